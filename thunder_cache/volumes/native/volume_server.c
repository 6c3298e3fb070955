/* thunder-volume-server: the peer mode's volume files, served in C.
 *
 * The same filesystem as thunder_cache/volumes/fusefs.py (one raw file per
 * volume, <mount>/<volume id>) on libfuse 3, reading and writing the same
 * files:
 * each volume's copy-on-write layer (<layers>/<id>/data, bitmap and
 * volume.json, see thunder_cache/volumes/cow.py and volumes.py) over the node
 * cache of its image (<cache>/<image id>/data and chunkmap, see
 * thunder_cache/cache/image_cache.py and chunkmap.py).
 *
 * Present chunks are read straight from the image's data file. Which
 * chunks may be read is only ever learnt from thunder-cache: the
 * "ensure_chunks" request on its control socket makes the chunks a read
 * needs present (fetching them if need be) and answers the image's whole
 * map of usable chunks (verified by this daemon run), which is kept (only
 * the chunks asked for while it records the image's reads for a boot
 * trace: "observed"). While
 * thunder-cache is unreachable a missing chunk waits for it, up to
 * --fetch-wait seconds, then the read fails with EIO; present chunks and
 * the layers are served all the while.
 *
 * Layer bits: as in cow.py, a write sets its blocks' bits in memory pages
 * after the data is written; fsync (and more than MAX_DIRTY_PAGES held
 * pages) writes them: fdatasync data, then the pages, then fdatasync the
 * bitmap. A bit on disk names a block whose bytes reached the disk first.
 *
 * thunder-cache creates, grows, copies and deletes layers itself; it asks
 * this server first on the --listen socket (one text line each way):
 *   PING                 -> OK <pid>
 *   HOLD <volume id>     -> OK <open count>: the volume's I/O waits, its
 *                           pages are flushed and its files closed until
 *                           RELEASE (or the connection closes); then the
 *                           files are opened again (a new size is seen)
 *                           and OK 0 answers the RELEASE
 *   UNHOLD <volume id>   -> OK 0: a hold whose server died is over (see
 *                           wait_unheld)
 *   FORGET <volume id>   -> OK 0, or ERR EBUSY while the file is open
 *   REVERIFY             -> OK <images>: a new thunder-cache runs; every
 *                           map of usable chunks is dropped (see
 *                           reverify_all)
 *   anything else        -> ERR EINVAL <why>
 *
 * The process started is the holder (see hold): it mounts, answers the
 * kernel's INIT, binds --listen, then runs the server (this binary with
 * --server and the descriptors) and starts a new one whenever it dies;
 * SIGHUP makes it exec the binary now installed (an upgrade). A server
 * takes the mount over (see serve): node ids are hashes of the volume
 * ids, file handles slots of a shared table, bits not yet in a bitmap in
 * shared files (all in --state-dir), and requests the dead server had
 * read are sent again by the kernel (FUSE_NOTIFY_RESEND).
 *
 * usage: thunder-volume-server --layers DIR --cache DIR --control SOCK
 *            --listen SOCK [--fetch-wait SECONDS] [--gid GROUP]
 *            [--allow-other] [--no-splice] [--pid-file FILE]
 *            [--state-dir DIR] MOUNT_DIR
 * (GROUP: a name or a number; it owns the volume files, mode 0660;
 * --state-dir: default the --listen path followed by ".state").
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define BLOCK 4096
#define PAGE 4096
#define BITS_OFFSET 4096
#define MAX_DIRTY_PAGES 64
#define MAX_ID 128
#define MAX_ENSURE 64           /* chunks per ensure_chunks request */
#define CMAP_HEADER 68

static const char *layers_dir, *cache_dir, *control_path, *listen_path;
static const char *mount_point, *pid_file;
static char self_exe[PATH_MAX];    /* this binary's path: see main */
static char state_dir[PATH_MAX];   /* --state-dir: see shadow_open */
static double fetch_wait = 60.0;
static gid_t file_gid;
static int use_splice = 1;         /* --no-splice: copy replies instead */
static time_t started;

static void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "thunder-volume-server: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int valid_id(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > MAX_ID || !isalnum((unsigned char)s[0]))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("_.-", s[i]))
            return 0;
    return 1;
}

/* A volume's node id: its id's FNV-1a hash, the same in every server of
 * a mount (the kernel keeps the node ids a previous one gave it). */
static uint64_t ino_of(const char *id)
{
    uint64_t h = 14695981039346656037ULL;
    for (; *id; id++)
        h = (h ^ (unsigned char)*id) * 1099511628211ULL;
    return h < 2 ? h + 2 : h;     /* 0: none, 1: the root */
}

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3];
}

static int pread_full(int fd, void *buf, size_t len, off_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, off + done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        done += n;
    }
    return 0;
}

static int pwrite_full(int fd, const void *buf, size_t len, off_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done,
                           off + done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += n;
    }
    return 0;
}

/* -- images --------------------------------------------------------------- */

struct image {
    char id[MAX_ID + 1];
    int fd;
    off_t size, chunk;
    long chunks;
    unsigned char *usable;      /* per chunk: 1 once thunder-cache said so */
    int refs;                   /* volumes loaded over it */
    struct image *next;
};

static struct image *images;
static pthread_mutex_t images_mu = PTHREAD_MUTEX_INITIALIZER;
/* Bumped by REVERIFY (under images_mu): an ensure_chunks answer asked for
 * before is not applied (it may come from the daemon run before). */
static unsigned long maps_generation;

/* The image's cache files: data, and the chunk map's header for sizes. */
static struct image *image_get(const char *id)
{
    pthread_mutex_lock(&images_mu);
    struct image *img;
    for (img = images; img; img = img->next)
        if (strcmp(img->id, id) == 0) {
            img->refs++;
            goto out;
        }
    char path[PATH_MAX];
    unsigned char head[CMAP_HEADER];
    snprintf(path, sizeof(path), "%s/%s/chunkmap", cache_dir, id);
    int mfd = open(path, O_RDONLY | O_CLOEXEC);
    if (mfd < 0) {
        logmsg("image %s: %s: %s", id, path, strerror(errno));
        goto out;
    }
    int rc = pread_full(mfd, head, sizeof(head), 0);
    close(mfd);
    if (rc || memcmp(head, "VMTHCMAP", 8) ||
        be32(head + 64) != (uint32_t)crc32(0, head, 64)) {
        logmsg("image %s: %s is not a chunk map", id, path);
        goto out;
    }
    img = calloc(1, sizeof(*img));
    if (!img)
        goto out;
    strcpy(img->id, id);
    img->chunk = be32(head + 12);
    img->size = (off_t)be64(head + 16);
    img->chunks = (long)be64(head + 24);
    snprintf(path, sizeof(path), "%s/%s/data", cache_dir, id);
    img->fd = open(path, O_RDONLY | O_CLOEXEC);
    img->usable = calloc(img->chunks + 1, 1);
    if (img->fd < 0 || !img->usable || img->chunk <= 0 ||
        img->chunks != (img->size + img->chunk - 1) / img->chunk) {
        logmsg("image %s: cannot open its cache (%s)", id, path);
        if (img->fd >= 0)
            close(img->fd);
        free(img->usable);
        free(img);
        img = NULL;
        goto out;
    }
    img->refs = 1;
    img->next = images;
    images = img;
out:
    pthread_mutex_unlock(&images_mu);
    return img;
}

/* A volume no longer reads img: the last one closes its cache file (so
 * that an image thunder-cache evicts frees its space). */
static void image_put(struct image *img)
{
    pthread_mutex_lock(&images_mu);
    if (--img->refs == 0) {
        struct image **pp = &images;
        while (*pp != img)
            pp = &(*pp)->next;
        *pp = img->next;
        close(img->fd);
        free(img->usable);
        free(img);
    }
    pthread_mutex_unlock(&images_mu);
}

/* Connections to thunder-cache's control socket kept for the next
 * request (a few: the daemon serves a limited number at once). */
#define POOL 16
static int pool_fds[POOL], pool_n;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;

static int pool_get(void)
{
    pthread_mutex_lock(&pool_mu);
    int fd = pool_n ? pool_fds[--pool_n] : -1;
    pthread_mutex_unlock(&pool_mu);
    return fd;
}

static void pool_put(int fd)
{
    pthread_mutex_lock(&pool_mu);
    if (pool_n < POOL) {
        pool_fds[pool_n++] = fd;
        fd = -1;
    }
    pthread_mutex_unlock(&pool_mu);
    if (fd >= 0)
        close(fd);
}

static int control_connect(void)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, control_path, sizeof(sa.sun_path) - 1);
    struct timeval tv = {.tv_sec = 600};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The answer line to line on fd (malloc'ed, NUL-terminated), or NULL. */
static char *exchange(int fd, const char *line)
{
    if (send(fd, line, strlen(line), MSG_NOSIGNAL) != (ssize_t)strlen(line))
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (len + 1 >= cap) {
            char *bigger = realloc(buf, cap * 2);
            if (!bigger)
                break;
            buf = bigger;
            cap *= 2;
        }
        ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += n;
        if (buf[len - 1] == '\n') {
            buf[len] = 0;
            return buf;
        }
    }
    free(buf);
    return NULL;
}

/* One request line to thunder-cache's control socket; the answer in *out
 * (malloc'ed). 0, or -EAGAIN when it cannot be reached. A kept
 * connection the daemon closed meanwhile is replaced by a new one. */
