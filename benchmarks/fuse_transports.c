/* fuse_transports: one file served over the raw FUSE kernel protocol.
 *
 * A benchmark candidate for benchmarks/fuse_transports.py, not a product
 * part: no libfuse, the kernel protocol spoken directly so that the
 * transports Debian 12's libfuse 3.14 does not have can be measured. It
 * serves MOUNT_DIR/volume, the bytes of BACKING (read-only, or read-write
 * with --writable), over one of:
 *
 *   classic  N threads each read(2) a request from /dev/fuse and writev(2)
 *            the reply (what libfuse 3.14 does);
 *   uring    FUSE over io_uring (kernel 6.14+, fuse.enable_uring=Y): one
 *            queue per possible CPU, each a thread pinned to its CPU with
 *            its own io_uring; a request arrives as the completion of an
 *            IORING_OP_URING_CMD on /dev/fuse and its reply is committed
 *            with the command that fetches the next one. One classic
 *            thread stays for what the kernel still sends over read(2)
 *            (INIT, FORGET, INTERRUPT).
 *
 * --passthrough (either transport; kernel 6.9+, root): the backing file is
 * registered with FUSE_DEV_IOC_BACKING_OPEN and every OPEN of the volume
 * is answered with FOPEN_PASSTHROUGH, so its reads and writes go from the
 * kernel to the backing file without this process.
 *
 * The few parts of the kernel ABI newer than Debian 12's <linux/fuse.h>
 * (7.38) are declared here from the kernel's documented uapi (7.42):
 * the io_uring ring-entry header and command, FUSE_OVER_IO_URING,
 * FUSE_PASSTHROUGH and struct fuse_backing_map.
 *
 * usage: fuse_transports [--transport classic|uring] [--threads N]
 *            [--depth N] [--no-pin] [--passthrough] [--writable]
 *            [--fd FD [--resume]] BACKING MOUNT_DIR
 * --fd FD: serve a /dev/fuse descriptor mounted by whoever holds it
 * (inherited), answering its INIT; with --resume, one whose INIT a server
 * before this one answered (that server died: the mount is kept by the
 * holder). Prints "ready" on stdout once serving.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- kernel ABI 7.39 to 7.42, not in Debian 12's header ---------------- */
#define ABI_MINOR 42
#define F_PASSTHROUGH (1ULL << 37)     /* FUSE_PASSTHROUGH */
#define F_OVER_IO_URING (1ULL << 41)   /* FUSE_OVER_IO_URING */
#define F_OPEN_PASSTHROUGH (1U << 7)   /* FOPEN_PASSTHROUGH */
#define URING_HDR_SZ 128               /* FUSE_URING_IN_OUT_HEADER_SZ */
#define URING_OP_SZ 128                /* FUSE_URING_OP_IN_OUT_SZ */
#define URING_CMD_REGISTER 1
#define URING_CMD_COMMIT_AND_FETCH 2

struct init_out {                      /* struct fuse_init_out, 7.40+ */
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2, max_stack_depth;
    uint16_t request_timeout;
    uint16_t unused[11];
};

struct open_out {                      /* struct fuse_open_out, 7.39+ */
    uint64_t fh;
    uint32_t open_flags;
    int32_t backing_id;
};

