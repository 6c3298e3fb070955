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

"""Durability helpers shared by the cache's on-disk formats."""

import ctypes
import ctypes.util
import os
import tempfile

# linux/falloc.h and linux/fs.h.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RENAME_EXCHANGE = 1 << 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_int64)
_libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                            ctypes.c_char_p, ctypes.c_uint)


def fsync_dir(path):
    """fsync the directory ``path`` (to make entries in it durable)."""
    fd = os.open(path or '.', os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_parent(path):
    """fsync the directory holding ``path`` (after creating or renaming)."""
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_atomic(path, data):
    """Replace ``path`` by ``data`` (bytes), durably and atomically.

    The bytes go to a temporary file of a unique name in the same
    directory (mode 0600), which is synced, renamed over ``path``, and
    the directory synced. Concurrent writers of one path all succeed (the
    last rename wins); a failure leaves no temporary file behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.%s.' % os.path.basename(path),
                               suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def _check(result, *names):
    if result:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), *names)


def punch_hole(fd, offset, length):
    """Deallocate [offset, offset + length) of ``fd``: it reads zeros.

    The file keeps its size.

    :raises OSError: ``EOPNOTSUPP`` where the filesystem cannot punch.
    """
    _check(_libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, length))


def exchange(first, second):
    """Swap two paths of one filesystem atomically (renameat2).

    :raises OSError: ``EINVAL`` where the filesystem cannot exchange.
    """
    _check(_libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD,
                           os.fsencode(second), RENAME_EXCHANGE),
           first, second)