static int control_call(const char *line, char **out)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        int fd = attempt ? -1 : pool_get();
        int pooled = fd >= 0;
        if (!pooled && (fd = control_connect()) < 0)
            return -EAGAIN;
        char *answer = exchange(fd, line);
        if (answer) {
            pool_put(fd);
            *out = answer;
            return 0;
        }
        close(fd);
        if (!pooled)
            return -EAGAIN;     /* the daemon went away mid-answer */
    }
    return -EAGAIN;
}

/* Ask thunder-cache for chunks [first, last] of img; learn its map. */
static int ensure_chunks(struct image *img, long first, long last)
{
    char req[512];
    snprintf(req, sizeof(req), "{\"first\":%ld,\"image_id\":\"%s\","
             "\"last\":%ld,\"op\":\"ensure_chunks\"}\n", first, img->id, last);
    double deadline = now() + fetch_wait, pause = 0.05;
    int logged = 0;
    for (;;) {
        char *answer = NULL;
        unsigned long gen = __atomic_load_n(&maps_generation,
                                            __ATOMIC_ACQUIRE);
        int rc = control_call(req, &answer);
        if (rc == 0 && strstr(answer, "\"error\":\"Busy\"")) {
            free(answer);       /* too many connections: as unreachable */
            rc = -EAGAIN;
        }
        if (rc == 0) {
            const char *key = "\"usable\":\"";
            char *u = strstr(answer, key);
            if (strncmp(answer, "{\"ok\":true,", 11) || !u) {
                logmsg("image %s: chunks %ld-%ld: %.300s", img->id, first,
                       last, answer);
                free(answer);
                return -EIO;
            }
            u += strlen(key);
            long n = 0;
            while (n < img->chunks && (u[n] == '0' || u[n] == '1'))
                n++;
            if (n != img->chunks || u[n] != '"') {
                logmsg("image %s: bad map in the answer", img->id);
                free(answer);
                return -EIO;
            }
            /* While thunder-cache records the image's reads (a boot
             * trace), learn only the chunks asked for: each other one is
             * asked for (and so recorded) the first time it is read. */
            long from = 0, to = n - 1;
            if (strstr(answer, "\"observed\":true")) {
                from = first;
                to = last;
            }
            pthread_mutex_lock(&images_mu);
            int stale = gen != maps_generation;
            for (long i = from; i <= to && !stale; i++)
                if (u[i] == '1')
                    __atomic_store_n(&img->usable[i], 1, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&images_mu);
            free(answer);
            if (stale)
                continue;       /* asked before a REVERIFY: ask again */
            for (long i = first; i <= last; i++)
                if (!__atomic_load_n(&img->usable[i], __ATOMIC_ACQUIRE))
                    return -EIO;
            if (logged)
                logmsg("image %s: thunder-cache answers again", img->id);
            return 0;
        }
        if (now() + pause > deadline) {
            logmsg("image %s: chunks %ld-%ld: thunder-cache at %s "
                   "unreachable, giving up", img->id, first, last,
                   control_path);
            return -EIO;
        }
        if (!logged++)
            logmsg("image %s: thunder-cache at %s unreachable; waiting up "
                   "to %.0f s", img->id, control_path, fetch_wait);
        usleep((useconds_t)(pause * 1e6));
        if (pause < 0.5)
            pause *= 2;
    }
}

/* Make the chunks under [off, off+len) of the image readable from its
 * data file; how many of the len bytes lie inside the image (the rest
 * reads zeros), or -errno. */
static ssize_t image_ensure(struct image *img, size_t len, off_t off)
{
    size_t inside = 0;
    if (img && off < img->size)
        inside = (off + (off_t)len <= img->size) ? len
                                                 : (size_t)(img->size - off);
    if (!inside)
        return 0;
    long first = off / img->chunk, last = (off + inside - 1) / img->chunk;
    for (long c = first; c <= last; c++) {
        if (__atomic_load_n(&img->usable[c], __ATOMIC_ACQUIRE))
            continue;
        long end = c;
        while (end < last && end - c + 1 < MAX_ENSURE &&
               !__atomic_load_n(&img->usable[end + 1], __ATOMIC_ACQUIRE))
            end++;
        int rc = ensure_chunks(img, c, end);
        if (rc)
            return rc;
        c = end;
    }
    return (ssize_t)inside;
}

/* len bytes of the image at off; zeros past its end. */
static int image_read(struct image *img, char *buf, size_t len, off_t off)
{
    ssize_t inside = image_ensure(img, len, off);
    if (inside < 0)
        return (int)inside;
    memset(buf + inside, 0, len - inside);
    return inside ? pread_full(img->fd, buf, inside, off) : 0;
}

/* -- volumes -------------------------------------------------------------- */

struct volume {
    char id[MAX_ID + 1];
    uint64_t ino;               /* its node id, from its id: see ino_of */
    int data_fd, bm_fd;         /* -1 while held */
    off_t size;
    int read_only, gone, open;  /* open: the layer's files are */
    struct image *img;          /* NULL: a blank volume */
    unsigned char *bits;        /* the bits as written: see shadow_open */
    size_t bits_len, bits_map;
    unsigned char *dirty;       /* per page of bits: not in the file yet */
    long *held;                 /* the dirty pages' indices */
    long nheld;
    pthread_mutex_t mu;         /* bits, dirty pages */
    pthread_mutex_t flush_mu;
    pthread_rwlock_t hold;      /* I/O: read lock; HOLD: write lock */
    struct volume *next;
};

static struct volume *volumes, *forgotten;
static pthread_mutex_t volumes_mu = PTHREAD_MUTEX_INITIALIZER;

/* The value after "key": in a flat JSON object (json.dumps sort_keys). */
static const char *json_value(const char *json, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\":", key);
    const char *p = strstr(json, pat);
    if (!p)
        return NULL;
    p += strlen(pat);
    while (*p == ' ')
        p++;
    return p;
}

static int json_string(const char *v, char *out, size_t cap)
{
    if (!v || *v != '"')
        return -1;
    const char *end = strchr(v + 1, '"');
    if (!end || (size_t)(end - v - 1) >= cap)
        return -1;
    memcpy(out, v + 1, end - v - 1);
    out[end - v - 1] = 0;
    return 0;
}

/* volume.json: size, image_id, read_only (all checked). */
static int read_meta(struct volume *v, char *image_id)
{
    char path[PATH_MAX], buf[65536];
    snprintf(path, sizeof(path), "%s/%s/volume.json", layers_dir, v->id);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -ENOENT;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -EIO;
    buf[n] = 0;
    char id[MAX_ID + 1];
    const char *size = json_value(buf, "size");
    const char *ro = json_value(buf, "read_only");
    const char *img = json_value(buf, "image_id");
    if (json_string(json_value(buf, "id"), id, sizeof(id)) ||
        strcmp(id, v->id) || !size || !isdigit((unsigned char)*size) ||
        !ro || !img)
        return -EIO;
    v->size = strtoll(size, NULL, 10);
    v->read_only = strncmp(ro, "true", 4) == 0;
    image_id[0] = 0;
    if (strncmp(img, "null", 4) && (json_string(img, image_id, MAX_ID + 1) ||
                                    !valid_id(image_id)))
        return -EIO;
    return 0;
}

/* The shadow of a layer's bitmap: <state>/<volume id>.bits, mapped
 * shared, holding the bits as written (those not yet in the bitmap file
 * too). A server killed between a write and the flush of its bit leaves
 * the bit there, and the next server, which takes over the mount, adopts
 * it: the kernel had been told the write was done, so the block must read
 * as written. Never read after a reboot: the holder empties the state
 * directory whenever it mounts afresh (see hold_mount). */
static int shadow_path(struct volume *v, char *path, size_t cap)
{
    return snprintf(path, cap, "%s/%s.bits", state_dir, v->id) >= (int)cap;
}

/* Map the shadow, adopting one left by a previous server of this mount;
 * the bitmap file's bits (bm, bits_len bytes) are folded in. The pages
 * where the two differ are dirty: they go to the file at the next flush. */
static int shadow_open(struct volume *v, const unsigned char *bm)
{
    char path[PATH_MAX];
    struct stat st;
    if (shadow_path(v, path, sizeof(path)))
        return -ENAMETOOLONG;
    long npages = (v->bits_len + PAGE - 1) / PAGE;
    v->bits_map = npages * PAGE;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 || fstat(fd, &st)) {
        logmsg("volume %s: %s: %s", v->id, path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -EIO;
    }
    int adopt = (size_t)st.st_size == v->bits_map;
    if (!adopt && (ftruncate(fd, 0) || ftruncate(fd, v->bits_map))) {
        close(fd);
        return -EIO;
    }
    v->bits = mmap(NULL, v->bits_map, PROT_READ | PROT_WRITE, MAP_SHARED,
                   fd, 0);
    close(fd);
    if (v->bits == MAP_FAILED) {
        v->bits = NULL;
        return -EIO;
    }
    long adopted = 0;
    for (long p = 0; p < npages; p++) {
        size_t n = v->bits_len - p * PAGE;
        n = n < PAGE ? n : PAGE;
        unsigned char *mine = v->bits + p * PAGE;
        if (!adopt) {
            memcpy(mine, bm + p * PAGE, n);
            continue;
        }
        int differs = 0;
        for (size_t i = 0; i < n; i++) {
            mine[i] |= bm[p * PAGE + i];
            differs |= mine[i] != bm[p * PAGE + i];
        }
        if (differs) {
            v->dirty[p] = 1;
            v->held[v->nheld++] = p;
            adopted++;
        }
    }
    if (adopted)
        logmsg("volume %s: %ld bitmap pages taken over from the previous "
               "server", v->id, adopted);
    return 0;
}

