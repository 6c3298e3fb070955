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

"""The peer mode's volumes, for real: FUSE files under loop devices.

A real node cache (:class:`thunder_cache.node.Node`) reads an image-volume
from a file origin; a :class:`~thunder_cache.volumes.VolumeStore` over it
is mounted with :class:`~thunder_cache.fusefs.Mount`, and its files are
attached the way the Cinder driver attaches them (``losetup --find --show
--direct-io=on``). Every loop device and mount made here is detached and
unmounted after each test, failed or not.
"""

import errno
import grp
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.functional import cache_daemons
from tests.unit import cache_helpers
from thunder_cache import node as node_mod
from thunder_cache import sources
from thunder_cache import volumes

IMAGE = 'img-volumes'
CHUNK = 256 * 1024
SIZE = 12 * 1024 * 1024 + 5 * 4096   # 4 KiB-aligned, last chunk short
MiB = 1024 * 1024


def _unavailable():
    if not os.path.exists('/dev/fuse'):
        return '/dev/fuse does not exist'
    if not shutil.which('losetup') or not shutil.which('blockdev'):
        return 'losetup or blockdev is not installed'
    if os.geteuid() != 0:
        return 'loop devices need root'
    try:
        import thunder_cache.fusefs  # noqa: F401
    except (ImportError, OSError) as e:
        return 'no libfuse 3: %s' % e
    if subprocess.run(['losetup', '--find'], capture_output=True).returncode:
        return 'no free loop device'
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None,
                                reason=str(_unavailable()))


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
        from thunder_cache import fusefs
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


@pytest.fixture(scope='module')
def image():
    return os.urandom(SIZE)


@pytest.fixture
def env(tmp_path, image):
    env = Env(tmp_path, image)
    try:
        yield env.start()
    finally:
        env.close()


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


def test_two_volumes_of_one_image(env, image):
    env.store.create('vol-a', SIZE, image_id=IMAGE)
    env.store.create('vol-b', SIZE, image_id=IMAGE)
    assert sorted(os.listdir(env.mount_dir)) == ['vol-a', 'vol-b']
    st = os.stat(env.path('vol-a'))
    assert st.st_size == SIZE and st.st_mode == 0o100600
    assert st.st_uid == 0
    dev_a = env.attach('vol-a')
    dev_b = env.attach('vol-b')
    for device in (dev_a, dev_b):
        assert run('losetup', '-n', '-O', 'DIO', device) == '1'
        assert int(run('blockdev', '--getsize64', device)) == SIZE
        assert sha(read_direct(device)) == sha(image)

    # Aligned writes through A: whole blocks, and 512 bytes of a block
    # never written (copied up from the image first).
    whole = os.urandom(64 * 1024)
    part = os.urandom(512)
    write_direct(dev_a, MiB + 4096, whole)
    write_direct(dev_a, 3 * 4096 + 512, part)
    expected = bytearray(image)
    expected[MiB + 4096:MiB + 4096 + len(whole)] = whole
    expected[3 * 4096 + 512:3 * 4096 + 1024] = part
    assert sha(read_direct(dev_a)) == sha(bytes(expected))
    assert sha(read_direct(dev_b)) == sha(image)
    assert sha(read_direct(env.path('vol-b'))) == sha(image)
    with open(env.cache_data(), 'rb') as f:
        assert sha(f.read()) == sha(image)
    assert env.store.info('vol-a')['written_bytes'] == len(whole) + 4096
    assert env.store.info('vol-b')['written_bytes'] == 0

    # Persisted across an unmount and a new store over the same layers.
    run('blockdev', '--flushbufs', dev_a)
    env.stop()
    assert not os.path.ismount(env.mount_dir)
    cwd = os.getcwd()
    env.start()
    assert os.getcwd() == cwd  # libfuse's chdir('/') is undone
    assert env.store.list() == ['vol-a', 'vol-b']
    dev_a = env.attach('vol-a')
    assert sha(read_direct(dev_a)) == sha(bytes(expected))
    assert sha(read_direct(env.path('vol-b'))) == sha(image)


def test_extend_attached_volume(env, image):
    env.store.create('vol', SIZE, image_id=IMAGE)
    device = env.attach('vol')
    new_size = SIZE + 8 * MiB
    env.store.resize('vol', new_size)
    assert os.stat(env.path('vol')).st_size == new_size
    run('losetup', '-c', device)
    assert int(run('blockdev', '--getsize64', device)) == new_size
    assert read_direct(device, SIZE, 8 * MiB) == bytes(8 * MiB)
    assert read_direct(device, 0, SIZE) == image
    # The new tail is writable through the device.
    write_direct(device, new_size - 4096, b't' * 4096)
    assert read_direct(device, new_size - 8192, 8192) == (
        bytes(4096) + b't' * 4096)


