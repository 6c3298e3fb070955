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

"""Tests for CowLayer.zero: discard and write-zeroes of a layer."""

import errno
import os
import random
import tracemalloc
from unittest import mock

import pytest

from thunder_cache.volumes import cow

BS = cow.BLOCK_SIZE
GiB = 1 << 30


class Image:
    """A base: ``image_size`` random bytes, zeros past them."""

    def __init__(self, image_size, seed=1):
        self.bytes = random.Random(seed).randbytes(image_size)

    def __call__(self, offset, length):
        head = self.bytes[offset:offset + length]
        return head + bytes(length - len(head))


class Model:
    """What a layer must read and which bits it must hold."""

    def __init__(self, size, image):
        self.size = size
        self.image = image
        self.zeros_from = len(image.bytes)
        self.bytes = bytearray(image(0, size))
        self.bits = set()

    def write(self, offset, data):
        data = data[:self.size - offset]
        self.bytes[offset:offset + len(data)] = data
        self.bits.update(range(offset // BS,
                               (offset + len(data) - 1) // BS + 1))

    def zero(self, offset, length):
        end = min(self.size, offset + length)
        if offset >= end:
            return
        self.bytes[offset:end] = bytes(end - offset)
        for block in range(offset // BS, (end - 1) // BS + 1):
            start, stop = block * BS, min((block + 1) * BS, self.size)
            if offset <= start and end >= stop:  # whole
                if start >= self.zeros_from:
                    self.bits.discard(block)
                else:
                    self.bits.add(block)
            elif start < self.zeros_from or block in self.bits:
                self.bits.add(block)  # written with zeros

    def written_bytes(self):
        tail = self.size % BS
        last = (self.size - 1) // BS
        return len(self.bits) * BS - (BS - tail if tail and last in
                                      self.bits else 0)


def _range(rng, size):
    """An offset and a length, often unaligned, sometimes past the end."""
    offset = rng.choice([rng.randrange(size), rng.randrange(size // BS) * BS,
                         rng.randrange(size + 2 * BS)])
    length = rng.choice([rng.randrange(1, 3 * BS), rng.randrange(1, 40) * BS,
                         rng.randrange(1, size + BS)])
    return offset, length


def _check(layer, model):
    assert layer.read(0, model.size, model.image) == bytes(model.bytes)
    assert layer.written_bytes() == model.written_bytes()


@pytest.mark.parametrize('seed', range(12))
def test_fuzz_against_a_bytearray(tmp_path, seed):
    """Writes, zeros, reads, flushes and reopens agree with a model."""
    rng = random.Random(seed)
    size = rng.randrange(8, 200) * BS + rng.choice([0, 1, 511, BS - 1])
    image_size = rng.choice([0, size // 2, size, size - 700, 3 * BS + 5])
    image = Image(max(0, image_size), seed)
    model = Model(size, image)
    path = str(tmp_path / 'v')
    layer = cow.CowLayer.create(path, size)
    try:
        for step in range(150):
            op = rng.random()
            offset, length = _range(rng, size)
            if op < 0.4:
                if offset < size:
                    data = rng.randbytes(min(length, 64 * BS))
                    assert layer.write(offset, data, image) == min(
                        len(data), size - offset)
                    model.write(offset, data)
            elif op < 0.8:
                layer.zero(offset, length, image, model.zeros_from)
                model.zero(offset, length)
            elif op < 0.9:
                assert layer.read(offset, length, image) == bytes(
                    model.bytes[offset:offset + length])
            else:
                layer.close()
                layer = cow.CowLayer.open(path)
            if step % 10 == 0:
                _check(layer, model)
        _check(layer, model)
        copy = layer.copy_to(str(tmp_path / 'copy'))
        try:
            _check(copy, model)
        finally:
            copy.close()
    finally:
        layer.close()


@pytest.fixture
def image():
    return Image(40 * BS)


@pytest.fixture
def layer(tmp_path, image):
    layer = cow.CowLayer.create(str(tmp_path / 'v'), 64 * BS)
    yield layer
    layer.close()


def _allocated(layer):
    return os.stat(os.path.join(layer.directory, 'data')).st_blocks * 512


def test_zero_over_the_image_punches_and_keeps_bits(layer, image):
    layer.write(0, b'w' * 16 * BS, image)
    layer.flush()
    assert _allocated(layer) >= 16 * BS
    layer.zero(4 * BS, 8 * BS, image, 40 * BS)
    assert layer.read(4 * BS, 8 * BS, image) == bytes(8 * BS)
    assert layer.read(0, 4 * BS, image) == b'w' * 4 * BS
    assert _allocated(layer) == layer.allocated_bytes() <= 8 * BS
    assert layer.written_bytes() == 16 * BS  # the zeros hide the image


def test_zero_never_written_blocks_over_the_image(layer, image):
    layer.zero(0, 8 * BS, image, 40 * BS)
    assert layer.read(0, 9 * BS, image) == bytes(8 * BS) + image(8 * BS, BS)
    assert layer.written_bytes() == 8 * BS
    assert layer.allocated_bytes() == 0


def test_zero_past_the_image_clears_bits(layer, image):
    layer.write(38 * BS, b'w' * 10 * BS, image)
    layer.zero(38 * BS, 10 * BS, image, 40 * BS)
    # Blocks 38 and 39 hold the image's place: their bits stay.
    assert layer.written_bytes() == 2 * BS
    assert layer.read(38 * BS, 10 * BS, image) == bytes(10 * BS)
    assert layer.allocated_bytes() == 0


def test_zero_blank_layer_clears_every_bit(layer):
    zeros = Image(0)
    layer.write(BS, b'w' * 30 * BS, zeros)
    layer.zero(0, 64 * BS, zeros, 0)
    assert layer.written_bytes() == 0
    assert layer.allocated_bytes() == 0
    assert layer.read(0, 64 * BS, zeros) == bytes(64 * BS)


def test_partial_blocks_are_written_with_zeros(layer, image):
    layer.zero(BS + 100, BS, image, 40 * BS)
    expected = bytearray(image(0, 3 * BS))
    expected[BS + 100:2 * BS + 100] = bytes(BS)
    assert layer.read(0, 3 * BS, image) == bytes(expected)
    assert layer.written_bytes() == 2 * BS
    # Past the image, a partial block without a bit reads zeros already:
    # nothing is written.
    layer.zero(50 * BS + 10, 100, image, 40 * BS)
    assert layer.written_bytes() == 2 * BS


def test_zero_past_the_end_is_ignored(layer, image):
    layer.zero(64 * BS, BS, image, 40 * BS)
    layer.zero(63 * BS, 10 * BS, image, 40 * BS)
    assert layer.read(63 * BS, BS, image) == bytes(BS)
    assert layer.written_bytes() == 0


def test_bad_arguments_and_closed_layer(layer, image):
    for args in ((-1, BS, image, 0), (0, -1, image, 0), (0, BS, image, -1)):
        with pytest.raises(ValueError):
            layer.zero(*args)
    layer.close()
    with pytest.raises(ValueError):
        layer.zero(0, BS, image, 0)
    assert layer.allocated_bytes() == 0


def test_unsupported_punch_changes_nothing(layer, image):
    layer.write(0, b'w' * 4 * BS, image)
    error = OSError(errno.EOPNOTSUPP, 'no holes here')
    with mock.patch('thunder_cache.fsutil.punch_hole', side_effect=error):
        with pytest.raises(OSError) as e:
            layer.zero(0, 4 * BS, image, 40 * BS)
    assert e.value.errno == errno.EOPNOTSUPP
    assert layer.read(0, 4 * BS, image) == b'w' * 4 * BS


def _bits_on_disk(layer):
    with open(os.path.join(layer.directory, 'bitmap'), 'rb') as f:
        f.seek(cow.BITS_OFFSET)
        return f.read(1)[0]


def test_bits_reach_disk_after_the_holes(layer, image):
    """The crash rule: data (holes) synced, then the bitmap written."""
    layer.flush()
    calls = []
    real_sync, real_punch = os.fdatasync, cow.fsutil.punch_hole

    def fdatasync(fd):
        calls.append('sync ' + ('data' if fd == layer._data_fd
                                else 'bitmap'))
        return real_sync(fd)

    def punch(fd, offset, length):
        calls.append('punch')
        return real_punch(fd, offset, length)

    with mock.patch('os.fdatasync', fdatasync), \
            mock.patch('thunder_cache.fsutil.punch_hole', punch):
        layer.zero(0, 8 * BS, image, 40 * BS)
        assert _bits_on_disk(layer) == 0  # not flushed yet
        layer.flush()
    assert calls == ['punch', 'sync data', 'sync bitmap']
    assert _bits_on_disk(layer) == 0xff
    reopened = cow.CowLayer.open(layer.directory)
    try:
        assert reopened.written_bytes() == 8 * BS
        assert reopened.read(0, 8 * BS, image) == bytes(8 * BS)
    finally:
        reopened.close()


def test_copy_of_a_discarded_layer_stays_sparse(tmp_path, layer, image):
    layer.write(0, b'w' * 32 * BS, image)
    layer.zero(0, 32 * BS, image, 40 * BS)
    copy = layer.copy_to(str(tmp_path / 'copy'))
    try:
        assert copy.allocated_bytes() == 0
        assert copy.written_bytes() == 32 * BS
        assert copy.read(0, 33 * BS, image) == bytes(32 * BS) + image(
            32 * BS, BS)
    finally:
        copy.close()


def _peak(call):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_zero_is_stepped_and_bounded(tmp_path):
    """A 64 GiB discard over an image: 512 bitmap pages, flushed in steps."""
    size = 64 * GiB
    layer = cow.CowLayer.create(str(tmp_path / 'v'), size)
    base = Image(0)
    try:
        layer.write(size // 2, b'w' * BS, base)
        peak = _peak(lambda: layer.zero(0, size, base, size))
        assert peak < 8 << 20
        assert len(layer._pages) <= cow.MAX_DIRTY_PAGES
        assert layer.written_bytes() == size
        assert layer.read(size // 2, BS, base) == bytes(BS)
        # And a blank one: no bit changes, no page taken into memory.
        blank = cow.CowLayer.create(str(tmp_path / 'b'), size)
        try:
            assert _peak(lambda: blank.zero(0, size, base, 0)) < 1 << 20
            assert not blank._pages and blank.written_bytes() == 0
        finally:
            blank.close()
    finally:
        layer.close()
