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

"""The per-image cache: fetch once, verify, fall back, persist."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import cache_helpers
from tests import hostile_peer
from tests.unit.thunder_cache.fake_sources import cache_over
from tests.unit.thunder_cache.fake_sources import FakeSource
from tests.unit.thunder_cache.fake_sources import GatedSource
from thunder_cache.cache import chunkmap
from thunder_cache.cache import image_cache
from thunder_cache.cache import upstream as upstream_mod
from thunder_cache.peer import protocol
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

CHUNK = manifest_mod.MIN_CHUNK_SIZE
SIZE = CHUNK * 10 + 123


@pytest.fixture
def image():
    return os.urandom(SIZE)


@pytest.fixture
def manifest(image):
    return manifest_mod.Manifest.build([image], CHUNK)


def test_read_any_range(tmp_path, image, manifest):
    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    for offset, length in [(0, 1), (CHUNK - 1, 2), (5, CHUNK * 3),
                           (SIZE - 10, 100), (SIZE, 10), (0, SIZE),
                           (3 * CHUNK, 0)]:
        assert cache.read(offset, length) == image[offset:offset + length]
    assert cache.complete()
    assert sorted(origin.calls) == list(range(manifest.chunk_count))
    snap = cache.counters.snapshot()
    assert snap['chunk_misses'] == manifest.chunk_count
    assert snap['chunks_from_origin'] == manifest.chunk_count
    assert snap['bytes_from_origin'] == SIZE
    assert snap['chunks_verified'] == manifest.chunk_count
    assert snap['chunk_hits'] > 0
    with pytest.raises(ValueError):
        cache.read(-1, 5)
    with pytest.raises(ValueError):
        cache.read(0, -5)
    cache.close()


def test_ensure_bad_index(tmp_path, image, manifest):
    cache = cache_over(tmp_path, manifest, FakeSource(image))
    for index in (-1, manifest.chunk_count, 2 ** 64):
        with pytest.raises(IndexError):
            cache.ensure(index)
    with pytest.raises(IndexError):
        cache.has(-1)
    cache.close()


def test_inflight_fetch_is_shared(tmp_path, image, manifest):
    origin = FakeSource(image, delay=0.2)
    cache = cache_over(tmp_path, manifest, origin)
    results = []
    barrier = threading.Barrier(16)

    def reader():
        barrier.wait()
        results.append(cache.read(CHUNK * 2 + 7, 100))

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [image[CHUNK * 2 + 7:CHUNK * 2 + 107]] * 16
    assert origin.calls == [2]
    snap = cache.counters.snapshot()
    assert snap['chunk_misses'] == 1
    assert snap['inflight_joins'] + snap['chunk_hits'] == 15
    assert snap['inflight_joins'] >= 1
    cache.close()


def test_inflight_error_is_shared(tmp_path, image, manifest):
    origin = FakeSource(image, delay=0.2, fail={3})
    cache = cache_over(tmp_path, manifest, origin)
    errors = []
    barrier = threading.Barrier(8)

    def reader():
        barrier.wait()
        try:
            cache.ensure(3)
        except image_cache.FetchError as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 8
    assert origin.calls == [3]
    # The failed fetch left no in-flight entry: the next read retries.
    origin.fail.clear()
    cache.ensure(3)
    assert origin.calls == [3, 3]
    cache.close()


def test_corrupt_chunk_rejected_next_source_used(tmp_path, image, manifest):
    bad = FakeSource(image, name='bad', kind='peer', corrupt={'all'})
    broken = FakeSource(image, name='broken', kind='peer', fail={'all'})
    origin = FakeSource(image, name='origin')
    cache = cache_over(tmp_path, manifest, bad, broken, origin)
    assert cache.read(0, SIZE) == image
    snap = cache.counters.snapshot()
    count = manifest.chunk_count
    assert snap['chunks_rejected'] == count
    assert snap['fetch_errors'] == 2 * count
    assert snap['chunks_from_origin'] == count
    assert snap['chunks_from_peers'] == 0
    reports = cache.upstream.reports
    assert [r for r in reports if r[0] == 'bad' and r[1]] == []
    assert all(isinstance(r[2], image_cache.BadChunk)
               for r in reports if r[0] == 'bad')
    assert sum(1 for r in reports if r[0] == 'origin' and r[1]) == count
    # Nothing corrupt was stored.
    with open(cache.data_path, 'rb') as f:
        assert f.read() == image
    cache.close()


def test_peer_bytes_counted(tmp_path, image, manifest):
    peer = FakeSource(image, name='peer', kind='peer')
    cache = cache_over(tmp_path, manifest, peer)
    cache.read(0, SIZE)
    snap = cache.counters.snapshot()
    assert snap['bytes_from_peers'] == SIZE
    assert snap['bytes_from_origin'] == 0
    cache.close()


def test_all_sources_fail(tmp_path, image, manifest):
    cache = cache_over(tmp_path, manifest,
                       FakeSource(image, corrupt={1}, name='a'),
                       FakeSource(image, fail={1}, name='b'))
    with pytest.raises(image_cache.FetchError, match='a: bad data; b:'):
        cache.ensure(1)
    assert not cache.has(1)
    assert cache.counters.get('fetch_failures') == 1
    cache.close()


class FlakySource(FakeSource):
    """Fails its first ``failures`` reads, then serves."""

    def __init__(self, image, failures, **kwargs):
        super().__init__(image, **kwargs)
        self.failures = failures

    def read_chunk(self, index, offset, length, via=(), ticket=None):
        with self.lock:
            self.failures -= 1
            failing = self.failures >= 0
        if failing:
            self.calls.append(index)
            raise IOError('%s is busy' % self.name)
        return super().read_chunk(index, offset, length, via, ticket)


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(image_cache, 'RETRY_FIRST', 0.01)
    monkeypatch.setattr(image_cache, 'RETRY_MAX', 0.02)


def test_local_read_retried_until_a_source_serves(tmp_path, image, manifest,
                                                  fast_retries):
    source = FlakySource(image, failures=3)
    cache = cache_over(tmp_path, manifest, source, read_retry=30)
    offset, length = manifest.chunk_range(1)
    assert cache.read(offset, length) == image[offset:offset + length]
    assert cache.counters.get('read_retries') == 3
    assert cache.counters.get('fetch_failures') == 3
    assert cache.upstream.forgiven == 3
    assert cache.has(1)
    cache.close()


def test_local_read_fails_after_read_retry(tmp_path, image, manifest,
                                           fast_retries):
    source = FakeSource(image, fail={'all'})
    cache = cache_over(tmp_path, manifest, source, read_retry=0.1)
    started = time.monotonic()
    with pytest.raises(image_cache.FetchError, match='no source'):
        cache.ensure(2)
    assert time.monotonic() - started >= 0.1
    assert cache.counters.get('read_retries') >= 2
    assert cache.demand_pending() == 0
    cache.close()


def test_without_read_retry_a_local_read_fails_at_once(tmp_path, image,
                                                       manifest):
    cache = cache_over(tmp_path, manifest, FlakySource(image, failures=1))
    with pytest.raises(image_cache.FetchError):
        cache.ensure(0)
    assert cache.counters.get('read_retries') == 0
    cache.ensure(0)
    assert cache.has(0)
    cache.close()


def test_peer_requests_are_not_retried(tmp_path, image, manifest,
                                       fast_retries):
    source = FlakySource(image, failures=1)
    cache = cache_over(tmp_path, manifest, source, read_retry=30)
    with pytest.raises(image_cache.FetchError):
        cache.ensure(0, via=('http://10.0.0.9:7000',),
                     ticket=protocol.new_ticket())
    assert cache.counters.get('read_retries') == 0
    assert source.calls == [0]
    cache.close()


def test_retried_read_is_observed_once(tmp_path, image, manifest,
                                       fast_retries):
    seen = []
    cache = cache_over(tmp_path, manifest, FlakySource(image, failures=2),
                       read_retry=30)
    cache.observer = seen.append
    cache.ensure(3)
    assert seen == [3]
    assert cache.counters.get('chunk_misses') == 3
    cache.close()


def test_wrong_length_rejected(tmp_path, image, manifest):

    class Short(FakeSource):
        def read_chunk(self, index, offset, length, via=(), ticket=None):
            return super().read_chunk(index, offset, length)[:-1]

    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, Short(image, name='short'), origin)
    assert cache.read_chunk(0) == image[:CHUNK]
    assert cache.counters.get('chunks_rejected') == 1
    cache.close()


def test_cache_survives_reopen(tmp_path, image, manifest):
    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    cache.read(0, CHUNK * 3)
    cache.close()
    cache = cache_over(tmp_path, manifest, origin)
    assert not cache.reset
    assert cache.present_count() == 3
    assert cache.read(0, CHUNK * 3) == image[:CHUNK * 3]
    assert origin.calls == [0, 1, 2]
    assert cache.counters.get('chunks_reverified') == 3
    cache.close()


def test_corrupt_cache_file_refetched_after_restart(
        tmp_path, image, manifest):
    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    cache.read(0, SIZE)
    cache.close()
    with open(cache.data_path, 'r+b') as f:
        f.seek(CHUNK * 4 + 10)
        f.write(b'\0garbage')
    cache = cache_over(tmp_path, manifest, origin)
    assert cache.read(0, SIZE) == image
    assert cache.counters.get('local_corrupt') == 1
    assert origin.calls.count(4) == 2
    cache.close()


def test_trusting_persisted_chunks_skips_reverification(tmp_path, image,
                                                        manifest):
    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    cache.read(0, SIZE)
    cache.close()
    cache = cache_over(tmp_path, manifest, origin, verify_persisted=False)
    assert cache.has(0)
    cache.read(0, SIZE)
    assert cache.counters.get('chunks_reverified') == 0
    cache.close()


def test_other_manifest_resets_cache(tmp_path, image, manifest):
    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    cache.read(0, SIZE)
    cache.close()
    other_image = os.urandom(SIZE)
    other = manifest_mod.Manifest.build([other_image], CHUNK)
    cache = cache_over(tmp_path, other, FakeSource(other_image))
    assert cache.reset
    assert cache.present_count() == 0
    # The data file was emptied: nothing of the old image remains.
    with open(cache.data_path, 'rb') as f:
        assert f.read() == bytes(SIZE)
    assert cache.read(0, SIZE) == other_image
    cache.close()


def test_missing_data_file_resets_map(tmp_path, image, manifest):
    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    cache.read(0, SIZE)
    cache.close()
    os.unlink(cache.data_path)
    cache = cache_over(tmp_path, manifest, origin)
    assert cache.reset and cache.present_count() == 0
    cache.close()


def test_loop_error_when_inflight_fetch_waits_on_requester(
        tmp_path, image, manifest):
    peer = FakeSource(image, name='p', kind='peer', delay=0.3,
                      url='http://10.0.0.2:7480')
    cache = cache_over(tmp_path, manifest, peer)
    t = threading.Thread(target=cache.ensure, args=(0,))
    t.start()
    time.sleep(0.1)
    with pytest.raises(image_cache.LoopError):
        cache.ensure(0, via=('http://10.0.0.2:7480',))
    # Other requesters join the fetch.
    cache.ensure(0, via=('http://10.0.0.3:7480',))
    t.join()
    cache.close()


def test_join_timeout(tmp_path, image, manifest):
    origin = FakeSource(image, delay=0.5)
    cache = cache_over(tmp_path, manifest, origin)
    t = threading.Thread(target=cache.ensure, args=(0,))
    t.start()
    time.sleep(0.1)
    with pytest.raises(image_cache.FetchError, match='timed out'):
        cache.ensure(0, timeout=0.05)
    t.join()
    cache.close()


def test_durability_order(tmp_path, image, manifest, monkeypatch):
    """The data file is synced before the bit reaches the map file."""
    events = []
    cache = cache_over(tmp_path, manifest, FakeSource(image))
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        events.append('sync-data' if fd == cache.fileno else 'sync-map')
        real_fdatasync(fd)

    real_set = cache.map.set_durable

    def set_durable(indexes):
        events.append('set-bits')
        real_set(indexes)

    monkeypatch.setattr(image_cache.os, 'fdatasync', fdatasync)
    monkeypatch.setattr(chunkmap.os, 'fdatasync', fdatasync)
    monkeypatch.setattr(cache.map, 'set_durable', set_durable)
    cache.ensure(0)
    assert events == ['sync-data', 'set-bits', 'sync-map']
    cache.close()


def test_upstream_with_real_origin_file(tmp_path, image, manifest):
    """The FileOrigin and the Upstream in front of an ImageCache."""
    path = tmp_path / 'volume'
    offset = manifest_mod.volume_offset(SIZE)
    with open(path, 'wb') as f:
        f.write(image)
        f.seek(offset)
        f.write(manifest.to_bytes())
    origin = sources.FileOrigin(str(path))
    loaded = sources.load_manifest(origin.read, manifest.digest(), offset)
    assert loaded == manifest
    up = upstream_mod.Upstream('img', origin, [], client=None,
                               self_url='http://127.0.0.1:1')
    cache = image_cache.ImageCache(str(tmp_path / 'c'), 'img', loaded, up)
    data = cache.read(0, SIZE)
    assert hashlib.sha256(data).digest() == hashlib.sha256(image).digest()
    cache.close()


def test_group_commit(tmp_path, image, manifest, monkeypatch):
    """Chunks are served before the commit; the map never leads the data."""
    events = []
    real_fdatasync = os.fdatasync
    cache = cache_over(tmp_path, manifest, FakeSource(image),
                       commit_interval=0.2)

    def fdatasync(fd):
        events.append(('sync-data' if fd == cache.fileno else 'sync-map',
                       cache.map.count()))
        real_fdatasync(fd)

    monkeypatch.setattr(image_cache.os, 'fdatasync', fdatasync)
    monkeypatch.setattr(chunkmap.os, 'fdatasync', fdatasync)
    assert cache.read(0, CHUNK * 3) == image[:CHUNK * 3]
    # Usable at once, not yet in the map.
    assert cache.has(0) and cache.has(2)
    assert cache.map.count() == 0
    deadline = time.monotonic() + 5
    while cache.map.count() < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(cache.map.present()) == [0, 1, 2]
    # One commit for the three chunks: data synced while the map was
    # still empty, then the map.
    assert events == [('sync-data', 0), ('sync-map', 3)]
    cache.read(CHUNK * 5, 1)
    cache.close()   # commits what is pending
    m, reset = chunkmap.open_map(cache.map_path, manifest.digest(), CHUNK,
                                 SIZE, manifest.chunk_count)
    assert not reset and list(m.present()) == [0, 1, 2, 5]
    m.close()


_FILLER = '''
import sys
from thunder_cache.cache import image_cache
from thunder_cache.cache import upstream
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod
volume, directory, digest, size, interval = sys.argv[1:6]
origin = sources.FileOrigin(volume)
m = sources.load_manifest(origin.read, digest,
                          manifest_mod.volume_offset(int(size)))
up = upstream.Upstream('img', origin, [], None, 'http://127.0.0.1:1')
cache = image_cache.ImageCache(directory, 'img', m, up,
                               commit_interval=float(interval))
print('ready', flush=True)
for index in range(m.chunk_count):
    cache.ensure(index)
print('done', flush=True)
import time
time.sleep(60)
'''


@pytest.mark.parametrize('interval', [0.0, 0.01])
def test_sigkill_at_any_moment_leaves_a_consistent_map(tmp_path, interval):
    """SIGKILL mid-fill: the map claims only chunks that verify on disk."""

    chunk = 64 * 1024
    image = os.urandom(chunk * 300 + 5)
    volume = tmp_path / 'volume'
    manifest = manifest_mod.Manifest.build([image], chunk)
    with open(volume, 'wb') as f:
        f.write(image)
        f.seek(manifest_mod.volume_offset(len(image)))
        f.write(manifest.to_bytes())
    directory = str(tmp_path / 'cache')
    rng = random.Random(interval)
    claimed = []
    for attempt in range(6):
        proc = subprocess.Popen(
            [sys.executable, '-c', _FILLER, str(volume), directory,
             manifest.digest(), str(len(image)), str(interval)],
            stdout=subprocess.PIPE, cwd=cache_helpers.REPO)
        assert proc.stdout.readline() == b'ready\n'
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        bits = chunkmap.read_map(os.path.join(directory, 'chunkmap'),
                                 manifest.digest(), chunk, len(image),
                                 manifest.chunk_count)
        present = [i for i in range(manifest.chunk_count)
                   if bits[i >> 3] & (1 << (i & 7))]
        with open(os.path.join(directory, 'data'), 'rb') as f:
            for index in present:
                offset, length = manifest.chunk_range(index)
                f.seek(offset)
                assert manifest.verify_chunk(index, f.read(length)), index
        claimed.append(len(present))
    # The fills made progress across restarts (each restart keeps what
    # the previous ones committed).
    assert claimed == sorted(claimed)
    assert claimed[-1] > 0


def test_older_peer_fetch_bypasses_a_younger_inflight_fetch(
        tmp_path, image, manifest):
    """Waits between fetches only go from younger to older tickets."""
    from thunder_cache.peer import protocol
    older = protocol.new_ticket(clock=lambda: 1000.0)
    younger = protocol.new_ticket(clock=lambda: 3000.0)
    middle = protocol.new_ticket(clock=lambda: 2000.0)
    peer = FakeSource(image, name='p', kind='peer', delay=0.3,
                      url='http://10.0.0.2:7480')
    cache = cache_over(tmp_path, manifest, peer)
    t = threading.Thread(target=cache.ensure, args=(0,),
                         kwargs={'ticket': middle})
    t.start()
    time.sleep(0.1)
    # Younger than the fetch in flight: waits for it.
    cache.ensure(0, via=('http://10.0.0.9:1',), ticket=younger)
    assert peer.calls == [0]
    assert cache.counters.get('inflight_joins') == 1
    t.join()
    t = threading.Thread(target=cache.ensure, args=(1,),
                         kwargs={'ticket': middle})
    t.start()
    time.sleep(0.1)
    # Older: served by a fetch of its own rather than waiting.
    cache.ensure(1, via=('http://10.0.0.9:1',), ticket=older)
    t.join()
    assert peer.calls == [0, 1, 1]
    assert cache.counters.get('inflight_bypasses') == 1
    cache.close()


def test_any_peer_fetch_joins_an_origin_fetch(tmp_path, image, manifest):
    from thunder_cache.peer import protocol
    origin = FakeSource(image, name='o', kind='origin', delay=0.3)
    cache = cache_over(tmp_path, manifest, origin)
    t = threading.Thread(target=cache.ensure, args=(0,))
    t.start()
    time.sleep(0.1)
    cache.ensure(0, via=('http://10.0.0.9:1',),
                 ticket=protocol.new_ticket(clock=lambda: 1.0))
    t.join()
    assert origin.calls == [0]
    assert cache.counters.get('inflight_bypasses') == 0
    cache.close()


# -- background fetches, demand accounting, the read observer -------------

def _in_thread(target, *args):
    t = threading.Thread(target=target, args=args)
    t.start()
    return t


def test_background_fetch_is_counted_apart(tmp_path, image, manifest):
    origin = FakeSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    assert cache.ensure(4, background=True) is True
    assert cache.ensure(4, background=True) is False
    assert cache.ensure(5) is None
    snap = cache.counters.snapshot()
    assert snap['chunk_misses'] == 1      # chunk 5 only
    assert snap['chunk_hits'] == 0
    assert snap['chunks_from_origin'] == 2
    assert origin.calls == [4, 5]
    # The first local read of a chunk fetched in background is a
    # prefetch hit; later reads are plain hits.
    assert cache.read_chunk(4) == image[4 * CHUNK:5 * CHUNK]
    cache.read_chunk(4)
    cache.read_chunk(5)
    snap = cache.counters.snapshot()
    assert snap['prefetch_hits'] == 1
    assert snap['chunk_hits'] == 3
    with pytest.raises(IndexError):
        cache.ensure(manifest.chunk_count, background=True)
    cache.close()


def test_prefetch_hit_found_under_the_lock(tmp_path, image, manifest,
                                           monkeypatch):
    """A chunk a prefetch lands between the two looks of a read."""
    cache = cache_over(tmp_path, manifest, FakeSource(image))
    assert cache.ensure(2, background=True)
    looks = []
    real_has = cache.has

    def has(index):
        looks.append(index)
        return len(looks) > 1 and real_has(index)

    monkeypatch.setattr(cache, 'has', has)
    reader = _in_thread(cache.ensure, 2)
    reader.join(30)
    assert not reader.is_alive(), 'the read deadlocked'
    assert looks == [2, 2]
    assert cache.counters.get('prefetch_hits') == 1
    cache.close()


def test_background_error_is_raised(tmp_path, image, manifest):
    cache = cache_over(tmp_path, manifest, FakeSource(image, fail={2}))
    with pytest.raises(image_cache.FetchError):
        cache.ensure(2, background=True)
    assert cache.background_pending() == 0
    assert not cache.has(2)
    cache.close()


def test_demand_read_joins_a_background_fetch(tmp_path, image, manifest):
    origin = GatedSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    background = _in_thread(cache.ensure, 3, (), None, None, True)
    origin.wait_for(lambda: origin.started == [3])
    assert cache.background_pending() == 1
    reader = _in_thread(cache.read_chunk, 3)
    origin.wait_for(lambda: cache.counters.get('inflight_joins') == 1)
    # Waiting on a prefetch does not hold the prefetch back.
    assert cache.demand_pending() == 0
    origin.release()
    background.join()
    reader.join()
    assert origin.calls == [3]
    snap = cache.counters.snapshot()
    assert snap['prefetch_joins'] == 1
    assert snap['chunk_misses'] == 0
    cache.read_chunk(3)
    assert cache.counters.get('prefetch_hits') == 0
    assert cache.background_pending() == 0
    cache.close()


def test_background_leaves_a_demand_fetch_alone(tmp_path, image, manifest):
    origin = GatedSource(image)
    cache = cache_over(tmp_path, manifest, origin)
    assert cache.demand_pending() == 0
    readers = [_in_thread(cache.ensure, 6) for _ in range(3)]
    origin.wait_for(lambda: origin.started == [6])
    origin.wait_for(lambda: cache.counters.get('inflight_joins') == 2)
    assert cache.demand_pending() == 3
    # Does not wait, does not fetch again.
    assert cache.ensure(6, background=True) is False
    origin.release()
    for t in readers:
        t.join()
    assert cache.demand_pending() == 0
    assert origin.calls == [6]
    cache.close()


def test_demand_pending_drops_after_a_failure(tmp_path, image, manifest):
    cache = cache_over(tmp_path, manifest, FakeSource(image, fail={1}))
    with pytest.raises(image_cache.FetchError):
        cache.ensure(1)
    assert cache.demand_pending() == 0
    cache.close()


def test_observer_sees_local_reads_only(tmp_path, image, manifest):
    from thunder_cache.peer import protocol
    cache = cache_over(tmp_path, manifest, FakeSource(image))
    assert cache.observer is None
    seen = []
    cache.observer = seen.append
    cache.read(CHUNK * 2 - 1, 2)          # chunks 1 and 2, misses
    cache.read_chunk(1)                    # a hit
    cache.ensure(7, background=True)
    cache.ensure(8, via=('http://10.0.0.9:1',),
                 ticket=protocol.new_ticket())
    cache.ensure(7)
    assert seen == [1, 2, 1, 7]
    cache.close()


def test_failing_observer_is_detached(tmp_path, image, manifest):
    cache = cache_over(tmp_path, manifest, FakeSource(image))
    calls = []

    def observer(index):
        calls.append(index)
        raise RuntimeError('broken')

    cache.observer = observer
    assert cache.read_chunk(0) == image[:CHUNK]
    assert cache.read_chunk(1) == image[CHUNK:2 * CHUNK]
    assert calls == [0]
    assert cache.observer is None
    cache.close()


def test_recorder_as_observer(tmp_path, image, manifest):
    from thunder_cache.boot import trace
    cache = cache_over(tmp_path, manifest, FakeSource(image))
    recorder = trace.TraceRecorder(manifest.chunk_count, window=1000)
    cache.observer = recorder.touch
    for index in (3, 1, 3, 9, 1, 0):
        cache.read_chunk(index)
    assert recorder.indexes() == [3, 1, 9, 0]
    cache.close()


# -- deadlines of waiters ----------------------------------------------------

@pytest.fixture
def short_grace(monkeypatch):
    monkeypatch.setattr(image_cache, 'WAIT_GRACE', 0.2)


def _limit(source, seconds):
    source.time_limit = lambda length: seconds
    return source


def test_waiter_released_when_the_fetch_overruns_its_source(
        tmp_path, image, manifest, short_grace):
    """A fetch stuck in a source does not hold its waiters forever."""
    stuck = _limit(GatedSource(image, hold={0}), 0.5)
    cache = cache_over(tmp_path, manifest, stuck)
    fetcher = threading.Thread(target=cache.ensure, args=(0,))
    fetcher.start()
    stuck.wait_for(lambda: stuck.started == [0])
    done, error, took = hostile_peer.bounded(lambda: cache.ensure(0), 10)
    try:
        assert done, 'the waiter is still waiting after %.0f s' % took
        assert isinstance(error, image_cache.FetchError), error
        assert 'overdue' in str(error)
        assert cache.counters.get('inflight_overdue') == 1
        assert cache.counters.get('inflight_joins') == 1
    finally:
        stuck.release()
        fetcher.join()
    # The fetch itself was not disturbed.
    assert cache.has(0)
    cache.close()


def test_overdue_waiter_retries_within_read_retry(
        tmp_path, image, manifest, short_grace, fast_retries):
    stuck = _limit(GatedSource(image, hold={0}), 0.3)
    cache = cache_over(tmp_path, manifest, stuck, read_retry=60)
    fetcher = threading.Thread(target=cache.ensure, args=(0,))
    fetcher.start()
    stuck.wait_for(lambda: stuck.started == [0])
    offset, length = manifest.chunk_range(0)
    result = []
    waiter = threading.Thread(
        target=lambda: result.append(cache.read(offset, length)))
    waiter.start()
    deadline = time.monotonic() + 10
    while (cache.counters.get('read_retries') < 2 and
           time.monotonic() < deadline):
        time.sleep(0.01)
    stuck.release()
    fetcher.join()
    waiter.join(10)
    assert result == [image[offset:offset + length]]
    assert cache.counters.get('inflight_overdue') >= 2
    assert cache.counters.get('read_retries') >= 2
    assert stuck.started == [0]
    cache.close()


def test_waiter_follows_a_fetch_from_source_to_source(
        tmp_path, image, manifest, monkeypatch):
    """Each source within its limit: the waiter waits the whole fetch."""
    monkeypatch.setattr(image_cache, 'WAIT_GRACE', 1.0)
    first = _limit(FakeSource(image, name='p', kind='peer', url='http://p:1',
                              fail={'all'}, delay=1.0), 1.5)
    second = _limit(FakeSource(image, name='origin', delay=1.5), 1.5)
    cache = cache_over(tmp_path, manifest, first, second)
    fetcher = threading.Thread(target=cache.ensure, args=(0,))
    fetcher.start()
    time.sleep(0.1)
    cache.ensure(0)
    fetcher.join()
    assert cache.counters.get('inflight_overdue') == 0
    assert cache.counters.get('inflight_joins') == 1
    assert second.calls == [0]
    cache.close()
