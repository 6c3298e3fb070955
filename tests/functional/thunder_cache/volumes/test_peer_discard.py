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

"""Discard and write-zeroes through a loop device reach the volume's layer.

The real thing of
:mod:`tests.functional.thunder_cache.volumes.test_peer_volumes` (a node, its
volume store on FUSE, ``losetup --direct-io=on``), with ``blkdiscard``, qemu's
block layer (``qemu-io``) as Nova configures it, and an ext4 file system on the
loop device trimmed with ``fstrim``.
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.functional.thunder_cache.volumes import fuse_env
from tests.functional.thunder_cache.volumes.fuse_env import IMAGE
from tests.functional.thunder_cache.volumes.fuse_env import MiB
from tests.functional.thunder_cache.volumes.fuse_env import read_direct
from tests.functional.thunder_cache.volumes.fuse_env import run
from tests.functional.thunder_cache.volumes.fuse_env import sha
from tests.functional.thunder_cache.volumes.fuse_env import write_direct

pytestmark = fuse_env.needs_fuse_and_loops

FS_BLOCK = 4096
_EXTENT = re.compile(r'^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):',
                     re.M)


def _allocated(env, volume_id):
    """Bytes the layer's data file takes (its st_blocks)."""
    data = os.path.join(env.layers_dir, volume_id, 'data')
    return os.stat(data).st_blocks * 512


def _queue(device, name):
    path = '/sys/block/%s/queue/%s' % (os.path.basename(device), name)
    with open(path) as f:
        return int(f.read())


def test_blkdiscard_and_zeroout_read_zeros(env, image):
    size = 32 * MiB
    env.store.create('vol', size, image_id=IMAGE)
    device = env.attach('vol')
    # The loop device offers discard and write-zeroes over a FUSE file.
    assert _queue(device, 'discard_max_bytes') > 0
    assert _queue(device, 'discard_granularity') == 4096
    assert _queue(device, 'write_zeroes_max_bytes') > 0
    expected = bytearray(image + bytes(size - len(image)))
    write_direct(device, 0, b'w' * 4 * MiB)
    expected[:4 * MiB] = b'w' * 4 * MiB
    assert _allocated(env, 'vol') >= 4 * MiB
    # Discard (PUNCH_HOLE) of written blocks, write-zeroes (ZERO_RANGE) of
    # blocks never written over the image and of a partial block, and a
    # discard past the image.
    for args, start, length in (
            (['-o', str(MiB), '-l', str(2 * MiB)], MiB, 2 * MiB),
            (['-z', '-o', str(6 * MiB), '-l', str(MiB)], 6 * MiB, MiB),
            (['-z', '-o', str(8 * MiB + 512), '-l', '1024'],
             8 * MiB + 512, 1024),
            (['-o', str(20 * MiB), '-l', str(MiB)], 20 * MiB, MiB)):
        run('blkdiscard', *(args + [device]))
        expected[start:start + length] = bytes(length)
    # The file itself: a hole punched in it reads zeros; preallocation
    # (mode 0) is refused, the size never changes by fallocate.
    run('fallocate', '--punch-hole', '-o', str(5 * MiB), '-l', '4096',
        env.path('vol'))
    expected[5 * MiB:5 * MiB + 4096] = bytes(4096)
    with pytest.raises(subprocess.CalledProcessError) as e:
        run('fallocate', '-o', '0', '-l', str(size + MiB), env.path('vol'))
    assert 'not supported' in e.value.stderr
    assert os.stat(env.path('vol')).st_size == size
    assert sha(read_direct(device)) == sha(bytes(expected))
    allocated = _allocated(env, 'vol')
    assert allocated <= 2 * MiB + 2 * FS_BLOCK
    assert os.stat(env.path('vol')).st_blocks * 512 == allocated
    # Durable: a new store over the same layers reads the same bytes.
    env.stop()
    env.start()
    assert sha(read_direct(env.path('vol'))) == sha(bytes(expected))


