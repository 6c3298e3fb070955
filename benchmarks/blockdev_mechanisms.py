# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""Peer mode: which user-space block device mechanism the VM should see.

Every mechanism exposes the same test image (default 1 GiB of random
bytes) whose bytes come from a user-space process that fetches missing
1 MiB chunks on demand from an "origin" file, the way the node cache does
(sparse cache file plus a chunk bitmap; a fetch can be delayed by
``--delays`` milliseconds to stand in for the network). The reads go
through the path the VM would use: ``qemu-img bench`` (qemu's own block
layer) with Nova's settings for a ``local`` volume (format raw,
cache=none, aio=threads) on the device, or qemu's own drivers (qcow2,
nbd, copy-on-read) where no host device exists. All mechanisms and the
plain local file baseline are measured in the same run, round-robin, and
the median of ``--repeat`` rounds is printed.

Run as root::

    tox -e bench -- benchmarks/blockdev_mechanisms.py [--size-mib 1024]
        [--repeat 3] [--only REGEX] [--keep-going] [--vm-debs DIR]

With ``--vm-debs DIR`` (what ``apt-get download linux-image-<version>-
cloud-amd64 busybox-static`` fetched into DIR) it also boots a guest on
some of the devices, set up as libvirt sets up Nova's ``local`` volumes,
and checks what the guest reads and writes.

Debian packages (a mechanism whose tool is missing is skipped with a
message):

* qemu-utils: qemu-img (the reader)
* qemu-system-x86: qemu-storage-daemon (in qemu-system-common) and
  qemu-system-x86_64 for the guests
* nbdkit, nbdkit-plugin-python: the NBD servers
* libfuse3-dev, gcc, pkg-config: the C FUSE server (the ceiling)
* fuse: libfuse 2 for fusepy (mfusepy, pyfuse3 and the C server use
  libfuse3-3)
* fio: optional (``--fio``) cross-check of the host block devices with
  true random offsets

Python packages: fusepy and mfusepy (test-requirements.txt); pyfuse3 by
hand (it builds against libfuse3-dev; its rows are skipped without it).

The states measured:

warm
    Every chunk is in the node cache's file (and that file is in the page
    cache), but the mechanism has not served it yet: a fresh mount, a fresh
    qcow2 overlay, a fresh loop device. The first VM on a node after a
    prefetch sees this.
hot
    The second pass over the same mechanism: whatever the kernel (FUSE page
    cache, loop) or qemu (copy-on-read overlay) kept from the first.
cold
    An empty cache: every chunk is fetched from the origin on first touch,
    with the fetch delayed by 0 or N ms.