/* Close the layer's files. keep_data: all but the data file, whose inode
 * never changes (cow.py grows it in place), and the image, which replies
 * being spliced to the kernel may still read. Callers flush first: the
 * shadow (bits not flushed) goes. */
static void layer_close(struct volume *v, int keep_data)
{
    char path[PATH_MAX];
    if (v->bits) {
        munmap(v->bits, v->bits_map);
        if (!shadow_path(v, path, sizeof(path)))
            unlink(path);
    }
    v->bits = NULL;
    if (v->data_fd >= 0 && !keep_data) {
        close(v->data_fd);
        v->data_fd = -1;
    }
    if (v->bm_fd >= 0)
        close(v->bm_fd);
    v->bm_fd = -1;
    v->open = 0;
    if (!keep_data && v->img) {
        image_put(v->img);
        v->img = NULL;
    }
    v->nheld = 0;
    free(v->dirty);
    free(v->held);
    v->dirty = NULL;
    v->held = NULL;
}

/* Open the layer's files and check its bitmap as cow.py does. */
static int layer_open(struct volume *v)
{
    char path[PATH_MAX], image_id[MAX_ID + 1];
    int rc = read_meta(v, image_id);
    if (rc)
        return rc;
    snprintf(path, sizeof(path), "%s/%s/data", layers_dir, v->id);
    if (v->data_fd < 0)
        v->data_fd = open(path, O_RDWR | O_CLOEXEC);
    snprintf(path, sizeof(path), "%s/%s/bitmap", layers_dir, v->id);
    v->bm_fd = open(path, O_RDWR | O_CLOEXEC);
    unsigned char head[36];
    struct stat st;
    if (v->data_fd < 0 || v->bm_fd < 0 || pread_full(v->bm_fd, head, 36, 0) ||
        fstat(v->bm_fd, &st)) {
        logmsg("volume %s: cannot open its layer", v->id);
        goto bad;
    }
    off_t size = (off_t)be64(head + 16);
    uint64_t blocks = (size + BLOCK - 1) / BLOCK;
    v->bits_len = (blocks + 7) / 8;
    if (memcmp(head, "VMTHCOWB", 8) || head[8] || head[9] != 1 ||
        be32(head + 12) != BLOCK || be64(head + 24) != blocks ||
        be32(head + 32) != (uint32_t)crc32(0, head, 32) || size <= 0 ||
        (size_t)st.st_size != BITS_OFFSET + v->bits_len ||
        fstat(v->data_fd, &st) || st.st_size < size) {
        logmsg("volume %s: torn or foreign bitmap", v->id);
        goto bad;
    }
    v->size = size;             /* the layer's size wins, as in volumes.py */
    size_t map_len = BITS_OFFSET + v->bits_len;
    unsigned char *map = mmap(NULL, map_len, PROT_READ, MAP_SHARED,
                              v->bm_fd, 0);
    long npages = (v->bits_len + PAGE - 1) / PAGE;
    v->dirty = calloc(npages, 1);
    v->held = calloc(npages, sizeof(*v->held));
    rc = (map == MAP_FAILED || !v->dirty || !v->held) ? -EIO
        : shadow_open(v, map + BITS_OFFSET);
    if (map != MAP_FAILED)
        munmap(map, map_len);
    if (rc)
        goto bad;
    /* A volume's image never changes: kept across holds. */
    if (image_id[0] && !v->img && !(v->img = image_get(image_id)))
        goto bad;
    v->open = 1;
    return 0;
bad:
    layer_close(v, 0);
    return -EIO;
}

/* <state>/<id>.held exists while thunder-cache holds the volume (see
 * hold_volume): a server that died during a hold leaves it, and the next
 * one does not open that layer, which thunder-cache may still be
 * changing, until thunder-cache says it is done (UNHOLD) or HOLD_WAIT
 * seconds have passed. */
#define HOLD_WAIT 300

static int held_path(const char *id, char *path, size_t cap)
{
    return snprintf(path, cap, "%s/%s.held", state_dir, id) >= (int)cap;
}

static void wait_unheld(const char *id)
{
    char path[PATH_MAX];
    if (held_path(id, path, sizeof(path)) || access(path, F_OK))
        return;
    logmsg("volume %s: held by thunder-cache when the previous server died; "
           "waiting for it (up to %d s)", id, HOLD_WAIT);
    for (double end = now() + HOLD_WAIT; access(path, F_OK) == 0;) {
        if (now() > end) {
            logmsg("volume %s: no UNHOLD from thunder-cache: serving it",
                   id);
            unlink(path);
            return;
        }
        usleep(10000);
    }
    logmsg("volume %s: released", id);
}

/* The volume named id, its layer opened on first use; NULL: ENOENT. */
static struct volume *volume_get(const char *id, int *err)
{
    *err = -ENOENT;
    if (!valid_id(id))
        return NULL;
    pthread_mutex_lock(&volumes_mu);
    struct volume *v;
    for (v = volumes; v; v = v->next)
        if (strcmp(v->id, id) == 0)
            goto out;
    pthread_mutex_unlock(&volumes_mu);
    wait_unheld(id);            /* before its first load only */
    pthread_mutex_lock(&volumes_mu);
    for (v = volumes; v; v = v->next)
        if (strcmp(v->id, id) == 0)
            goto out;
    v = calloc(1, sizeof(*v));
    if (!v) {
        *err = -ENOMEM;
        goto out;
    }
    strcpy(v->id, id);
    v->ino = ino_of(id);
    v->data_fd = v->bm_fd = -1;
    int rc = layer_open(v);
    if (rc) {
        *err = rc;
        free(v);
        v = NULL;
        goto out;
    }
    pthread_mutex_init(&v->mu, NULL);
    pthread_mutex_init(&v->flush_mu, NULL);
    /* A HOLD must not wait behind an endless stream of reads. */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr,
                                  PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&v->hold, &attr);
    pthread_rwlockattr_destroy(&attr);
    v->next = volumes;
    volumes = v;
out:
    pthread_mutex_unlock(&volumes_mu);
    return v;
}

/* Bit of block b; caller holds v->mu. */
static int bit_set(struct volume *v, uint64_t b)
{
    return v->bits[b >> 3] >> (b & 7) & 1;
}

/* Page p of the bits is to be written at the next flush; holds v->mu. */
static void page_dirty(struct volume *v, long p)
{
    if (!v->dirty[p]) {
        v->dirty[p] = 1;
        v->held[v->nheld++] = p;
    }
}

/* Set the bits of blocks [first, stop); caller holds v->mu. */
static int mark(struct volume *v, uint64_t first, uint64_t stop)
{
    for (uint64_t b = first; b < stop; b++) {
        v->bits[b >> 3] |= 1 << (b & 7);
        page_dirty(v, (b >> 3) / PAGE);
    }
    return 0;
}

/* Data, then the changed pages of the bitmap, each made durable. */
static int layer_flush(struct volume *v)
{
    pthread_mutex_lock(&v->flush_mu);
    pthread_mutex_lock(&v->mu);
    long n = v->nheld, *which = malloc((n + 1) * sizeof(long));
    unsigned char *copy = malloc((size_t)(n + 1) * PAGE);
    int rc = (which && copy) ? 0 : -ENOMEM;
    for (long i = 0; !rc && i < n; i++) {
        long p = which[i] = v->held[i];
        v->dirty[p] = 0;
        memcpy(copy + i * PAGE, v->bits + p * PAGE, PAGE);
    }
    if (!rc)
        v->nheld = 0;
    pthread_mutex_unlock(&v->mu);
    if (!rc && fdatasync(v->data_fd))
        rc = -errno;
    for (long i = 0; !rc && i < n; i++) {
        size_t len = v->bits_len - which[i] * PAGE;
        rc = pwrite_full(v->bm_fd, copy + i * PAGE, len < PAGE ? len : PAGE,
                         BITS_OFFSET + which[i] * PAGE);
    }
    if (!rc && n && fdatasync(v->bm_fd))
        rc = -errno;
    if (rc && which && copy) {
        pthread_mutex_lock(&v->mu);
        for (long i = 0; i < n; i++)
            page_dirty(v, which[i]);
        pthread_mutex_unlock(&v->mu);
    }
    pthread_mutex_unlock(&v->flush_mu);
    free(which);
    free(copy);
    if (rc)
        logmsg("volume %s: flush failed: %s", v->id, strerror(-rc));
    return rc;
}

/* The length of the run of blocks from pos (before end) that are all
 * written, or all not (*written says which). */
static size_t next_run(struct volume *v, off_t pos, off_t end, int *written)
{
    uint64_t b = pos / BLOCK, stop = (end - 1) / BLOCK + 1, e = b + 1;
    pthread_mutex_lock(&v->mu);
    *written = bit_set(v, b);
    while (e < stop && bit_set(v, e) == *written)
        e++;
    pthread_mutex_unlock(&v->mu);
    return (e * BLOCK < (uint64_t)end ? (off_t)(e * BLOCK) : end) - pos;
}

