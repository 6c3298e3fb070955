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

"""The per-chunk digest manifest: format, parsing, verification."""

import hashlib
import io
import os
import struct

import pytest

from thunder_common import manifest

CHUNK = manifest.MIN_CHUNK_SIZE
MiB = 1024 * 1024


def _data(size):
    return os.urandom(size)


@pytest.mark.parametrize('size', [0, 1, CHUNK - 1, CHUNK, CHUNK + 1,
                                  3 * CHUNK, 5 * CHUNK + 17])
def test_round_trip(size):
    data = _data(size)
    m = manifest.Manifest.build(io.BytesIO(data), CHUNK)
    assert m.image_size == size
    assert m.chunk_count == -(-size // CHUNK)
    raw = m.to_bytes()
    assert len(raw) == manifest.serialized_size(size, CHUNK)
    again = manifest.Manifest.from_bytes(raw)
    assert again == m
    assert again.digest() == hashlib.sha256(raw).hexdigest()
    for i in range(m.chunk_count):
        offset, length = m.chunk_range(i)
        assert again.verify_chunk(i, data[offset:offset + length])


def test_header_layout_is_the_documented_one():
    m = manifest.Manifest.build([b'x' * (CHUNK + 1)], CHUNK)
    raw = m.to_bytes()
    assert raw[:8] == b'VMTHMFST'
    assert struct.unpack('>HHIQQ', raw[8:32]) == (1, 1, CHUNK, CHUNK + 1, 2)
    assert raw[32:64] == hashlib.sha256(b'x' * CHUNK).digest()
    assert raw[64:96] == hashlib.sha256(b'x').digest()


def test_builder_is_independent_of_how_data_is_split():
    data = _data(7 * CHUNK + 123)
    whole = manifest.Manifest.build([data], CHUNK)
    builder = manifest.ManifestBuilder(CHUNK)
    pos = 0
    for step in (1, 5000, 3, CHUNK, 2 * CHUNK + 7, 999999):
        builder.update(data[pos:pos + step])
        pos += step
    builder.update(data[pos:])
    assert builder.finish() == whole
    assert builder.bytes_seen == len(data)


def test_builder_refuses_updates_after_finish():
    builder = manifest.ManifestBuilder(CHUNK)
    builder.update(b'abc')
    builder.finish()
    with pytest.raises(ValueError):
        builder.update(b'more')


def test_verify_chunk_rejects_corruption_and_wrong_length():
    data = _data(2 * CHUNK + 10)
    m = manifest.Manifest.build([data], CHUNK)
    chunk = bytearray(data[:CHUNK])
    assert m.verify_chunk(0, bytes(chunk))
    chunk[100] ^= 1
    assert not m.verify_chunk(0, bytes(chunk))
    assert not m.verify_chunk(2, data[2 * CHUNK:] + b'\0')
    assert not m.verify_chunk(1, data[:CHUNK])  # another chunk's bytes
    assert m.verify_chunk(2, data[2 * CHUNK:])
    for bad in (-1, 3, 1.0, True, '0'):
        with pytest.raises(IndexError):
            m.verify_chunk(bad, b'')


@pytest.mark.parametrize('cut', [0, 1, 8, 31, 32, 33, 63, 95])
def test_truncated_manifest_is_refused(cut):
    raw = manifest.Manifest.build([b'y' * (2 * CHUNK + 1)], CHUNK).to_bytes()
    assert len(raw) == 128
    with pytest.raises(ValueError, match='truncated'):
        manifest.Manifest.from_bytes(raw[:cut])


def test_trailing_bytes_are_refused():
    raw = manifest.Manifest.build([b'y'], CHUNK).to_bytes()
    with pytest.raises(ValueError, match='unexpected bytes'):
        manifest.Manifest.from_bytes(raw + b'\0')


def _header(**fields):
    values = dict(magic=b'VMTHMFST', version=1, algorithm=1,
                  chunk_size=CHUNK, image_size=CHUNK, count=1)
    values.update(fields)
    return struct.pack('>8sHHIQQ', values['magic'], values['version'],
                       values['algorithm'], values['chunk_size'],
                       values['image_size'], values['count'])


@pytest.mark.parametrize('fields, message', [
    (dict(magic=b'VMTHMFSX'), 'magic'),
    (dict(version=2), 'version'),
    (dict(version=0), 'version'),
    (dict(algorithm=2), 'algorithm'),
    (dict(chunk_size=CHUNK + 1), 'power of two'),
    (dict(chunk_size=1024), 'power of two'),
    (dict(chunk_size=1 << 31), 'power of two'),
    (dict(count=2), 'chunk count does not match'),
    (dict(count=0), 'chunk count does not match'),
    (dict(image_size=0, count=1), 'chunk count does not match'),
])
def test_corrupted_header_is_refused(fields, message):
    raw = _header(**fields) + b'\0' * 32
    with pytest.raises(ValueError, match=message):
        manifest.Manifest.from_bytes(raw)


@pytest.mark.parametrize('fields', [
    dict(version=0x1234), dict(algorithm=0x4321),
    dict(chunk_size=0x12345), dict(count=0x7654321),
    dict(image_size=0x1234567, count=3)])
def test_header_errors_do_not_echo_what_was_read(fields):
    """The header may be any bytes of an origin: never said back."""
    raw = _header(**fields) + b'\0' * 32
    with pytest.raises(ValueError) as info:
        manifest.Manifest.from_bytes(raw)
    message = str(info.value)
    for value in fields.values():
        assert str(value) not in message
        assert '%x' % value not in message


def test_digest_mismatch_does_not_echo_the_digest_read():
    data = b'secret bytes an origin holds'
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match='does not match') as info:
        manifest.load_verified(data, 'a' * 64)
    assert actual not in str(info.value)
    assert actual[:16] not in str(info.value)


