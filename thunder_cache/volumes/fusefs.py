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

"""The node's volumes as files: one FUSE mount, one raw file per volume.

``<mount_dir>/<volume id>`` is a regular file of exactly the volume's
size, read and written through
:class:`~thunder_cache.volumes.volumes.VolumeStore`
(doc/source/peer-mode-blockdev.rst). The Cinder driver attaches it with
``losetup --direct-io=on`` and hands the loop device to Nova as a ``local``
volume.

The filesystem is served by mfusepy on libfuse 3, multi-threaded, with no
lock of its own around reads and writes (the layers lock what they must),
and with attribute timeouts of 0, so that a resize made through the store
is what the next ``stat`` sees (and ``losetup -c`` after it). Files are
opened without ``direct_io``, so the kernel accepts ``O_DIRECT`` opens.

Discard and write-zeroes reach the layers through ``fallocate``: FUSE has
the operation, so the loop driver advertises both (granularity: this
filesystem's ``f_bsize``), and on Linux 6.18 sends a discard as
``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` and a write-zeroes as the
same (``ZERO_RANGE | KEEP_SIZE`` when the caller asked not to unmap,
e.g. ``BLKZEROOUT``). Both become
:meth:`~thunder_cache.volumes.volumes.VolumeStore.zero`; a file's ``st_blocks``
is its layer's allocated size, so ``du`` shows what a ``fstrim`` freed.

libfuse installs handlers for SIGHUP, SIGINT and SIGTERM that end the
mount, but only for signals whose handler is still the default: a daemon
must install its own handlers before :meth:`Mount.start`.
"""

import errno
import grp
import itertools
import logging
import os
import re
import shutil
import subprocess
import threading
import time

from thunder_cache import fsutil
from thunder_cache.volumes import volumes

LOG = logging.getLogger(__name__)


# mfusepy takes libfuse 2 when both are installed unless FUSE_LIBRARY_NAME
# says otherwise, and reads it once, at its import: the variable is set for
# that import only (FUSE_LIBRARY_PATH, if set, still wins).
_NAME_SET_HERE = 'FUSE_LIBRARY_NAME' not in os.environ
if _NAME_SET_HERE:
    os.environ['FUSE_LIBRARY_NAME'] = 'fuse3'
try:
    import mfusepy
finally:
    if _NAME_SET_HERE:
        del os.environ['FUSE_LIBRARY_NAME']

if mfusepy.fuse_version_major != 3:
    raise ImportError('thunder_cache.volumes.fusefs needs libfuse 3 (Debian: '
                      'libfuse3-3), mfusepy loaded libfuse %d.%d'
                      % (mfusepy.fuse_version_major,
                         mfusepy.fuse_version_minor))

FSNAME = 'thunder-volumes'
# fuse_common.h (libfuse 3).
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_DEVICE = '/dev/fuse'

_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EOPNOTSUPP)
# What the loop driver sends: discard, write-zeroes (cow.py's docstring).
_ZERO_MODES = (fsutil.FALLOC_FL_PUNCH_HOLE | fsutil.FALLOC_FL_KEEP_SIZE,
               fsutil.FALLOC_FL_ZERO_RANGE | fsutil.FALLOC_FL_KEEP_SIZE,
               fsutil.FALLOC_FL_ZERO_RANGE)
_OCTAL = re.compile(r'\\([0-7]{3})')


class MountError(Exception):
    """The filesystem could not be mounted."""


def _errno_of(e):
    if isinstance(e, mfusepy.FuseOSError):
        return e.errno
    if isinstance(e, volumes.VolumeNotFound):
        return errno.ENOENT
    if isinstance(e, volumes.VolumeReadOnly):
        return errno.EROFS
    if isinstance(e, volumes.VolumeBusy):
        return errno.EBUSY
    if isinstance(e, volumes.VolumeExists):
        return errno.EEXIST
    if isinstance(e, volumes.VolumeTooLarge):
        return errno.EFBIG
    if isinstance(e, OSError) and e.errno in _IO_ERRNOS:
        return e.errno
    return errno.EIO


def _errors(method):
    """Turn the store's exceptions into errno values for the kernel."""

    def wrapper(self, path, *args, **kwargs):
        try:
            return method(self, path, *args, **kwargs)
        except Exception as e:
            code = _errno_of(e)
            if code == errno.EIO:
                LOG.warning('%s %s: %s: %s', method.__name__, path,
                            type(e).__name__, e)
            raise mfusepy.FuseOSError(code)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _volume_id(path):
    """The volume id a path names, or ENOENT."""
    name = path[1:] if path and path.startswith('/') else ''
    try:
        return volumes.check_volume_id(name)
    except ValueError:
        raise mfusepy.FuseOSError(errno.ENOENT)


def _refuse(*args, **kwargs):
    raise mfusepy.FuseOSError(errno.EPERM)