/* Read [off, off+len) of the volume: written runs from the layer, the
 * rest from the image. */
static int volume_read(struct volume *v, char *buf, size_t len, off_t off)
{
    if (off >= v->size)
        return 0;
    if (off + (off_t)len > v->size)
        len = v->size - off;
    size_t done = 0;
    while (done < len) {
        int written;
        size_t n = next_run(v, off + done, off + len, &written);
        int rc = written ? pread_full(v->data_fd, buf + done, n, off + done)
                         : image_read(v->img, buf + done, n, off + done);
        if (rc)
            return rc;
        done += n;
    }
    return (int)len;
}

#define MAX_BUFS 64

static int add_buf(struct fuse_bufvec *bv, int fd, size_t len, off_t pos)
{
    if (bv->count == MAX_BUFS)
        return -E2BIG;
    struct fuse_buf *b = &bv->buf[bv->count];
    memset(b, 0, sizeof(*b));
    b->size = len;
    if (fd >= 0) {
        b->flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
        b->fd = fd;
        b->pos = pos;
    } else if (!(b->mem = calloc(1, len))) {
        return -ENOMEM;
    }
    bv->count++;
    return 0;
}

static void free_bufs(struct fuse_bufvec *bv)
{
    for (size_t i = 0; i < bv->count; i++)
        if (!(bv->buf[i].flags & FUSE_BUF_IS_FD))
            free(bv->buf[i].mem);
    free(bv);
}

/* volume_read as buffers naming the files (the kernel splices them):
 * written runs from the layer's data, the rest from the image's. */
static int volume_bufs(struct volume *v, struct fuse_bufvec **bufp,
                       size_t len, off_t off)
{
    struct fuse_bufvec *bv = calloc(1, sizeof(*bv) +
                                    MAX_BUFS * sizeof(struct fuse_buf));
    if (!bv)
        return -ENOMEM;
    bv->count = 0;
    if (off >= v->size)
        len = 0;
    else if (off + (off_t)len > v->size)
        len = v->size - off;
    size_t done = 0;
    int rc = 0;
    while (!rc && done < len) {
        int written;
        size_t n = next_run(v, off + done, off + len, &written);
        if (written) {
            rc = add_buf(bv, v->data_fd, n, off + done);
        } else {
            ssize_t inside = image_ensure(v->img, n, off + done);
            rc = inside < 0 ? (int)inside : 0;
            if (!rc && inside)
                rc = add_buf(bv, v->img->fd, inside, off + done);
            if (!rc && (size_t)inside < n)
                rc = add_buf(bv, -1, n - inside, 0);
        }
        done += n;
    }
    if (rc == -E2BIG) {         /* too fragmented: one buffer, read here */
        free_bufs(bv);
        bv = calloc(1, sizeof(*bv));
        if (!bv || !(bv->buf[0].mem = malloc(len ? len : 1))) {
            free(bv);
            return -ENOMEM;
        }
        bv->count = 1;
        rc = volume_read(v, bv->buf[0].mem, len, off);
        bv->buf[0].size = rc > 0 ? (size_t)rc : 0;
        rc = rc < 0 ? rc : 0;
    }
    if (rc) {
        free_bufs(bv);
        return rc;
    }
    *bufp = bv;
    return 0;
}

/* Copy block b up from the image unless written; caller holds v->mu. */
static int copy_up(struct volume *v, uint64_t b)
{
    if (bit_set(v, b))
        return 0;
    char blk[BLOCK];
    off_t start = b * BLOCK;
    size_t n = start + BLOCK <= v->size ? BLOCK : v->size - start;
    int rc = image_read(v->img, blk, n, start);
    return rc ? rc : pwrite_full(v->data_fd, blk, n, start);
}

static int volume_write(struct volume *v, const char *buf, size_t len,
                        off_t off)
{
    if (off >= v->size)
        return -ENOSPC;
    if (off + (off_t)len > v->size)
        len = v->size - off;
    if (!len)
        return 0;
    uint64_t first = off / BLOCK, last = (off + len - 1) / BLOCK;
    uint64_t edges[2] = {first, last};
    pthread_mutex_lock(&v->mu);
    int rc = 0;
    /* A block the write covers only partly is copied up first. */
    for (int i = 0; !rc && i < (first == last ? 1 : 2); i++) {
        off_t start = edges[i] * BLOCK;
        off_t end = start + BLOCK < v->size ? start + BLOCK : v->size;
        if (off > start || off + (off_t)len < end)
            rc = copy_up(v, edges[i]);
    }
    if (!rc)
        rc = pwrite_full(v->data_fd, buf, len, off);
    if (!rc)
        rc = mark(v, first, last + 1);
    int too_many = v->nheld > MAX_DIRTY_PAGES;
    pthread_mutex_unlock(&v->mu);
    if (!rc && too_many)
        rc = layer_flush(v);
    return rc ? rc : (int)len;
}

/* Discard and write-zeroes: the range reads zeros afterwards. Whole
 * blocks get a hole punched in the layer's data and their bits set (a bit
 * set over a hole reads zeros); partial blocks are written with zeros. */
static int volume_zero(struct volume *v, off_t off, off_t len)
{
    if (off >= v->size)
        return 0;
    if (off + len > v->size)
        len = v->size - off;
    off_t head = (BLOCK - off % BLOCK) % BLOCK, end = off + len;
    off_t whole_start = off + head, whole_end = end - end % BLOCK;
    if (end == v->size)
        whole_end = end;
    static const char zeros[BLOCK];
    int rc = 0;
    if (whole_start >= whole_end) {
        for (off_t p = off; !rc && p < end; p += BLOCK) {
            size_t n = end - p < BLOCK ? end - p : BLOCK;
            rc = volume_write(v, zeros, n, p) < 0 ? -EIO : 0;
        }
        return rc;
    }
    if (head && (rc = volume_write(v, zeros, head, off)) < 0)
        return rc;
    if (end > whole_end &&
        (rc = volume_write(v, zeros, end - whole_end, whole_end)) < 0)
        return rc;
    pthread_mutex_lock(&v->mu);
    rc = 0;
    if (fallocate(v->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  whole_start, whole_end - whole_start))
        rc = -errno;
    if (!rc)
        rc = mark(v, whole_start / BLOCK, (whole_end + BLOCK - 1) / BLOCK);
    int too_many = v->nheld > MAX_DIRTY_PAGES;
    pthread_mutex_unlock(&v->mu);
    if (!rc && too_many)
        rc = layer_flush(v);
    return rc;
}

/* -- open files ------------------------------------------------------------ */

/* The kernel's open files of the mount, in <state>/handles (mapped
 * shared): a slot per open file, its index + 1 the file handle the kernel
 * gives back. It outlives a server, so that the next one knows the files
 * opened before it (how often a volume is open, and for writing). A slot
 * keeps the unique id of the OPEN request that filled it: the same
 * request resent to a new server (FUSE_NOTIFY_RESEND) finds its slot
 * again instead of counting twice. Slots are taken round the table (the
 * cursor in the slot past the last), so that a resent RELEASE never
 * frees a slot an OPEN took meanwhile. */
#define HANDLES 4096
#define FUSE_UNIQUE_RESEND (1ULL << 63)

struct slot {
    uint64_t ino, unique;
    uint32_t used, writable;
    uint64_t pad;
};

static struct slot *slots;
static pthread_mutex_t slots_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread uint64_t request_unique;   /* of the request being served */

static int handles_map(int fresh)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof(path), "%s/handles", state_dir) >=
        (int)sizeof(path))
        return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    size_t len = (HANDLES + 1) * sizeof(struct slot);
    if (fd < 0 || (fresh && ftruncate(fd, 0)) || ftruncate(fd, len)) {
        logmsg("%s: %s", path, strerror(errno));
        return -1;
    }
    slots = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return slots == MAP_FAILED ? -1 : 0;
}

/* A handle for an open of ino by the current request; 0 if full. */
static uint64_t handle_new(uint64_t ino, int writable)
{
    uint64_t unique = request_unique & ~FUSE_UNIQUE_RESEND, fh = 0;
    pthread_mutex_lock(&slots_mu);
    for (long i = 0; i < HANDLES && !fh; i++)
        if (slots[i].used && slots[i].ino == ino &&
            slots[i].unique == unique)
            fh = i + 1;         /* a resent OPEN */
    uint64_t *cursor = &slots[HANDLES].unique;
    for (long n = 0; n < HANDLES && !fh; n++) {
        long i = (*cursor + n) % HANDLES;
        if (!slots[i].used) {
            slots[i] = (struct slot){.ino = ino, .unique = unique,
                                     .writable = writable};
            __atomic_store_n(&slots[i].used, 1, __ATOMIC_RELEASE);
            *cursor = i + 1;
            fh = i + 1;
        }
    }
    pthread_mutex_unlock(&slots_mu);
    return fh;
}

static struct slot *handle(uint64_t fh)
{
    return fh >= 1 && fh <= HANDLES && slots[fh - 1].used ? &slots[fh - 1]
                                                           : NULL;
}

static int opens_of(uint64_t ino)
{
    int n = 0;
    pthread_mutex_lock(&slots_mu);
    for (long i = 0; i < HANDLES; i++)
        n += slots[i].used && slots[i].ino == ino;
    pthread_mutex_unlock(&slots_mu);
    return n;
}

