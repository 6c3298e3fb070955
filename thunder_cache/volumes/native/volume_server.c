/* thunder-volume-server: the peer mode's volume files, served in C.
 *
 * The same filesystem as thunder_cache/fusefs.py (one raw file per volume,
 * <mount>/<volume id>) on libfuse 3, reading and writing the same files:
 * each volume's copy-on-write layer (<layers>/<id>/data, bitmap and
 * volume.json, see thunder_cache/cow.py and volumes.py) over the node
 * cache of its image (<cache>/<image id>/data and chunkmap, see
 * thunder_cache/image_cache.py and chunkmap.py).
 *
 * Present chunks are read straight from the image's data file. Which
 * chunks may be read is only ever learnt from thunder-cache: the
 * "ensure_chunks" request on its control socket makes the chunks a read
 * needs present (fetching them if need be) and answers the image's whole
 * map of usable chunks (verified by this daemon run), which is kept. While
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
 *   FORGET <volume id>   -> OK 0, or ERR EBUSY while the file is open
 *   anything else        -> ERR EINVAL <why>
 *
 * usage: thunder-volume-server --layers DIR --cache DIR --control SOCK
 *            --listen SOCK [--fetch-wait SECONDS] [--gid GROUP]
 *            [--allow-other] [--no-splice] [--pid-file FILE] MOUNT_DIR
 * (GROUP: a name or a number; it owns the volume files, mode 0660).
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
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
            for (long i = 0; i < n; i++)
                if (u[i] == '1')
                    __atomic_store_n(&img->usable[i], 1, __ATOMIC_RELEASE);
            free(answer);
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
    int data_fd, bm_fd;         /* -1 while held */
    off_t size;
    int read_only, gone, open;  /* open: the layer's files are */
    struct image *img;          /* NULL: a blank volume */
    unsigned char *map;         /* the bitmap file, mapped read-only */
    size_t map_len, bits_len;
    unsigned char **pages;      /* changed pages not yet in the file */
    unsigned char *dirty;       /* per page: changed since last flush */
    long *held;                 /* indices of pages[] that are set */
    long nheld;
    int opens;
    pthread_mutex_t mu;         /* bits, pages, opens */
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

/* Close the layer's files. keep_data: all but the data file, whose inode
 * never changes (cow.py grows it in place), and the image, which replies
 * being spliced to the kernel may still read. */
static void layer_close(struct volume *v, int keep_data)
{
    if (v->map)
        munmap(v->map, v->map_len);
    v->map = NULL;
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
    for (long i = 0; i < v->nheld; i++) {
        free(v->pages[v->held[i]]);
        v->pages[v->held[i]] = NULL;
    }
    v->nheld = 0;
    free(v->pages);
    free(v->dirty);
    free(v->held);
    v->pages = NULL;
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
    v->map_len = BITS_OFFSET + v->bits_len;
    v->map = mmap(NULL, v->map_len, PROT_READ, MAP_SHARED, v->bm_fd, 0);
    long npages = (v->bits_len + PAGE - 1) / PAGE;
    v->pages = calloc(npages, sizeof(*v->pages));
    v->dirty = calloc(npages, 1);
    v->held = calloc(npages, sizeof(*v->held));
    if (v->map == MAP_FAILED || !v->pages || !v->dirty || !v->held) {
        if (v->map == MAP_FAILED)
            v->map = NULL;
        goto bad;
    }
    /* A volume's image never changes: kept across holds. */
    if (image_id[0] && !v->img && !(v->img = image_get(image_id)))
        goto bad;
    v->open = 1;
    return 0;
bad:
    layer_close(v, 0);
    return -EIO;
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
    v = calloc(1, sizeof(*v));
    if (!v) {
        *err = -ENOMEM;
        goto out;
    }
    strcpy(v->id, id);
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
    uint64_t byte = b >> 3;
    unsigned char *page = v->pages[byte / PAGE];
    unsigned char c = page ? page[byte % PAGE] : v->map[BITS_OFFSET + byte];
    return c >> (b & 7) & 1;
}

/* Set the bits of blocks [first, stop); caller holds v->mu. */
static int mark(struct volume *v, uint64_t first, uint64_t stop)
{
    for (uint64_t b = first; b < stop; b++) {
        uint64_t byte = b >> 3;
        long p = byte / PAGE;
        if (!v->pages[p]) {
            unsigned char *page = calloc(1, PAGE);
            if (!page)
                return -ENOMEM;
            size_t n = v->bits_len - p * PAGE;
            memcpy(page, v->map + BITS_OFFSET + p * PAGE, n < PAGE ? n : PAGE);
            v->pages[p] = page;
            v->held[v->nheld++] = p;
        }
        v->pages[p][byte % PAGE] |= 1 << (b & 7);
        v->dirty[p] = 1;
    }
    return 0;
}