class VolumeFS(mfusepy.Operations):
    """A flat directory of the store's volumes, each a raw file."""

    use_ns = True

    def __init__(self, store, gid=0):
        self.store = store
        # With a group, its members (cinder-volume) may read and write the
        # volume files: upload to Glance, download into a volume.
        self.gid = gid
        self._file_modes = (0o440, 0o660) if gid else (0o400, 0o600)
        self._handles = {}
        self._fh = itertools.count(1)
        self._lock = threading.Lock()
        self._time = time.time_ns()

    def init_with_config(self, conn_info, config_3):
        if config_3 is not None:
            # Every stat asks: a resize is seen at once (losetup -c).
            config_3.attr_timeout = 0
            config_3.entry_timeout = 0
            config_3.negative_timeout = 0
            config_3.direct_io = 0
        if conn_info is not None:
            # With auto_inval_data (libfuse 3's default) and attribute
            # timeouts of 0, the kernel asks for the attributes before
            # every read: twice the requests. Volume files change only
            # through this server, and the loop device reads them with
            # direct I/O: there is no page cache to invalidate.
            conn_info.want &= ~FUSE_CAP_AUTO_INVAL_DATA
            LOG.info('Volumes mounted (libfuse %d.%d, max_write %d, '
                     'max_readahead %d)', mfusepy.fuse_version_major,
                     mfusepy.fuse_version_minor, conn_info.max_write,
                     conn_info.max_readahead)

    # -- metadata ---------------------------------------------------------

    @_errors
    def getattr(self, path, fh=None):
        now = self._time
        if path == '/':
            return {'st_mode': _S_IFDIR | 0o755, 'st_nlink': 2,
                    'st_uid': 0, 'st_gid': self.gid, 'st_size': 0,
                    'st_atime': now, 'st_mtime': now, 'st_ctime': now}
        info = self.store.info(_volume_id(path))
        mode = self._file_modes[0 if info['read_only'] else 1]
        return {'st_mode': _S_IFREG | mode, 'st_nlink': 1,
                'st_uid': 0, 'st_gid': self.gid, 'st_size': info['size'],
                'st_blocks': info['allocated_bytes'] // 512,
                'st_blksize': 4096,
                'st_atime': now, 'st_mtime': now, 'st_ctime': now}

    def readdir(self, path, fh):
        if path != '/':
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return ['.', '..'] + self.store.list()

    @_errors
    def statfs(self, path):
        st = os.statvfs(self.store.layers_dir)
        return {'f_bsize': st.f_bsize, 'f_frsize': st.f_frsize,
                'f_blocks': st.f_blocks, 'f_bfree': st.f_bfree,
                'f_bavail': st.f_bavail, 'f_files': st.f_files,
                'f_ffree': st.f_ffree, 'f_favail': st.f_favail,
                'f_namemax': 128}

    @_errors
    def truncate(self, path, length, fh=None):
        volume_id = _volume_id(path)
        info = self.store.info(volume_id)
        if length == info['size']:
            return 0
        if info['read_only']:
            raise mfusepy.FuseOSError(errno.EROFS)
        if length < info['size']:
            raise mfusepy.FuseOSError(errno.EPERM)
        self.store.resize(volume_id, length)
        return 0

    def utimens(self, path, times=None):
        return 0

    # Volumes are made and removed through the store only.
    chmod = chown = create = mknod = mkdir = rmdir = unlink = _refuse
    rename = link = symlink = _refuse

    # -- open files -------------------------------------------------------

    @_errors
    def open(self, path, flags):
        volume_id = _volume_id(path)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        self.store.open(volume_id, writable)
        with self._lock:
            fh = next(self._fh)
            self._handles[fh] = (volume_id, writable)
        return fh

    def _handle(self, fh, write=False):
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        if write and not handle[1]:
            raise mfusepy.FuseOSError(errno.EBADF)
        return handle[0]

    @_errors
    def release(self, path, fh):
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            self.store.release(handle[0])
        return 0

    @_errors
    def read(self, path, size, offset, fh):
        return self.store.read(self._handle(fh), offset, size)

    @_errors
    def write(self, path, data, offset, fh):
        return self.store.write(self._handle(fh, write=True), offset, data)

    @_errors
    def fallocate(self, path, mode, offset, length, fh):
        """Punch a hole or zero a range: it reads zeros afterwards.

        A volume's size changes only by a resize, and a layer reserves no
        space: other modes, and a range past the end without
        ``FALLOC_FL_KEEP_SIZE``, are ``EOPNOTSUPP``.
        """
        volume_id = self._handle(fh, write=True)
        if mode not in _ZERO_MODES or (
                not mode & fsutil.FALLOC_FL_KEEP_SIZE and
                offset + length > self.store.info(volume_id)['size']):
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        self.store.zero(volume_id, offset, length)
        return 0

    @_errors
    def fsync(self, path, datasync, fh):
        self.store.flush(self._handle(fh))
        return 0

    @_errors
    def flush(self, path, fh):
        with self._lock:
            handle = self._handles.get(fh)
        if handle is not None and handle[1]:
            self.store.flush(handle[0])
        return 0


def _mount_points():
    """The mount points of this mount namespace."""
    points = set()
    with open('/proc/self/mountinfo') as f:
        for line in f:
            field = line.split(' ')[4]
            points.add(_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field))
    return points


