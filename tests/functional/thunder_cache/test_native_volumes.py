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

"""The native volume server with a real daemon, FUSE and loop devices.

``thunder-volume-server`` is built from source (make), started by a real
``thunder-cache`` daemon (``[blockdev] volume_server = native``) and read
and written through its mount and through a direct-I/O loop device, as
the Cinder driver attaches it. The daemon is killed (-9), restarted and
stopped while a reader and writer checks every byte on the loop device.
"""

import contextlib
import ctypes
import errno
import importlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests import cache_helpers
from tests.functional.cinder_thunder_driver import peer_helpers
from tests.functional.thunder_cache import cache_daemons
from tests.functional.thunder_cache.volumes import fuse_env
from thunder_cache.boot import trace
from thunder_cache.control import client as control_client
from thunder_cache.volumes import cow
from thunder_cache.volumes import nativevol
from thunder_common import procs

BENCHMARKS = os.path.join(cache_helpers.REPO, 'benchmarks')
sys.path.insert(0, BENCHMARKS)
# The benchmark's checker.
restart = importlib.import_module('restart')

CHUNK = 64 * 1024
BS = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MiB = 1024 * 1024


def _unavailable():
    if os.geteuid() != 0:
        return 'needs root (FUSE mount, loop devices)'
    if not os.path.exists('/dev/fuse'):
        return '/dev/fuse does not exist'
    for tool in ('fusermount3', 'losetup', 'make', 'pkg-config'):
        if not shutil.which(tool):
            return '%s is not installed' % tool
    if subprocess.run(['pkg-config', '--exists', 'fuse3']).returncode:
        return 'libfuse3-dev is not installed'
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None,
                                reason=str(_unavailable()))


@pytest.fixture(scope='module')
def binary(tmp_path_factory):
    return nativevol.build(str(tmp_path_factory.mktemp('native')))


@pytest.fixture
def workdir():
    # Short: socket paths must fit in 108 bytes.
    path = tempfile.mkdtemp(prefix='nat-', dir='/tmp')
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stop_server(pid_file):
    try:
        with open(pid_file) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.exists('/proc/%d' % pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # our grandchild may be our zombie
        except ChildProcessError:
            pass
        time.sleep(0.05)


@pytest.fixture
def node(workdir, binary):
    daemon = cache_daemons.VolumeDaemon(workdir, 'n', native=binary,
                                        commit_interval=0)
    daemon.start()
    yield daemon
    daemon.stop()
    _stop_server(daemon.paths['native'] + '.pid')
    left = os.path.ismount(daemon.paths['mount'])
    if left:  # a server that died: its mount stays until unmounted
        subprocess.run(['fusermount3', '-u', '-z', daemon.paths['mount']],
                       check=False)
    assert not left


def _register(node, workdir, image_id, size):
    data = os.urandom(size)
    path = os.path.join(workdir, image_id + '.volume')
    manifest = cache_helpers.write_volume(path, data, CHUNK)
    node.control.call('register_image', image_id=image_id,
                      manifest_digest=manifest.digest(), image_size=size,
                      origin={'type': 'file', 'path': path})
    return data


def _file(node, volume_id):
    return os.path.join(node.paths['mount'], volume_id)


def _fallocate(fd, mode, offset, length):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                               ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length):
        raise OSError(ctypes.get_errno(), 'fallocate')