/* Data, then the changed pages of the bitmap, each made durable. */
static int layer_flush(struct volume *v)
{
    pthread_mutex_lock(&v->flush_mu);
    pthread_mutex_lock(&v->mu);
    long n = 0, *which = malloc((v->nheld + 1) * sizeof(long));
    unsigned char *copy = malloc((size_t)(v->nheld + 1) * PAGE);
    int rc = (which && copy) ? 0 : -ENOMEM;
    for (long i = 0; !rc && i < v->nheld; i++) {
        long p = v->held[i];
        if (!v->dirty[p])
            continue;
        v->dirty[p] = 0;
        memcpy(copy + n * PAGE, v->pages[p], PAGE);
        which[n++] = p;
    }
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
    pthread_mutex_lock(&v->mu);
    if (rc) {
        for (long i = 0; i < n; i++)
            v->dirty[which[i]] = 1;
    } else {
        /* The file holds these pages now: those not changed since go. */
        long kept = 0;
        for (long i = 0; i < v->nheld; i++) {
            long p = v->held[i];
            if (v->dirty[p]) {
                v->held[kept++] = p;
            } else {
                free(v->pages[p]);
                v->pages[p] = NULL;
            }
        }
        v->nheld = kept;
    }
    pthread_mutex_unlock(&v->mu);
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
#define SPLICE_MIN (64 * 1024)  /* smaller reads are copied */

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

/* -- FUSE operations ------------------------------------------------------- */

/* An open file: its volume, and whether it was opened for writing (the
 * kernel does not tell fallocate and flush requests how). */
struct handle {
    struct volume *v;
    int writable;
};

static struct volume *of(struct fuse_file_info *fi)
{
    return ((struct handle *)(uintptr_t)fi->fh)->v;
}

static int writable(struct fuse_file_info *fi)
{
    return ((struct handle *)(uintptr_t)fi->fh)->writable;
}

/* Run I/O on an open volume unless it is held; EIO once it is gone. */
#define WITH_VOLUME(v, expr) ({                                         \
        pthread_rwlock_rdlock(&(v)->hold);                              \
        int _rc = ((v)->gone || !(v)->open) ? -EIO : (expr);            \
        pthread_rwlock_unlock(&(v)->hold);                              \
        _rc; })

static int t_getattr(const char *path, struct stat *st,
                     struct fuse_file_info *fi)
{
    memset(st, 0, sizeof(*st));
    st->st_gid = file_gid;
    st->st_atime = st->st_mtime = st->st_ctime = started;
    /* With nullpath_ok, an open file may come without its path. */
    struct handle *h = fi ? (struct handle *)(uintptr_t)fi->fh : NULL;
    if (!h && !path)
        return -ENOENT;
    if (!h && strcmp(path, "/") == 0) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        return 0;
    }
    int err = -ENOENT;
    struct volume *v = h ? h->v : volume_get(path + 1, &err);
    if (!v)
        return err;
    pthread_rwlock_rdlock(&v->hold);
    int ro = v->read_only;
    st->st_size = v->size;
    pthread_rwlock_unlock(&v->hold);
    if (v->gone)
        return -ENOENT;
    st->st_mode = S_IFREG | (file_gid ? (ro ? 0440 : 0660) : (ro ? 0400 : 0600));
    st->st_nlink = 1;
    st->st_blksize = BLOCK;
    return 0;
}

static int t_readdir(const char *path, void *buf, fuse_fill_dir_t fill,
                     off_t off, struct fuse_file_info *fi,
                     enum fuse_readdir_flags flags)
{
    if (path && strcmp(path, "/"))
        return -ENOTDIR;
    fill(buf, ".", NULL, 0, 0);
    fill(buf, "..", NULL, 0, 0);
    DIR *d = opendir(layers_dir);
    if (!d)
        return -errno;
    struct dirent *e;
    char meta[PATH_MAX];
    while ((e = readdir(d))) {
        snprintf(meta, sizeof(meta), "%s/%s/volume.json", layers_dir,
                 e->d_name);
        if (valid_id(e->d_name) && access(meta, F_OK) == 0)
            fill(buf, e->d_name, NULL, 0, 0);
    }
    closedir(d);
    return 0;
}

