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

"""Tests for thunder_cache.volumes.cow: a volume's copy-on-write layer."""

import errno
import os
import random
import threading
import tracemalloc
from unittest import mock
import zlib

import pytest

from thunder_cache.volumes import cow

BS = cow.BLOCK_SIZE


class Base:
    """A base of known bytes that records its calls."""

    def __init__(self, size, seed=1):
        self.bytes = random.Random(seed).randbytes(size)
        self.calls = []

    def __call__(self, offset, length):
        self.calls.append((offset, length))
        return self.bytes[offset:offset + length]


@pytest.fixture
def base():
    return Base(64 * BS + 1000)


@pytest.fixture
def layer(tmp_path, base):
    layer = cow.CowLayer.create(str(tmp_path / 'vol'), len(base.bytes))
    yield layer
    layer.close()


def test_create_is_sparse_and_empty(tmp_path):
    size = 1 << 40
    layer = cow.CowLayer.create(str(tmp_path / 'big'), size)
    try:
        assert layer.size == size
        assert layer.written_bytes() == 0
        data = os.stat(str(tmp_path / 'big' / 'data'))
        bitmap = os.stat(str(tmp_path / 'big' / 'bitmap'))
        assert data.st_size == size
        assert bitmap.st_size == cow.bitmap_size(size)
        assert data.st_blocks * 512 < 1 << 20
        assert bitmap.st_blocks * 512 < 1 << 20
    finally:
        layer.close()


def test_create_refuses_existing_layer(layer):
    with pytest.raises(FileExistsError):
        cow.CowLayer.create(layer.directory, 4096)


@pytest.mark.parametrize('size', [0, -1, 1.5, True, None])
def test_create_refuses_bad_size(tmp_path, size):
    with pytest.raises(ValueError):
        cow.CowLayer.create(str(tmp_path / 'x'), size)


def test_fresh_reads_fall_through_in_one_call(layer, base):
    assert layer.read(100, 3 * BS, base) == base.bytes[100:100 + 3 * BS]
    assert base.calls == [(100, 3 * BS)]


def test_read_past_end_is_short(layer, base):
    size = layer.size
    assert layer.read(size - 10, 100, base) == base.bytes[-10:]
    assert layer.read(size, 100, base) == b''
    assert layer.read(size + 5000, 1, base) == b''
    assert layer.read(0, 0, base) == b''
    with pytest.raises(ValueError):
        layer.read(-1, 10, base)


def test_partial_block_write_copies_up(layer, base):
    layer.write(BS + 100, b'x' * 50, base)
    assert (BS, BS) in base.calls
    expected = bytearray(base.bytes[BS:2 * BS])
    expected[100:150] = b'x' * 50
    # The block now comes from the layer, whatever the base says.
    base.bytes = bytes(len(base.bytes))
    assert layer.read(BS, BS, base) == bytes(expected)
    assert layer.written_bytes() == BS


def test_whole_block_write_does_not_read_base(layer, base):
    layer.write(2 * BS, b'y' * (2 * BS), base)
    assert base.calls == []
    assert layer.read(2 * BS, 2 * BS, base) == b'y' * (2 * BS)


def test_write_across_block_boundaries(layer, base):
    offset = 3 * BS - 512
    data = os.urandom(2 * BS + 1024)
    assert layer.write(offset, data, base) == len(data)
    # Only the two partly covered blocks were copied up.
    assert sorted(base.calls) == [(2 * BS, BS), (5 * BS, BS)]
    assert layer.written_bytes() == 4 * BS
    expected = bytearray(base.bytes)
    expected[offset:offset + len(data)] = data
    assert layer.read(0, layer.size, base) == bytes(expected)


def test_second_partial_write_does_not_copy_up_again(layer, base):
    layer.write(10, b'a', base)
    base.calls.clear()
    layer.write(20, b'b', base)
    assert base.calls == []
    block = layer.read(0, BS, base)
    assert block[10:11] == b'a' and block[20:21] == b'b'
    assert block[21:] == base.bytes[21:BS]


def test_mixed_runs(layer, base):
    expected = bytearray(base.bytes)
    for block in (1, 2, 5, 9, 16, 17, 18, 19, 20, 21, 22, 23, 24, 40):
        data = os.urandom(BS)
        layer.write(block * BS, data, base)
        expected[block * BS:(block + 1) * BS] = data
    base.calls.clear()
    for offset, length in [(0, layer.size), (BS - 1, 3), (5 * BS + 7, BS),
                           (15 * BS, 11 * BS), (3 * BS, 2 * BS),
                           (40 * BS + 4095, 2)]:
        assert layer.read(offset, length, base) == bytes(
            expected[offset:offset + length]), (offset, length)
    # Unwritten runs are read from the base whole, never block by block.
    assert (25 * BS, 15 * BS) in base.calls


