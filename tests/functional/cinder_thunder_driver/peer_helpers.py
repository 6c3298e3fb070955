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

"""What the peer-mode driver's functional tests share.

The driver's backend and host, the connector, Cinder volumes on that host,
direct reads and writes of the loop devices, and the loop devices left
under a daemon's mount (detached at the end of each test).
"""

import os
import shutil
import subprocess

import pytest

from tests.harness import standalone
from thunder_common import loops

BACKEND = 'thunder_peer_functional'
HOST = 'peer-node'
MiB = 1024 * 1024
GiB = 1024 * MiB
CONNECTOR = {'host': HOST, 'ip': '127.0.0.1'}


def unavailable():
    """Why these tests cannot run here (None if they can)."""
    for tool in ('losetup', 'fusermount3'):
        if not shutil.which(tool):
            return '%s is not installed' % tool
    if not os.path.exists('/dev/fuse'):
        return 'no /dev/fuse'
    if os.geteuid() != 0:
        return 'loop devices need root'
    return None


needs_loops_and_fuse = pytest.mark.skipif(unavailable() is not None,
                                          reason=unavailable() or '')


def loops_under(mount):
    """The loop devices backed by files under ``mount``."""
    out = subprocess.run(loops.LIST_COMMAND, capture_output=True, text=True,
                         check=True).stdout
    return loops.backed_by(out, under=mount)


def detach_all(mount):
    for device in loops_under(mount):
        subprocess.run(['losetup', '-d', device], check=False)


def new_volume(size=1):
    """A Cinder volume on the peer-mode backend of HOST."""
    vol = standalone.Volume(size=size)
    vol.host = '%s@%s#%s' % (HOST, BACKEND, BACKEND)
    return vol


def read_device(device, length, offset=0):
    """``length`` bytes of a block device at ``offset``."""
    fd = os.open(device, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < length:
            block = os.pread(fd, min(4 * MiB, length - len(out)),
                             offset + len(out))
            assert block, 'short read from %s' % device
            out += block
        return bytes(out)
    finally:
        os.close(fd)


def write_device(device, offset, data):
    """Write ``data`` to a block device at ``offset`` and sync it."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