"""

import argparse
import contextlib
import errno
import hashlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = MiB           # thunder_common.manifest.DEFAULT_CHUNK_SIZE
COW_BLOCK = 4096      # granularity of the per-volume writable layer

DEBIAN_PACKAGES = ('qemu-utils', 'qemu-system-x86', 'nbdkit',
                   'nbdkit-plugin-python', 'libfuse3-dev', 'gcc',
                   'pkg-config', 'fuse', 'fio')


# ---------------------------------------------------------------------------
# The node cache stand-in: a sparse file, a chunk bitmap, fetch on miss.
# The C server below implements the same logic; the nbdkit plugin imports
# this module (with Debian's python3) to use these classes.
# ---------------------------------------------------------------------------

class ChunkCache:
    """Read-only image cache: chunks fetched from ``origin`` on first read.

    A fetch reads the chunk from the origin file, sleeps ``delay`` seconds
    (the network), writes it into the sparse cache file and marks it
    present. Concurrent readers of a missing chunk share one fetch.
    """

    def __init__(self, origin, cache, size, chunk, delay, warm):
        self.size = size
        self.chunk = chunk
        self.delay = delay
        self.origin_fd = os.open(origin, os.O_RDONLY)
        if warm:
            self.cache_fd = os.open(cache, os.O_RDWR)
        else:
            self.cache_fd = os.open(cache, os.O_RDWR | os.O_CREAT |
                                    os.O_TRUNC, 0o600)
            os.ftruncate(self.cache_fd, size)
        count = (size + chunk - 1) // chunk
        self.present = bytearray(b'\x01' * count if warm else count)
        self.lock = threading.Lock()
        self.inflight = {}
        self.fetches = 0

    def _fetch(self, index):
        with self.lock:
            if self.present[index]:
                return
            event = self.inflight.get(index)
            owner = event is None
            if owner:
                event = self.inflight[index] = threading.Event()
        if not owner:
            event.wait()
            return
        try:
            offset = index * self.chunk
            data = os.pread(self.origin_fd, self.chunk, offset)
            if self.delay:
                time.sleep(self.delay)
            os.pwrite(self.cache_fd, data, offset)
            self.present[index] = 1
            self.fetches += 1
        finally:
            with self.lock:
                del self.inflight[index]
            event.set()

    def read(self, offset, length):
        if offset >= self.size:
            return b''
        length = min(length, self.size - offset)
        first = offset // self.chunk
        last = (offset + length - 1) // self.chunk
        if self.present.find(0, first, last + 1) >= 0:
            for index in range(first, last + 1):
                if not self.present[index]:
                    self._fetch(index)
        return os.pread(self.cache_fd, length, offset)


class CowLayer:
    """A volume's own writable layer over a read-only base.

    Written 4 KiB blocks live in a per-volume sparse file and are marked
    in a block bitmap; everything else is read from the base. A write that
    covers a block partly first copies that block up from the base.
    """

    def __init__(self, base, path, size):
        self.base = base
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)
        self.written = bytearray((size + COW_BLOCK - 1) // COW_BLOCK)
        self.lock = threading.Lock()

    def read(self, offset, length):
        if offset >= self.size:
            return b''
        length = min(length, self.size - offset)
        end = offset + length
        first = offset // COW_BLOCK
        stop = (end - 1) // COW_BLOCK + 1
        written = self.written
        if written.find(1, first, stop) < 0:
            return self.base.read(offset, length)
        parts = []
        pos = offset
        block = first
        while pos < end:
            state = written[block]
            nxt = block + 1
            while nxt < stop and written[nxt] == state:
                nxt += 1
            run_end = min(end, nxt * COW_BLOCK)
            if state:
                parts.append(os.pread(self.fd, run_end - pos, pos))
            else:
                parts.append(self.base.read(pos, run_end - pos))
            pos = run_end
            block = nxt
        return b''.join(parts)

    def write(self, offset, data):
        if offset >= self.size:
            raise OSError(errno.ENOSPC, 'write beyond the end')
        data = data[:self.size - offset]
        end = offset + len(data)
        first = offset // COW_BLOCK
        last = (end - 1) // COW_BLOCK
        with self.lock:
            for block in {first, last}:
                start = block * COW_BLOCK
                covered = (offset <= start and
                           end >= min(start + COW_BLOCK, self.size))
                if not self.written[block] and not covered:
                    os.pwrite(self.fd, self.base.read(start, COW_BLOCK),
                              start)
            os.pwrite(self.fd, data, offset)
            self.written[first:last + 1] = b'\x01' * (last + 1 - first)
        return len(data)


def make_volume(opts):
    """The object a server serves: the cache, or a COW layer over it."""
    cache = ChunkCache(opts.origin, opts.cache, opts.size, opts.chunk,
                       opts.delay_ms / 1000.0, opts.warm)
    if opts.cow:
        return CowLayer(cache, opts.cow, opts.size)
    return cache


# ---------------------------------------------------------------------------
# Servers, run as child processes of this script (``--serve KIND``).
# ---------------------------------------------------------------------------

def serve_fusepy(opts):
    """fusepy (libfuse 2), or mfusepy (the same API) on libfuse 3."""
    if opts.serve == 'mfusepy':
        # mfusepy takes libfuse 2 when both are installed, unless told.
        os.environ['FUSE_LIBRARY_NAME'] = 'fuse3'
        import mfusepy as fuse
    else:
        import fuse

    volume = make_volume(opts)
    now = time.time()
    mode = 0o644 if opts.cow else 0o444

    class Ops(fuse.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            if path == '/':
                return dict(st_mode=0o40755, st_nlink=2, st_size=0,
                            st_mtime=now, st_atime=now, st_ctime=now)
            if path == '/disk':
                return dict(st_mode=0o100000 | mode, st_nlink=1,
                            st_size=opts.size, st_mtime=now, st_atime=now,
                            st_ctime=now)
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            return ['.', '..', 'disk']

        def open(self, path, flags):
            if path != '/disk':
                raise fuse.FuseOSError(errno.ENOENT)
            if not opts.cow and flags & os.O_ACCMODE != os.O_RDONLY:
                raise fuse.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):
            return volume.read(offset, size)

        def write(self, path, data, offset, fh):
            if not opts.cow:
                raise fuse.FuseOSError(errno.EROFS)
            return volume.write(offset, data)

        def truncate(self, path, length, fh=None):
            if length != opts.size:
                raise fuse.FuseOSError(errno.EPERM)

        def flush(self, path, fh):
            return 0

        def fsync(self, path, datasync, fh):
            return 0

    # kernel_cache: the image is immutable and every write goes through
    # this process, so the kernel may keep what it has read.
    options = dict(foreground=True, kernel_cache=True, ro=not opts.cow,
                   fsname='thunder-' + opts.serve)
    if opts.serve == 'fusepy':
        # libfuse 2 caps requests at 128 KiB whatever max_read says.
        options.update(big_writes=True, max_read=1024 * 1024)
    fuse.FUSE(Ops(), opts.mountpoint, **options)


def serve_pyfuse3(opts):
    import pyfuse3
    import trio

    cache = ChunkCache(opts.origin, opts.cache, opts.size, opts.chunk, 0,
                       opts.warm)
    delay = opts.delay_ms / 1000.0
    inflight = {}

    async def fetch(index):
        # The same as ChunkCache._fetch, with the network wait in trio.
        event = inflight.get(index)
        if event is not None:
            await event.wait()
            return
        event = inflight[index] = trio.Event()
        try:
            offset = index * cache.chunk
            data = os.pread(cache.origin_fd, cache.chunk, offset)
            if delay:
                await trio.sleep(delay)
            os.pwrite(cache.cache_fd, data, offset)
            cache.present[index] = 1
        finally:
            del inflight[index]
            event.set()

    async def ensure(offset, length):
        first = offset // cache.chunk
        last = (offset + length - 1) // cache.chunk
        if cache.present.find(0, first, last + 1) >= 0:
            for index in range(first, last + 1):
                if not cache.present[index]:
                    await fetch(index)

    # The COW layer's own logic is synchronous: the chunks a request
    # touches are fetched (awaited) first, so that its reads of the base
    # never block.
    cow = CowLayer(cache, opts.cow, opts.size) if opts.cow else None

    async def volume_read(offset, length):
        if offset >= opts.size:
            return b''
        length = min(length, opts.size - offset)
        await ensure(offset, length)
        if cow is None:
            return os.pread(cache.cache_fd, length, offset)
        return cow.read(offset, length)

    async def volume_write(offset, data):
        await ensure(offset, max(1, min(len(data), opts.size - offset)))
        return cow.write(offset, data)

    disk_inode = pyfuse3.ROOT_INODE + 1
    mode = 0o644 if opts.cow else 0o444

    def attrs(inode):
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = 3600
        entry.attr_timeout = 3600
        stamp = int(time.time() * 1e9)
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = stamp
        entry.st_uid = entry.st_gid = 0
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = 0o40755
            entry.st_nlink = 2
            entry.st_size = 0
        else:
            entry.st_mode = 0o100000 | mode
            entry.st_nlink = 1
            entry.st_size = opts.size
        entry.st_blksize = 4096
        entry.st_blocks = (entry.st_size + 511) // 512
        return entry

    class Ops(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            if inode not in (pyfuse3.ROOT_INODE, disk_inode):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(inode)

        async def lookup(self, parent_inode, name, ctx=None):
            if parent_inode != pyfuse3.ROOT_INODE or name != b'disk':
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(disk_inode)

        async def opendir(self, inode, ctx):
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            if start_id == 0:
                pyfuse3.readdir_reply(token, b'disk', attrs(disk_inode), 1)

        async def open(self, inode, flags, ctx):
            if inode != disk_inode:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if cow is None and flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh, offset, size):
            return await volume_read(offset, size)

        async def write(self, fh, offset, buf):
            if cow is None:
                raise pyfuse3.FUSEError(errno.EROFS)
            return await volume_write(offset, buf)

        async def flush(self, fh):
            pass

        async def fsync(self, fh, datasync):
            pass

        async def release(self, fh):
            pass

    options = set(pyfuse3.default_options)
    options.add('fsname=thunder-pyfuse3')
    if cow is None:
        options.add('ro')
    pyfuse3.init(Ops(), opts.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


C_SERVER = r'''
/* The node cache stand-in of blockdev_mechanisms.py, in C (libfuse3):
 * one file "disk" whose reads fetch missing chunks from an origin file
 * into a sparse cache file, optionally under a 4 KiB-block COW layer.
 * usage: thunderfs ORIGIN CACHE SIZE CHUNK DELAY_US WARM COW|- MNT [opts]
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 4096
static int origin_fd, cache_fd, cow_fd = -1;
static off_t img_size, chunk;
static long delay_us;
static unsigned char *present;   /* 0 missing, 1 fetching, 2 present */
static unsigned char *written;   /* per BLOCK of the COW layer */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t wmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static int fetch(off_t c)
{
    pthread_mutex_lock(&mu);
    while (present[c] == 1)
        pthread_cond_wait(&cv, &mu);
    if (present[c] == 2) {
        pthread_mutex_unlock(&mu);
        return 0;
    }
    present[c] = 1;
    pthread_mutex_unlock(&mu);
    size_t n = chunk;
    if (c * chunk + (off_t)n > img_size)
        n = img_size - c * chunk;
    int rc = 0;
    char *buf = malloc(n);
    if (!buf)
        rc = -ENOMEM;
    else if (pread(origin_fd, buf, n, c * chunk) != (ssize_t)n)
        rc = -EIO;
    else {
        if (delay_us)
            usleep(delay_us);
        if (pwrite(cache_fd, buf, n, c * chunk) != (ssize_t)n)
            rc = -EIO;
    }
    free(buf);
    pthread_mutex_lock(&mu);
    __atomic_store_n(&present[c], rc ? 0 : 2, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return rc;
}

static int base_read(char *buf, size_t size, off_t off)
{
    for (off_t c = off / chunk; c <= (off + (off_t)size - 1) / chunk; c++)
        if (__atomic_load_n(&present[c], __ATOMIC_ACQUIRE) != 2) {
            int rc = fetch(c);
            if (rc)
                return rc;
        }
    ssize_t n = pread(cache_fd, buf, size, off);
    return n < 0 ? -errno : (int)n;
}

static int t_getattr(const char *path, struct stat *st,
                     struct fuse_file_info *fi)
{
    memset(st, 0, sizeof(*st));
    if (strcmp(path, "/") == 0) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else if (strcmp(path, "/disk") == 0) {
        st->st_mode = S_IFREG | (cow_fd >= 0 ? 0644 : 0444);
        st->st_nlink = 1;
        st->st_size = img_size;
        st->st_blocks = img_size / 512;
    } else
        return -ENOENT;
    return 0;
}

static int t_readdir(const char *path, void *buf, fuse_fill_dir_t fill,
                     off_t off, struct fuse_file_info *fi,
                     enum fuse_readdir_flags flags)
{
    fill(buf, ".", NULL, 0, 0);
    fill(buf, "..", NULL, 0, 0);
    fill(buf, "disk", NULL, 0, 0);
    return 0;
}

static int t_open(const char *path, struct fuse_file_info *fi)
{
    if (strcmp(path, "/disk") != 0)
        return -ENOENT;
    if (cow_fd < 0 && (fi->flags & O_ACCMODE) != O_RDONLY)
        return -EROFS;
    fi->keep_cache = 1;
    return 0;
}

static int t_read(const char *path, char *buf, size_t size, off_t off,
                  struct fuse_file_info *fi)
{
    if (off >= img_size)
        return 0;
    if (off + (off_t)size > img_size)
        size = img_size - off;
    if (cow_fd < 0)
        return base_read(buf, size, off);
    off_t end = off + size, pos = off;
    while (pos < end) {
        int state = written[pos / BLOCK];
        off_t run = (pos / BLOCK + 1) * BLOCK;
        while (run < end && written[run / BLOCK] == state)
            run += BLOCK;
        if (run > end)
            run = end;
        int rc;
        if (state) {
            ssize_t r = pread(cow_fd, buf + (pos - off), run - pos, pos);
            rc = r < 0 ? -errno : (int)r;
        } else
            rc = base_read(buf + (pos - off), run - pos, pos);
        if (rc < 0)
            return rc;
        pos = run;
    }
    return size;
}

static int copy_up(off_t b)
{
    char blk[BLOCK];
    size_t n = BLOCK;
    if (b * BLOCK + (off_t)n > img_size)
        n = img_size - b * BLOCK;
    int rc = base_read(blk, n, b * BLOCK);
    if (rc < 0)
        return rc;
    if (pwrite(cow_fd, blk, n, b * BLOCK) != (ssize_t)n)
        return -EIO;
    return 0;
}

static int t_write(const char *path, const char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi)
{
    if (cow_fd < 0)
        return -EROFS;
    if (off >= img_size)
        return -ENOSPC;
    if (off + (off_t)size > img_size)
        size = img_size - off;
    off_t b0 = off / BLOCK, b1 = (off + size - 1) / BLOCK;
    off_t edges[2] = {b0, b1};
    pthread_mutex_lock(&wmu);
    for (int i = 0; i < 2; i++) {
        off_t start = edges[i] * BLOCK, stop = start + BLOCK;
        if (stop > img_size)
            stop = img_size;
        int covered = off <= start && off + (off_t)size >= stop;
        if (!written[edges[i]] && !covered) {
            int rc = copy_up(edges[i]);
            if (rc) {
                pthread_mutex_unlock(&wmu);
                return rc;
            }
        }
    }
    ssize_t n = pwrite(cow_fd, buf, size, off);
    if (n == (ssize_t)size)
        memset(written + b0, 1, b1 - b0 + 1);
    pthread_mutex_unlock(&wmu);
    return n < 0 ? -errno : (int)n;
}

static int t_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    return size == img_size ? 0 : -EPERM;
}

static int t_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    return 0;
}

static void *t_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    cfg->kernel_cache = 1;
    cfg->entry_timeout = cfg->attr_timeout = 3600;
    return NULL;
}

static const struct fuse_operations ops = {
    .getattr = t_getattr, .readdir = t_readdir, .open = t_open,
    .read = t_read, .write = t_write, .truncate = t_truncate,
    .fsync = t_fsync, .init = t_init,
};

int main(int argc, char **argv)
{
    if (argc < 9) {
        fprintf(stderr, "usage: %s ORIGIN CACHE SIZE CHUNK DELAY_US WARM "
                "COW|- MOUNTPOINT [fuse options]\n", argv[0]);
        return 2;
    }
    img_size = strtoll(argv[3], NULL, 10);
    chunk = strtoll(argv[4], NULL, 10);
    delay_us = strtol(argv[5], NULL, 10);
    int warm = atoi(argv[6]);
    origin_fd = open(argv[1], O_RDONLY);
    cache_fd = warm ? open(argv[2], O_RDWR)
                    : open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (origin_fd < 0 || cache_fd < 0 ||
        (!warm && ftruncate(cache_fd, img_size))) {
        perror("open");
        return 1;
    }
    off_t count = (img_size + chunk - 1) / chunk;
    present = calloc(count, 1);
    if (warm)
        memset(present, 2, count);
    if (strcmp(argv[7], "-") != 0) {
        cow_fd = open(argv[7], O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (cow_fd < 0 || ftruncate(cow_fd, img_size)) {
            perror("cow");
            return 1;
        }
        written = calloc((img_size + BLOCK - 1) / BLOCK, 1);
    }
    char *fargv[argc - 6];
    int fargc = 0;
    fargv[fargc++] = argv[0];
    for (int i = 8; i < argc; i++)
        fargv[fargc++] = argv[i];
    return fuse_main(fargc, fargv, &ops, NULL);
}
'''

NBDKIT_PLUGIN = r'''
# nbdkit python plugin: the node cache stand-in of blockdev_mechanisms.py
import sys
sys.path.insert(0, %(bench_dir)r)
import blockdev_mechanisms as bm  # noqa
import nbdkit  # noqa

API_VERSION = 2
conf = {}
cache = None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    conf[key] = value


def config_complete():
    global cache
    cache = bm.ChunkCache(conf['origin'], conf['cache'], int(conf['size']),
                          int(conf['chunk']), float(conf['delay_ms']) / 1000,
                          conf['warm'] == '1')


def open(readonly):
    return 1


def get_size(h):
    return cache.size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = cache.read(offset, len(buf))
'''


# ---------------------------------------------------------------------------
# Process, mount and loop device bookkeeping: everything started is undone,
# in reverse order, whatever happens.
# ---------------------------------------------------------------------------

class Cleanup:
    def __init__(self):
        self.stack = contextlib.ExitStack()

    def callback(self, func, *args):
        self.stack.callback(func, *args)

    def close(self):
        self.stack.close()


def run(cmd, check=True, **kwargs):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          **kwargs)
    if check and proc.returncode:
        raise RuntimeError('%s failed (%d): %s' % (
            ' '.join(cmd), proc.returncode,
            (proc.stderr or proc.stdout).strip()[-2000:]))
    return proc


def proc_cpu(pids):
    """User + system CPU seconds used so far by the processes ``pids``."""
    total = 0
    tick = os.sysconf('SC_CLK_TCK')
    for pid in pids:
        try:
            with open('/proc/%d/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def host_cpu():
    """Busy CPU seconds of the whole machine so far (all processes)."""
    with open('/proc/stat') as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


class Server:
    """A child process, stopped (process group) when the run ends."""

    def __init__(self, cleanup, cmd, name, log):
        self.name = name
        self.log = log
        with open(log, 'ab') as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        cleanup.callback(self.stop)

    @property
    def pid(self):
        return self.proc.pid

    def check(self):
        if self.proc.poll() is not None:
            with open(self.log, errors='replace') as f:
                tail = f.read()[-2000:]
            raise RuntimeError('%s exited with %s: %s' % (
                self.name, self.proc.returncode, tail))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def wait_for(predicate, server, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        server.check()
        if time.monotonic() > deadline:
            raise RuntimeError('timed out waiting for %s' % what)
        time.sleep(0.02)


def unmount(path):
    if not os.path.ismount(path):
        return
    for cmd in (['fusermount3', '-u', path], ['fusermount', '-u', path],
                ['umount', path], ['umount', '-l', path]):
        if shutil.which(cmd[0]) and not run(cmd, check=False).returncode:
            return


def remove_tree(path):
    """rm -r, except below anything still mounted."""
    if not os.path.isdir(path):
        return
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.ismount(full):
            print('!! still mounted, left in place: %s' % full,
                  file=sys.stderr)
        elif os.path.isdir(full) and not os.path.islink(full):
            remove_tree(full)
        else:
            with contextlib.suppress(OSError):
                os.unlink(full)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def fuse_mount(cleanup, cmd, mountpoint, name, log):
    os.makedirs(mountpoint, exist_ok=True)
    server = Server(cleanup, cmd, name, log)
    # The callbacks run in reverse order: unmount (the server then exits by
    # itself), then make sure the server is gone.
    cleanup.callback(unmount, mountpoint)
    wait_for(lambda: os.path.ismount(mountpoint), server,
             '%s to mount %s' % (name, mountpoint))
    return server


def loop_attach(cleanup, path, readonly, direct_io=False):
    cmd = ['losetup', '-f', '--show']
    if readonly:
        cmd.append('-r')
    if direct_io:
        cmd.append('--direct-io=on')
    device = run(cmd + [path]).stdout.strip()
    cleanup.callback(loop_detach, device)
    if direct_io:
        # The kernel quietly falls back to buffered I/O if the backing file
        # does not take O_DIRECT: make sure the row measures what it says.
        dio = run(['losetup', '-n', '-O', 'DIO', device]).stdout.strip()
        if dio != '1':
            raise RuntimeError('%s: loop direct I/O not enabled' % device)
    return device


def loop_detach(device):
    for _ in range(50):
        if not run(['losetup', '-d', device], check=False).returncode:
            return
        time.sleep(0.1)
    print('!! could not detach %s' % device, file=sys.stderr)


# ---------------------------------------------------------------------------
# What the VM reads: a target for qemu-img bench.
# ---------------------------------------------------------------------------

class Target:
    def __init__(self, filename=None, fmt='raw', image_opts=None,
                 cache='none', pids=(), device=None, writable=False,
                 compare=None, cache_file=None):
        self.filename = filename
        self.fmt = fmt
        self.image_opts = image_opts
        self.cache = cache
        self.pids = list(pids)
        self.device = device
        self.writable = writable
        # (filename, fmt) that qemu-img compare can open, if not filename.
        self.compare = compare
        # The node cache's data file behind it, if any.
        self.cache_file = cache_file

    def qemu_args(self):
        if self.image_opts:
            return ['--image-opts', self.image_opts]
        return ['-f', self.fmt, self.filename]


def bench(target, count, size, depth, step=None, write=False, offset=0):
    """qemu-img bench: returns (seconds, reader CPU, server CPU, host CPU)."""
    cmd = ['qemu-img', 'bench', '-c', str(count), '-s', str(size),
           '-d', str(depth), '-t', target.cache, '-i', 'threads']
    if step:
        cmd += ['-S', str(step)]
    if offset:
        cmd += ['-o', str(offset)]
    if write:
        cmd += ['-w', '--pattern=0xa5']
    cmd += target.qemu_args()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = proc_cpu(target.pids)
    host_before = host_cpu()
    proc = run(cmd, check=False)
    host_used = host_cpu() - host_before
    server_used = proc_cpu(target.pids) - server_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError('qemu-img bench failed: %s' % (
            proc.stderr or proc.stdout).strip()[-2000:])
    match = re.search(r'Run completed in ([0-9.]+) seconds', proc.stdout)
    seconds = max(float(match.group(1)), 0.0005)
    reader = (after.ru_utime - before.ru_utime +
              after.ru_stime - before.ru_stime)
    return seconds, reader, server_used, host_used


def random_step(size, block):
    """A stride for qemu-img bench that looks random.

    An odd multiple of ``block`` near size/phi, coprime with the number of
    blocks: successive reads land far apart and none repeats before every
    block was read once.
    """
    blocks = size // block
    k = int(blocks * 0.6180339887) | 1
    while k > 1 and _gcd(k, blocks) != 1:
        k -= 2
    return k * block


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


# ---------------------------------------------------------------------------
# The mechanisms.
# ---------------------------------------------------------------------------

class Env:
    """Shared state of a run: paths, sizes, the compiled C server."""

    def __init__(self, workdir, size, chunk):
        self.workdir = workdir
        self.size = size
        self.chunk = chunk
        self.origin = os.path.join(workdir, 'origin.raw')
        self.warm_cache = os.path.join(workdir, 'warm-cache.raw')
        self.plain = os.path.join(workdir, 'plain.raw')
        self.c_server = None
        self.counter = 0
        self.phase_dir = workdir

    def path(self, stem):
        """A fresh path in the current phase's directory."""
        self.counter += 1
        return os.path.join(self.phase_dir, '%s-%d' % (stem, self.counter))

    def log(self, name):
        return os.path.join(self.workdir, '%s.log' % name)


