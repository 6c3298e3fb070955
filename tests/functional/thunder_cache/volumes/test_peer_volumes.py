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

A real node cache (:class:`thunder_cache.cache.node.Node`) reads an
image-volume from a file origin; a
:class:`~thunder_cache.volumes.volumes.VolumeStore` over it is mounted with
:class:`~thunder_cache.volumes.fusefs.Mount`, and its files are attached the
way the Cinder driver attaches them (``losetup --find --show
--direct-io=on``). Every loop device and mount made here is detached and
unmounted after each test, failed or not.
"""

import errno
import grp
import os
import subprocess
import sys
import time

import pytest

from tests.functional.thunder_cache import cache_daemons
from tests.functional.thunder_cache.volumes import fuse_env
from tests.functional.thunder_cache.volumes.fuse_env import IMAGE
from tests.functional.thunder_cache.volumes.fuse_env import MiB
from tests.functional.thunder_cache.volumes.fuse_env import read_direct
from tests.functional.thunder_cache.volumes.fuse_env import run
from tests.functional.thunder_cache.volumes.fuse_env import sha
from tests.functional.thunder_cache.volumes.fuse_env import SIZE
from tests.functional.thunder_cache.volumes.fuse_env import write_direct
from thunder_cache.volumes import volumes

pytestmark = fuse_env.needs_fuse_and_loops


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
from thunder_cache.volumes import fusefs
from thunder_cache.volumes import volumes
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
