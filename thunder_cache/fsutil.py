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

import os
import tempfile


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