class Mechanism:
    name = None
    summary = None
    nova = None       # how Nova could attach it ('local' or why not)
    fetches = True    # has a fetcher, so cold reads mean something
    tools = ()
    py_modules = ()

    def missing(self, env):
        for tool in self.tools:
            if not shutil.which(tool):
                return 'the %s command is not installed' % tool
        for module in self.py_modules:
            proc = run([sys.executable, '-c', 'import %s' % module],
                       check=False)
            if proc.returncode:
                return 'Python module %s does not import: %s' % (
                    module, proc.stderr.strip().splitlines()[-1:])
        return None

    def start(self, env, cleanup, warm, delay_ms):
        """Bring the mechanism up; returns the Target the VM would read."""
        raise NotImplementedError()


class PlainFile(Mechanism):
    fetches = False
    tools = ('qemu-img',)

    def __init__(self, cache):
        self.cache = cache
        if cache == 'none':
            self.name = 'plain file (cache=none)'
            self.summary = ('baseline: the image as a local raw file, read '
                            'with O_DIRECT as Nova reads volumes')
        else:
            self.name = 'plain file (page cache)'
            self.summary = ('ceiling: the same file read through the page '
                            'cache')
        self.nova = 'local (a block device: an LV or a loop device)'

    def start(self, env, cleanup, warm, delay_ms):
        return Target(env.plain, cache=self.cache)