/* -- FUSE operations (low level: node ids and handles are ours) ----------- */

/* The volume with node id ino: loaded, or found among the layers (a node
 * the kernel learnt from a previous server). NULL: *err. */
static struct volume *volume_of(fuse_ino_t ino, int *err)
{
    pthread_mutex_lock(&volumes_mu);
    struct volume *v;
    for (v = volumes; v && v->ino != ino; v = v->next)
        ;
    pthread_mutex_unlock(&volumes_mu);
    *err = -ENOENT;
    if (v)
        return v;
    DIR *d = opendir(layers_dir);
    struct dirent *e;
    char id[MAX_ID + 1] = "";
    while (d && (e = readdir(d)))
        if (valid_id(e->d_name) && ino_of(e->d_name) == ino) {
            memcpy(id, e->d_name, strlen(e->d_name) + 1);  /* valid: short */
            break;
        }
    if (d)
        closedir(d);
    return id[0] ? volume_get(id, err) : NULL;
}

/* What a volume's attributes and opens need of it. */
struct volume_state {
    int gone, read_only;
    off_t size;
};

/* The volume's state, read without waiting for a hold: a held volume
 * (thunder-cache copying or resizing its layer) shows its state from
 * before the hold, and the threads reading /dev/fuse never wait for one
 * (see run_or_defer). */
static struct volume_state state_of(struct volume *v)
{
    int locked = pthread_rwlock_tryrdlock(&v->hold) == 0;
    struct volume_state state = {
        .gone = __atomic_load_n(&v->gone, __ATOMIC_ACQUIRE),
        .read_only = __atomic_load_n(&v->read_only, __ATOMIC_ACQUIRE),
        .size = __atomic_load_n(&v->size, __ATOMIC_ACQUIRE)};
    if (locked)
        pthread_rwlock_unlock(&v->hold);
    return state;
}

/* Look the request's volume up, or answer the error and return. */
#define VOLUME_OR_REPLY(v, req, ino) \
    int _err; \
    struct volume *v = volume_of(ino, &_err); \
    if (!v) { \
        fuse_reply_err(req, -_err); \
        return; \
    }

static void reply_rc(fuse_req_t req, int rc)
{
    fuse_reply_err(req, rc < 0 ? -rc : 0);
}

static int stat_of(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_gid = file_gid;
    st->st_atime = st->st_mtime = st->st_ctime = started;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        return 0;
    }
    int err;
    struct volume *v = volume_of(ino, &err);
    if (!v)
        return err;
    struct volume_state state = state_of(v);
    int ro = state.read_only;
    st->st_size = state.size;
    if (state.gone)
        return -ENOENT;
    st->st_mode = S_IFREG | (file_gid ? (ro ? 0440 : 0660) : (ro ? 0400 : 0600));
    st->st_nlink = 1;
    st->st_blksize = BLOCK;
    return 0;
}

static void t_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e = {0};
    int err = -ENOENT;
    if (parent == FUSE_ROOT_ID && volume_get(name, &err))
        err = stat_of(ino_of(name), &e.attr);
    if (err) {
        reply_rc(req, err);
        return;
    }
    e.ino = e.attr.st_ino;
    fuse_reply_entry(req, &e);
}

static void t_getattr(fuse_req_t req, fuse_ino_t ino,
                      struct fuse_file_info *fi)
{
    struct stat st;
    int rc = stat_of(ino, &st);
    if (rc)
        reply_rc(req, rc);
    else
        fuse_reply_attr(req, &st, 0);
}

static void t_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                      int to_set, struct fuse_file_info *fi)
{
    struct stat st;
    int rc = stat_of(ino, &st);
    if (!rc && to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID |
                         FUSE_SET_ATTR_GID))
        rc = -EPERM;
    /* Volumes grow through thunder-cache's resize_volume only. */
    if (!rc && to_set & FUSE_SET_ATTR_SIZE && attr->st_size != st.st_size)
        rc = -EPERM;
    if (rc)
        reply_rc(req, rc);
    else
        fuse_reply_attr(req, &st, 0);
}

static void t_readdir(fuse_req_t req, fuse_ino_t ino, size_t size,
                      off_t off, struct fuse_file_info *fi)
{
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    char *buf = malloc(size), meta[PATH_MAX];
    DIR *d = opendir(layers_dir);
    if (!buf || !d) {
        reply_rc(req, buf ? -errno : -ENOMEM);
        free(buf);
        if (d)
            closedir(d);
        return;
    }
    size_t used = 0;
    off_t n = 0;
    struct stat st = {.st_mode = S_IFREG};
    struct dirent *e;
    const char *name = ".";
    while (name) {
        st.st_ino = n < 2 ? FUSE_ROOT_ID : ino_of(name);
        if (n++ >= off) {
            size_t len = fuse_add_direntry(req, buf + used, size - used,
                                           name, &st, n);
            if (len > size - used)
                break;
            used += len;
        }
        name = n == 1 ? ".." : NULL;
        while (!name && (e = readdir(d))) {
            snprintf(meta, sizeof(meta), "%s/%s/volume.json", layers_dir,
                     e->d_name);
            if (valid_id(e->d_name) && access(meta, F_OK) == 0)
                name = e->d_name;
        }
    }
    closedir(d);
    fuse_reply_buf(req, buf, used);
    free(buf);
}

static void t_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    VOLUME_OR_REPLY(v, req, ino);
    int wr = (fi->flags & O_ACCMODE) != O_RDONLY;
    struct volume_state state = state_of(v);
    int err = state.gone ? -ENOENT : (wr && state.read_only) ? -EROFS : 0;
    if (!err && !(fi->fh = handle_new(ino, wr)))
        err = -ENFILE;
    if (err)
        reply_rc(req, err);
    else
        fuse_reply_open(req, fi);
}

static void t_release(fuse_req_t req, fuse_ino_t ino,
                      struct fuse_file_info *fi)
{
    struct slot *h = handle(fi->fh);
    if (h)
        __atomic_store_n(&h->used, 0, __ATOMIC_RELEASE);
    fuse_reply_err(req, 0);
}

#define SPLICE_MIN (64 * 1024)  /* smaller reads are copied */

/* Answer a read of the volume (which may wait for thunder-cache). With
 * locked, the caller holds v->hold for reading; it is released here. */
static void read_volume(fuse_req_t req, struct volume *v, size_t size,
                        off_t off, int locked)
{
    struct fuse_bufvec *bv = NULL;
    char *buf = NULL;
    int rc, splice = use_splice && size >= SPLICE_MIN;
    if (!splice && !(buf = malloc(size ? size : 1))) {
        if (locked)
            pthread_rwlock_unlock(&v->hold);
        reply_rc(req, -ENOMEM);
        return;
    }
    if (!locked)
        pthread_rwlock_rdlock(&v->hold);
    if (v->gone || !v->open)
        rc = -EIO;
    else if (splice)
        rc = volume_bufs(v, &bv, size, off);
    else    /* small reads: a copy costs less than setting up a splice */
        rc = volume_read(v, buf, size, off);
    pthread_rwlock_unlock(&v->hold);
    if (rc < 0)
        reply_rc(req, rc);
    else if (splice)
        fuse_reply_data(req, bv, FUSE_BUF_SPLICE_MOVE);
    else
        fuse_reply_buf(req, buf, rc);
    free(buf);
    if (bv)
        free_bufs(bv);
}

/* -- I/O that waits: a pool of its own ------------------------------------ *
 *
 * A read of a chunk not fetched yet waits for thunder-cache (up to
 * --fetch-wait seconds), and any I/O of a held volume for the hold's end
 * (thunder-cache copying or resizing its layer). Such a request is handed
 * to one of MISS_THREADS threads, so that the few threads reading
 * /dev/fuse (FUSE_THREADS) go on serving the other volumes and the data
 * present meanwhile. With one pool of 32 threads for both, warm 4 KiB
 * reads at queue depth 16 ran at 0.37 to 0.64x a plain file; with these,
 * 0.67 to 1.12x (peer-mode-native.rst, "Threads"). */

#define MISS_THREADS 32
#define MAX_BACKGROUND 256      /* see t_init */

enum vop_kind { VOP_READ, VOP_WRITE, VOP_FLUSH, VOP_ZERO };

/* One request on a volume's data. */
struct vop {
    enum vop_kind kind;
    fuse_req_t req;
    fuse_ino_t ino;
    size_t size;                /* VOP_ZERO: the length */
    off_t off;
    struct vop *next;
    char data[];                /* a deferred VOP_WRITE's bytes */
};

static struct vop *deferred, **deferred_end = &deferred;
static pthread_mutex_t deferred_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t deferred_cv = PTHREAD_COND_INITIALIZER;

/* Whether reading [off, off+size) of v may wait for thunder-cache: a
 * chunk of its image under the range is not known usable yet. Called with
 * v->hold held (a closed layer lets its image go). */
static int read_may_wait(struct volume *v, size_t size, off_t off)
{
    struct image *img = v->img;
    if (v->gone || !v->open || !img || !size || off >= img->size)
        return 0;
    off_t end = off + (off_t)size < img->size ? off + (off_t)size
                                              : img->size;
    for (long c = off / img->chunk; c <= (end - 1) / img->chunk; c++)
        if (!__atomic_load_n(&img->usable[c], __ATOMIC_ACQUIRE))
            return 1;
    return 0;
}