def test_reads_writes_resize_clone_discard_delete(node, workdir):
    data = _register(node, workdir, 'img-1', 3 * MiB + 1234)
    size = 8 * MiB
    node.control.call('create_volume', volume_id='vol-a', size=size,
                      image_id='img-1')
    path = _file(node, 'vol-a')
    expected = bytearray(data + bytes(size - len(data)))
    fd = os.open(path, os.O_RDWR)
    try:
        # Every chunk fetched through ensure_chunks on first read.
        assert os.pread(fd, size, 0) == expected
        # Unaligned: the partial blocks are copied up from the image.
        os.pwrite(fd, b'w' * 10000, 5000)
        expected[5000:15000] = b'w' * 10000
        os.fsync(fd)
        layer = cow.CowLayer.open(os.path.join(node.paths['layers'], 'vol-a'))
        assert layer.written_bytes() == 3 * BS  # blocks 1-3, durable
        layer.close()
        assert os.pread(fd, size, 0) == expected
        with open(node.cache_path('img-1'), 'rb') as f:
            assert f.read() == data  # the image cache is untouched
        # Open: the daemon may not delete it.
        with pytest.raises(control_client.ControlError) as info:
            node.control.call('delete_volume', volume_id='vol-a')
        assert info.value.kind == 'VolumeBusy'
        info = node.control.call('volume_info', volume_id='vol-a')
        assert info['open_count'] == 1 and info['written_bytes'] == 3 * BS
        # Grown while open: the server sees the new size and bitmap.
        node.control.call('resize_volume', volume_id='vol-a', size=2 * size)
        assert os.fstat(fd).st_size == 2 * size
        os.pwrite(fd, b'z' * BS, 2 * size - BS)
        expected += bytes(size - BS) + b'z' * BS
        assert os.pread(fd, 2 * size, 0) == expected
    finally:
        os.close(fd)
    # A clone copies the written blocks (flushed by the hold first).
    node.control.call('create_volume', volume_id='vol-b', size=2 * size,
                      source='vol-a')
    fd = os.open(_file(node, 'vol-b'), os.O_RDWR)
    try:
        assert os.pread(fd, 2 * size, 0) == expected
        # Discard: the range reads zeros, the layer's blocks are freed.
        layer_data = os.path.join(node.paths['layers'], 'vol-b', 'data')
        allocated = os.stat(layer_data).st_blocks
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100,
                   5 * BS)
        # The clone's copied blocks 1-3 are whole in the range: freed.
        assert os.stat(layer_data).st_blocks < allocated
        expected[100:100 + 5 * BS] = bytes(5 * BS)
        # Write-zeroes over the image's bytes and the volume's writes.
        _fallocate(fd, FALLOC_FL_ZERO_RANGE, 9 * BS + 7, 3 * BS)
        expected[9 * BS + 7:12 * BS + 7] = bytes(3 * BS)
        assert os.pread(fd, 2 * size, 0) == expected
        os.fsync(fd)
    finally:
        os.close(fd)
    node.control.call('create_volume', volume_id='snap-b', size=2 * size,
                      source='vol-b', read_only=True)
    with pytest.raises(OSError) as info:
        os.open(_file(node, 'snap-b'), os.O_RDWR)
    assert info.value.errno == errno.EROFS
    with open(_file(node, 'snap-b'), 'rb') as f:
        assert f.read() == expected
    image_data = os.path.realpath(node.cache_path('img-1'))
    assert image_data in _open_files(node)
    for volume_id in ('snap-b', 'vol-b', 'vol-a'):
        node.delete_volume(volume_id)
        assert not os.path.exists(os.path.join(node.paths['layers'],
                                               volume_id))
    assert os.listdir(node.paths['mount']) == []
    # No volume reads the image any more: the server let its cache go.
    assert image_data not in _open_files(node)


def _open_files(node):
    """The files the native server has open (not its holder's)."""
    return procs.open_files(
        nativevol.NativeServer(node.paths['native']).ping())


@contextlib.contextmanager
def _under_io(node, workdir, image_id, volume_id):
    """A volume on a loop device, checked by restart.py's checker.

    Beside it a reader's 1 MiB reads keep requests in flight. At the end:
    0 I/O errors, 0 wrong bytes, no I/O longer than 10 s, the device read
    back equal; then it is detached and the volume deleted.
    """
    data = _register(node, workdir, image_id, 16 * MiB)
    size = 24 * MiB
    node.control.call('create_volume', volume_id=volume_id, size=size,
                      image_id=image_id)
    device = subprocess.run(
        ['losetup', '--find', '--show', '--direct-io=on',
         _file(node, volume_id)], check=True, capture_output=True,
        text=True).stdout.strip()
    checker = restart.Checker(device,
                              bytearray(data + bytes(size - len(data))))
    reader = restart.Reader(device, checker)
    try:
        checker.start()
        reader.start()
        time.sleep(1)
        yield checker
        checker.finish()
        assert checker.errors == [] and checker.wrong == 0
        assert checker.longest < 10, checker.longest
        with open(device, 'rb') as f:
            assert f.read() == bytes(checker.expected)
    finally:
        checker.stop.set()
        checker.join(60)
        reader.join(60)
        subprocess.run(['losetup', '-d', device], check=False)
    node.delete_volume(volume_id, timeout=20)


