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

"""Byte copies between files and RBD images, holes included."""

import os
from unittest import mock

import pytest

from cinder_thunder_driver import image_io

REAL_CHUNK = image_io.CHUNK
CHUNK = 16  # small chunks keep the files tiny and the boundaries visible


@pytest.fixture(autouse=True)
def small_chunks():
    with mock.patch.object(image_io, 'CHUNK', CHUNK):
        yield


class Image:
    """An rbd.Image stand-in over a bytearray, recording every call."""

    def __init__(self, data=b''):
        self.data = bytearray(data)
        self.calls = []

    def write(self, data, offset):
        self.calls.append(('write', offset, len(data)))
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data
        return len(data)

    def write_zeroes(self, offset, length):
        self.calls.append(('write_zeroes', offset, length))
        self.data[offset:offset + length] = bytes(length)

    def read(self, offset, length):
        self.calls.append(('read', offset, length))
        return bytes(self.data[offset:offset + length])

    def size(self):
        return len(self.data)

    def flush(self):
        self.calls.append(('flush',))


def _blocks(*chunks):
    """Build file contents from per-chunk markers: 0 = zeros, n = n's."""
    return b''.join(bytes(CHUNK) if c == 0 else bytes([c]) * CHUNK
                    for c in chunks)


def test_file_to_image_sparse_skips_zero_chunks(tmp_path):
    content = _blocks(1, 0, 0, 2) + b'\x03' * 5
    src = tmp_path / 'src'
    src.write_bytes(content)
    image = Image(bytes(len(content)))
    written = image_io.file_to_image(str(src), image)
    assert image.calls == [('write', 0, CHUNK), ('write', 3 * CHUNK, CHUNK),
                           ('write', 4 * CHUNK, 5), ('flush',)]
    assert written == 2 * CHUNK + 5
    assert bytes(image.data) == content


def test_file_to_image_sparse_trailing_partial_zero_chunk(tmp_path):
    src = tmp_path / 'src'
    src.write_bytes(_blocks(7) + bytes(3))
    image = Image(bytes(CHUNK + 3))
    assert image_io.file_to_image(str(src), image) == CHUNK
    assert ('write_zeroes', CHUNK, 3) not in image.calls
    assert image.calls[-1] == ('flush',)


def test_file_to_image_dense_overwrites_old_data(tmp_path):
    content = _blocks(1, 0, 2) + bytes(4)
    src = tmp_path / 'src'
    src.write_bytes(content)
    image = Image(b'\xff' * len(content))  # old contents must not show
    written = image_io.file_to_image(str(src), image, sparse=False)
    assert image.calls == [('write', 0, CHUNK),
                           ('write_zeroes', CHUNK, CHUNK),
                           ('write', 2 * CHUNK, CHUNK),
                           ('write_zeroes', 3 * CHUNK, 4), ('flush',)]
    assert written == 2 * CHUNK
    assert bytes(image.data) == content


def test_file_to_image_empty_file(tmp_path):
    src = tmp_path / 'src'
    src.write_bytes(b'')
    image = Image()
    assert image_io.file_to_image(str(src), image) == 0
    assert image.calls == [('flush',)]


def test_file_to_image_missing_file(tmp_path):
    image = Image()
    with pytest.raises(FileNotFoundError):
        image_io.file_to_image(str(tmp_path / 'missing'), image)
    assert image.calls == []


def test_image_to_file_keeps_holes(tmp_path):
    content = _blocks(0, 4, 0, 0, 5) + b'\x06' * 3
    image = Image(content)
    dst = tmp_path / 'dst'
    assert image_io.image_to_file(image, str(dst)) == len(content)
    assert dst.read_bytes() == content
    reads = [c for c in image.calls if c[0] == 'read']
    assert reads == [('read', i * CHUNK, CHUNK) for i in range(5)] + [
        ('read', 5 * CHUNK, 3)]


def test_image_to_file_trailing_hole_keeps_the_length(tmp_path):
    content = _blocks(9, 0, 0)
    dst = tmp_path / 'dst'
    assert image_io.image_to_file(Image(content), str(dst)) == len(content)
    assert os.path.getsize(dst) == len(content)
    assert dst.read_bytes() == content


def test_image_to_file_all_zero_image_is_a_hole(tmp_path):
    dst = tmp_path / 'dst'
    length = 2 * 1024 * 1024
    with mock.patch.object(image_io, 'CHUNK', 4096):
        image_io.image_to_file(Image(bytes(length)), str(dst))
    st = os.stat(dst)
    assert st.st_size == length
    # Nothing was written: the file has (almost) no blocks allocated.
    assert st.st_blocks * 512 < length // 2


def test_image_to_file_partial_length(tmp_path):
    content = _blocks(1, 2, 3)
    image = Image(content)
    dst = tmp_path / 'dst'
    assert image_io.image_to_file(image, str(dst), length=CHUNK + 4) == \
        CHUNK + 4
    assert dst.read_bytes() == content[:CHUNK + 4]


def test_image_to_file_replaces_an_existing_file(tmp_path):
    dst = tmp_path / 'dst'
    dst.write_bytes(b'\xee' * (10 * CHUNK))
    content = _blocks(0, 1)
    image_io.image_to_file(Image(content), str(dst))
    assert dst.read_bytes() == content


def test_round_trip(tmp_path):
    content = _blocks(1, 0, 2, 0, 0, 3) + b'tail'
    src, dst = tmp_path / 'src', tmp_path / 'dst'
    src.write_bytes(content)
    image = Image(bytes(len(content)))
    image_io.file_to_image(str(src), image)
    image_io.image_to_file(image, str(dst))
    assert dst.read_bytes() == content


def test_default_chunk_is_4_mib():
    assert REAL_CHUNK == 4 * 1024 * 1024
