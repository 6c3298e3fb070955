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

"""Boot-trace replay and background hydration over a real ImageCache."""

import os
import threading

from oslo_config import cfg
import pytest

from tests.unit.thunder_cache.fake_sources import cache_over
from tests.unit.thunder_cache.fake_sources import FakeSource
from tests.unit.thunder_cache.fake_sources import GatedSource
from thunder_cache.boot import prefetch
from thunder_cache.boot import trace
from thunder_common import manifest as manifest_mod

CHUNK = manifest_mod.MIN_CHUNK_SIZE
SIZE = CHUNK * 12 + 77                   # 13 chunks, the last one short
COUNT = 13


@pytest.fixture
def image():
    return os.urandom(SIZE)


@pytest.fixture
def cache_of(tmp_path, image):
    """cache_of(source): an ImageCache of ``image`` over ``source``."""
    manifest = manifest_mod.Manifest.build([image], CHUNK)
    made = []

    def make(source):
        made.append(cache_over(tmp_path, manifest, source))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


class FakeClock:
    """A clock that only the fake sleep moves; records the sleeps."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []
        self.lock = threading.Lock()

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        with self.lock:
            self.sleeps.append(seconds)
            self.now += seconds


def _count_polls(cache):
    """Make cache.demand_pending count its calls; returns the counter."""
    calls = [0]
    real = cache.demand_pending

    def counted():
        calls[0] += 1
        return real()

    cache.demand_pending = counted
    return calls


def _after_polls(origin, polls, more=5):
    start = polls[0]
    origin.wait_for(lambda: polls[0] >= start + more)


def _demand_read(cache, origin, index):
    """A thread reading chunk ``index``, once its fetch has started."""
    reader = threading.Thread(target=cache.ensure, args=(index,))
    reader.start()
    origin.wait_for(lambda: origin.started == [index])
    return reader


# -- the prefetcher -------------------------------------------------------

def test_replays_in_trace_order_skipping_present(image, cache_of):
    origin = FakeSource(image)
    cache = cache_of(origin)
    cache.ensure(5)
    replay = prefetch.Prefetcher(cache, [7, 5, 2, 9, 0, 12], concurrency=1)
    assert not replay.done
    replay.start()
    assert replay.wait(30)
    assert replay.done
    assert origin.calls == [5, 7, 2, 9, 0, 12]
    assert replay.stats() == {'fetched': 5, 'skipped': 1, 'errors': 0}
    snap = cache.counters.snapshot()
    assert snap['chunks_prefetched'] == 5
    assert snap['chunk_misses'] == 1
    for index in (7, 2, 9, 0, 12):
        assert cache.read_chunk(index) == image[index * CHUNK:
                                                (index + 1) * CHUNK]
    assert cache.counters.get('prefetch_hits') == 5
    with pytest.raises(RuntimeError):
        replay.start()


def test_at_most_concurrency_fetches_in_trace_order(image, cache_of):
    origin = GatedSource(image)
    cache = cache_of(origin)
    order = [11, 3, 8, 0, 5, 1, 12, 7, 2, 9]
    replay = prefetch.Prefetcher(cache, order, concurrency=3).start()
    origin.wait_for(lambda: origin.active == 3)
    assert sorted(origin.started) == sorted(order[:3])
    assert replay.in_flight() == 3
    # One slot frees: the next chunk of the trace is the next fetched.
    origin.release(order[0])
    origin.wait_for(lambda: len(origin.started) == 4)
    assert origin.started[3] == order[3]
    origin.release()
    assert replay.wait(30)
    assert origin.max_active == 3
    assert sorted(origin.started) == sorted(order)
    assert all(cache.has(i) for i in order)
    assert not cache.has(4)


def _prefetcher(cache, **kwargs):
    return prefetch.Prefetcher(cache, [i for i in range(COUNT) if i != 6],
                               concurrency=4, **kwargs)


def _hydrator(cache, **kwargs):
    return prefetch.Hydrator(cache, 0, concurrency=4, **kwargs)


@pytest.mark.parametrize('make', [_prefetcher, _hydrator])
def test_no_new_fetch_while_demand_waits(image, cache_of, make):
    origin = GatedSource(image, hold={6})
    cache = cache_of(origin)
    reader = _demand_read(cache, origin, 6)
    assert cache.demand_pending() == 1
    polls = _count_polls(cache)
    replay = make(cache, demand_allowance=0).start()
    _after_polls(origin, polls)
    assert origin.started == [6]
    assert replay.in_flight() == 0
    origin.release(6)
    reader.join()
    assert replay.wait(30)
    assert sorted(origin.started) == list(range(COUNT))
    assert origin.calls.count(6) == 1


@pytest.mark.parametrize('make', [_prefetcher, _hydrator])
def test_workers_resume_when_the_demand_ends_not_on_a_poll(image, cache_of,
                                                           make):
    origin = GatedSource(image, hold={6})
    cache = cache_of(origin)
    reader = _demand_read(cache, origin, 6)
    polls = _count_polls(cache)
    # Workers that looked at the demand once would look again only after
    # an hour: the cache's word that it ended is what wakes them.
    replay = make(cache, demand_allowance=0, poll_interval=3600).start()
    # Each of the 4 workers looked once.
    origin.wait_for(lambda: polls[0] >= 4)
    assert origin.started == [6], polls
    origin.release(6)
    reader.join()
    assert replay.wait(30)
    assert sorted(origin.started) == list(range(COUNT))
    # Once over, the replay is no longer told of the cache's demand.
    assert cache._demand_watchers == []


def test_allowance_keeps_one_fetch_moving(image, cache_of):
    origin = GatedSource(image)
    cache = cache_of(origin)
    reader = _demand_read(cache, origin, 6)
    polls = _count_polls(cache)
    order = [0, 1, 2, 3, 4, 5, 7, 8]
    replay = prefetch.Prefetcher(cache, order, concurrency=4,
                                 demand_allowance=1).start()
    origin.wait_for(lambda: len(origin.started) == 2)
    _after_polls(origin, polls)
    assert origin.started == [6, 0]
    origin.release(0)
    origin.wait_for(lambda: len(origin.started) == 3)
    _after_polls(origin, polls)
    assert origin.started == [6, 0, 1]
    assert replay.in_flight() == 1
    # Demand served: the replay opens up to its concurrency.
    origin.release(6)
    reader.join()
    origin.wait_for(lambda: origin.active == 4)
    origin.release()
    assert replay.wait(30)
    assert origin.max_active == 4
    assert all(cache.has(i) for i in order)


@pytest.mark.parametrize('make', [_prefetcher, _hydrator])
def test_stop_is_prompt(image, cache_of, make):
    origin = GatedSource(image)
    cache = cache_of(origin)
    replay = make(cache).start()
    origin.wait_for(lambda: origin.active == 4)
    replay.stop()
    assert replay.stopped
    origin.release()
    assert replay.wait(30)
    assert len(origin.started) == 4
    assert cache.present_count() == 4


@pytest.mark.parametrize('make', [_prefetcher, _hydrator])
def test_stop_while_yielding(image, cache_of, make):
    origin = GatedSource(image, hold={6})
    cache = cache_of(origin)
    reader = _demand_read(cache, origin, 6)
    polls = _count_polls(cache)
    replay = make(cache, demand_allowance=0).start()
    _after_polls(origin, polls)
    replay.stop()
    assert replay.wait(30)
    assert cache.demand_pending() == 1
    origin.release()
    reader.join()
    assert origin.started == [6]


def test_errors_are_counted_and_the_replay_continues(image, cache_of):
    origin = FakeSource(image, fail={2, 5})
    cache = cache_of(origin)
    replay = prefetch.Prefetcher(cache, [1, 2, 3, 5, 7], concurrency=1)
    assert replay.start().wait(30)
    assert origin.calls == [1, 2, 3, 5, 7]
    assert replay.stats() == {'fetched': 3, 'skipped': 0, 'errors': 2}
    assert not replay.gave_up
    assert [cache.has(i) for i in (1, 2, 3, 5, 7)] == [True, False, True,
                                                       False, True]
    assert cache.counters.get('fetch_failures') == 2
    assert cache.counters.get('chunks_prefetched') == 3


def test_gives_up_after_failures_in_a_row(image, cache_of):
    origin = FakeSource(image, fail={'all'})
    cache = cache_of(origin)
    replay = prefetch.Prefetcher(cache, range(COUNT), concurrency=1,
                                 max_errors=3)
    assert replay.start().wait(30)
    assert replay.gave_up
    assert replay.errors == 3
    assert origin.calls == [0, 1, 2]


def test_trace_must_fit_the_image(image, cache_of):
    cache = cache_of(FakeSource(image))
    for bad in ([COUNT], [-1]):
        with pytest.raises(ValueError):
            prefetch.Prefetcher(cache, bad)
    with pytest.raises(ValueError):
        prefetch.Prefetcher(cache, [1], concurrency=0)
    with pytest.raises(ValueError):
        prefetch.Prefetcher(cache, [1], demand_allowance=-1)
    empty = prefetch.Prefetcher(cache, []).start()
    assert empty.wait(30)
    assert empty.fetched == 0


# -- the hydrator -----------------------------------------------------------

def test_hydration_delay_rate_and_order(image, cache_of):
    origin = FakeSource(image)
    cache = cache_of(origin)
    cache.ensure(0)
    clock = FakeClock()
    rate = 2 * CHUNK
    hydrator = prefetch.Hydrator(cache, rate, delay=7.0, concurrency=1,
                                 clock=clock, sleep=clock.sleep)
    assert hydrator.start().wait(30)
    assert cache.complete()
    assert origin.calls == list(range(COUNT))
    assert clock.sleeps[0] == 7.0
    hydrated = SIZE - CHUNK
    # The first second's worth (the burst) is free; the rest waits.
    assert sum(clock.sleeps[1:]) == pytest.approx((hydrated - rate) / rate)
    assert hydrator.bucket.waited == pytest.approx((hydrated - rate) / rate)
    assert cache.counters.get('chunks_hydrated') == COUNT - 1
    assert hydrator.stats() == {'fetched': COUNT - 1, 'skipped': 0,
                                'errors': 0}
    assert hydrator.passes == 1


def test_hydration_stops_during_its_delay(image, cache_of):
    origin = FakeSource(image)
    cache = cache_of(origin)
    hydrator = prefetch.Hydrator(cache, CHUNK, delay=3600).start()
    hydrator.stop()
    assert hydrator.wait(30)
    assert origin.calls == []


def test_hydration_stops_in_the_rate_limit(image, cache_of):
    origin = GatedSource(image, hold=set())
    cache = cache_of(origin)
    # A chunk an hour: the first chunk waits for most of an hour.
    hydrator = prefetch.Hydrator(cache, CHUNK / 3600.0, concurrency=1)
    hydrator.start()
    origin.wait_for(lambda: hydrator.bucket.waited > 3000)
    hydrator.stop()
    assert hydrator.wait(30)
    assert origin.calls == []


class FlakySource(FakeSource):
    """Fails the first read of each chunk in ``flaky``."""

    def __init__(self, image, flaky):
        super().__init__(image)
        self.fail = set(flaky)

    def read_chunk(self, index, offset, length, via=(), ticket=None):
        try:
            return super().read_chunk(index, offset, length, via, ticket)
        finally:
            self.fail.discard(index)


def test_hydration_retries_failed_chunks(image, cache_of):
    origin = FlakySource(image, {3, 8})
    cache = cache_of(origin)
    hydrator = prefetch.Hydrator(cache, 0, concurrency=1)
    assert hydrator.start().wait(30)
    assert cache.complete()
    assert origin.calls == list(range(COUNT)) + [3, 8]
    assert hydrator.passes == 2
    assert hydrator.errors == 2


def test_hydration_ends_when_a_pass_only_fails(image, cache_of):
    origin = FakeSource(image, fail={3})
    cache = cache_of(origin)
    hydrator = prefetch.Hydrator(cache, 0, concurrency=2)
    assert hydrator.start().wait(30)
    assert not cache.complete()
    assert cache.present_count() == COUNT - 1
    assert origin.calls.count(3) == 2
    assert hydrator.errors == 2 and not hydrator.gave_up


def test_hydration_waits_for_a_chunk_a_reader_fetches(image, cache_of):
    origin = GatedSource(image, hold={6})
    cache = cache_of(origin)
    reader = _demand_read(cache, origin, 6)
    # An allowance as large as the concurrency: no yielding here.
    hydrator = prefetch.Hydrator(cache, 0, concurrency=2,
                                 demand_allowance=2).start()
    origin.wait_for(lambda: cache.present_count() == COUNT - 1)
    origin.wait_for(lambda: hydrator.passes >= 2)
    assert not hydrator.done
    origin.release(6)
    reader.join()
    assert hydrator.wait(30)
    assert cache.complete()
    assert origin.calls.count(6) == 1
    assert hydrator.fetched == COUNT - 1


# -- options ----------------------------------------------------------------

def test_options():
    conf = cfg.ConfigOpts()
    conf.register_opts(prefetch.opts, group=prefetch.GROUP)
    conf([], project='test')
    group = conf.prefetch
    assert group.record is True
    assert group.record_window == 60.0
    assert group.record_max_chunks == 6144
    assert group.replay is True
    assert group.replay_concurrency == 4
    assert group.demand_allowance == 1
    assert group.hydrate is False
    assert group.hydrate_delay == 300.0
    assert prefetch.hydrate_rate_bytes(group) == 10 * 1024 * 1024
    assert all(opt.help for opt in prefetch.opts)
    assert prefetch.list_opts() == [('prefetch', prefetch.opts)]
    with pytest.raises(ValueError):
        conf.set_override('record_max_chunks', 10 ** 6, group='prefetch')
    # As many chunks as a trace may name; what is published is cut to
    # what fits the metadata.
    conf.set_override('record_max_chunks', trace.MAX_TRACE_CHUNKS,
                      group='prefetch')
    assert conf.prefetch.record_max_chunks == 16384
    with pytest.raises(ValueError):
        conf.set_override('record_max_chunks', trace.MAX_TRACE_CHUNKS + 1,
                          group='prefetch')