def test_daemon_killed_restarted_and_stopped_under_io(node, workdir):
    """0 I/O errors, 0 wrong bytes, short stalls.

    The volume server does not depend on the daemon, except for chunks
    not yet fetched, which wait for it to come back.
    """
    with _under_io(node, workdir, 'img-2', 'vol-io') as checker:
        for event in ('kill', 'kill', 'stop'):
            before = checker.ops
            if event == 'kill':
                node.kill()
            else:
                node.stop()
            time.sleep(2)  # misses wait for the daemon meanwhile
            node.start()
            time.sleep(1)
            assert checker.ops > before, event
        # The daemon pauses the volume's I/O to look at its layer and to
        # grow it: done at once, under I/O, and nothing fails.
        started = time.monotonic()
        info = node.control.call('volume_info', volume_id='vol-io')
        assert info['open_count'] == 1 and info['written_bytes'] > 0
        node.control.call('resize_volume', volume_id='vol-io',
                          size=24 * MiB + MiB)
        assert time.monotonic() - started < 10
        time.sleep(0.5)


def test_volume_server_killed_restarted_upgraded_under_io(node, workdir,
                                                          binary):
    """The server's own death: its holder keeps the mount and restarts it.

    0 I/O errors and 0 wrong bytes through a loop device while the server
    is killed (-9), stopped (SIGTERM), upgraded (its binary replaced, then
    restarted), and its holder killed (-9); open counts and pending bitmap
    bits survive.
    """
    server = nativevol.NativeServer(node.paths['native'])
    holder = server.holder_pid()
    with _under_io(node, workdir, 'img-3', 'vol-vs') as checker:
        for event in ('kill', 'kill', 'kill', 'term', 'upgrade', 'holder'):
            before = checker.ops
            pid = server.ping()
            if event == 'upgrade':
                shutil.copy(binary, binary + '.new')
                os.replace(binary + '.new', binary)
                assert server.restart() != pid
                assert server.holder_pid() == holder  # exec'd in place
            elif event == 'holder':
                # The holder killed: its server takes its place.
                os.kill(holder, signal.SIGKILL)
                server.wait_for_new(pid)
                assert server.holder_pid() == pid
            else:
                os.kill(pid, signal.SIGKILL if event == 'kill'
                        else signal.SIGTERM)
                server.wait_for_new(pid)
            time.sleep(1)
            assert checker.ops > before, event
            assert checker.errors == [] and checker.wrong == 0, event
        # Killed while the daemon holds the volume (as for a resize): the
        # next server waits for the daemon's word before opening the layer.
        with server.hold('vol-vs') as opens:
            assert opens == 1
            pid = server.ping()
            os.kill(pid, signal.SIGKILL)
            server.wait_for_new(pid)
            time.sleep(0.5)
            before = checker.ops
            time.sleep(1)
            assert checker.ops == before  # still held
        time.sleep(1)
        assert checker.ops > before
        assert checker.errors == [] and checker.wrong == 0
        # What the kernel opened before stays known to the new server.
        info = node.control.call('volume_info', volume_id='vol-vs')
        assert info['open_count'] == 1 and info['written_bytes'] > 0
        with pytest.raises(control_client.ControlError) as info:
            node.control.call('delete_volume', volume_id='vol-vs')
        assert info.value.kind == 'VolumeBusy'
    with open(node.paths['native'] + '.log') as f:
        log = f.read()
    # Writes answered but not flushed when a server died: their bits were
    # taken over (else the checker would have read the image's bytes).
    assert 'bitmap pages taken over from the previous server' in log
    assert log.count('started the server') == 8
    assert 'vol-vs: held by thunder-cache when the previous server' in log