def test_delete_refused_while_attached(env):
    env.store.create('vol', SIZE, image_id=IMAGE)
    device = env.attach('vol')
    with pytest.raises(volumes.VolumeBusy):
        env.store.delete('vol')
    assert env.store.info('vol')['open_count'] >= 1
    env.detach(device)
    # The kernel releases the file asynchronously after losetup -d.
    deadline = time.monotonic() + 10
    while True:
        try:
            env.store.delete('vol')
            break
        except volumes.VolumeBusy:
            assert time.monotonic() < deadline, 'still open after detach'
            time.sleep(0.05)
    assert os.listdir(env.mount_dir) == []
    assert not os.path.exists(os.path.join(env.layers_dir, 'vol'))


def test_filesystem_rules(env):
    env.store.create('ro', MiB, read_only=True)
    env.store.create('rw', MiB)
    assert os.stat(env.path('ro')).st_mode == 0o100400
    with pytest.raises(OSError) as e:
        os.open(env.path('ro'), os.O_RDWR)
    assert e.value.errno == errno.EROFS
    assert read_direct(env.path('ro')) == bytes(MiB)
    for call in (lambda: os.unlink(env.path('rw')),
                 lambda: os.mkdir(os.path.join(env.mount_dir, 'd')),
                 lambda: os.rename(env.path('rw'), env.path('x')),
                 lambda: open(os.path.join(env.mount_dir, 'new'), 'w'),
                 lambda: os.truncate(env.path('rw'), MiB - 1)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno in (errno.EPERM, errno.EROFS), call
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(env.mount_dir, 'missing'))
    # Growing the file through the mount is a resize.
    os.truncate(env.path('rw'), 2 * MiB)
    assert env.store.info('rw')['size'] == 2 * MiB
    # Writing past the end is refused.
    fd = os.open(env.path('rw'), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b'x', 2 * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.statvfs(env.mount_dir).f_bsize > 0


def test_image_fetch_failure_is_eio(env):
    env.store.create('vol', SIZE, image_id=IMAGE)
    # The cache holds nothing yet; the origin goes away.
    os.rename(env.origin_path, env.origin_path + '.gone')
    with pytest.raises(OSError) as e:
        read_direct(env.path('vol'), 0, 4096)
    assert e.value.errno == errno.EIO
    os.rename(env.origin_path + '.gone', env.origin_path)
    assert read_direct(env.path('vol'), 0, 4096) == env.image[:4096]


_DYING_SERVER = """
import os, sys
from thunder_cache import fusefs, volumes
store = volumes.VolumeStore(sys.argv[1], None)
fusefs.Mount(store, sys.argv[2]).start()
os._exit(0)
"""


def test_stale_mount_is_cleared(env, image, tmp_path):
    """A mount whose server died is lazily unmounted at start."""
    env.store.create('vol', SIZE, image_id=IMAGE)
    env.mount.stop()
    subprocess.run([sys.executable, '-c', _DYING_SERVER,
                    str(tmp_path / 'other-layers'), env.mount_dir],
                   check=True, cwd=cache_daemons.REPO, timeout=60)
    try:
        with pytest.raises(OSError) as e:
            os.stat(env.mount_dir)
        assert e.value.errno == errno.ENOTCONN
        env.mount.start()
        assert os.listdir(env.mount_dir) == ['vol']
        assert read_direct(env.path('vol'), 0, MiB) == image[:MiB]
    finally:
        if not env.mount.mounted:
            subprocess.run(['umount', '-l', env.mount_dir],
                           capture_output=True)


def test_group_owned_files(env):
    """With a group, cinder-volume's group may read and write the files."""
    group = next((g for g in grp.getgrall() if g.gr_gid), None)
    if group is None:
        pytest.skip('no group other than root on this host')
    env.store.create('rw', MiB)
    env.store.create('ro', MiB, read_only=True)
    env.mount.stop()
    env.mount = env.fusefs.Mount(env.store, env.mount_dir,
                                 group=group.gr_name)
    env.mount.start()
    rw = os.stat(env.path('rw'))
    ro = os.stat(env.path('ro'))
    assert (rw.st_uid, rw.st_gid) == (0, group.gr_gid)
    assert rw.st_mode == 0o100660
    assert (ro.st_gid, ro.st_mode) == (group.gr_gid, 0o100440)