@pytest.mark.skipif(not shutil.which('qemu-io'), reason='no qemu-io')
@pytest.mark.parametrize('discard', ['unmap', 'ignore'])
def test_qemu_passes_discards_with_unmap(env, image, discard):
    """qemu's block layer on the loop device, as Nova sets a local volume.

    raw on a host device, cache=none, aio=threads; ``discard=unmap`` is
    what the connection's ``discard`` makes Nova ask for, ``ignore``
    qemu's default without it.
    """
    env.store.create('vol', 32 * MiB, image_id=IMAGE)
    device = env.attach('vol')
    out = run('qemu-io', '--image-opts',
              'driver=raw,file.driver=host_device,file.filename=%s,'
              'file.aio=threads,cache.direct=on,discard=%s'
              % (device, discard),
              '-c', 'write -P 0x5a 0 4M', '-c', 'discard 0 4M')
    assert 'error' not in out.lower(), out
    if discard == 'unmap':
        assert _allocated(env, 'vol') == 0
        assert read_direct(device, 0, 4 * MiB) == bytes(4 * MiB)
    else:
        assert _allocated(env, 'vol') >= 4 * MiB
        assert read_direct(device, 0, 4 * MiB) == b'\x5a' * 4 * MiB


def _extents(path):
    """(offset, length) in bytes of the device blocks a file occupies."""
    out = run('filefrag', '-v', '-b%d' % FS_BLOCK, path)
    return [(int(a) * FS_BLOCK, (int(b) - int(a) + 1) * FS_BLOCK)
            for a, b in _EXTENT.findall(out)]


@pytest.fixture
def mountpoint(tmp_path):
    path = str(tmp_path / 'fs')
    os.mkdir(path)
    yield path
    if os.path.ismount(path):
        subprocess.run(['umount', path], capture_output=True)


@pytest.mark.skipif(not (shutil.which('mkfs.ext4') and
                         shutil.which('fstrim') and
                         shutil.which('filefrag')),
                    reason='mkfs.ext4, fstrim or filefrag missing')
def test_fstrim_frees_the_layer(env, image, mountpoint):
    """Prints (``pytest -s``) the layer's allocated size and fstrim's."""
    env.store.create('vol', 96 * MiB, image_id=IMAGE)
    device = env.attach('vol')
    run('mkfs.ext4', '-q', '-b', str(FS_BLOCK), '-E',
        'lazy_itable_init=0,lazy_journal_init=0', device)
    run('mount', device, mountpoint)
    kept, gone = os.urandom(4 * MiB), os.urandom(40 * MiB)
    for name, data in (('kept', kept), ('gone', gone)):
        with open(os.path.join(mountpoint, name), 'wb') as f:
            f.write(data)
    os.sync()
    extents = _extents(os.path.join(mountpoint, 'gone'))
    assert sum(length for _, length in extents) == len(gone)
    before = _allocated(env, 'vol')
    assert before >= len(kept) + len(gone)
    os.unlink(os.path.join(mountpoint, 'gone'))
    os.sync()
    started = time.monotonic()
    trimmed = run('fstrim', '-v', mountpoint)
    took = time.monotonic() - started
    assert 'trimmed' in trimmed
    after = _allocated(env, 'vol')
    print('\nlayer allocated: %.1f MiB with the files, %.1f MiB after '
          'deleting the 40 MiB one and fstrim (%s, %.2f s)'
          % (before / MiB, after / MiB, trimmed.split(': ')[-1], took))
    assert before - after >= len(gone) - MiB, (before, after)
    run('umount', mountpoint)
    # The freed blocks read zeros, never the image's bytes or the file's.
    for offset, length in extents:
        assert read_direct(device, offset, length) == bytes(length)
    # Flushed: a new store over the layers holds a clean file system with
    # the kept file intact.
    env.stop()
    env.start()
    device = env.attach('vol')
    run('e2fsck', '-fn', device)
    run('mount', '-o', 'ro', device, mountpoint)
    with open(os.path.join(mountpoint, 'kept'), 'rb') as f:
        assert sha(f.read()) == sha(kept)
    run('umount', mountpoint)
    for offset, length in extents:
        assert read_direct(device, offset, length) == bytes(length)
    assert _allocated(env, 'vol') == after