def test_last_partial_block(layer, base):
    size = layer.size
    layer.write(size - 3, b'end', base)
    assert layer.read(size - 10, 20, base) == base.bytes[-10:-3] + b'end'
    assert layer.written_bytes() == size % BS


def test_write_beyond_size(layer, base):
    with pytest.raises(OSError) as e:
        layer.write(layer.size, b'x', base)
    assert e.value.errno == errno.ENOSPC
    # A write reaching past the end is cut short.
    assert layer.write(layer.size - 2, b'xyz', base) == 2
    assert layer.read(layer.size - 2, 10, base) == b'xy'


def test_base_errors_fail_the_write_without_marking(layer, base):
    def broken(offset, length):
        raise IOError(errno.EIO, 'chunk unavailable')
    with pytest.raises(IOError):
        layer.write(100, b'z', broken)
    assert layer.written_bytes() == 0
    assert layer.read(0, BS, base) == base.bytes[:BS]


def test_short_base_is_an_error(layer):
    with pytest.raises(IOError):
        layer.read(0, BS, lambda offset, length: b'short')


def test_flush_orders_data_before_bitmap(layer, base):
    layer.write(0, b'q' * BS, base)
    calls = []
    real = os.fdatasync
    pwrite = os.pwrite

    def fdatasync(fd):
        calls.append(('sync', 'data' if fd == layer._data_fd else 'bitmap'))
        return real(fd)

    def record_pwrite(fd, data, offset):
        if fd == layer._bitmap_fd:
            calls.append(('write', 'bitmap'))
        return pwrite(fd, data, offset)

    with mock.patch('os.fdatasync', fdatasync), \
            mock.patch('os.pwrite', record_pwrite):
        layer.flush()
    assert calls == [('sync', 'data'), ('write', 'bitmap'),
                     ('sync', 'bitmap')]


def test_bits_reach_disk_only_on_flush(layer, base):
    layer.write(5 * BS, b'w' * BS, base)
    bitmap = os.path.join(layer.directory, 'bitmap')
    with open(bitmap, 'rb') as f:
        f.seek(cow.BITS_OFFSET)
        assert not any(f.read())
    layer.flush()
    with open(bitmap, 'rb') as f:
        f.seek(cow.BITS_OFFSET)
        assert f.read(1) == bytes([1 << 5])


def test_reopen_keeps_flushed_writes(tmp_path, base):
    path = str(tmp_path / 'vol')
    layer = cow.CowLayer.create(path, len(base.bytes))
    layer.write(7 * BS + 3, b'persist', base)
    layer.close()
    layer = cow.CowLayer.open(path)
    try:
        assert layer.written_bytes() == BS
        base.bytes = bytes(len(base.bytes))
        assert layer.read(7 * BS + 3, 7, base) == b'persist'
        assert layer.read(0, 4, base) == bytes(4)
    finally:
        layer.close()


@pytest.mark.parametrize('damage', ['truncate', 'extend', 'header', 'magic',
                                    'tail_bits', 'empty', 'short_data'])
def test_torn_or_foreign_bitmap_rejected(tmp_path, damage):
    path = str(tmp_path / 'vol')
    size = 100 * BS + 1
    cow.CowLayer.create(path, size).close()
    bitmap = os.path.join(path, 'bitmap')
    length = os.path.getsize(bitmap)
    if damage == 'truncate':
        os.truncate(bitmap, length - 1)
    elif damage == 'extend':
        os.truncate(bitmap, length + 1)
    elif damage == 'header':
        with open(bitmap, 'r+b') as f:
            f.seek(20)
            f.write(b'\x01')
    elif damage == 'magic':
        with open(bitmap, 'r+b') as f:
            f.write(b'VMTHCMAP')
    elif damage == 'tail_bits':
        with open(bitmap, 'r+b') as f:
            f.seek(length - 1)
            f.write(b'\xff')
    elif damage == 'empty':
        os.truncate(bitmap, 0)
    elif damage == 'short_data':
        os.truncate(os.path.join(path, 'data'), size - 1)
    with pytest.raises(cow.LayerError):
        cow.CowLayer.open(path)
    assert issubclass(cow.LayerError, ValueError)


def test_open_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        cow.CowLayer.open(str(tmp_path / 'nothing'))