class LoopPlain(Mechanism):
    name = 'loop on plain file'
    summary = 'loop device over the plain file: the cost of the loop layer'
    nova = 'local'
    fetches = False
    tools = ('qemu-img', 'losetup')

    def start(self, env, cleanup, warm, delay_ms):
        device = loop_attach(cleanup, env.plain, readonly=True)
        return Target(device, device=device)


def server_args(env, warm, delay_ms, cow, cache=None):
    cache = cache or (env.warm_cache if warm else env.path('cold-cache'))
    return ['--origin', env.origin, '--cache', cache,
            '--size', str(env.size), '--chunk', str(env.chunk),
            '--delay-ms', str(delay_ms)] + (['--warm'] if warm else []) + (
                ['--cow', env.path('cow')] if cow else [])


class FuseLoop(Mechanism):
    """A FUSE file (one of three servers) under a loop device."""

    tools = ('qemu-img', 'losetup')

    def __init__(self, server, cow, direct_io=False):
        self.server = server
        self.cow = cow
        self.direct_io = direct_io
        label = {'fusepy': 'fusepy', 'mfusepy': 'mfusepy',
                 'pyfuse3': 'pyfuse3', 'c': 'C libfuse3'}[server]
        loop = 'loop dio' if direct_io else 'loop'
        if cow:
            self.name = '%s COW file + %s' % (label, loop)
            self.summary = ('per-volume FUSE file: COW layer (4 KiB blocks) '
                            'over the cache, loop device read-write')
        else:
            self.name = '%s file + %s -r' % (label, loop)
            self.summary = ('the read-only cache as a FUSE file, read-only '
                            'loop device on top')
        if direct_io:
            self.summary += (' with direct I/O (no page cache for the FUSE '
                             'file, concurrent requests)')
        self.nova = 'local'
        if server == 'fusepy':
            self.py_modules = ('fuse',)
        elif server == 'mfusepy':
            self.py_modules = ('mfusepy',)
        elif server == 'pyfuse3':
            self.py_modules = ('pyfuse3', 'trio')

    def missing(self, env):
        if self.server == 'c' and not env.c_server:
            return 'the C server did not build (gcc, libfuse3-dev, pkg-config)'
        return super().missing(env)

    def start(self, env, cleanup, warm, delay_ms):
        mountpoint = env.path('mnt')
        cache = env.warm_cache if warm else env.path('cold-cache')
        if self.server == 'c':
            cow = env.path('cow') if self.cow else '-'
            cmd = [env.c_server, env.origin, cache, str(env.size),
                   str(env.chunk), str(int(delay_ms * 1000)),
                   '1' if warm else '0', cow, mountpoint, '-f',
                   '-o', 'fsname=thunder-c' + ('' if self.cow else ',ro')]
        else:
            cmd = [sys.executable, os.path.abspath(__file__), '--serve',
                   self.server, '--mountpoint', mountpoint] + server_args(
                       env, warm, delay_ms, self.cow, cache)
        server = fuse_mount(cleanup, cmd, mountpoint, self.name,
                            env.log('fuse'))
        device = loop_attach(cleanup, os.path.join(mountpoint, 'disk'),
                             readonly=not self.cow, direct_io=self.direct_io)
        return Target(device, pids=[server.pid], device=device,
                      writable=self.cow, cache_file=cache)


