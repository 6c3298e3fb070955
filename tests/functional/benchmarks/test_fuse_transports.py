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

"""The raw FUSE server of ``benchmarks/fuse_transports.py``, for real.

Built from ``benchmarks/fuse_transports.c`` and mounted as root over each
transport (classic /dev/fuse, io_uring, passthrough): what it serves is
the backing file's bytes, end to end, at odd offsets and past the end; a
writable mount writes through to the backing file; a classic server
killed and replaced on the same /dev/fuse descriptor (the mount kept by
its holder, here the test) serves the next read.
"""

import mmap
import os
import random
import shutil

import pytest

from benchmarks import blockdev_mechanisms as bm
from benchmarks import fuse_transports as ft

SIZE = 8 * 1024 * 1024 + 1234    # not a multiple of a page

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists('/dev/fuse') or
    not shutil.which('gcc'),
    reason='needs root, /dev/fuse and gcc (with liburing-dev)')


@pytest.fixture(scope='module')
def binary(tmp_path_factory):
    path, why = ft.build_raw(str(tmp_path_factory.mktemp('raw')))
    if why:
        pytest.skip(why)
    return path


@pytest.fixture
def backing(tmp_path):
    path = tmp_path / 'backing'
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture(scope='module')
def uring_switch():
    """FUSE over io_uring turned on for these tests, as it was after.

    The kernel offers it only while ``fuse.enable_uring`` is Y (N by
    default); the benchmark turns it on the same way.
    """
    try:
        with open(ft.ENABLE_URING) as f:
            before = f.read().strip()
    except OSError:
        before = None
    why = ft.uring_enabled()
    yield why
    if before == 'N' and why is None:
        with open(ft.ENABLE_URING, 'w') as f:
            f.write('N')


@pytest.fixture
def uring_or_skip(uring_switch):
    """Skip where this kernel has no FUSE over io_uring at all."""
    def check():
        if uring_switch:
            pytest.skip(uring_switch)
    return check


def mounted(binary, args, backing, tmp_path):
    cleanup = bm.Cleanup()
    try:
        raw = ft.RawServer(cleanup, binary, args, str(backing),
                           str(tmp_path / 'mnt'), str(tmp_path / 'log'))
    except BaseException:
        cleanup.close()
        raise
    return raw, cleanup


@pytest.mark.parametrize('args', [
    ['--transport', 'classic', '--threads', '2'],
    ['--transport', 'uring', '--depth', '4'],
    ['--transport', 'classic', '--passthrough'],
], ids=['classic', 'uring', 'passthrough'])
def test_reads_are_the_backing_files_bytes(binary, backing, tmp_path, args,
                                           uring_or_skip):
    if 'uring' in args:
        uring_or_skip()
    expected = backing.read_bytes()
    raw, cleanup = mounted(binary, args, backing, tmp_path)
    try:
        assert os.path.getsize(raw.file) == SIZE
        with open(raw.file, 'rb') as f:
            assert f.read() == expected
        fd = os.open(raw.file, os.O_RDONLY | os.O_DIRECT)
        try:
            # Aligned, as O_DIRECT on the backing file (passthrough) wants.
            buf = mmap.mmap(-1, 4096)
            for offset in random.Random(7).sample(range(SIZE // 4096), 64):
                assert os.preadv(fd, [buf], offset * 4096) == 4096
                assert buf[:] == expected[offset * 4096:offset * 4096 + 4096]
        finally:
            os.close(fd)
        with open(raw.file, 'rb') as f:
            f.seek(SIZE - 1000)
            assert f.read(4096) == expected[-1000:]
            assert f.read(4096) == b''
        with pytest.raises(OSError):
            open(raw.file, 'r+b')       # read-only without --writable
        raw.server.stop()
        if 'uring' in args:
            assert 'uring=0' not in raw.served()
    finally:
        cleanup.close()


@pytest.mark.parametrize('transport', ['classic', 'uring'])
def test_writes_reach_the_backing_file(binary, backing, tmp_path,
                                       transport, uring_or_skip):
    if transport == 'uring':
        uring_or_skip()
    raw, cleanup = mounted(binary, ['--transport', transport, '--writable'],
                           backing, tmp_path)
    data = os.urandom(3 * 4096)
    try:
        fd = os.open(raw.file, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, len(data))
            buf.write(data)
            assert os.pwritev(fd, [buf], 5 * 4096) == len(data)
            os.fsync(fd)
            assert os.pread(fd, len(data), 5 * 4096) == data
        finally:
            os.close(fd)
    finally:
        cleanup.close()
    with open(backing, 'rb') as f:
        f.seek(5 * 4096)
        assert f.read(len(data)) == data


def test_classic_server_replaced_on_the_same_descriptor(binary, backing,
                                                        tmp_path):
    expected = backing.read_bytes()
    mount_dir = tmp_path / 'mnt'
    mount_dir.mkdir()
    log = str(tmp_path / 'log')    # each server's: .1, .2
    cleanup = bm.Cleanup()
    try:
        fd = os.open('/dev/fuse', os.O_RDWR)
        cleanup.callback(os.close, fd)
        bm.run(['mount', '-i', '-t', 'fuse.fuse_transports', '-o',
                'fd=%d,rootmode=40000,user_id=0,group_id=0' % fd,
                'fuse_transports', str(mount_dir)], pass_fds=(fd,))
        # Undone after the servers are killed: a lazy unmount, which asks
        # nothing of a server (a stat of the mount would wait for one).
        cleanup.callback(bm.run, ['umount', '-l', str(mount_dir)])
        server = [binary, '--transport', 'classic', '--fd', str(fd)]
        first = ft.start_process(cleanup, server + [str(backing),
                                                    str(mount_dir)],
                                 log + '.1', (fd,))
        ft.wait_ready(first, log + '.1')
        with open(mount_dir / 'volume', 'rb') as f:
            assert f.read(4096) == expected[:4096]
        first.kill()
        first.wait()
        second = ft.start_process(cleanup, server + [
            '--resume', str(backing), str(mount_dir)], log + '.2', (fd,))
        ft.wait_ready(second, log + '.2')
        with open(mount_dir / 'volume', 'rb') as f:
            assert f.read() == expected
    finally:
        cleanup.close()
    assert not os.path.ismount(str(mount_dir))
