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

"""The persistent chunk presence map."""

import hashlib
import os

import pytest

from thunder_cache.cache import chunkmap

DIGEST = hashlib.sha256(b'manifest').hexdigest()
OTHER = hashlib.sha256(b'other manifest').hexdigest()
CHUNK = 4096


def _open(path, count=100, digest=DIGEST, on_reset=None):
    return chunkmap.open_map(str(path), digest, CHUNK, count * CHUNK - 7,
                             count, on_reset=on_reset)


def test_new_map_is_empty_and_sized(tmp_path):
    path = tmp_path / 'map'
    m, reset = _open(path)
    assert reset
    assert m.count() == 0
    assert list(m.missing()) == list(range(100))
    assert os.path.getsize(path) == chunkmap.BITS_OFFSET + 13
    m.close()


def test_bits_persist_across_reopen(tmp_path):
    path = tmp_path / 'map'
    m, _ = _open(path)
    m.set_durable([0, 7, 8, 99])
    m.set_durable([7])  # idempotent
    assert m.count() == 4
    m.close()
    m, reset = _open(path)
    assert not reset
    assert list(m.present()) == [0, 7, 8, 99]
    assert m.has(99) and not m.has(98)
    m.clear([7])
    m.close()
    m, _ = _open(path)
    assert list(m.present()) == [0, 8, 99]
    m.close()


def test_complete(tmp_path):
    m, _ = _open(tmp_path / 'map', count=3)
    m.set_durable(range(3))
    assert m.complete()
    m.close()


@pytest.mark.parametrize('index', [-1, 100, 2 ** 70, True, 1.0, '1'])
def test_bad_index(tmp_path, index):
    m, _ = _open(tmp_path / 'map')
    with pytest.raises(IndexError):
        m.has(index)
    with pytest.raises(IndexError):
        m.set_durable([index])
    m.close()


def test_other_manifest_resets(tmp_path):
    path = tmp_path / 'map'
    m, _ = _open(path)
    m.set_durable([1, 2, 3])
    m.close()
    calls = []
    m, reset = _open(path, digest=OTHER,
                     on_reset=lambda: calls.append(os.path.exists(path)))
    # The old map is gone before the callback runs.
    assert reset and calls == [False]
    assert m.count() == 0
    m.close()


def test_other_chunk_count_resets(tmp_path):
    path = tmp_path / 'map'
    m, _ = _open(path)
    m.set_durable([1])
    m.close()
    m, reset = _open(path, count=101)
    assert reset and m.count() == 0
    m.close()


@pytest.mark.parametrize('damage', [
    lambda data: data[:100],                                   # truncated
    lambda data: data + b'\0',                                 # too long
    lambda data: b'X' + data[1:],                              # magic
    lambda data: data[:20] + bytes([data[20] ^ 1]) + data[21:],  # crc
    lambda data: data[:-1] + b'\xff',                          # tail bits
    lambda data: b'',
])
def test_damaged_map_resets(tmp_path, damage):
    path = tmp_path / 'map'
    m, _ = _open(path)
    m.set_durable([0, 50])
    m.close()
    path.write_bytes(damage(path.read_bytes()))
    m, reset = _open(path)
    assert reset and m.count() == 0
    m.close()
    # ... and the recreated map is valid.
    m, reset = _open(path)
    assert not reset
    m.close()


def test_read_map_errors(tmp_path):
    path = tmp_path / 'map'
    with pytest.raises(FileNotFoundError):
        chunkmap.read_map(str(path), DIGEST, CHUNK, CHUNK, 1)
    chunkmap.create_map(str(path), DIGEST, CHUNK, CHUNK, 1)
    with pytest.raises(chunkmap.ChunkMapError, match='another manifest'):
        chunkmap.read_map(str(path), OTHER, CHUNK, CHUNK, 1)


def test_many_bits_across_pages(tmp_path):
    count = 8 * chunkmap.PAGE * 3 + 5
    path = tmp_path / 'map'
    m, _ = chunkmap.open_map(str(path), DIGEST, CHUNK, count * CHUNK, count)
    wanted = {0, 1, 8 * chunkmap.PAGE, 8 * chunkmap.PAGE * 2 + 3, count - 1}
    m.set_durable(wanted)
    m.close()
    m, _ = chunkmap.open_map(str(path), DIGEST, CHUNK, count * CHUNK, count)
    assert set(m.present()) == wanted
    assert m.count() == len(wanted)
    m.close()


def test_closed_map_refuses_updates(tmp_path):
    m, _ = _open(tmp_path / 'map')
    m.close()
    m.close()
    with pytest.raises(ValueError):
        m.set_durable([1])