def _read_fresh(path, length):
    """length bytes of path, opened anew (the kernel's cache dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


def _flip_byte(path, offset):
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xff]))


@pytest.mark.parametrize('server_restarts', [False, True],
                         ids=['server-kept', 'server-restarted'])
def test_chunk_damaged_between_runs_is_fetched_again(
        node, workdir, server_restarts):
    """No wrong byte from a cache file damaged while no daemon ran.

    Chunks persisted by an earlier daemon run are read by the server
    only once the new daemon has verified them (``verify_persisted``,
    the default), whether the server outlived the daemon (it is told to
    forget its maps) or was restarted too: a damaged one is fetched
    again, counted and logged.
    """
    size = 16 * CHUNK
    data = _register(node, workdir, 'img-4', size)
    node.control.call('create_volume', volume_id='vol-c', size=size,
                      image_id='img-4')
    path = _file(node, 'vol-c')
    fd = os.open(path, os.O_RDONLY)  # open across the restart, as a VM's
    try:
        assert _read_fresh(path, size) == data
        assert node.metric('thunder_cache_chunks_from_origin_total') == 16
        server = nativevol.NativeServer(node.paths['native'])
        pid = server.ping()
        node.stop()
        if server_restarts:
            os.kill(pid, signal.SIGKILL)
            assert server.wait_for_new(pid) != pid
        # Bit rot in two persisted chunks, their bits still set.
        for index in (3, 7):
            _flip_byte(node.cache_path('img-4'), index * CHUNK + 100)
        node.start()
        assert (server.ping() == pid) != server_restarts
        for _ in range(2):  # the second time from the server's map
            assert _read_fresh(path, size) == data
        assert os.pread(fd, size, 0) == data
    finally:
        os.close(fd)
    assert node.metric('thunder_cache_local_corrupt_total') == 2
    assert node.metric('thunder_cache_chunks_reverified_total') == 14
    assert node.metric('thunder_cache_chunks_from_origin_total') == 2
    with open(node.cache_path('img-4'), 'rb') as f:
        assert f.read() == data  # repaired on disk
    log = node.log()
    for index in (3, 7):
        assert ('cached chunk %d does not match the manifest' % index) in log
    node.delete_volume('vol-c', timeout=20)
    if not server_restarts:
        with open(node.paths['native'] + '.log') as f:
            assert ('a new thunder-cache runs: the chunks of 1 images are '
                    'read again only once it says they are usable'
                    ) in f.read()


def _read_direct(path, offset, length):
    """length bytes at offset, past the kernel's cache and read-ahead."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def test_a_held_volume_does_not_stall_the_others(node, workdir):
    """I/O waiting for a hold waits apart from the threads that read FUSE.

    While thunder-cache holds volume A (as for a snapshot's copy), more
    requests on A than the server has threads wait; volume B is still
    read and written meanwhile. Then A's requests complete, right.
    """
    data = _register(node, workdir, 'img-1', 2 * MiB)
    for volume_id in ('vol-a', 'vol-b'):
        node.control.call('create_volume', volume_id=volume_id,
                          size=2 * MiB, image_id='img-1')
        assert _read_direct(_file(node, volume_id), 0, 2 * MiB) == data
    waiting = 40  # more than the server's threads, of either kind
    results = {}

    def on_a(i):
        offset = i * BS
        if i % 2:
            fuse_env.write_direct(_file(node, 'vol-a'), offset,
                                  bytes([i]) * BS)
            results[i] = bytes([i]) * BS
        else:
            results[i] = _read_direct(_file(node, 'vol-a'), offset, BS)

    def on_b():
        fuse_env.write_direct(_file(node, 'vol-b'), 0, b'b' * BS)
        results['b'] = _read_direct(_file(node, 'vol-b'), 0, 2 * BS)

    server = nativevol.NativeServer(node.paths['native'])
    with server.hold('vol-a'):
        held = [threading.Thread(target=on_a, args=(i,), daemon=True)
                for i in range(waiting)]
        for thread in held:
            thread.start()
        time.sleep(1)  # let A's requests reach the server and wait
        other = threading.Thread(target=on_b, daemon=True)
        other.start()
        other.join(60)
        assert not other.is_alive(), 'volume B waited for the hold of A'
        assert results['b'] == b'b' * BS + data[BS:2 * BS]
        assert all(thread.is_alive() for thread in held)
    for thread in held:
        thread.join(60)
        assert not thread.is_alive()
    for i in range(waiting):
        expected = bytes([i]) * BS if i % 2 else data[i * BS:(i + 1) * BS]
        assert results[i] == expected
        assert _read_direct(_file(node, 'vol-a'), i * BS, BS) == expected