struct backing_map {                   /* struct fuse_backing_map */
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define DEV_IOC_BACKING_OPEN _IOW(229, 1, struct backing_map)

struct ring_ent_in_out {               /* struct fuse_uring_ent_in_out */
    uint64_t flags;
    uint64_t commit_id;
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};

struct ring_header {                   /* struct fuse_uring_req_header */
    char in_out[URING_HDR_SZ];
    char op_in[URING_OP_SZ];
    struct ring_ent_in_out ent;
};

struct ring_cmd {                      /* struct fuse_uring_cmd_req */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

/* ---- the file system --------------------------------------------------- */
#define VOLUME_ID 2
#define VOLUME_NAME "volume"
#define MAX_WRITE (1024 * 1024)
#define MAX_PAGES (MAX_WRITE / 4096)
#define MAX_BACKGROUND 256
#define VALID_SECONDS 3600
/* A classic request: headers, then up to MAX_WRITE bytes of data. */
#define CLASSIC_BUF (MAX_WRITE + 4096)

static int fuse_fd = -1;
static int backing_fd = -1;
static uint64_t backing_size;
static int writable, passthrough, backing_id;
static const char *mount_dir;
/* Requests answered by each transport (printed when the server stops). */
static unsigned long served_classic, served_uring;

static void die(const char *what)
{
    fprintf(stderr, "fuse_transports: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fill_attr(uint64_t node, struct fuse_attr *attr)
{
    memset(attr, 0, sizeof(*attr));
    attr->ino = node;
    attr->nlink = 1;
    attr->blksize = 4096;
    if (node == FUSE_ROOT_ID) {
        attr->mode = S_IFDIR | 0755;
        attr->nlink = 2;
    } else {
        attr->mode = S_IFREG | (writable ? 0644 : 0444);
        attr->size = backing_size;
        attr->blocks = (backing_size + 511) / 512;
    }
}

/* Answer one request. ``op`` is its fixed per-opcode argument (op_len
 * bytes), ``data`` what follows it (a name, written bytes: data_len); the
 * reply body goes to ``out`` (at most ``room`` bytes). Returns the body's
 * length, a negative errno, or 1 << 30 for "no reply" (FORGET). */
#define NO_REPLY (1 << 30)
static int handle(const struct fuse_in_header *in, const void *op,
                  size_t op_len, const char *data, size_t data_len,
                  void *out, size_t room)
{
    switch (in->opcode) {
    case FUSE_LOOKUP: {
        struct fuse_entry_out *e = out;
        if (in->nodeid != FUSE_ROOT_ID || data_len != sizeof(VOLUME_NAME) ||
            memcmp(data, VOLUME_NAME, sizeof(VOLUME_NAME)))
            return -ENOENT;
        memset(e, 0, sizeof(*e));
        e->nodeid = VOLUME_ID;
        e->entry_valid = e->attr_valid = VALID_SECONDS;
        fill_attr(VOLUME_ID, &e->attr);
        return sizeof(*e);
    }
    case FUSE_GETATTR: {
        struct fuse_attr_out *a = out;
        if (in->nodeid != FUSE_ROOT_ID && in->nodeid != VOLUME_ID)
            return -ENOENT;
        memset(a, 0, sizeof(*a));
        a->attr_valid = VALID_SECONDS;
        fill_attr(in->nodeid, &a->attr);
        return sizeof(*a);
    }
    case FUSE_OPEN: {
        const struct fuse_open_in *o = op;
        struct open_out *r = out;
        if (op_len < sizeof(*o) || in->nodeid != VOLUME_ID)
            return -EISDIR;
        if ((o->flags & O_ACCMODE) != O_RDONLY && !writable)
            return -EROFS;
        memset(r, 0, sizeof(*r));
        if (passthrough) {
            r->open_flags = F_OPEN_PASSTHROUGH;
            r->backing_id = backing_id;
        }
        return sizeof(*r);
    }
    case FUSE_OPENDIR: {
        struct open_out *r = out;
        if (in->nodeid != FUSE_ROOT_ID)
            return -ENOTDIR;
        memset(r, 0, sizeof(*r));
        return sizeof(*r);
    }
    case FUSE_READ: {
        const struct fuse_read_in *r = op;
        size_t want, done = 0;
        if (op_len < sizeof(*r) || in->nodeid != VOLUME_ID)
            return -EINVAL;
        want = r->size < room ? r->size : room;
        while (done < want) {
            ssize_t n = pread(backing_fd, (char *)out + done, want - done,
                              r->offset + done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -errno;
            if (n == 0)
                break;          /* end of file: a short read */
            done += n;
        }
        return done;
    }
    case FUSE_WRITE: {
        const struct fuse_write_in *w = op;
        struct fuse_write_out *r = out;
        size_t done = 0;
        if (op_len < sizeof(*w) || in->nodeid != VOLUME_ID ||
            w->size > data_len)
            return -EINVAL;
        if (!writable)
            return -EROFS;
        if (w->offset >= backing_size || w->size > backing_size - w->offset)
            return -EFBIG;      /* the volume does not grow */
        while (done < w->size) {
            ssize_t n = pwrite(backing_fd, data + done, w->size - done,
                               w->offset + done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return n < 0 ? -errno : -EIO;
            done += n;
        }
        memset(r, 0, sizeof(*r));
        r->size = done;
        return sizeof(*r);
    }
    case FUSE_FSYNC:
        if (writable && fdatasync(backing_fd))
            return -errno;
        return 0;
    case FUSE_STATFS: {
        struct fuse_statfs_out *s = out;
        memset(s, 0, sizeof(*s));
        s->st.bsize = s->st.frsize = 4096;
        s->st.namelen = 255;
        s->st.blocks = (backing_size + 4095) / 4096;
        s->st.files = 2;
        return sizeof(*s);
    }
    case FUSE_DESTROY:
    case FUSE_READDIR:          /* an empty listing: only LOOKUP finds it */
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_FLUSH:
        return 0;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:        /* no request here waits long */
        return NO_REPLY;
    default:
        return -ENOSYS;
    }
}

/* The fixed argument's size of the opcodes that have data after it. */
static size_t op_size(uint32_t opcode)
{
    switch (opcode) {
    case FUSE_LOOKUP: return 0;
    case FUSE_WRITE: return sizeof(struct fuse_write_in);
    default: return (size_t)-1;  /* everything after the header */
    }
}

/* ---- INIT -------------------------------------------------------------- */
static int transport_uring;

static void reply_classic(uint64_t unique, int result, const void *body)
{
    struct fuse_out_header oh = {
        .len = sizeof(oh) + (result > 0 ? result : 0),
        .error = result < 0 ? result : 0, .unique = unique,
    };
    struct iovec iov[2] = {{&oh, sizeof(oh)},
                           {(void *)body, result > 0 ? result : 0}};
    if (writev(fuse_fd, iov, result > 0 ? 2 : 1) < 0 && errno != ENOENT)
        fprintf(stderr, "fuse_transports: writev: %s\n", strerror(errno));
}

static void answer_init(void)
{
    static char buf[CLASSIC_BUF];
    const struct fuse_in_header *in = (void *)buf;
    const struct fuse_init_in *ii = (void *)(in + 1);
    struct init_out io;
    uint64_t offered, want;
    ssize_t n;

    do
        n = read(fuse_fd, buf, sizeof(buf));
    while (n < 0 && errno == EINTR);
    if (n < (ssize_t)(sizeof(*in) + 16) || in->opcode != FUSE_INIT)
        die("reading FUSE_INIT");
    offered = ii->flags;
    if (ii->flags & FUSE_INIT_EXT)
        offered |= (uint64_t)ii->flags2 << 32;
    want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO |
           FUSE_MAX_PAGES | FUSE_PARALLEL_DIROPS | FUSE_INIT_EXT;
    if (passthrough) {
        if (!(offered & F_PASSTHROUGH)) {
            errno = EOPNOTSUPP;
            die("the kernel offers no FUSE_PASSTHROUGH");
        }
        want |= F_PASSTHROUGH;
    }
    if (transport_uring) {
        if (!(offered & F_OVER_IO_URING)) {
            errno = EOPNOTSUPP;
            die("the kernel offers no FUSE_OVER_IO_URING "
                "(fuse.enable_uring=N?)");
        }
        want |= F_OVER_IO_URING;
    }
    want &= offered;
    memset(&io, 0, sizeof(io));
    io.major = FUSE_KERNEL_VERSION;
    io.minor = ABI_MINOR;
    io.max_readahead = ii->max_readahead;
    io.flags = (uint32_t)want;
    io.flags2 = (uint32_t)(want >> 32);
    io.max_background = MAX_BACKGROUND;
    io.congestion_threshold = MAX_BACKGROUND * 3 / 4;
    io.max_write = MAX_WRITE;
    io.time_gran = 1;
    io.max_pages = MAX_PAGES;
    io.max_stack_depth = passthrough ? 1 : 0;
    reply_classic(in->unique, sizeof(io), &io);
}

/* FUSE_NOTIFY_RESEND (7.40): the kernel queues again every request a
 * server had read and not answered (classic /dev/fuse only: see the
 * benchmark's hand-over test for the io_uring queues). */
#define NOTIFY_RESEND 7
static void notify_resend(void)
{
    struct fuse_out_header oh = {.len = sizeof(oh), .error = NOTIFY_RESEND};
    if (write(fuse_fd, &oh, sizeof(oh)) < 0)
        fprintf(stderr, "fuse_transports: FUSE_NOTIFY_RESEND: %s\n",
                strerror(errno));
}

/* ---- classic transport ------------------------------------------------- */
static void *classic_thread(void *arg)
{
    char *buf = malloc(CLASSIC_BUF);
    char *out = malloc(MAX_WRITE);

    if (!buf || !out)
        die("malloc");
    for (;;) {
        const struct fuse_in_header *in = (void *)buf;
        ssize_t n = read(fuse_fd, buf, CLASSIC_BUF);
        size_t rest, fixed;
        const char *op;
        int result;

        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue;
            if (errno == ENODEV)    /* unmounted */
                return NULL;
            die("read /dev/fuse");
        }
        if ((size_t)n < sizeof(*in) || in->len != (size_t)n)
            continue;       /* not a request this server can parse */
        op = (const char *)(in + 1);
        rest = n - sizeof(*in);
        fixed = op_size(in->opcode);
        if (fixed > rest)
            fixed = rest;
        result = handle(in, op, fixed, op + fixed, rest - fixed, out,
                        MAX_WRITE);
        __atomic_add_fetch(&served_classic, 1, __ATOMIC_RELAXED);
        if (result != NO_REPLY)
            reply_classic(in->unique, result, out);
        if (in->opcode == FUSE_DESTROY)
            return NULL;
    }
}

/* ---- io_uring transport ------------------------------------------------ */
struct entry {
    struct ring_header header;
    struct iovec iov[2];
    char *payload;
    int qid;
};

static int queue_depth = 16;
static int pin = 1;             /* each queue's thread on its CPU */
static size_t payload_size;

static void prep_cmd(struct io_uring *ring, struct entry *e, int cmd_op,
                     uint64_t commit_id)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    struct ring_cmd *cmd;

    if (!sqe) {
        io_uring_submit(ring);
        sqe = io_uring_get_sqe(ring);
        if (!sqe)
            die("io_uring_get_sqe");
    }
    memset(sqe, 0, 128);        /* an SQE128: the command is in its tail */
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = cmd_op;
    if (cmd_op == URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    cmd = (struct ring_cmd *)sqe->cmd;
    cmd->commit_id = commit_id;
    cmd->qid = e->qid;
    io_uring_sqe_set_data(sqe, e);
}

static void uring_handle(struct entry *e)
{
    struct fuse_in_header in;
    struct fuse_out_header *oh = (void *)e->header.in_out;
    size_t data_len = e->header.ent.payload_sz;
    int result;

    memcpy(&in, e->header.in_out, sizeof(in));
    if (data_len > payload_size)
        data_len = 0;           /* never past the buffer */
    /* The kernel puts the fixed argument in op_in, the rest (a name,
     * written bytes) in the payload; the reply body goes to the payload. */
    if (in.opcode == FUSE_WRITE) {
        /* The reply overwrites the payload: a small body, written after
         * the data has been used. */
        struct fuse_write_out wo;
        result = handle(&in, e->header.op_in, URING_OP_SZ, e->payload,
                        data_len, &wo, sizeof(wo));
        if (result > 0)
            memcpy(e->payload, &wo, result);
    } else {
        char name[256];
        size_t name_len = data_len < sizeof(name) ? data_len : 0;
        memcpy(name, e->payload, name_len);
        result = handle(&in, e->header.op_in, URING_OP_SZ, name, name_len,
                        e->payload, payload_size);
    }
    memset(oh, 0, sizeof(*oh));
    oh->unique = in.unique;
    oh->error = result < 0 && result != NO_REPLY ? result : 0;
    e->header.ent.payload_sz = result > 0 && result != NO_REPLY ? result : 0;
    oh->len = sizeof(*oh) + e->header.ent.payload_sz;
}

static void *uring_thread(void *arg)
{
    int qid = (int)(intptr_t)arg;
    struct io_uring ring;
    struct io_uring_params params;
    struct entry *entries;
    cpu_set_t cpus;
    int i, err;

    CPU_ZERO(&cpus);
    CPU_SET(qid, &cpus);
    if (pin)
        pthread_setaffinity_np(pthread_self(), sizeof(cpus), &cpus);
    memset(&params, 0, sizeof(params));
    params.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER |
                   IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN;
    err = io_uring_queue_init_params(queue_depth * 2, &ring, &params);
    if (err) {
        errno = -err;
        die("io_uring_queue_init");
    }
    entries = calloc(queue_depth, sizeof(*entries));
    if (!entries)
        die("calloc");
    for (i = 0; i < queue_depth; i++) {
        struct entry *e = &entries[i];
        e->qid = qid;
        e->payload = aligned_alloc(4096, payload_size);
        if (!e->payload)
            die("aligned_alloc");
        e->iov[0].iov_base = &e->header;
        e->iov[0].iov_len = sizeof(e->header);
        e->iov[1].iov_base = e->payload;
        e->iov[1].iov_len = payload_size;
        prep_cmd(&ring, e, URING_CMD_REGISTER, 0);
    }
    for (;;) {
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;

        err = io_uring_submit_and_wait(&ring, 1);
        if (err < 0 && err != -EINTR) {
            errno = -err;
            die("io_uring_submit_and_wait");
        }
        io_uring_for_each_cqe(&ring, head, cqe) {
            struct entry *e = io_uring_cqe_get_data(cqe);
            seen++;
            if (cqe->res < 0) {
                /* ENOTCONN/ENODEV: unmounted or aborted; else a bug. */
                if (cqe->res != -ENOTCONN && cqe->res != -ENODEV &&
                    cqe->res != -ECANCELED)
                    fprintf(stderr, "fuse_transports: queue %d: %s\n",
                            qid, strerror(-cqe->res));
                return NULL;
            }
            uring_handle(e);
            __atomic_add_fetch(&served_uring, 1, __ATOMIC_RELAXED);
            prep_cmd(&ring, e, URING_CMD_COMMIT_AND_FETCH,
                     e->header.ent.commit_id);
        }
        io_uring_cq_advance(&ring, seen);
    }
}

/* ---- start ------------------------------------------------------------- */
static void mount_fs(void)
{
    char opts[256];

    fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0)
        die("open /dev/fuse");
    snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,"
             "group_id=0,allow_other", fuse_fd);
    if (mount("fuse_transports", mount_dir, "fuse.fuse_transports",
              MS_NOSUID | MS_NODEV, opts))
        die("mount");
}

static void print_served(void)
{
    char line[128];
    int n = snprintf(line, sizeof(line), "served classic=%lu uring=%lu\n",
                     served_classic, served_uring);
    if (write(STDOUT_FILENO, line, n) < 0)
        return;
}

static void on_signal(int signum)
{
    print_served();
    if (mount_dir)
        umount2(mount_dir, MNT_DETACH);
    _exit(0);
}

static void usage(void)
{
    fprintf(stderr, "usage: fuse_transports [--transport classic|uring] "
            "[--threads N] [--depth N] [--no-pin] [--passthrough] "
            "[--writable] [--fd FD [--resume]] BACKING MOUNT_DIR\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int threads = 4, i, inherited = -1, queues, resume = 0;
    pthread_t classic[64];
    struct stat st;

    for (i = 1; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--transport") && i + 1 < argc) {
            i++;
            if (!strcmp(argv[i], "uring"))
                transport_uring = 1;
            else if (strcmp(argv[i], "classic"))
                usage();
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--depth") && i + 1 < argc) {
            queue_depth = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--fd") && i + 1 < argc) {
            inherited = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--no-pin")) {
            pin = 0;
        } else if (!strcmp(argv[i], "--resume")) {
            resume = 1;
        } else if (!strcmp(argv[i], "--passthrough")) {
            passthrough = 1;
        } else if (!strcmp(argv[i], "--writable")) {
            writable = 1;
        } else {
            usage();
        }
    }
    if (argc - i != 2 || threads < 1 || threads > 64 || queue_depth < 1 ||
        queue_depth > 1024)
        usage();
    backing_fd = open(argv[i], (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (backing_fd < 0 || fstat(backing_fd, &st))
        die(argv[i]);
    backing_size = st.st_size;
    payload_size = MAX_WRITE;

    if (inherited >= 0) {
        /* Mounted by whoever holds the descriptor; a replacement (--resume)
         * has the kernel send again what the dead server had read. */
        fuse_fd = inherited;
        if (resume)
            notify_resend();
        else
            answer_init();
    } else {
        mount_dir = argv[i + 1];
        mount_fs();
        signal(SIGTERM, on_signal);
        signal(SIGINT, on_signal);
        answer_init();
    }
    if (passthrough) {
        struct backing_map map = {.fd = backing_fd};
        backing_id = ioctl(fuse_fd, DEV_IOC_BACKING_OPEN, &map);
        if (backing_id <= 0)
            die("FUSE_DEV_IOC_BACKING_OPEN");
    }
    queues = transport_uring ? get_nprocs_conf() : 0;
    for (i = 0; i < queues; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, uring_thread, (void *)(intptr_t)i))
            die("pthread_create");
        pthread_detach(t);
    }
    if (transport_uring)
        threads = 1;    /* only what the kernel still sends by read(2) */
    for (i = 0; i < threads; i++)
        if (pthread_create(&classic[i], NULL, classic_thread, NULL))
            die("pthread_create");
    printf("ready\n");
    fflush(stdout);
    for (i = 0; i < threads; i++)
        pthread_join(classic[i], NULL);
    print_served();
    return 0;
}