def start_nbdkit(env, cleanup, warm, delay_ms, plugin='python'):
    socket = env.path('nbd') + '.sock'
    cmd = ['nbdkit', '--foreground', '--readonly', '--unix', socket,
           '--threads', '16']
    if plugin == 'python':
        script = os.path.join(env.workdir, 'thunder_nbdkit.py')
        if not os.path.exists(script):
            with open(script, 'w') as f:
                f.write(NBDKIT_PLUGIN % {
                    'bench_dir': os.path.dirname(os.path.abspath(__file__))})
        cache = env.warm_cache if warm else env.path('cold-cache')
        cmd += ['python', script, 'origin=' + env.origin, 'cache=' + cache,
                'size=%d' % env.size, 'chunk=%d' % env.chunk,
                'delay_ms=%s' % delay_ms, 'warm=%d' % bool(warm)]
    else:
        cmd += ['file', env.warm_cache]
    server = Server(cleanup, cmd, 'nbdkit', env.log('nbdkit'))
    wait_for(lambda: os.path.exists(socket), server, 'nbdkit socket')
    return server, 'nbd+unix:///?socket=%s' % socket


def qcow2_overlay(env, backing, backing_fmt='raw'):
    overlay = env.path('overlay') + '.qcow2'
    run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-u', '-b', backing,
         '-F', backing_fmt, overlay, str(env.size)])
    return overlay


class NbdRaw(Mechanism):
    tools = ('qemu-img', 'nbdkit')

    def __init__(self, plugin):
        self.plugin = plugin
        if plugin == 'python':
            self.name = 'nbdkit python (nbd)'
            self.summary = ('nbdkit python plugin as the fetcher, qemu reads '
                            'nbd+unix:// itself (no host device)')
        else:
            self.name = 'nbdkit file (nbd)'
            self.summary = ('ceiling of NBD: nbdkit file plugin (C) over the '
                            'full cache file; no fetcher, warm only')
            self.fetches = False
        self.nova = ('cannot attach: no nbd volume driver in Nova, no nbd '
                     'kernel module for a host device')

    def missing(self, env):
        if self.plugin == 'python' and not os.path.exists(
                '/usr/lib/x86_64-linux-gnu/nbdkit/plugins/'
                'nbdkit-python-plugin.so') and run(
                    ['nbdkit', 'python', '--version'],
                    check=False).returncode:
            return 'nbdkit-plugin-python is not installed'
        return super().missing(env)

    def start(self, env, cleanup, warm, delay_ms):
        server, url = start_nbdkit(env, cleanup, warm, delay_ms, self.plugin)
        return Target(url, pids=[server.pid])


class Qcow2Over(Mechanism):
    """A per-volume qcow2 overlay that qemu reads, over a FUSE file or NBD."""

    def __init__(self, backing, copy_on_read=False):
        self.backing = backing
        self.copy_on_read = copy_on_read
        what = {'fusepy': 'fusepy file', 'nbd': 'nbdkit python'}[backing]
        if copy_on_read:
            self.name = 'qcow2 copy-on-read over %s' % what
            self.summary = ('qemu copy-on-read: first reads are copied into '
                            'the per-volume overlay (hot = from overlay)')
        else:
            self.name = 'qcow2 over %s' % what
            self.summary = ('per-volume qcow2 overlay read by qemu, backing '
                            '= the cache')
        self.nova = ('cannot attach: its local driver forces format raw, '
                     'so qemu never sees the qcow2')
        self.tools = ('qemu-img',) + (
            ('nbdkit',) if backing == 'nbd' else ())
        self.py_modules = ('fuse',) if backing == 'fusepy' else ()

    def start(self, env, cleanup, warm, delay_ms):
        if self.backing == 'nbd':
            server, backing = start_nbdkit(env, cleanup, warm, delay_ms)
        else:
            mountpoint = env.path('mnt')
            cmd = [sys.executable, os.path.abspath(__file__), '--serve',
                   'fusepy', '--mountpoint', mountpoint] + server_args(
                       env, warm, delay_ms, False)
            server = fuse_mount(cleanup, cmd, mountpoint, self.name,
                                env.log('fuse'))
            backing = os.path.join(mountpoint, 'disk')
        overlay = qcow2_overlay(env, backing)
        if self.copy_on_read:
            # read-only=off: qemu-img bench opens read-only unless -w, and
            # copy-on-read must write the overlay.
            opts = ('driver=copy-on-read,read-only=off,file.driver=qcow2,'
                    'file.file.driver=file,file.file.filename=%s' % overlay)
            return Target(image_opts=opts, pids=[server.pid], writable=True,
                          compare=(overlay, 'qcow2'))
        return Target(overlay, fmt='qcow2', pids=[server.pid],
                      writable=True)


class QsdLoop(Mechanism):
    name = 'qsd qcow2/nbd FUSE export + loop'
    summary = ('qemu-storage-daemon: qcow2 overlay over nbdkit python, '
               'exported as a FUSE file, loop device on top')
    nova = 'local'
    tools = ('qemu-img', 'nbdkit', 'qemu-storage-daemon', 'losetup')

    def start(self, env, cleanup, warm, delay_ms):
        nbd, url = start_nbdkit(env, cleanup, warm, delay_ms)
        overlay = qcow2_overlay(env, url)
        export = env.path('export')
        open(export, 'w').close()
        cleanup.callback(unmount, export)
        socket = url.split('socket=')[1]
        cmd = ['qemu-storage-daemon',
               '--blockdev', 'driver=nbd,node-name=base,read-only=on,'
               'server.type=unix,server.path=%s' % socket,
               '--blockdev', 'driver=file,node-name=ovf,filename=%s,'
               'cache.direct=on' % overlay,
               '--blockdev', 'driver=qcow2,node-name=ov,file=ovf,backing=base',
               '--export', 'type=fuse,id=e,node-name=ov,mountpoint=%s,'
               'writable=on' % export]
        qsd = Server(cleanup, cmd, 'qemu-storage-daemon', env.log('qsd'))
        wait_for(lambda: os.path.ismount(export), qsd, 'the FUSE export')
        device = loop_attach(cleanup, export, readonly=False)
        return Target(device, pids=[nbd.pid, qsd.pid], device=device,
                      writable=True)