def test_huge_counts_are_refused_before_allocating():
    huge = (1 << 64) - 1
    raw = _header(image_size=huge, count=-(-huge // CHUNK))
    with pytest.raises(ValueError, match='more than'):
        manifest.Manifest.from_bytes(raw)
    one_too_many = manifest.MAX_CHUNKS + 1
    raw = _header(image_size=one_too_many * CHUNK, count=one_too_many)
    with pytest.raises(ValueError, match='more than'):
        manifest.Manifest.parse_header(raw)
    # A reader may set a lower ceiling, e.g. from the image's known size.
    raw = _header(image_size=10 * CHUNK, count=10)
    with pytest.raises(ValueError, match='more than the 5 allowed'):
        manifest.Manifest.parse_header(raw, max_chunks=5)
    assert manifest.Manifest.parse_header(raw) == (CHUNK, 10 * CHUNK,
                                                   32 + 320)


def test_corrupted_digest_changes_the_manifest_digest():
    m = manifest.Manifest.build([b'z' * CHUNK * 2], CHUNK)
    raw = bytearray(m.to_bytes())
    raw[40] ^= 0xff
    other = manifest.Manifest.from_bytes(bytes(raw))
    assert other.digest() != m.digest()
    assert not other.verify_chunk(0, b'z' * CHUNK)
    with pytest.raises(ValueError, match='does not match'):
        manifest.load_verified(bytes(raw), m.digest())
    assert manifest.load_verified(m.to_bytes(), m.digest()) == m


@pytest.mark.parametrize('args', [
    (CHUNK, -1, b''),
    (CHUNK, 1, b''),
    (CHUNK, 0, b'\0' * 32),
    (3, 0, b''),
    (CHUNK, True, b''),
])
def test_constructor_validates(args):
    with pytest.raises(ValueError):
        manifest.Manifest(*args)


def test_manifest_larger_than_allowed_is_refused():
    with pytest.raises(ValueError, match='more than'):
        manifest.Manifest(CHUNK, (manifest.MAX_CHUNKS + 1) * CHUNK, b'')


def test_builder_refuses_more_chunks_than_allowed(monkeypatch):
    monkeypatch.setattr(manifest, 'MAX_CHUNKS', 2)
    builder = manifest.ManifestBuilder(CHUNK)
    builder.update(b'a' * 2 * CHUNK)
    with pytest.raises(ValueError, match='larger than'):
        builder.update(b'a' * CHUNK)


@pytest.mark.parametrize('offset, length, image_size', [
    (0, None, None), (0, 32, 0), (MiB, 64, 5000), (MiB, 96, 5000),
    (manifest.volume_offset(manifest.MAX_IMAGE_SIZE),
     manifest.MAX_LENGTH, manifest.MAX_IMAGE_SIZE)])
def test_placement_accepted(offset, length, image_size):
    manifest.check_placement(offset, length, image_size)


@pytest.mark.parametrize('offset, length, image_size, message', [
    (1, None, None, 'not aligned'),
    (MiB + 4096, None, None, 'not aligned'),
    (-MiB, None, None, 'non-negative'),
    (True, None, None, 'non-negative'),
    ('1048576', None, None, 'non-negative'),
    (MiB, 31, None, 'out of range'),
    (MiB, 0, None, 'out of range'),
    (MiB, manifest.MAX_LENGTH + 32, None, 'out of range'),
    (MiB, 65, None, 'whole number'),
    (MiB, 1.0, None, 'non-negative'),
    (2 * MiB, 64, 5000, 'not where'),
    (0, 64, 5000, 'not where'),
    (MiB, 32 + 32 * 3, 5000, 'no chunk size'),
    (MiB, 32, 5000, 'no chunk size'),
    (manifest.volume_offset(manifest.MAX_IMAGE_SIZE) + MiB, None, None,
     'past the largest'),
    (0, None, manifest.MAX_IMAGE_SIZE + 1, 'larger than'),
    (0, None, -1, 'non-negative'),
])
def test_placement_refused(offset, length, image_size, message):
    with pytest.raises(ValueError, match=message):
        manifest.check_placement(offset, length, image_size)


def test_volume_layout():
    assert manifest.volume_offset(0) == 0
    assert manifest.volume_offset(1) == manifest.ALIGNMENT
    assert manifest.volume_offset(manifest.ALIGNMENT) == manifest.ALIGNMENT
    size = 5 * manifest.ALIGNMENT + 1
    chunks = -(-size // manifest.DEFAULT_CHUNK_SIZE)
    assert manifest.volume_bytes_needed(size) == (
        6 * manifest.ALIGNMENT + 32 + chunks * 32)


def test_metadata_round_trip():
    m = manifest.Manifest.build([b'q' * 3000], CHUNK)
    meta = m.metadata(manifest.ALIGNMENT)
    assert all(isinstance(v, str) for v in meta.values())
    assert manifest.from_metadata(meta) == (manifest.ALIGNMENT, 64,
                                            m.digest())
    assert meta[manifest.META_CHUNK_SIZE] == str(CHUNK)


@pytest.mark.parametrize('change', [
    {manifest.META_DIGEST: 'A' * 64},
    {manifest.META_DIGEST: 'a' * 63},
    {manifest.META_DIGEST: None},
    {manifest.META_OFFSET: '-1'},
    {manifest.META_OFFSET: '01048576'},
    {manifest.META_OFFSET: '1048577'},
    {manifest.META_OFFSET: ' 1048576'},
    {manifest.META_OFFSET: '9' * 40},
    {manifest.META_LENGTH: '31'},
    {manifest.META_LENGTH: '33'},
    {manifest.META_LENGTH: str(32 + 32 * (manifest.MAX_CHUNKS + 1))},
    {manifest.META_LENGTH: 64},
])
def test_bad_metadata_is_refused(change):
    meta = {manifest.META_DIGEST: 'a' * 64,
            manifest.META_OFFSET: '1048576',
            manifest.META_LENGTH: '64'}
    meta.update(change)
    with pytest.raises(ValueError):
        manifest.from_metadata(meta)


def test_missing_metadata_is_refused():
    with pytest.raises(ValueError, match='does not name'):
        manifest.from_metadata({})
    with pytest.raises(ValueError, match='does not name'):
        manifest.from_metadata(None)


@pytest.mark.parametrize('size, configured, expected', [
    (0, 64 * 1024, 64 * 1024),
    (1, 4096, 4096),
    (manifest.MAX_CHUNKS * 64 * 1024, 64 * 1024, 64 * 1024),
    (manifest.MAX_CHUNKS * 64 * 1024 + 1, 64 * 1024, 128 * 1024),
    (5 * manifest.MAX_CHUNKS * 64 * 1024, 64 * 1024, 512 * 1024),
    (manifest.MAX_IMAGE_SIZE, 64 * 1024, manifest.MAX_CHUNK_SIZE),
    (10, manifest.MAX_CHUNK_SIZE, manifest.MAX_CHUNK_SIZE),
])
def test_chunk_size_for(size, configured, expected):
    chunk = manifest.chunk_size_for(size, configured)
    assert chunk == expected
    assert manifest.chunk_count(size, chunk) <= manifest.MAX_CHUNKS


@pytest.mark.parametrize('size, configured', [
    (manifest.MAX_IMAGE_SIZE + 1, 64 * 1024),
    (-1, 64 * 1024),
    (True, 64 * 1024),
    (10, 3000),
    (10, 0),
])
def test_chunk_size_for_refuses(size, configured):
    with pytest.raises(ValueError):
        manifest.chunk_size_for(size, configured)


def test_builder_past_max_chunks_raises_too_many_chunks(monkeypatch):
    monkeypatch.setattr(manifest, 'MAX_CHUNKS', 2)
    builder = manifest.ManifestBuilder(4096)
    builder.update(bytes(2 * 4096))
    with pytest.raises(manifest.TooManyChunks):
        builder.update(b'x')
        builder.finish()