/* Run o on v and answer it. With locked, the caller holds v->hold for
 * reading; it is released here. wbuf: a write's bytes. */
static void run_vop(struct volume *v, const struct vop *o, const char *wbuf,
                    int locked)
{
    if (o->kind == VOP_READ) {
        read_volume(o->req, v, o->size, o->off, locked);
        return;
    }
    if (!locked)
        pthread_rwlock_rdlock(&v->hold);
    int rc = (v->gone || !v->open) ? -EIO
        : o->kind == VOP_WRITE ? volume_write(v, wbuf, o->size, o->off)
        : o->kind == VOP_FLUSH ? layer_flush(v)
        : volume_zero(v, o->off, (off_t)o->size);
    pthread_rwlock_unlock(&v->hold);
    if (o->kind == VOP_WRITE && rc >= 0)
        fuse_reply_write(o->req, rc);
    else
        reply_rc(o->req, rc);
}

/* Run o now if it need not wait; else hand it to the pool (a write with a
 * copy of its bytes: the receive buffer is reused). */
static void run_or_defer(struct volume *v, const struct vop *o,
                         const char *wbuf)
{
    if (pthread_rwlock_tryrdlock(&v->hold) == 0) {
        if (o->kind != VOP_READ || !read_may_wait(v, o->size, o->off)) {
            run_vop(v, o, wbuf, 1);
            return;
        }
        pthread_rwlock_unlock(&v->hold);
    }
    size_t copy = o->kind == VOP_WRITE ? o->size : 0;
    struct vop *d = malloc(sizeof(*d) + copy);
    if (!d) {                   /* wait here then */
        run_vop(v, o, wbuf, 0);
        return;
    }
    *d = *o;
    d->next = NULL;
    if (copy)
        memcpy(d->data, wbuf, copy);
    pthread_mutex_lock(&deferred_mu);
    *deferred_end = d;
    deferred_end = &d->next;
    pthread_cond_signal(&deferred_cv);
    pthread_mutex_unlock(&deferred_mu);
}

static void *serve_deferred(void *arg)
{
    for (;;) {
        pthread_mutex_lock(&deferred_mu);
        while (!deferred)
            pthread_cond_wait(&deferred_cv, &deferred_mu);
        struct vop *d = deferred;
        if (!(deferred = d->next))
            deferred_end = &deferred;
        pthread_mutex_unlock(&deferred_mu);
        int err;
        struct volume *v = volume_of(d->ino, &err);
        if (v)
            run_vop(v, d, d->data, 0);
        else
            fuse_reply_err(d->req, -err);
        free(d);
    }
    return NULL;
}

static void t_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                   struct fuse_file_info *fi)
{
    VOLUME_OR_REPLY(v, req, ino);
    run_or_defer(v, &(struct vop){.kind = VOP_READ, .req = req, .ino = ino,
                                  .size = size, .off = off}, NULL);
}

static void t_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
                    size_t size, off_t off, struct fuse_file_info *fi)
{
    VOLUME_OR_REPLY(v, req, ino);
    struct slot *h = handle(fi->fh);
    if (!h || !h->writable)
        reply_rc(req, -EBADF);
    else
        run_or_defer(v, &(struct vop){.kind = VOP_WRITE, .req = req,
                                      .ino = ino, .size = size, .off = off},
                     buf);
}

static void t_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                    struct fuse_file_info *fi)
{
    VOLUME_OR_REPLY(v, req, ino);
    run_or_defer(v, &(struct vop){.kind = VOP_FLUSH, .req = req, .ino = ino},
                 NULL);
}

static void t_flush(fuse_req_t req, fuse_ino_t ino,
                    struct fuse_file_info *fi)
{
    VOLUME_OR_REPLY(v, req, ino);
    struct slot *h = handle(fi->fh);
    if (!h || !h->writable)
        reply_rc(req, 0);
    else
        run_or_defer(v, &(struct vop){.kind = VOP_FLUSH, .req = req,
                                      .ino = ino}, NULL);
}

static void t_fallocate(fuse_req_t req, fuse_ino_t ino, int mode,
                        off_t off, off_t len, struct fuse_file_info *fi)
{
    VOLUME_OR_REPLY(v, req, ino);
    struct slot *h = handle(fi->fh);
    int rc = 0;
    if (!h || !h->writable)
        rc = -EBADF;
    else if (mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) &&
             mode != FALLOC_FL_ZERO_RANGE &&
             mode != (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        rc = -EOPNOTSUPP;
    else if (off < 0 || len <= 0)
        rc = -EINVAL;
    if (rc)
        reply_rc(req, rc);
    else
        run_or_defer(v, &(struct vop){.kind = VOP_ZERO, .req = req,
                                      .ino = ino, .size = (size_t)len,
                                      .off = off}, NULL);
}

static void t_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct statvfs st;
    if (statvfs(layers_dir, &st))
        fuse_reply_err(req, errno);
    else
        fuse_reply_statfs(req, &st);
}

static void t_create(fuse_req_t req, fuse_ino_t parent, const char *name,
                     mode_t mode, struct fuse_file_info *fi)
{
    fuse_reply_err(req, EPERM);
}

static void t_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    fuse_reply_none(req);       /* node ids are the volumes': nothing kept */
}