def _run(cmd):
    if not shutil.which(cmd[0]):
        return False
    result = subprocess.run(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        LOG.warning('%s: %s', ' '.join(cmd), result.stdout.strip())
    return not result.returncode


class Mount:
    """The FUSE mount of a store's volumes, served by a background thread.

    :param allow_other: let users other than the server's own open the
        files (with the kernel checking the files' modes); needed when
        the server does not run as root.
    :param group: name of the group owning the volume files (mode 0660,
        0440 for snapshots); None: root's (0600).
    """

    def __init__(self, store, mount_dir, allow_other=False, group=None):
        self.store = store
        self.gid = grp.getgrnam(group).gr_gid if group else 0
        mount_dir = os.path.abspath(mount_dir)
        # As /proc/self/mountinfo names it.
        self.mount_dir = os.path.join(
            os.path.realpath(os.path.dirname(mount_dir)),
            os.path.basename(mount_dir))
        self.allow_other = allow_other
        self._thread = None
        self._error = None
        self._lock = threading.Lock()

    def __repr__(self):
        return '<Mount %s%s>' % (self.mount_dir,
                                 ' (mounted)' if self.mounted else '')

    @property
    def mounted(self):
        return self._thread is not None and os.path.ismount(self.mount_dir)

    def path(self, volume_id):
        """The file of a volume in the mount."""
        return os.path.join(self.mount_dir,
                            volumes.check_volume_id(volume_id))

    def _clear_stale(self):
        if self.mount_dir not in _mount_points():
            return
        try:
            os.stat(self.mount_dir)
        except OSError as e:
            LOG.warning('Lazily unmounting the stale mount at %s (%s), left '
                        'by a server that died', self.mount_dir, e)
            if not (_run(['fusermount3', '-u', '-z', self.mount_dir]) or
                    _run(['umount', '-l', self.mount_dir])):
                raise MountError('cannot unmount the stale mount at %s'
                                 % self.mount_dir)
            return
        raise MountError('%s is already a mount point (another server '
                         'running?)' % self.mount_dir)

    def _serve(self):
        options = dict(foreground=True, fsname=FSNAME)
        if self.allow_other:
            options.update(allow_other=True, default_permissions=True)
        try:
            mfusepy.FUSE(VolumeFS(self.store, self.gid), self.mount_dir,
                         **options)
        except BaseException as e:
            self._error = e
            LOG.error('The volumes filesystem at %s ended: %s',
                      self.mount_dir, e)
        else:
            LOG.info('The volumes filesystem at %s is unmounted',
                     self.mount_dir)

    def start(self, timeout=10):
        """Mount; return once the mount is in place.

        :raises MountError: if it is not mounted within ``timeout``
            seconds.
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            if not os.path.exists(FUSE_DEVICE):
                raise MountError('%s does not exist: no FUSE on this host '
                                 '(load the fuse module, or give the '
                                 'container the device)' % FUSE_DEVICE)
            self._clear_stale()
            os.makedirs(self.mount_dir, mode=0o755, exist_ok=True)
            self._error = None
            try:
                cwd = os.getcwd()
            except OSError:
                cwd = None
            self._thread = threading.Thread(target=self._serve, daemon=True,
                                            name='fuse-volumes')
            self._thread.start()
            deadline = time.monotonic() + timeout
            while not os.path.ismount(self.mount_dir):
                if not self._thread.is_alive():
                    self._thread = None
                    raise MountError('cannot mount the volumes at %s: %s '
                                     '(libfuse says why on stderr)'
                                     % (self.mount_dir, self._error))
                if time.monotonic() > deadline:
                    self._stop(timeout=5)
                    raise MountError('the volumes at %s were not mounted '
                                     'within %s s' % (self.mount_dir,
                                                      timeout))
                time.sleep(0.01)
            # libfuse changes the process's directory to / before it
            # serves (fuse_daemonize, even in the foreground): once a
            # request was answered that is done, and undone here.
            os.listdir(self.mount_dir)
            if cwd is not None and os.getcwd() != cwd:
                os.chdir(cwd)
        LOG.info('Serving %d volumes at %s', len(self.store.list()),
                 self.mount_dir)

    def stop(self, timeout=10):
        """Unmount and wait for the serving thread; idempotent."""
        with self._lock:
            self._stop(timeout)

    def _stop(self, timeout):
        thread = self._thread
        if thread is None:
            return
        busy = self.store.open_volumes()
        if busy:
            LOG.error('Unmounting %s while volumes are open (loop devices '
                      'attached?): %s; their I/O fails from now on',
                      self.mount_dir, ', '.join(sorted(busy)))
        if os.path.ismount(self.mount_dir) or (
                self.mount_dir in _mount_points()):
            if not _run(['fusermount3', '-u', self.mount_dir]):
                LOG.warning('Lazily unmounting %s', self.mount_dir)
                _run(['umount', '-l', self.mount_dir])
        thread.join(timeout)
        if thread.is_alive():
            LOG.error('The volumes filesystem at %s still serves open files '
                      'after %s s', self.mount_dir, timeout)
            return
        self._thread = None
