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

"""Boot trace: record on one node, replay and hydrate on another.

Real image caches (the sparse data file, the chunk map, verification)
over an image-volume file read through a real FileOrigin that takes a
while for every chunk, as a remote origin does. Node 1 records the trace
of a boot-like read pattern; the trace goes through its Cinder metadata
encoding; node 2 replays it while its own "guest" reads the same pattern,
and hydrates the rest of the image at the same time.
"""

import hashlib
import os
import random
import threading
import time

import pytest

from tests import cache_helpers
from thunder_cache.boot import prefetch
from thunder_cache.boot import trace
from thunder_cache.cache import image_cache
from thunder_cache.cache import upstream

IMAGE = 'img-prefetch'
CHUNK = 64 * 1024
SIZE = 8 * 1024 * 1024 + 4321            # 129 chunks, the last one short
COUNT = 129
FETCH_DELAY = 0.01


class SlowOrigin(cache_helpers.CountingOrigin):
    """The image-volume file, counted, ``FETCH_DELAY`` s per chunk read."""

    def read_chunk(self, index, offset, length, via=(), ticket=None):
        time.sleep(FETCH_DELAY)
        return super().read_chunk(index, offset, length, via, ticket)


@pytest.fixture(scope='module')
def image():
    return os.urandom(SIZE)


@pytest.fixture
def volume(tmp_path, image):
    path = str(tmp_path / 'image-volume')
    manifest = cache_helpers.write_volume(path, image, CHUNK)
    assert manifest.chunk_count == COUNT
    return path, manifest


@pytest.fixture
def node_cache(tmp_path, volume):
    """node_cache(name) -> (ImageCache, its origin); closed after."""
    path, manifest = volume
    made = []

    def make(name):
        origin = SlowOrigin(path)
        up = upstream.Upstream(IMAGE, origin, [], None,
                               'http://%s.invalid:1' % name)
        cache = image_cache.ImageCache(str(tmp_path / name / IMAGE), IMAGE,
                                       manifest, up, commit_interval=0.02)
        made.append(cache)
        return cache, origin

    yield make
    for cache in made:
        cache.close()


def boot_reads():
    """A boot-like pattern: (offset, length) reads, first-touch order."""
    rng = random.Random(2014)
    reads = [(0, 512), (4096, 4096)]                  # boot sector, header
    # The kernel and initrd: a sequential stretch in 128 KiB reads.
    start = 20 * CHUNK
    reads += [(start + i * 2 * CHUNK, 2 * CHUNK) for i in range(8)]
    # Then files all over the file system, some crossing chunk bounds.
    for _ in range(24):
        reads.append((rng.randrange(SIZE - 1), rng.randrange(1, 2 * CHUNK)))
    # And again some of what was already read.
    reads += [(0, 512), (start, CHUNK), reads[-1]]
    return reads


def first_touches(reads):
    order = []
    for offset, length in reads:
        end = min(SIZE, offset + length)
        for index in range(offset // CHUNK, (end - 1) // CHUNK + 1):
            if index not in order:
                order.append(index)
    return order


def read_all(cache, reads, image):
    """Read the pattern; every byte is checked against the image."""
    for offset, length in reads:
        assert cache.read(offset, length) == image[offset:offset + length]


def _eventually(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.005)


def _sha256_of(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_record_then_replay_and_hydrate(node_cache, image):
    reads = boot_reads()
    expected = first_touches(reads)
    assert 30 < len(expected) < COUNT // 2

    # Node 1: the first boot, recorded.
    cache1, _origin1 = node_cache('node1')
    recorder = trace.TraceRecorder(COUNT, window=3600, max_chunks=1024)
    cache1.observer = recorder.touch
    read_all(cache1, reads, image)
    recorder.finish()
    assert recorder.done
    assert recorder.indexes() == expected

    # Attached to the image-volume as Cinder metadata, read back.
    metadata = trace.to_metadata(trace.encode(recorder.indexes()))
    assert all(isinstance(v, str) and len(v) <= 255
               for v in metadata.values())
    order = trace.decode(trace.from_metadata(dict(metadata)), COUNT)
    assert order == expected

    # Node 2: replay ahead of the guest, hydrate the rest meanwhile.
    cache2, origin2 = node_cache('node2')
    replay = prefetch.Prefetcher(cache2, order, concurrency=4)
    hydrator = prefetch.Hydrator(cache2, 4 * 1024 * 1024, delay=0,
                                 concurrency=2)
    head_start = 8
    try:
        replay.start()
        hydrator.start()
        # The guest starts once the replay is a few chunks ahead.
        _eventually(lambda: all(cache2.has(i) for i in order[:head_start]))
        guest = threading.Thread(target=read_all,
                                 args=(cache2, reads, image))
        guest.start()
        guest.join(120)
        assert not guest.is_alive()
        assert replay.wait(60)
        assert hydrator.wait(120)
    finally:
        replay.stop()
        hydrator.stop()
        assert replay.wait(60) and hydrator.wait(60)

    snap = cache2.counters.snapshot()
    # The chunks the replay fetched before the guest asked were hits.
    assert snap['prefetch_hits'] >= head_start
    assert snap['chunks_prefetched'] >= head_start
    assert replay.errors == 0 and hydrator.errors == 0
    # Every chunk was read from the origin exactly once, by whichever of
    # guest, replay and hydration came first.
    assert all(cache2.has(i) for i in range(COUNT))
    _eventually(cache2.complete)          # the map follows by a commit
    assert sorted(origin2.reads) == list(range(COUNT))
    assert set(origin2.reads.values()) == {1}
    assert (snap['chunk_misses'] + snap['chunks_prefetched'] +
            snap['chunks_hydrated']) == COUNT
    assert snap['chunks_from_origin'] == COUNT
    # Every byte: the whole image through the cache, and the data file.
    assert hashlib.sha256(cache2.read(0, SIZE)).hexdigest() == \
        hashlib.sha256(image).hexdigest()
    assert _sha256_of(cache2.data_path) == hashlib.sha256(image).hexdigest()