static int t_open(const char *path, struct fuse_file_info *fi)
{
    int err;
    struct volume *v = volume_get(path + 1, &err);
    if (!v)
        return err;
    int wr = (fi->flags & O_ACCMODE) != O_RDONLY;
    pthread_rwlock_rdlock(&v->hold);
    pthread_mutex_lock(&v->mu);
    err = v->gone ? -ENOENT : (wr && v->read_only) ? -EROFS : 0;
    if (!err)
        v->opens++;
    pthread_mutex_unlock(&v->mu);
    pthread_rwlock_unlock(&v->hold);
    struct handle *h = err ? NULL : malloc(sizeof(*h));
    if (!err && !h) {
        err = -ENOMEM;
        pthread_mutex_lock(&v->mu);
        v->opens--;
        pthread_mutex_unlock(&v->mu);
    }
    if (err)
        return err;
    h->v = v;
    h->writable = wr;
    fi->fh = (uintptr_t)h;
    return 0;
}

static int t_release(const char *path, struct fuse_file_info *fi)
{
    struct volume *v = of(fi);
    pthread_mutex_lock(&v->mu);
    v->opens--;
    pthread_mutex_unlock(&v->mu);
    free((struct handle *)(uintptr_t)fi->fh);
    return 0;
}

static int t_read(const char *path, char *buf, size_t size, off_t off,
                  struct fuse_file_info *fi)
{
    struct volume *v = of(fi);
    return WITH_VOLUME(v, volume_read(v, buf, size, off));
}

static int t_read_buf(const char *path, struct fuse_bufvec **bufp,
                      size_t size, off_t off, struct fuse_file_info *fi)
{
    struct volume *v = of(fi);
    if (use_splice && size >= SPLICE_MIN)
        return WITH_VOLUME(v, volume_bufs(v, bufp, size, off));
    /* Small reads: a copy costs less than setting up a splice. */
    struct fuse_bufvec *bv = calloc(1, sizeof(*bv));
    if (!bv || !(bv->buf[0].mem = malloc(size ? size : 1))) {
        free(bv);
        return -ENOMEM;
    }
    bv->count = 1;
    int rc = WITH_VOLUME(v, volume_read(v, bv->buf[0].mem, size, off));
    if (rc < 0) {
        free_bufs(bv);
        return rc;
    }
    bv->buf[0].size = rc;
    *bufp = bv;
    return 0;
}

static int t_write(const char *path, const char *buf, size_t size,
                   off_t off, struct fuse_file_info *fi)
{
    struct volume *v = of(fi);
    if (!writable(fi))
        return -EBADF;
    return WITH_VOLUME(v, volume_write(v, buf, size, off));
}

static int t_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    struct volume *v = of(fi);
    return WITH_VOLUME(v, layer_flush(v));
}

static int t_flush(const char *path, struct fuse_file_info *fi)
{
    struct volume *v = of(fi);
    if (!writable(fi))
        return 0;
    return WITH_VOLUME(v, layer_flush(v));
}

static int t_fallocate(const char *path, int mode, off_t off, off_t len,
                       struct fuse_file_info *fi)
{
    struct volume *v = of(fi);
    if (!writable(fi))
        return -EBADF;
    if (mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) &&
        mode != FALLOC_FL_ZERO_RANGE &&
        mode != (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        return -EOPNOTSUPP;
    if (off < 0 || len <= 0)
        return -EINVAL;
    return WITH_VOLUME(v, volume_zero(v, off, len));
}

static int t_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    int err;
    struct handle *h = fi ? (struct handle *)(uintptr_t)fi->fh : NULL;
    struct volume *v = h ? h->v : path ? volume_get(path + 1, &err) : NULL;
    if (!v)
        return -ENOENT;
    /* Volumes grow through thunder-cache's resize_volume only. */
    return size == v->size ? 0 : -EPERM;
}

static int t_statfs(const char *path, struct statvfs *st)
{
    return statvfs(layers_dir, st) ? -errno : 0;
}

static int t_utimens(const char *path, const struct timespec tv[2],
                     struct fuse_file_info *fi)
{
    return 0;
}

static int t_refuse(const char *path, mode_t mode, struct fuse_file_info *f)
{
    return -EPERM;
}