static void t_init(void *userdata, struct fuse_conn_info *conn)
{
    /* A loop device's direct I/O reaches the server as background
     * requests, of which the kernel has at most max_background in flight
     * for the whole mount (12 by default): requests waiting for a hold of
     * one volume would hold back every other volume's. This server defers
     * the waiting ones (run_or_defer) and takes many more. */
    conn->max_background = MAX_BACKGROUND;
    conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
    /* As fusefs.py: no attribute request before every read. */
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
    /* Replies spliced from the cache and layer files: no copy here. */
    if (use_splice && conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE;
}

static const struct fuse_lowlevel_ops ops = {
    .init = t_init, .lookup = t_lookup, .forget = t_forget,
    .getattr = t_getattr, .setattr = t_setattr, .readdir = t_readdir,
    .open = t_open, .release = t_release, .read = t_read, .write = t_write,
    .fsync = t_fsync, .flush = t_flush, .fallocate = t_fallocate,
    .statfs = t_statfs, .create = t_create,
};

/* -- the --listen socket ---------------------------------------------------- */

static void say(int fd, const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    send(fd, line, strlen(line), MSG_NOSIGNAL);
}

/* One line (without its newline) into buf; 0 at EOF or on a bad line. */
static int read_line(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    while (n < cap - 1) {
        ssize_t r = recv(fd, buf + n, 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return 0;
        if (buf[n] == '\n') {
            buf[n] = 0;
            return 1;
        }
        n++;
    }
    return 0;
}

static void hold_volume(int fd, const char *id)
{
    int err;
    struct volume *v = volume_get(id, &err);
    if (!v) {                   /* no such volume (yet): nothing to hold */
        say(fd, "OK 0\n");
        read_line(fd, (char[64]){0}, 64);
        return;
    }
    pthread_rwlock_wrlock(&v->hold);
    int rc = v->open ? layer_flush(v) : 0;
    if (rc) {
        pthread_rwlock_unlock(&v->hold);
        say(fd, "ERR EIO flush failed: %s\n", strerror(-rc));
        return;
    }
    int opens = opens_of(v->ino);
    layer_close(v, 1);
    char marker[PATH_MAX] = "";
    int mfd = held_path(id, marker, sizeof(marker)) ? -1
        : open(marker, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (mfd >= 0)
        close(mfd);
    say(fd, "OK %d\n", opens);
    char line[64];
    read_line(fd, line, sizeof(line));   /* RELEASE, or the close */
    if (!v->gone && layer_open(v)) {
        logmsg("volume %s: its layer is gone after a hold", v->id);
        v->gone = 1;
    }
    if (mfd >= 0)
        unlink(marker);
    pthread_rwlock_unlock(&v->hold);
    say(fd, "OK 0\n");         /* released: the volume is served again */
}

/* thunder-cache is done with a volume it held from a server that died. */
static void unhold_volume(int fd, const char *id)
{
    char marker[PATH_MAX];
    if (!held_path(id, marker, sizeof(marker)))
        unlink(marker);
    say(fd, "OK 0\n");
}

static void forget_volume(int fd, const char *id)
{
    pthread_mutex_lock(&volumes_mu);
    struct volume **pp = &volumes, *v;
    while ((v = *pp) && strcmp(v->id, id))
        pp = &v->next;
    int opens = opens_of(ino_of(id));
    if (opens) {                /* also when opened before this server */
        pthread_mutex_unlock(&volumes_mu);
        say(fd, "ERR EBUSY volume %s is open %d times\n", id, opens);
        return;
    }
    if (v) {
        *pp = v->next;
        pthread_rwlock_wrlock(&v->hold);
        if (v->open)
            layer_flush(v);
        layer_close(v, 0);
        v->gone = 1;
        pthread_rwlock_unlock(&v->hold);
        /* Kept, not freed: a lookup (stat) racing with the delete may
         * still hold it; it answers ENOENT. A few bytes per volume
         * deleted while the server runs. */
        v->next = forgotten;
        forgotten = v;
    }
    pthread_mutex_unlock(&volumes_mu);
    say(fd, "OK 0\n");
}

/* A new thunder-cache runs: no chunk is read from a cache file again
 * before it says the chunk is usable, i.e. (verify_persisted) that it
 * verified the chunk's bytes in its own run. A chunk damaged on disk while
 * no daemon ran is so never served, though this server ran all along. */
static void reverify_all(int fd)
{
    int n = 0;
    pthread_mutex_lock(&images_mu);
    maps_generation++;
    for (struct image *img = images; img; img = img->next, n++)
        for (long i = 0; i < img->chunks; i++)
            __atomic_store_n(&img->usable[i], 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&images_mu);
    logmsg("a new thunder-cache runs: the chunks of %d images are read "
           "again only once it says they are usable", n);
    say(fd, "OK %d\n", n);
}

static void *serve_client(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char line[256];
    if (read_line(fd, line, sizeof(line))) {
        char *sp = strchr(line, ' ');
        const char *id = sp ? sp + 1 : "";
        if (sp)
            *sp = 0;
        if (strcmp(line, "PING") == 0 && !sp)
            say(fd, "OK %d\n", (int)getpid());
        else if (strcmp(line, "REVERIFY") == 0 && !sp)
            reverify_all(fd);
        else if (!valid_id(id))
            say(fd, "ERR EINVAL bad request\n");
        else if (strcmp(line, "HOLD") == 0)
            hold_volume(fd, id);
        else if (strcmp(line, "FORGET") == 0)
            forget_volume(fd, id);
        else if (strcmp(line, "UNHOLD") == 0)
            unhold_volume(fd, id);
        else
            say(fd, "ERR EINVAL unknown request\n");
    }
    close(fd);
    return NULL;
}

static void *listen_loop(void *arg)
{
    int sfd = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept4(sfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            logmsg("accept: %s", strerror(errno));
            return NULL;
        }
        pthread_t t;
        if (pthread_create(&t, NULL, serve_client, (void *)(intptr_t)fd))
            close(fd);
        else
            pthread_detach(t);
    }
}

/* Whether something accepts connections on --listen (a holder). */
static int listen_answers(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", listen_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int rc = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    if (fd >= 0)
        close(fd);
    return rc;
}

/* The --listen socket, bound by the holder (connections made while no
 * server runs wait in its backlog for the next one). */
static int listen_socket(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(listen_path) >= sizeof(sa.sun_path))
        return -1;
    strcpy(sa.sun_path, listen_path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct stat st;
    if (lstat(listen_path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(listen_path);
    mode_t old = umask(0077);
    int rc = fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) ||
        listen(fd, 64);
    umask(old);
    if (rc) {
        logmsg("cannot listen on %s: %s", listen_path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

/* -- the server: takes the mount over ---------------------------------------- */

#define FUSE_THREADS 4           /* read /dev/fuse; see MISS_THREADS */
#define FUSE_INIT_OP 26
#define FUSE_NOTIFY_RESEND 7    /* Linux >= 6.9; not in Debian 12's headers */
#define SYNTHETIC_UNIQUE (1ULL << 62)   /* never a kernel request's */

/* The kernel ABI's request and notification headers (linux/fuse.h). */
struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

static long resent;             /* requests the kernel sent again */

/* Every loaded volume's pages to its bitmap file (a server that stops). */
static void flush_all(void)
{
    pthread_mutex_lock(&volumes_mu);
    struct volume *v = volumes;
    pthread_mutex_unlock(&volumes_mu);
    for (; v; v = v->next) {    /* volumes are never freed */
        pthread_rwlock_rdlock(&v->hold);
        if (v->open && !v->gone)
            layer_flush(v);
        pthread_rwlock_unlock(&v->hold);
    }
}

/* SIGTERM: flush, then exit with SERVER_STOPPED (the holder starts a new
 * server unless it is stopping itself). SIGUSR1, the holder's death
 * (PR_SET_PDEATHSIG): flush, then become the holder (exec, keeping the
 * descriptors), which starts a new server; requests read meanwhile are
 * sent again to it. */
#define SERVER_STOPPED 3

static char **child_argv(char **argv, int argc, const char *role, int fuse_fd,
                         int listen_fd, const char *init_hex);

static struct {
    sigset_t set;
    char **argv;
    int argc, fuse_fd, listen_fd;
    const char *init_hex;
} me;

static void *on_signals(void *arg)
{
    for (;;) {
        int sig;
        if (sigwait(&me.set, &sig))
            continue;
        flush_all();
        if (sig == SIGTERM) {
            logmsg("SIGTERM: bitmaps flushed, exiting");
            _exit(SERVER_STOPPED);
        }
        logmsg("the holder died: taking its place");
        execv(self_exe, child_argv(me.argv, me.argc, "--resume", me.fuse_fd,
                                   me.listen_fd, me.init_hex));
        logmsg("exec %s: %s; serving on without a holder", self_exe,
               strerror(errno));
    }
}

static void *serve_fuse(void *arg)
{
    struct fuse_session *se = arg;
    struct fuse_buf buf = {0};
    for (;;) {
        int res = fuse_session_receive_buf(se, &buf);
        if (res == -EINTR || res == -EAGAIN)
            continue;
        if (res == 0) {         /* ENODEV: unmounted */
            flush_all();
            logmsg("the mount is gone: exiting");
            _exit(0);
        }
        if (res < 0) {
            logmsg("reading /dev/fuse: %s", strerror(-res));
            _exit(1);
        }
        request_unique = buf.size >= sizeof(struct in_header) ?
            ((struct in_header *)buf.mem)->unique : 0;
        if (request_unique & FUSE_UNIQUE_RESEND &&
            __atomic_fetch_add(&resent, 1, __ATOMIC_RELAXED) == 0)
            logmsg("answering requests the previous server had read");
        fuse_session_process_buf(se, &buf);
    }
}

static int unhex(const char *hex, unsigned char *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    if (n > cap || strlen(hex) % 2)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (sscanf(hex + 2 * i, "%2hhx", &out[i]) != 1)
            return -1;
    return (int)n;
}

/* Serve the mount on fuse_fd, whose INIT the holder answered (init: that
 * request, in hex): the session is given the same INIT (its reply goes
 * nowhere: no request has its id), then the kernel is asked to send again
 * the requests a previous server read but did not answer. */
static int serve(int fuse_fd, int listen_fd, const char *init_hex,
                 char **argv, int argc)
{
    pid_t holder = getppid();
    char *argv0 = argv[0];
    unsigned char init[512];
    int n = unhex(init_hex, init, sizeof(init));
    if (n < (int)sizeof(struct in_header) ||
        ((struct in_header *)init)->opcode != FUSE_INIT_OP) {
        logmsg("--init: not a FUSE INIT request");
        return 2;
    }
    if (handles_map(0))
        return 1;
    char *fargv[] = {argv0, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, fargv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    char dev[32];
    snprintf(dev, sizeof(dev), "/dev/fd/%d", fuse_fd);
    if (!se || fuse_session_mount(se, dev)) {
        logmsg("cannot use the FUSE descriptor %d", fuse_fd);
        return 1;
    }
    ((struct in_header *)init)->unique = SYNTHETIC_UNIQUE;
    struct fuse_buf b = {.size = n, .mem = init};
    fuse_session_process_buf(se, &b);
    if (fuse_session_exited(se)) {
        logmsg("the session refused the mount's INIT");
        return 1;
    }
    struct out_header resend = {.len = sizeof(resend),
                                .error = FUSE_NOTIFY_RESEND};
    if (write(fuse_fd, &resend, sizeof(resend)) != sizeof(resend))
        logmsg("FUSE_NOTIFY_RESEND refused (%s): requests a killed server "
               "had read stay unanswered", strerror(errno));
    me.argv = argv;
    me.argc = argc;
    me.fuse_fd = fuse_fd;
    me.listen_fd = listen_fd;
    me.init_hex = init_hex;
    sigemptyset(&me.set);
    sigaddset(&me.set, SIGTERM);
    sigaddset(&me.set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &me.set, NULL);  /* for on_signals only */
    prctl(PR_SET_PDEATHSIG, SIGUSR1);
    if (getppid() != holder)
        kill(getpid(), SIGUSR1);                /* it died already */
    pthread_t t;
    if (pthread_create(&t, NULL, on_signals, NULL) ||
        pthread_create(&t, NULL, listen_loop, (void *)(intptr_t)listen_fd))
        return 1;
    for (int i = 0; i < MISS_THREADS; i++)
        if (pthread_create(&t, NULL, serve_deferred, NULL))
            return 1;
    for (int i = 1; i < FUSE_THREADS; i++)
        if (pthread_create(&t, NULL, serve_fuse, se))
            return 1;
    logmsg("serving volumes (PID %d)", (int)getpid());
    serve_fuse(se);             /* never returns */
    return 1;
}

/* -- the holder: the mount's descriptors outlive every server --------------- */

static pid_t server_pid;
static volatile sig_atomic_t stop_signal, upgrade_signal;

static void on_signal(int sig)
{
    if (sig == SIGHUP)
        upgrade_signal = 1;
    else
        stop_signal = sig;
}

static int no_cloexec(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    return flags < 0 ? -1 : fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
}

/* argv for exec'ing ourselves: the options given, then the descriptors
 * and the INIT (what a holder resumes from). */
static char **child_argv(char **argv, int argc, const char *role, int fuse_fd,
                         int listen_fd, const char *init_hex)
{
    char **out = calloc(argc + 10, sizeof(char *));
    int n = 0;
    out[n++] = self_exe;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--server") || !strcmp(argv[i], "--resume"))
            continue;
        if (!strcmp(argv[i], "--fuse-fd") || !strcmp(argv[i], "--listen-fd") ||
            !strcmp(argv[i], "--init")) {
            i++;
            continue;
        }
        out[n++] = argv[i];
    }
    asprintf(&out[n++], "%s", role);
    out[n++] = "--fuse-fd";
    asprintf(&out[n++], "%d", fuse_fd);
    out[n++] = "--listen-fd";
    asprintf(&out[n++], "%d", listen_fd);
    out[n++] = "--init";
    out[n++] = (char *)init_hex;
    out[n] = NULL;
    return out;
}

static void kill_server(void)
{
    if (server_pid > 0) {
        kill(server_pid, SIGTERM);
        waitpid(server_pid, NULL, 0);
        server_pid = 0;
    }
}

/* Keep a server running on the mount; restart it when it dies, with the
 * binary now installed (an upgrade). SIGHUP: the holder itself is
 * replaced too (exec), keeping the descriptors and the mount. SIGTERM or
 * SIGINT: the server stops, the mount goes. */
static int hold(struct fuse_session *se, char **argv, int argc, int fuse_fd,
                int listen_fd, const char *init_hex)
{
    struct sigaction sa = {.sa_handler = on_signal};
    prctl(PR_SET_PDEATHSIG, 0);     /* a server that took a holder's place */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    char **sargv = child_argv(argv, argc, "--server", fuse_fd, listen_fd,
                              init_hex);
    double last_start = 0;
    while (!stop_signal) {
        if (upgrade_signal) {
            kill_server();
            logmsg("SIGHUP: exec %s (descriptors kept)", self_exe);
            execv(self_exe, child_argv(argv, argc, "--resume", fuse_fd,
                                       listen_fd, init_hex));
            logmsg("exec %s: %s; keeping on", self_exe, strerror(errno));
            upgrade_signal = 0;
        }
        if (server_pid <= 0) {
            if (now() - last_start < 1)
                sleep(1);       /* a server that cannot start: not a storm */
            last_start = now();
            server_pid = fork();
            if (server_pid == 0) {
                signal(SIGTERM, SIG_DFL);
                execv(self_exe, sargv);
                _exit(127);
            }
            logmsg("started the server (PID %d)", (int)server_pid);
        }
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid == server_pid) {
            server_pid = 0;
            if (WIFSIGNALED(status))
                logmsg("the server was killed by signal %d: restarting it",
                       WTERMSIG(status));
            else if (WEXITSTATUS(status) == 0) {
                logmsg("the mount was unmounted: stopping");
                break;
            } else if (WEXITSTATUS(status) == SERVER_STOPPED)
                logmsg("the server stopped (SIGTERM): starting a new one");
            else
                logmsg("the server exited with status %d: restarting it",
                       WEXITSTATUS(status));
        }
    }
    kill_server();
    logmsg("stopping: unmounting");
    if (se) {
        fuse_session_unmount(se);
    } else if (umount2(mount_point, MNT_DETACH)) {
        /* Not root: the set-user-ID helper that mounted it (libfuse's
         * unmount needs the session a resumed holder does not have). */
        pid_t pid = fork();
        if (pid == 0) {
            execlp("fusermount3", "fusermount3", "-u", "-z", mount_point,
                   (char *)NULL);
            _exit(127);
        }
        if (pid > 0)
            waitpid(pid, NULL, 0);
    }
    unlink(listen_path);
    if (pid_file)
        unlink(pid_file);
    return 0;
}

static int write_pid_file(void)
{
    if (!pid_file)
        return 0;
    FILE *f = fopen(pid_file, "w");
    if (!f) {
        logmsg("cannot write %s: %s", pid_file, strerror(errno));
        return -1;
    }
    fprintf(f, "%d\n", (int)getpid());
    fclose(f);
    return 0;
}

/* Mount afresh and answer the kernel's INIT; start holding. */
static int hold_mount(char **argv, int argc, int allow_other)
{
    char path[PATH_MAX];
    if (mkdir(state_dir, 0700) && errno != EEXIST) {
        logmsg("cannot create %s: %s", state_dir, strerror(errno));
        return 1;
    }
    /* A fresh mount: nothing a previous one left counts (see shadow_open). */
    DIR *d = opendir(state_dir);
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.' && snprintf(path, sizeof(path), "%s/%s",
                                            state_dir, e->d_name) <
            (int)sizeof(path))
            unlink(path);
    if (d)
        closedir(d);
    if (listen_answers()) {
        logmsg("a thunder-volume-server already listens on %s: not "
               "mounting %s again", listen_path, mount_point);
        return 1;
    }
    if (handles_map(1))
        return 1;
    int listen_fd = listen_socket();
    if (listen_fd < 0)
        return 1;
    char *fargv[] = {argv[0], "-o", allow_other ?
        "fsname=thunder-volumes,allow_other,default_permissions" :
        "fsname=thunder-volumes", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (!se || fuse_session_mount(se, mount_point)) {
        logmsg("cannot mount %s", mount_point);
        unlink(listen_path);
        return 1;
    }
    int fuse_fd = fuse_session_fd(se);
    struct fuse_buf buf = {0};
    int res = fuse_session_receive_buf(se, &buf);
    if (res <= 0 || buf.size < sizeof(struct in_header) ||
        ((struct in_header *)buf.mem)->opcode != FUSE_INIT_OP) {
        logmsg("no INIT from the kernel");
        goto fail;
    }
    char *hex = malloc(buf.size * 2 + 1);
    for (size_t i = 0; hex && i < buf.size; i++)
        sprintf(hex + 2 * i, "%02x", ((unsigned char *)buf.mem)[i]);
    fuse_session_process_buf(se, &buf);
    free(buf.mem);
    if (!hex || no_cloexec(fuse_fd) || no_cloexec(listen_fd) ||
        write_pid_file())
        goto fail;
    logmsg("mounted %s", mount_point);
    return hold(se, argv, argc, fuse_fd, listen_fd, hex);
fail:
    fuse_session_unmount(se);
    unlink(listen_path);
    return 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: thunder-volume-server --layers DIR --cache DIR "
            "--control SOCK --listen SOCK [--fetch-wait SECONDS] "
            "[--gid GROUP] [--allow-other] [--no-splice] [--pid-file FILE] "
            "[--state-dir DIR] MOUNT_DIR\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *init_hex = NULL, *state = NULL;
    int allow_other = 0, role = 0, fuse_fd = -1, listen_fd = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--allow-other")) {
            allow_other = 1;
            continue;
        }
        if (!strcmp(a, "--no-splice")) {
            use_splice = 0;
            continue;
        }
        if (!strcmp(a, "--server") || !strcmp(a, "--resume")) {
            role = a[2];        /* 's' or 'r' */
            continue;
        }
        if (a[0] != '-') {
            if (mount_point)
                usage();
            mount_point = a;
            continue;
        }
        if (!val)
            usage();
        i++;
        if (!strcmp(a, "--layers"))
            layers_dir = val;
        else if (!strcmp(a, "--cache"))
            cache_dir = val;
        else if (!strcmp(a, "--control"))
            control_path = val;
        else if (!strcmp(a, "--listen"))
            listen_path = val;
        else if (!strcmp(a, "--state-dir"))
            state = val;
        else if (!strcmp(a, "--fetch-wait"))
            fetch_wait = atof(val);
        else if (!strcmp(a, "--fuse-fd"))
            fuse_fd = atoi(val);
        else if (!strcmp(a, "--listen-fd"))
            listen_fd = atoi(val);
        else if (!strcmp(a, "--init"))
            init_hex = val;
        else if (!strcmp(a, "--gid")) {
            struct group *g = isdigit((unsigned char)val[0]) ? NULL
                                                             : getgrnam(val);
            if (!g && !isdigit((unsigned char)val[0])) {
                logmsg("--gid %s: no such group", val);
                return 2;
            }
            file_gid = g ? g->gr_gid : (gid_t)atol(val);
        }
        else if (!strcmp(a, "--pid-file"))
            pid_file = val;
        else
            usage();
    }
    if (!mount_point || !layers_dir || !cache_dir || !control_path ||
        !listen_path || fetch_wait < 0 ||
        (role && (fuse_fd < 0 || listen_fd < 0 || !init_hex)))
        usage();
    snprintf(state_dir, sizeof(state_dir), "%s", state ? state : "");
    if (!state)
        snprintf(state_dir, sizeof(state_dir), "%s.state", listen_path);
    started = time(NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t none;              /* a server exec'ing had some blocked */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* The binary's path (not its target: an upgrade may move a link),
     * what the holder starts and execs, so the binary installed then. */
    if (strchr(argv[0], '/'))
        snprintf(self_exe, sizeof(self_exe), "%s", argv[0]);
    else if (readlink("/proc/self/exe", self_exe, sizeof(self_exe) - 1) < 0)
        return 1;
    if (role == 's')
        return serve(fuse_fd, listen_fd, init_hex, argv, argc);
    if (role == 'r') {
        logmsg("resumed holding %s (PID %d)", mount_point, (int)getpid());
        if (write_pid_file())
            return 1;
        return hold(NULL, argv, argc, fuse_fd, listen_fd, init_hex);
    }
    return hold_mount(argv, argc, allow_other);
}