def all_mechanisms():
    return [
        PlainFile('none'),
        PlainFile('writeback'),
        LoopPlain(),
        FuseLoop('fusepy', cow=False),
        FuseLoop('fusepy', cow=False, direct_io=True),
        FuseLoop('mfusepy', cow=False),
        FuseLoop('mfusepy', cow=False, direct_io=True),
        FuseLoop('mfusepy', cow=True, direct_io=True),
        FuseLoop('pyfuse3', cow=False, direct_io=True),
        FuseLoop('pyfuse3', cow=True, direct_io=True),
        FuseLoop('c', cow=False),
        FuseLoop('c', cow=False, direct_io=True),
        FuseLoop('c', cow=True),
        FuseLoop('c', cow=True, direct_io=True),
        Qcow2Over('fusepy'),
        NbdRaw('python'),
        NbdRaw('file'),
        Qcow2Over('nbd'),
        Qcow2Over('nbd', copy_on_read=True),
        QsdLoop(),
    ]


# ---------------------------------------------------------------------------
# The measurements.
# ---------------------------------------------------------------------------

def build_c_server(workdir):
    if not shutil.which('gcc') or not shutil.which('pkg-config'):
        return None, 'gcc or pkg-config is not installed'
    flags = run(['pkg-config', '--cflags', '--libs', 'fuse3'], check=False)
    if flags.returncode:
        return None, 'libfuse3-dev is not installed'
    source = os.path.join(workdir, 'thunderfs.c')
    binary = os.path.join(workdir, 'thunderfs')
    with open(source, 'w') as f:
        f.write(C_SERVER)
    proc = run(['gcc', '-O2', '-Wall', '-o', binary, source] +
               flags.stdout.split() + ['-lpthread'], check=False)
    if proc.returncode:
        return None, 'gcc failed: %s' % proc.stderr.strip()[-500:]
    return binary, None


def write_random(path, size):
    digest = hashlib.sha256()
    with open(path, 'wb') as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MiB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def verify(target, env):
    """qemu-img compare the target with the origin: every byte equal."""
    filename, fmt = target.compare or (target.filename, target.fmt)
    proc = run(['qemu-img', 'compare', '-q', '-f', 'raw', '-F', fmt,
                '-T', 'none' if target.cache == 'none' else 'writeback',
                env.origin, filename], check=False)
    if proc.returncode:
        raise RuntimeError('content differs from the image: %s %s' % (
            proc.stdout.strip(), proc.stderr.strip()))


def verify_writes(target, env, count, step):
    """Check the volume after ``count`` 4 KiB writes along ``step``.

    The written blocks must read back as the pattern (0xa5), every other
    byte must still equal the image.
    """
    filename, fmt = target.compare or (target.filename, target.fmt)
    copy = env.path('readback') + '.raw'
    run(['qemu-img', 'convert', '-f', fmt, '-O', 'raw', '-T',
         'none' if target.cache == 'none' else 'writeback', filename, copy])
    written = {i * step % env.size for i in range(count)}
    pattern = b'\xa5' * 4096
    with open(env.origin, 'rb') as origin, open(copy, 'rb') as result:
        for offset in range(0, env.size, MiB):
            want = bytearray(origin.read(MiB))
            for block in range(0, MiB, 4096):
                if offset + block in written:
                    want[block:block + 4096] = pattern
            if result.read(MiB) != want:
                raise RuntimeError('after writes, the MiB at %d differs' %
                                   offset)
    os.unlink(copy)


def fio_randread(device, seconds=3):
    cmd = ['fio', '--name=r', '--filename=%s' % device, '--rw=randread',
           '--bs=4k', '--iodepth=16', '--ioengine=libaio', '--direct=1',
           '--runtime=%d' % seconds, '--time_based', '--readonly',
           '--output-format=terse', '--terse-version=3']
    proc = run(cmd)
    return float(proc.stdout.split(';')[7])


GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev \
         virtio_pci virtio_blk; do
    insmod /lib/$m.ko 2>/dev/null
done
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "GUEST-SECTORS $(cat /sys/block/vda/size)"
echo "GUEST-RO $(cat /sys/block/vda/ro)"
echo "GUEST-SHA $(sha256sum /dev/vda | cut -d' ' -f1)"
if [ "$(cat /sys/block/vda/ro)" = 0 ]; then
    head -c 1048576 /dev/urandom > /tmp/w
    echo "GUEST-WSHA $(sha256sum /tmp/w | cut -d' ' -f1)"
    dd if=/tmp/w of=/dev/vda bs=1M seek=7 oflag=direct conv=fsync 2>/dev/null
    echo "GUEST-RSHA $(dd if=/dev/vda bs=1M skip=7 count=1 iflag=direct \
        2>/dev/null | sha256sum | cut -d' ' -f1)"