def test_resize_grow(tmp_path, base):
    path = str(tmp_path / 'vol')
    layer = cow.CowLayer.create(path, 10 * BS + 100)
    layer.write(10 * BS, b'tail', base)
    layer.resize(1 << 30)
    assert layer.size == 1 << 30
    assert os.path.getsize(os.path.join(path, 'data')) == 1 << 30
    zeros = lambda offset, length: bytes(length)  # noqa: E731
    assert layer.read(10 * BS, 4, zeros) == b'tail'
    layer.write((1 << 30) - BS, b'n' * BS, zeros)
    layer.close()
    layer = cow.CowLayer.open(path)
    try:
        assert layer.size == 1 << 30
        assert layer.read(10 * BS, 4, zeros) == b'tail'
        assert layer.read((1 << 30) - BS, BS, zeros) == b'n' * BS
        assert layer.written_bytes() == 2 * BS
    finally:
        layer.close()


def test_resize_refuses_shrink(layer):
    size = layer.size
    with pytest.raises(ValueError):
        layer.resize(size - 1)
    layer.resize(size)
    assert layer.size == size


def test_copy_to_copies_only_written_blocks(tmp_path):
    size = 1 << 36  # 64 GiB, sparse
    zeros = lambda offset, length: bytes(length)  # noqa: E731
    src = cow.CowLayer.create(str(tmp_path / 'src'), size)
    try:
        src.write(0, b'a' * BS, zeros)
        src.write(size // 2 + 10, b'b' * 10, zeros)
        src.write(size - BS, b'c' * BS, zeros)
        copy = src.copy_to(str(tmp_path / 'copy'))
        try:
            data = os.stat(str(tmp_path / 'copy' / 'data'))
            assert data.st_size == size
            assert data.st_blocks * 512 <= 1 << 20
            assert copy.size == size
            assert copy.written_bytes() == 3 * BS
            assert copy.read(0, BS, zeros) == b'a' * BS
            assert copy.read(size // 2 + 10, 10, zeros) == b'b' * 10
            assert copy.read(size - BS, BS, zeros) == b'c' * BS
            # Independent afterwards, both ways.
            src.write(0, b'S' * BS, zeros)
            copy.write(size - BS, b'C' * BS, zeros)
            assert copy.read(0, BS, zeros) == b'a' * BS
            assert src.read(size - BS, BS, zeros) == b'c' * BS
        finally:
            copy.close()
        copy = cow.CowLayer.open(str(tmp_path / 'copy'))
        try:
            assert copy.read(size - BS, BS, zeros) == b'C' * BS
            assert copy.read(0, BS, zeros) == b'a' * BS
        finally:
            copy.close()
    finally:
        src.close()


def test_copy_to_flushes_the_source(tmp_path, base):
    src = cow.CowLayer.create(str(tmp_path / 'src'), len(base.bytes))
    src.write(0, b'x' * BS, base)
    src.copy_to(str(tmp_path / 'copy')).close()
    with open(str(tmp_path / 'src' / 'bitmap'), 'rb') as f:
        f.seek(cow.BITS_OFFSET)
        assert f.read(1) == b'\x01'
    src.close()


def test_concurrent_partial_writes_to_one_block(layer, base):
    """Copy-ups never undo a neighbour's write in the same block."""
    errors = []

    def writer(i):
        try:
            for round_ in range(20):
                block = round_ * 2
                layer.write(block * BS + i * 256, bytes([i]) * 256, base)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for round_ in range(20):
        block = layer.read(round_ * 2 * BS, BS, base)
        assert block == b''.join(bytes([i]) * 256 for i in range(16))


def test_closed_layer(layer, base):
    layer.close()
    layer.close()
    with pytest.raises(ValueError):
        layer.write(0, b'x', base)


# -- memory: the bitmap in pieces --------------------------------------------

TiB = 1 << 40


def _zeros(offset, length):
    return bytes(length)


def _peak(call):
    """Peak bytes Python allocated while ``call`` ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_volume_size(tmp_path):
    """A 2 TiB layer's bitmap is 64 MiB: never held whole in memory."""
    size = 2 * TiB
    path = str(tmp_path / 'big')
    peak, layer = _peak(lambda: cow.CowLayer.create(path, size))
    assert peak < 4 << 20
    # Writes all over the volume: each in another bitmap page.
    step = size // 300 // BS * BS
    offsets = [n * step for n in range(300)]
    try:
        def write_everywhere():
            for offset in offsets:
                layer.write(offset, b'w' * BS, _zeros)
            layer.flush()

        peak, _ = _peak(write_everywhere)
        assert peak < 4 << 20
        assert layer.written_bytes() == 300 * BS
    finally:
        layer.close()
    peak, layer = _peak(lambda: cow.CowLayer.open(path))
    try:
        assert peak < 4 << 20
        assert layer.written_bytes() == 300 * BS
        peak, copy = _peak(lambda: layer.copy_to(str(tmp_path / 'copy')))
        assert peak < 4 << 20
        copy.close()
        peak, _ = _peak(lambda: layer.resize(size + TiB))
        assert peak < 4 << 20
        for offset in offsets:
            assert layer.read(offset, BS, _zeros) == b'w' * BS
            assert layer.read(offset + BS, BS, _zeros) == bytes(BS)
    finally:
        layer.close()
    copy = cow.CowLayer.open(str(tmp_path / 'copy'))
    try:
        assert copy.written_bytes() == 300 * BS
        assert copy.read(offsets[-1], BS, _zeros) == b'w' * BS
    finally:
        copy.close()
    bitmap = os.stat(os.path.join(path, 'bitmap'))
    assert bitmap.st_blocks * 512 < 4 << 20  # still sparse


def test_too_many_changed_pages_are_flushed_data_first(tmp_path):
    """Past MAX_DIRTY_PAGES a write flushes: data synced, then bits."""
    layer = cow.CowLayer.create(str(tmp_path / 'v'), TiB)
    page_span = cow.PAGE * 8 * BS  # the volume bytes of one bitmap page
    calls = []
    real_sync, real_pwrite = os.fdatasync, os.pwrite

    def fdatasync(fd):
        calls.append('sync data' if fd == layer._data_fd else 'sync bits')
        return real_sync(fd)

    def pwrite(fd, data, offset):
        if fd == layer._bitmap_fd:
            calls.append('write bits')
        return real_pwrite(fd, data, offset)

    try:
        with mock.patch('os.fdatasync', fdatasync), \
                mock.patch('os.pwrite', pwrite):
            for n in range(cow.MAX_DIRTY_PAGES + 1):
                layer.write(n * page_span, b'x', _zeros)
        assert calls[0] == 'sync data'
        assert calls[1:-1] == ['write bits'] * (cow.MAX_DIRTY_PAGES + 1)
        assert calls[-1] == 'sync bits'
        assert len(layer._pages) == 0
        with open(os.path.join(layer.directory, 'bitmap'), 'rb') as f:
            f.seek(cow.BITS_OFFSET + cow.MAX_DIRTY_PAGES * cow.PAGE)
            assert f.read(1) == b'\x01'
    finally:
        layer.close()


def test_reads_see_writes_while_pages_are_flushed(tmp_path):
    """A page leaves memory only once the file holds it."""
    layer = cow.CowLayer.create(str(tmp_path / 'v'), 1 << 36)
    page_span = cow.PAGE * 8 * BS
    errors = []
    stop = threading.Event()

    def flusher():
        while not stop.is_set():
            layer.flush()

    def writer_reader(k):
        try:
            for n in range(60):
                offset = (n * 7 + k) % 128 * page_span + k * BS
                layer.write(offset, bytes([k + 1]) * BS, _zeros)
                for _ in range(3):
                    if layer.read(offset, BS, _zeros) != bytes([k + 1]) * BS:
                        errors.append((k, n))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=flusher)] + [
        threading.Thread(target=writer_reader, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(60)
    finally:
        stop.set()
        threads[0].join(60)
        layer.close()
    assert not errors


def test_resize_while_reading(tmp_path):
    layer = cow.CowLayer.create(str(tmp_path / 'v'), 64 * BS)
    layer.write(3 * BS, b'r' * BS, _zeros)
    errors = []
    done = threading.Event()

    def reader():
        try:
            while not done.is_set():
                assert layer.read(3 * BS, BS, _zeros) == b'r' * BS
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(2, 40):
            layer.resize(n * 64 * BS)
    finally:
        done.set()
        thread.join(30)
        layer.close()
    assert not errors


@pytest.mark.parametrize('size', [0, -1, cow.MAX_SIZE + 1, 1 << 64, True,
                                  2.0])
def test_check_size_bounds(size):
    with pytest.raises(ValueError):
        cow.check_size(size)


def test_bitmap_header_past_off_t_rejected(tmp_path):
    path = str(tmp_path / 'v')
    cow.CowLayer.create(path, BS).close()
    head = cow._HEADER.pack(cow.MAGIC, cow.VERSION, 0, BS, 1 << 63,
                            cow.block_count(1 << 63))
    with open(os.path.join(path, 'bitmap'), 'r+b') as f:
        f.write(head + cow._CRC.pack(zlib.crc32(head)))
    with pytest.raises(cow.LayerError):
        cow.CowLayer.open(path)