def test_boot_trace_records_chunks_the_server_knew(workdir, binary):
    """Every chunk a boot reads is in its trace, present or fetched.

    Chunks persisted by a run before (and not re-verified:
    ``verify_persisted = false``) are usable at once; while the daemon
    records the image's reads the server still asks for each chunk the
    first time it reads it, so the trace has them in read order.
    """
    node = cache_daemons.VolumeDaemon(
        workdir, 'n', native=binary, commit_interval=0,
        extra='\n'.join(['[prefetch]', 'record = true', 'replay = false',
                         'record_window = 1', '[cache]',
                         'verify_persisted = false']))
    node.start()
    try:
        size = 16 * CHUNK
        data = _register(node, workdir, 'img-5', size)
        node.control.call('create_volume', volume_id='vol-t', size=size,
                          image_id='img-5')
        path = _file(node, 'vol-t')
        assert _read_direct(path, 0, 8 * CHUNK) == data[:8 * CHUNK]
        node.stop()
        trace_path = node.cache_path('img-5', 'trace')
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trace_path)
        node.start()  # 8 chunks of 16 present: this boot is recorded
        order = [12, 3, 5, 0, 13]
        for index in order:
            assert _read_direct(path, index * CHUNK, BS) == \
                data[index * CHUNK:index * CHUNK + BS]
        deadline = time.monotonic() + 20
        while not os.path.exists(trace_path):
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.2)
        with open(trace_path) as f:
            assert trace.decode(f.read(), 16) == order
        assert node.metric('thunder_cache_chunks_from_origin_total') == 2
        node.delete_volume('vol-t', timeout=20)
    finally:
        node.stop()
        _stop_server(node.paths['native'] + '.pid')


def test_missing_server_is_a_clear_start_error(workdir):
    daemon = cache_daemons.VolumeDaemon(
        workdir, 'n', native='/nonexistent/thunder-volume-server')
    result = subprocess.run(
        [sys.executable, '-m', 'thunder_cache.daemon', '--config-file',
         daemon.conf_path], capture_output=True, text=True, timeout=120,
        cwd=cache_daemons.REPO)
    assert result.returncode == 1
    assert ('Cannot start: cannot serve the volume files at %s with the '
            'native server: NotFound: [blockdev] native_server_binary = '
            '/nonexistent/thunder-volume-server is not installed'
            % daemon.paths['mount']) in result.stdout
    assert 'make -C %s install' % nativevol.SOURCE_DIR in result.stdout
    assert 'Traceback' not in result.stdout + result.stderr
    assert not os.path.ismount(daemon.paths['mount'])
    assert not os.path.exists(daemon.paths['control'])


def _attach(path):
    return subprocess.run(['losetup', '--find', '--show', '--direct-io=on',
                           path], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_switch_from_python_with_a_volume_attached(workdir, binary):
    """What the new default does to a volume attached under Python.

    A node upgraded from ``volume_server = python`` (the old default): the
    daemon's stop takes the Python server's mount away, so the loop device
    attached over it fails every I/O from then on, and the native server
    the new daemon starts does not help it. The layer is intact: attached
    again, the volume reads the image and its writes.
    """
    size = 4 * MiB
    old = cache_daemons.VolumeDaemon(workdir, 'n', commit_interval=0)
    daemons, devices = [old], []
    try:
        old.start()
        data = _register(old, workdir, 'img-s', 2 * MiB)
        old.control.call('create_volume', volume_id='vol-s', size=size,
                         image_id='img-s')
        devices.append(_attach(_file(old, 'vol-s')))
        peer_helpers.write_device(devices[0], BS, b'p' * BS)
        expected = bytearray(data + bytes(size - len(data)))
        expected[BS:2 * BS] = b'p' * BS
        assert _read_direct(devices[0], 0, size) == expected
        old.stop()
        # The same node, its configuration now the new default's.
        new = cache_daemons.VolumeDaemon(workdir, 'n', native=binary,
                                         commit_interval=0)
        daemons.append(new)
        new.start()
        assert nativevol.NativeServer(new.paths['native']).ping()
        with pytest.raises(OSError) as info:
            _read_direct(devices[0], 0, size)
        assert info.value.errno == errno.EIO
        # Attached again: served by the native server, nothing lost.
        devices.append(_attach(_file(new, 'vol-s')))
        assert _read_direct(devices[1], 0, size) == expected
        for device in devices:
            subprocess.run(['losetup', '-d', device], check=True)
        devices = []
        new.delete_volume('vol-s', timeout=20)
    finally:
        for device in devices:
            subprocess.run(['losetup', '-d', device], check=False)
        for daemon in daemons:
            daemon.stop()
        _stop_server(old.paths['native'] + '.pid')
    assert not os.path.ismount(old.paths['mount'])