fi
echo GUEST-DONE
echo o > /proc/sysrq-trigger
sleep 30
"""
GUEST_MODULES = ('virtio/virtio_ring', 'virtio/virtio',
                 'virtio/virtio_pci_legacy_dev',
                 'virtio/virtio_pci_modern_dev', 'virtio/virtio_pci',
                 'block/virtio_blk')


def build_guest(debs, workdir):
    """Kernel and initramfs from Debian's cloud kernel and busybox-static.

    ``debs`` holds what ``apt-get download linux-image-cloud-amd64
    linux-image-<version>-cloud-amd64 busybox-static`` fetched.
    """
    # Here, not at the top: nbdkit's python plugin imports this module
    # with Debian's python3, which need not see this checkout.
    from thunder_stack.guest import rootfs
    root = os.path.join(workdir, 'guest')
    for deb in os.listdir(debs):
        if deb.endswith('.deb') and (deb.startswith('busybox-static') or
                                     re.match(r'linux-image-\d', deb)):
            run(['dpkg-deb', '-x', os.path.join(debs, deb), root])
    kernels = [k for k in os.listdir(os.path.join(root, 'boot'))
               if k.startswith('vmlinuz-')] if os.path.isdir(
                   os.path.join(root, 'boot')) else []
    busybox = os.path.join(root, 'bin', 'busybox')
    if not kernels or not os.path.exists(busybox):
        raise RuntimeError('no linux-image-*.deb or busybox-static*.deb in '
                           '%s' % debs)
    version = kernels[0][len('vmlinuz-'):]
    moddir = os.path.join(root, 'lib', 'modules', version, 'kernel',
                          'drivers')
    entries = [(d, 0o40755, b'')
               for d in ('bin', 'lib', 'proc', 'sys', 'dev', 'tmp')]
    with open(busybox, 'rb') as f:
        entries.append(('bin/busybox', 0o100755, f.read()))
    for module in GUEST_MODULES:
        with open(os.path.join(moddir, module + '.ko'), 'rb') as f:
            entries.append(('lib/%s.ko' % module.split('/')[1], 0o100644,
                            f.read()))
    entries.append(('init', 0o100755, GUEST_INIT.encode()))
    initrd = os.path.join(workdir, 'guest-initrd.gz')
    with open(initrd, 'wb') as f:
        f.write(rootfs.newc_archive(entries))
    return os.path.join(root, 'boot', kernels[0]), initrd


def guest_check(mech, env, args, guest, image_sha):
    """Boot a guest on the mechanism's device and check what it sees.

    The disk is set up as libvirt does for Nova's ``local`` volumes
    (host_device, raw, cache=none, aio=threads). The mechanism starts with
    an empty cache, so the guest's reads fetch every chunk. Returns (ok,
    a one-line verdict).
    """
    cleanup = Cleanup()
    env.phase_dir = tempfile.mkdtemp(prefix='guest-', dir=env.workdir)
    cleanup.callback(remove_tree, env.phase_dir)
    try:
        target = mech.start(env, cleanup, False, 0)
        readonly = ',read-only=on' if not target.writable else ''
        kernel, initrd = guest
        # A plain file is opened as a file (Nova would hand over an LV).
        driver = 'host_device' if target.device else 'file'
        cmd = ['qemu-system-x86_64', '-accel', args.vm_accel, '-m', '512',
               '-smp', '1', '-nodefaults', '-nographic', '-serial', 'stdio',
               '-no-reboot', '-kernel', kernel, '-initrd', initrd,
               '-append', 'console=ttyS0 quiet panic=-1',
               '-blockdev', 'driver=%s,node-name=disk,filename=%s,'
               'cache.direct=on,cache.no-flush=off,aio=threads%s' % (
                   driver, target.filename, readonly),
               '-blockdev', 'driver=raw,node-name=fmt,file=disk%s' % readonly,
               '-device', 'virtio-blk-pci,drive=fmt']
        started = time.monotonic()
        proc = run(cmd, check=False, timeout=args.vm_timeout)
        seconds = time.monotonic() - started
        lines = dict((key, value.strip()) for key, value in re.findall(
            r'(GUEST-[A-Z]+) ?(.*)', proc.stdout.replace('\r', '')))
        if 'GUEST-SHA' not in lines:
            raise RuntimeError('the guest did not report: %s' % (
                (proc.stderr or proc.stdout).strip()[-1000:]))
        sectors = int(lines['GUEST-SECTORS'])
        verdict = ['/dev/vda %d MiB' % (sectors // 2048),
                   'sha256 %s' % ('= image' if lines['GUEST-SHA'] ==
                                  image_sha else 'DIFFERS')]
        ok = sectors * 512 == env.size and lines['GUEST-SHA'] == image_sha
        if 'GUEST-WSHA' in lines:
            wrote = lines['GUEST-WSHA'] == lines['GUEST-RSHA']
            with open(env.origin, 'rb') as f:
                f.seek(7 * MiB)
                want = f.read(MiB)
            cache_ok = True
            if target.cache_file:
                with open(target.cache_file, 'rb') as f:
                    f.seek(7 * MiB)
                    cache_ok = f.read(MiB) == want
            verdict.append('guest write read back: %s' % (
                'yes' if wrote else 'NO'))
            verdict.append('image cache untouched: %s' % (
                'yes' if cache_ok else 'NO'))
            ok = ok and wrote and cache_ok
        verdict.append('%.0f s' % seconds)
        return ok, ', '.join(verdict)
    finally:
        cleanup.close()
        env.phase_dir = env.workdir


class Results:
    def __init__(self):
        self.data = {}

    def add(self, name, key, value):
        self.data.setdefault(name, {}).setdefault(key, []).append(value)

    def median(self, name, key):
        values = self.data.get(name, {}).get(key)
        return statistics.median(values) if values else None

    def count(self, name, key):
        return len(self.data.get(name, {}).get(key, ()))


def measure(mech, env, results, args, first_round):
    size = env.size
    seq_count = size // MiB
    rand_step = random_step(size, 4096)
    name = mech.name

    def phase(warm, delay_ms, body):
        cleanup = Cleanup()
        env.phase_dir = tempfile.mkdtemp(prefix='phase-', dir=env.workdir)
        # Registered first, so it runs last: after loop devices, servers and
        # mounts are gone, delete the phase's caches, overlays and sockets.
        cleanup.callback(remove_tree, env.phase_dir)
        try:
            target = mech.start(env, cleanup, warm, delay_ms)
            body(target)
        finally:
            cleanup.close()
            env.phase_dir = env.workdir

    def seq_rate(result):
        return size / result[0] / 1e6

    def warm_body(target):
        result = bench(target, seq_count, MiB, 4)
        results.add(name, 'warm_seq', seq_rate(result))
        results.add(name, 'cpu_proc', (result[1] + result[2]) * GiB / size)
        results.add(name, 'cpu_host', result[3] * GiB / size)
        result = bench(target, seq_count, MiB, 4)
        results.add(name, 'hot_seq', seq_rate(result))
        result = bench(target, args.rand_count, 4096, 16, rand_step)
        results.add(name, 'hot_rand', args.rand_count / result[0])
        if first_round and args.verify:
            verify(target, env)
            results.add(name, 'verified', 1)
        if target.device and args.fio and shutil.which('fio'):
            results.add(name, 'fio_hot_rand', fio_randread(target.device))
        if target.writable:
            count = args.rand_count // 4
            result = bench(target, count, 4096, 16, rand_step, write=True)
            results.add(name, 'rand_write', count / result[0])
            if first_round and args.verify:
                verify_writes(target, env, count, rand_step)

    def warm_rand_body(target):
        result = bench(target, args.rand_count, 4096, 16, rand_step)
        results.add(name, 'warm_rand', args.rand_count / result[0])
        # Go on along the same stride: blocks this mount has not read yet.
        result = bench(target, args.rand_count // 4, 4096, 1, rand_step,
                       offset=args.rand_count * rand_step % size)
        results.add(name, 'warm_rand_qd1',
                    args.rand_count // 4 / result[0])

    phase(True, 0, warm_body)
    phase(True, 0, warm_rand_body)
    if not mech.fetches:
        return
    for delay in args.delays:
        def cold_body(target, delay=delay):
            result = bench(target, seq_count, MiB, 4)
            results.add(name, 'cold_seq_%g' % delay, seq_rate(result))
            if first_round and args.verify and delay == args.delays[-1]:
                verify(target, env)
        phase(False, delay, cold_body)
    delay = args.delays[-1]

    def cold_rand_body(target):
        count = args.cold_rand_count
        result = bench(target, count, 4096, 16, random_step(size, env.chunk))
        results.add(name, 'cold_rand_%g' % delay, count / result[0])
    phase(False, delay, cold_rand_body)


def fmt(value, digits=0):
    if value is None:
        return '-'
    if digits:
        return '%.*f' % (digits, value)
    return '%d' % round(value)


def report(mechanisms, results, args, env, skipped, failed):
    last = args.delays[-1]
    columns = [
        ('warm_seq', 'warm seq', 'MB/s', 0),
        ('hot_seq', 'hot seq', 'MB/s', 0),
        ('warm_rand', 'warm rnd', 'IOPS', 0),
        ('warm_rand_qd1', 'rnd QD1', 'IOPS', 0),
        ('hot_rand', 'hot rnd', 'IOPS', 0),
    ] + [('cold_seq_%g' % d, 'cold %gms' % d, 'MB/s', 0)
         for d in args.delays] + [
        ('cold_rand_%g' % last, 'cold rnd', 'IOPS', 0),
        ('rand_write', 'rnd write', 'IOPS', 0),
        ('cpu_proc', 'CPU proc', 's/GiB', 2),
        ('cpu_host', 'CPU host', 's/GiB', 2),
    ]
    if args.fio:
        columns.append(('fio_hot_rand', 'fio rnd', 'IOPS', 0))
    base = results.median(PlainFile('none').name, 'warm_seq')
    width = max(len(m.name) for m in mechanisms) + 1
    print()
    print('Block device mechanisms: %d MiB image, %d KiB chunks, median of '
          '%d rounds' % (env.size // MiB, env.chunk // 1024, args.repeat))
    print('seq = 1 MiB reads at queue depth 4; rnd = 4 KiB reads at depth 16 '
          '(QD1: depth 1);')
    print('cold = empty cache, fetch delayed by N ms per chunk; cold rnd = '
          '%d 4 KiB reads on distinct chunks, %g ms fetches;' % (
              args.cold_rand_count, last))
    print('CPU = CPU seconds per GiB of the warm seq pass: proc = servers + '
          'reader, host = whole machine')
    print()
    head1 = '%-*s' % (width, 'mechanism') + ''.join(
        '%10s' % c[1] for c in columns) + '%10s' % 'vs plain'
    head2 = '%-*s' % (width, '') + ''.join(
        '%10s' % c[2] for c in columns) + '%10s' % 'warm seq'
    print(head1)
    print(head2)
    for mech in mechanisms:
        if mech.name in skipped or mech.name in failed:
            continue
        row = '%-*s' % (width, mech.name)
        for key, _, _, digits in columns:
            row += '%10s' % fmt(results.median(mech.name, key), digits)
        value = results.median(mech.name, 'warm_seq')
        ratio = '%.2fx' % (value / base) if value and base else '-'
        print(row + '%10s' % ratio)
    print()
    print('The mechanisms, and how Nova would attach each (connection type):')
    for mech in mechanisms:
        if mech.name in skipped or mech.name in failed:
            continue
        print('  %s' % mech.name)
        for line in textwrap.wrap('%s. Nova: %s.' % (mech.summary, mech.nova),
                                  74):
            print('      %s' % line)
    print()
    met = [m.name for m in mechanisms if m.nova.startswith('local') and
           not isinstance(m, PlainFile) and m.fetches and base and
           (results.median(m.name, 'warm_seq') or 0) >= base / 2]
    print('goal: warm seq >= half the plain file (cache=none), among the '
          'Nova-attachable fetching mechanisms: %s' % (
              ', '.join(met) or 'none'))
    print('load average: %s at the start, %s at the end' % (
        args.load_start, load_average()))
    for name, why in skipped.items():
        print('skipped: %s: %s' % (name, why))
    for name, why in failed.items():
        print('FAILED: %s: %s' % (name, why))
    if args.verify:
        ok = [m.name for m in mechanisms
              if results.count(m.name, 'verified')]
        print('verified byte for byte against the image (qemu-img compare): '
              '%d of %d mechanisms' % (len(ok), len(mechanisms) -
                                       len(skipped) - len(failed)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size-mib', type=int, default=1024,
                        help='test image size in MiB (default 1024)')
    parser.add_argument('--repeat', type=int, default=3,
                        help='rounds; the median is printed (default 3)')
    parser.add_argument('--delays', default='0,1',
                        help='fetch delays in ms for the cold reads '
                        '(default 0,1)')
    parser.add_argument('--rand-count', type=int, default=32768,
                        help='4 KiB random reads per pass (default 32768)')
    parser.add_argument('--cold-rand-count', type=int, default=512,
                        help='4 KiB cold random reads (default 512)')
    parser.add_argument('--only', default=None,
                        help='regular expression: mechanisms to run (the '
                        'plain file baseline always runs)')
    parser.add_argument('--no-verify', dest='verify', action='store_false',
                        help='skip the byte-for-byte check of each mechanism')
    parser.add_argument('--fio', action='store_true',
                        help='also fio 4 KiB random reads on host devices')
    parser.add_argument('--keep-going', action='store_true',
                        help='report a failing mechanism and go on')
    parser.add_argument('--vm-debs', default=None,
                        help='directory holding linux-image-*-cloud-amd64 '
                        'and busybox-static .deb files (apt-get download): '
                        'also boot a guest on the mechanisms matching '
                        '--vm-only, with the disk set up as libvirt does for '
                        'Nova\'s local volumes, and check what it reads and '
                        'writes')
    parser.add_argument('--vm-only', default=r'^plain file \(cache=none|'
                        r'COW file \+ loop dio',
                        help='regular expression: mechanisms to boot a '
                        'guest on (default: the plain file and the COW '
                        'files under loop dio)')
    parser.add_argument('--vm-accel', default='tcg',
                        help='qemu accelerator for the guest (default tcg: '
                        'nested KVM does not boot this kernel here)')
    parser.add_argument('--vm-timeout', type=int, default=600,
                        help='seconds a guest may take (default 600)')
    parser.add_argument('--workdir', default=None,
                        help='directory for the images (default: a temporary '
                        'directory under /var/tmp)')
    # Internal: run a FUSE server (used by the benchmark itself).
    parser.add_argument('--serve', choices=('fusepy', 'mfusepy', 'pyfuse3'),
                        help=argparse.SUPPRESS)
    parser.add_argument('--mountpoint', help=argparse.SUPPRESS)
    parser.add_argument('--origin', help=argparse.SUPPRESS)
    parser.add_argument('--cache', help=argparse.SUPPRESS)
    parser.add_argument('--size', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--chunk', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--delay-ms', type=float, default=0,
                        help=argparse.SUPPRESS)
    parser.add_argument('--warm', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--cow', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.delays = [float(x) for x in args.delays.split(',')]
    return args


def load_average():
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    if args.serve:
        # No Python SIGTERM handler here: libfuse installs its own (exit the
        # loop, unmount) only where the handler is still the default.
        if args.serve in ('fusepy', 'mfusepy'):
            serve_fusepy(args)
        else:
            serve_pyfuse3(args)
        return 0
    if os.geteuid() != 0:
        print('run as root (loop devices, FUSE mounts)', file=sys.stderr)
        return 2
    if not shutil.which('qemu-img'):
        print('qemu-img is required: apt-get install qemu-utils',
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = tempfile.mkdtemp(prefix='blockdev-mech-', dir=args.workdir or
                               '/var/tmp')
    cleanup = Cleanup()
    cleanup.callback(remove_tree, workdir)
    try:
        return _main(args, workdir)
    finally:
        cleanup.close()


def _main(args, workdir):
    env = Env(workdir, args.size_mib * MiB, CHUNK)
    args.load_start = load_average()
    print('.. writing a %d MiB random image in %s' % (
        args.size_mib, workdir), file=sys.stderr)
    write_random(env.origin, env.size)
    shutil.copyfile(env.origin, env.plain)
    shutil.copyfile(env.origin, env.warm_cache)
    env.c_server, why = build_c_server(workdir)
    if why:
        print('.. C FUSE server not built: %s' % why, file=sys.stderr)
    mechanisms = all_mechanisms()
    if args.only:
        mechanisms = [m for m in mechanisms if isinstance(m, PlainFile) or
                      re.search(args.only, m.name)]
    skipped, failed = {}, {}
    for mech in mechanisms:
        why = mech.missing(env)
        if why:
            skipped[mech.name] = why
            print('.. skipping %s: %s' % (mech.name, why), file=sys.stderr)
    active = [m for m in mechanisms if m.name not in skipped]
    results = Results()
    for round_ in range(args.repeat):
        for mech in active:
            if mech.name in failed:
                continue
            print('.. round %d/%d: %s' % (round_ + 1, args.repeat, mech.name),
                  file=sys.stderr)
            try:
                measure(mech, env, results, args, round_ == 0)
            except Exception as exc:
                if not args.keep_going:
                    raise
                failed[mech.name] = str(exc)[-500:]
                print('!! %s failed: %s' % (mech.name, exc), file=sys.stderr)
    guests = []
    if args.vm_debs:
        guests = run_guests(active, env, args, failed)
    report(mechanisms, results, args, env, skipped, failed)
    for name, ok, verdict in guests:
        print('guest on %s: %s%s' % (name, verdict, '' if ok else
                                     '  FAILED'))
    return 1 if failed or not all(ok for _, ok, _ in guests) else 0


def run_guests(mechanisms, env, args, failed):
    if not shutil.which('qemu-system-x86_64'):
        print('.. no guest checks: qemu-system-x86_64 is not installed '
              '(qemu-system-x86)', file=sys.stderr)
        return []
    guest = build_guest(args.vm_debs, env.workdir)
    with open(env.origin, 'rb') as f:
        image_sha = hashlib.file_digest(f, 'sha256').hexdigest()
    checks = []
    for mech in mechanisms:
        if mech.name in failed or not re.search(args.vm_only, mech.name):
            continue
        if not (mech.nova.startswith('local')):
            continue
        print('.. guest on %s' % mech.name, file=sys.stderr)
        try:
            ok, verdict = guest_check(mech, env, args, guest, image_sha)
        except Exception as exc:
            if not args.keep_going:
                raise
            ok, verdict = False, str(exc)[-300:]
        checks.append((mech.name, ok, verdict))
    return checks


if __name__ == '__main__':
    sys.exit(main())
