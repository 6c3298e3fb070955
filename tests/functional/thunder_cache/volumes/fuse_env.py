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

"""A node, its volume store on FUSE and loop devices, for volume tests."""

import hashlib
import mmap
import os
import shutil
import subprocess
import time

import pytest

from tests import cache_helpers
from thunder_cache.cache import node as node_mod
from thunder_cache.peer import sources
from thunder_cache.volumes import volumes

IMAGE = 'img-volumes'
CHUNK = 256 * 1024
SIZE = 12 * 1024 * 1024 + 5 * 4096   # 4 KiB-aligned, last chunk short
MiB = 1024 * 1024


def unavailable():
    """Why these tests cannot run here, or None."""
    if not os.path.exists('/dev/fuse'):
        return '/dev/fuse does not exist'
    if not shutil.which('losetup') or not shutil.which('blockdev'):
        return 'losetup or blockdev is not installed'
    if os.geteuid() != 0:
        return 'loop devices need root'
    try:
        import thunder_cache.volumes.fusefs  # noqa: F401
    except (ImportError, OSError) as e:
        return 'no libfuse 3: %s' % e
    if subprocess.run(['losetup', '--find'], capture_output=True).returncode:
        return 'no free loop device'
    return None


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True,
                          text=True).stdout.strip()


class NodeImages:
    """The images of a Node, as a VolumeStore reads them."""

    def __init__(self, node):
        self.node = node

    def image_size(self, image_id):
        return self.node.cache(image_id).manifest.image_size

    def read_image(self, image_id, offset, length):
        return self.node.cache(image_id).read(offset, length)


class Env:
    """A node, a volume store, its mount, and the loop devices made."""

    def __init__(self, tmp_path, image):
        from thunder_cache.volumes import fusefs
        self.fusefs = fusefs
        self.tmp_path = tmp_path
        self.image = image
        self.origin_path = str(tmp_path / 'image-volume')
        manifest = cache_helpers.write_volume(self.origin_path, image, CHUNK)
        self.node = node_mod.Node('node-1', 'http://127.0.0.1:9',
                                  str(tmp_path / 'cache'),
                                  cache_helpers.client())
        self.node.register(node_mod.ImageSpec(
            IMAGE, manifest.digest(), sources.FileOrigin(self.origin_path),
            image_size=len(image)))
        self.layers_dir = str(tmp_path / 'layers')
        self.mount_dir = str(tmp_path / 'mnt')
        self.devices = []
        self.store = None
        self.mount = None

    def start(self):
        self.store = volumes.VolumeStore(self.layers_dir,
                                         NodeImages(self.node))
        self.mount = self.fusefs.Mount(self.store, self.mount_dir)
        self.mount.start()
        return self

    def stop(self):
        """Detach the loop devices, unmount, close the store."""
        for device in list(self.devices):
            self.detach(device)
        if self.mount is not None:
            self.mount.stop()
        if self.store is not None:
            self.store.close()
        self.mount = self.store = None

    def close(self):
        try:
            self.stop()
        finally:
            self.node.close()

    def path(self, volume_id):
        return os.path.join(self.mount_dir, volume_id)

    def cache_data(self):
        return os.path.join(str(self.tmp_path / 'cache'), IMAGE, 'data')

    def attach(self, volume_id):
        device = run('losetup', '--find', '--show', '--direct-io=on',
                     self.path(volume_id))
        self.devices.append(device)
        return device

    def detach(self, device):
        for _ in range(50):
            if not subprocess.run(['losetup', '-d', device],
                                  capture_output=True).returncode:
                break
            time.sleep(0.1)
        self.devices.remove(device)


def read_direct(path, offset=0, length=None):
    """Bytes of ``path`` read with O_DIRECT, 1 MiB at a time."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        if length is None:
            length = os.lseek(fd, 0, os.SEEK_END) - offset
        out = bytearray()
        buf = mmap.mmap(-1, MiB)
        while len(out) < length:
            n = os.preadv(fd, [buf], offset + len(out))
            if not n:
                break
            out += buf[:min(n, length - len(out))]
        return bytes(out)
    finally:
        os.close(fd)


def write_direct(path, offset, data):
    """Write ``data`` (512-byte aligned) at ``offset`` with O_DIRECT."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha(data):
    return hashlib.sha256(data).hexdigest()


#: The mark of tests that need FUSE, loop devices and root.
needs_fuse_and_loops = pytest.mark.skipif(unavailable() is not None,
                                          reason=str(unavailable()))