static void *t_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    cfg->attr_timeout = cfg->entry_timeout = cfg->negative_timeout = 0;
    cfg->direct_io = 0;
    cfg->nullpath_ok = 1;
    /* As fusefs.py: no attribute request before every read. */
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
    /* Replies spliced from the cache and layer files: no copy here. */
    if (use_splice && conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE;
    logmsg("serving volumes (max_write %u, max_readahead %u)",
           conn->max_write, conn->max_readahead);
    return NULL;
}

static const struct fuse_operations ops = {
    .getattr = t_getattr, .readdir = t_readdir, .open = t_open,
    .release = t_release, .read = t_read, .read_buf = t_read_buf,
    .write = t_write,
    .fsync = t_fsync, .flush = t_flush, .fallocate = t_fallocate,
    .truncate = t_truncate, .statfs = t_statfs, .utimens = t_utimens,
    .chmod = t_refuse, .create = t_refuse, .init = t_init,
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
    pthread_mutex_lock(&v->mu);
    int opens = v->opens;
    pthread_mutex_unlock(&v->mu);
    layer_close(v, 1);
    say(fd, "OK %d\n", opens);
    char line[64];
    read_line(fd, line, sizeof(line));   /* RELEASE, or the close */
    if (!v->gone && layer_open(v)) {
        logmsg("volume %s: its layer is gone after a hold", v->id);
        v->gone = 1;
    }
    pthread_rwlock_unlock(&v->hold);
}

static void forget_volume(int fd, const char *id)
{
    pthread_mutex_lock(&volumes_mu);
    struct volume **pp = &volumes, *v;
    while ((v = *pp) && strcmp(v->id, id))
        pp = &v->next;
    if (v && v->opens) {
        pthread_mutex_unlock(&volumes_mu);
        say(fd, "ERR EBUSY volume %s is open %d times\n", id, v->opens);
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
        else if (!valid_id(id))
            say(fd, "ERR EINVAL bad request\n");
        else if (strcmp(line, "HOLD") == 0)
            hold_volume(fd, id);
        else if (strcmp(line, "FORGET") == 0)
            forget_volume(fd, id);
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

static int start_listener(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(listen_path) >= sizeof(sa.sun_path))
        return -1;
    strcpy(sa.sun_path, listen_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct stat st;
    if (lstat(listen_path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(listen_path);
    mode_t old = umask(0077);
    int rc = fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) ||
        listen(fd, 64);
    umask(old);
    pthread_t t;
    if (rc || pthread_create(&t, NULL, listen_loop, (void *)(intptr_t)fd)) {
        logmsg("cannot listen on %s: %s", listen_path, strerror(errno));
        return -1;
    }
    pthread_detach(t);
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: thunder-volume-server --layers DIR --cache DIR "
            "--control SOCK --listen SOCK [--fetch-wait SECONDS] "
            "[--gid GROUP] [--allow-other] [--no-splice] [--pid-file FILE] "
            "MOUNT_DIR\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *mount_dir = NULL, *pid_file = NULL;
    int allow_other = 0;
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
        if (a[0] != '-') {
            if (mount_dir)
                usage();
            mount_dir = a;
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
        else if (!strcmp(a, "--fetch-wait"))
            fetch_wait = atof(val);
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
    if (!mount_dir || !layers_dir || !cache_dir || !control_path ||
        !listen_path || fetch_wait < 0)
        usage();
    started = time(NULL);
    signal(SIGPIPE, SIG_IGN);
    if (start_listener())
        return 1;
    if (pid_file) {
        FILE *f = fopen(pid_file, "w");
        if (!f) {
            logmsg("cannot write %s: %s", pid_file, strerror(errno));
            return 1;
        }
        fprintf(f, "%d\n", (int)getpid());
        fclose(f);
    }
    char *fargv[10];
    int fargc = 0;
    fargv[fargc++] = argv[0];
    fargv[fargc++] = (char *)mount_dir;
    fargv[fargc++] = "-f";
    fargv[fargc++] = "-o";
    /* Enough idle threads for the loop device's queue (no churn). */
    fargv[fargc++] = "max_threads=64,max_idle_threads=32,clone_fd";
    fargv[fargc++] = "-o";
    fargv[fargc++] = allow_other ?
        "fsname=thunder-volumes,allow_other,default_permissions" :
        "fsname=thunder-volumes";
    fargv[fargc] = NULL;
    int rc = fuse_main(fargc, fargv, &ops, NULL);
    unlink(listen_path);
    if (pid_file)
        unlink(pid_file);
    return rc;
}
