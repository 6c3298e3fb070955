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

"""Tests for thunder_cache.boot.lifecycle: advertisement, traces, hydration."""

import functools
import logging
import os
import threading
import time
import types
from unittest import mock
import uuid

import pytest

from tests import cache_helpers
from thunder_cache.boot import lifecycle
from thunder_cache.boot import prefetch
from thunder_cache.boot import trace as trace_mod
from thunder_cache.cache import node as node_mod
from thunder_cache.peer.advertise import cinder as cinder_records
from thunder_cache.peer import sources

IMAGE_ID = 'img-1'
CHUNKS = 100
DESCRIBED = 'http://192.0.2.1:7485'
ADVERTISED = ['http://192.0.2.7:7485', DESCRIBED, 'http://192.0.2.8:7485']


class FakeRecords:
    """Volume metadata in a dict, like CinderRecords."""

    def __init__(self):
        self.metadata = {}
        self.writes = []
        self.failing = False

    def get_metadata(self, volume_id):
        if self.failing:
            raise cinder_records.RecordsError('cinder is down')
        return dict(self.metadata.get(volume_id, {}))

    def set_metadata(self, volume_id, metadata):
        if self.failing:
            raise cinder_records.RecordsError('cinder is down')
        self.writes.append((volume_id, dict(metadata)))
        self.metadata.setdefault(volume_id, {}).update(metadata)


class FakeAdvertiser:
    """What ImageLifecycle uses of an Advertiser."""

    def __init__(self, peers=()):
        self.records = FakeRecords()
        self.advertised = []
        self.peer_urls = list(peers)
        self.peer_calls = []
        self.stopped = []

    def advertise(self, volume_id):
        self.advertised.append(volume_id)

    def peers(self, volume_id, include_self=False):
        self.peer_calls.append((volume_id, include_self))
        return list(self.peer_urls)

    def stop(self, withdraw=True, timeout=30):
        self.stopped.append(withdraw)


class FakeCache:
    """What ImageLifecycle uses of an ImageCache."""

    def __init__(self, directory, chunk_count=CHUNKS, complete=False):
        self.directory = directory
        self.manifest = types.SimpleNamespace(chunk_count=chunk_count)
        self.observer = None
        self._complete = complete

    def complete(self):
        return self._complete


def make_conf(**overrides):
    """A ``[prefetch]`` group: the options' defaults and ``overrides``."""
    values = {opt.dest: opt.default for opt in prefetch.opts}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def make_spec(volume_id='default', peers=(DESCRIBED,)):
    if volume_id == 'default':
        volume_id = str(uuid.uuid4())
    return node_mod.ImageSpec(IMAGE_ID, 'a' * 64, peers=peers,
                              image_size=CHUNKS * 1024,
                              origin_volume_id=volume_id)


@pytest.fixture
def workers():
    """Prefetcher and Hydrator replaced by mocks."""
    with mock.patch.object(lifecycle.prefetch, 'Prefetcher') as prefetcher, \
            mock.patch.object(lifecycle.prefetch, 'Hydrator') as hydrator:
        yield types.SimpleNamespace(prefetcher=prefetcher,
                                    hydrator=hydrator)


@pytest.fixture
def cache(tmp_path):
    return FakeCache(str(tmp_path))


@pytest.fixture
def advertiser():
    return FakeAdvertiser(ADVERTISED)


@pytest.fixture
def node():
    return mock.Mock(spec=node_mod.Node)


def _lifecycle(node, advertiser, **conf):
    return lifecycle.ImageLifecycle(node, make_conf(**conf), advertiser,
                                    interval=0.01)


def _publish(advertiser, volume_id, indexes):
    text = trace_mod.encode(indexes)
    advertiser.records.metadata[volume_id] = trace_mod.to_metadata(text)
    return text


def _trace_file(cache):
    return os.path.join(cache.directory, lifecycle.TRACE_FILE)


def _record(cache, indexes):
    for index in indexes:
        cache.observer(index)


# -- activation --------------------------------------------------------------

def test_activated_advertises_and_sets_peers(node, advertiser, cache,
                                             workers):
    spec = make_spec()
    _lifecycle(node, advertiser).activated(spec, cache)
    assert advertiser.advertised == [spec.origin_volume_id]
    assert advertiser.peer_calls == [(spec.origin_volume_id, True)]
    # The descriptor's peers first, then the advertised ones in order.
    node.set_peers.assert_called_once_with(IMAGE_ID, [
        DESCRIBED, 'http://192.0.2.7:7485', 'http://192.0.2.8:7485'])


def test_activated_without_origin_volume(node, advertiser, cache, workers):
    _lifecycle(node, advertiser).activated(make_spec(volume_id=None), cache)
    assert advertiser.advertised == []
    assert advertiser.peer_calls == []
    node.set_peers.assert_not_called()
    assert cache.observer is not None  # still records, kept locally


def test_activated_twice_is_ignored(node, advertiser, cache, workers):
    life = _lifecycle(node, advertiser)
    spec = make_spec()
    life.activated(spec, cache)
    observer = cache.observer
    life.activated(spec, cache)
    assert advertiser.advertised == [spec.origin_volume_id]
    assert cache.observer is observer


def test_published_trace_is_replayed(node, advertiser, cache, workers):
    spec = make_spec()
    _publish(advertiser, spec.origin_volume_id, [5, 1, 2, 3, 40])
    _lifecycle(node, advertiser, replay_concurrency=7,
               demand_allowance=3).activated(spec, cache)
    workers.prefetcher.assert_called_once_with(
        cache, [5, 1, 2, 3, 40], concurrency=7, demand_allowance=3)
    workers.prefetcher.return_value.start.assert_called_once_with()
    assert cache.observer is None  # not recorded again
    workers.hydrator.assert_not_called()


class SlowAdvertiser(FakeAdvertiser):
    """Cinder that answers only once ``answer`` is set."""

    def __init__(self, peers=()):
        super().__init__(peers)
        self.answer = threading.Event()

    def advertise(self, volume_id):
        assert self.answer.wait(30)
        super().advertise(volume_id)


def test_slow_cinder_does_not_hold_the_first_read(node, cache, workers,
                                                  caplog):
    advertiser = SlowAdvertiser(ADVERTISED)
    spec = make_spec()
    _publish(advertiser, spec.origin_volume_id, [4, 5, 6])
    life = lifecycle.ImageLifecycle(node, make_conf(), advertiser,
                                    interval=60, activation_wait=0.05)
    started = time.monotonic()
    life.activated(spec, cache)
    assert time.monotonic() - started < 10
    assert 'go on in the background' in caplog.text
    # Meanwhile the boot is recorded, and nothing is prefetched yet.
    assert cache.observer is not None
    workers.prefetcher.assert_not_called()
    advertiser.answer.set()
    deadline = time.monotonic() + 10
    while not workers.prefetcher.return_value.start.called:
        assert time.monotonic() < deadline, 'no prefetch started'
        time.sleep(0.01)
    # The published trace wins over this node's recording.
    workers.prefetcher.assert_called_once_with(
        cache, [4, 5, 6], concurrency=4, demand_allowance=1)
    assert cache.observer is None
    assert advertiser.advertised == [spec.origin_volume_id]
    node.set_peers.assert_called_once_with(IMAGE_ID, [DESCRIBED] + [
        u for u in ADVERTISED if u != DESCRIBED])


def test_activation_error_is_logged_not_raised(node, advertiser, cache,
                                               workers, caplog):
    workers.prefetcher.side_effect = RuntimeError('boom')
    spec = make_spec()
    _publish(advertiser, spec.origin_volume_id, [1])
    _lifecycle(node, advertiser).activated(spec, cache)
    assert 'activation failed' in caplog.text


def test_published_trace_not_replayed_when_replay_is_off(node, advertiser,
                                                         cache, workers):
    spec = make_spec()
    _publish(advertiser, spec.origin_volume_id, [1, 2])
    _lifecycle(node, advertiser, replay=False).activated(spec, cache)
    workers.prefetcher.assert_not_called()
    assert cache.observer is not None


def test_local_trace_replayed_without_advertiser(node, cache, workers):
    with open(_trace_file(cache), 'w') as f:
        f.write(trace_mod.encode([9, 8, 7]))
    _lifecycle(node, None).activated(make_spec(), cache)
    assert workers.prefetcher.call_args.args == (cache, [9, 8, 7])
    node.set_peers.assert_not_called()


def test_local_trace_used_when_cinder_fails(node, advertiser, cache,
                                            workers, caplog):
    with open(_trace_file(cache), 'w') as f:
        f.write(trace_mod.encode([3, 4]))
    advertiser.records.failing = True
    _lifecycle(node, advertiser).activated(make_spec(), cache)
    assert workers.prefetcher.call_args.args == (cache, [3, 4])
    assert 'cannot read its boot trace' in caplog.text


def _malformed_checksum(advertiser, volume_id):
    _publish(advertiser, volume_id, [1, 2, 3])
    advertiser.records.metadata[volume_id][
        trace_mod.DEFAULT_PREFIX + '_sha256'] = 'f' * 64


def _out_of_range(advertiser, volume_id):
    _publish(advertiser, volume_id, [1, CHUNKS + 5])


def _missing_count(advertiser, volume_id):
    advertiser.records.metadata[volume_id] = {
        trace_mod.DEFAULT_PREFIX + '_0': '1:0-5'}


@pytest.mark.parametrize('damage', [_malformed_checksum, _out_of_range,
                                    _missing_count])
def test_malformed_published_trace_is_ignored(node, advertiser, cache,
                                              workers, damage, caplog):
    caplog.set_level(logging.WARNING)
    spec = make_spec()
    damage(advertiser, spec.origin_volume_id)
    _lifecycle(node, advertiser).activated(spec, cache)
    workers.prefetcher.assert_not_called()
    assert cache.observer is not None  # records its own instead
    assert 'trace' in caplog.text


def test_malformed_local_trace_is_ignored(node, cache, workers):
    with open(_trace_file(cache), 'w') as f:
        f.write('not a trace')
    _lifecycle(node, None).activated(make_spec(), cache)
    workers.prefetcher.assert_not_called()
    assert cache.observer is not None


def test_nothing_recorded_when_record_is_off(node, advertiser, cache,
                                             workers):
    _lifecycle(node, advertiser, record=False).activated(make_spec(), cache)
    assert cache.observer is None
    workers.prefetcher.assert_not_called()


def test_complete_cache_needs_no_worker(node, advertiser, tmp_path,
                                        workers):
    cache = FakeCache(str(tmp_path), complete=True)
    spec = make_spec()
    _publish(advertiser, spec.origin_volume_id, [1])
    _lifecycle(node, advertiser, hydrate=True).activated(spec, cache)
    assert cache.observer is None
    workers.prefetcher.assert_not_called()
    workers.hydrator.assert_not_called()
    assert advertiser.advertised == [spec.origin_volume_id]


def test_hydrate(node, advertiser, cache, workers):
    _lifecycle(node, advertiser, hydrate=True, hydrate_rate=2.5,
               hydrate_delay=30.0, demand_allowance=2).activated(
        make_spec(), cache)
    workers.hydrator.assert_called_once_with(
        cache, int(2.5 * prefetch.MiB), 30.0, demand_allowance=2)
    workers.hydrator.return_value.start.assert_called_once_with()


def test_hydrate_off_by_default(node, advertiser, cache, workers):
    _lifecycle(node, advertiser).activated(make_spec(), cache)
    workers.hydrator.assert_not_called()


def test_set_peers_failure_is_logged(node, advertiser, cache, workers,
                                     caplog):
    node.set_peers.side_effect = KeyError(IMAGE_ID)
    life = _lifecycle(node, advertiser)
    life.activated(make_spec(), cache)
    life.tick()
    assert node.set_peers.call_count == 2
    assert 'cannot update its peers' in caplog.text


# -- recording and publication ------------------------------------------------

def test_recording_published_once(node, advertiser, cache, workers):
    spec = make_spec()
    life = _lifecycle(node, advertiser, record_max_chunks=4)
    life.activated(spec, cache)
    _record(cache, [7, 3, 7])
    life.tick()  # not done yet
    assert advertiser.records.writes == []
    assert not os.path.exists(_trace_file(cache))
    _record(cache, [0, 50])
    life.tick()
    text = trace_mod.encode([7, 3, 0, 50])
    assert advertiser.records.writes == [
        (spec.origin_volume_id, trace_mod.to_metadata(text))]
    with open(_trace_file(cache)) as f:
        assert f.read() == text
    assert not os.path.exists(_trace_file(cache) + '.tmp')
    assert cache.observer is None
    life.tick()
    assert len(advertiser.records.writes) == 1
    # Peers are refreshed at every tick.
    assert len(advertiser.peer_calls) == 4


def test_too_long_a_recording_is_published_in_part(node, advertiser,
                                                   tmp_path, workers,
                                                   caplog):
    caplog.set_level(logging.INFO)
    # 5000 scattered chunks of four digits: five characters each, 3263
    # fit the 64 values of 255 characters.
    cache = FakeCache(str(tmp_path), chunk_count=36 ** 4)
    recorded = list(range(36 ** 3, 36 ** 3 + 10000, 2))
    spec = make_spec()
    life = _lifecycle(node, advertiser, record_max_chunks=len(recorded))
    life.activated(spec, cache)
    _record(cache, recorded)
    with pytest.raises(ValueError):
        trace_mod.encode(recorded)
    life.tick()
    assert life.trace_state(IMAGE_ID) == 'recorded'
    [(volume_id, metadata)] = advertiser.records.writes
    assert volume_id == spec.origin_volume_id
    assert metadata['thunder_trace_parts'] == str(trace_mod.MAX_PARTS)
    text = trace_mod.from_metadata(metadata)
    assert trace_mod.decode(text, 36 ** 4) == recorded[:3263]
    with open(_trace_file(cache)) as f:
        assert f.read() == text
    assert ('keeping the first 3263 of the 5000 chunks of its boot trace: '
            'a trace names at most 16384 chunks in the 64 Cinder metadata '
            'values of a trace' in caplog.text)
    assert 'published a boot trace of 3263 chunks' in caplog.text


def test_recording_that_fits_is_published_whole(node, advertiser, tmp_path,
                                                workers, caplog):
    caplog.set_level(logging.INFO)
    # More than the 1813 chunks that fit however scattered: a boot read in
    # runs is published whole.
    cache = FakeCache(str(tmp_path), chunk_count=36 ** 4)
    recorded = [i for start in range(0, 36 ** 4, 100)
                for i in range(start, start + 10)][:6144]
    spec = make_spec()
    life = _lifecycle(node, advertiser)
    assert life.conf.record_max_chunks == 6144
    life.activated(spec, cache)
    _record(cache, recorded)
    life.tick()
    [(_, metadata)] = advertiser.records.writes
    assert trace_mod.decode(trace_mod.from_metadata(metadata),
                            36 ** 4) == recorded
    assert 'keeping the first' not in caplog.text
    assert 'published a boot trace of 6144 chunks' in caplog.text


def test_first_publisher_wins(node, advertiser, cache, workers):
    spec = make_spec()
    life = _lifecycle(node, advertiser, record_max_chunks=2)
    life.activated(spec, cache)
    # Another node published while this one recorded.
    theirs = _publish(advertiser, spec.origin_volume_id, [11, 12, 13])
    _record(cache, [1, 2])
    life.tick()
    life.tick()
    assert advertiser.records.writes == []
    assert trace_mod.from_metadata(
        advertiser.records.metadata[spec.origin_volume_id]) == theirs
    # This node keeps its own copy.
    with open(_trace_file(cache)) as f:
        assert f.read() == trace_mod.encode([1, 2])


def test_publication_retried_when_cinder_fails(node, advertiser, cache,
                                               workers):
    spec = make_spec()
    life = _lifecycle(node, advertiser, record_max_chunks=1)
    life.activated(spec, cache)
    _record(cache, [5])
    advertiser.records.failing = True
    life.tick()
    assert advertiser.records.writes == []
    advertiser.records.failing = False
    life.tick()
    life.tick()
    assert advertiser.records.writes == [
        (spec.origin_volume_id,
         trace_mod.to_metadata(trace_mod.encode([5])))]


def test_recording_without_advertiser_kept_locally(node, cache, workers):
    life = _lifecycle(node, None, record_max_chunks=2)
    life.activated(make_spec(), cache)
    _record(cache, [4, 2])
    life.tick()
    with open(_trace_file(cache)) as f:
        assert trace_mod.decode(f.read(), CHUNKS) == [4, 2]
    assert cache.observer is None
    node.set_peers.assert_not_called()


def test_empty_recording_publishes_nothing(node, advertiser, cache,
                                           workers):
    spec = make_spec()
    life = _lifecycle(node, advertiser, record_window=1.0)
    clock = [0.0]
    recorder = functools.partial(trace_mod.TraceRecorder,
                                 clock=lambda: clock[0])
    with mock.patch.object(lifecycle.trace_mod, 'TraceRecorder', recorder):
        life.activated(spec, cache)
        _record(cache, [CHUNKS + 1])  # out of range: starts the window
        clock[0] = 5.0
        life.tick()
    assert advertiser.records.writes == []
    assert not os.path.exists(_trace_file(cache))
    assert cache.observer is None


def test_unwritable_trace_file_still_published(node, advertiser, tmp_path,
                                               workers, caplog):
    cache = FakeCache(str(tmp_path / 'missing-dir'))
    spec = make_spec()
    life = _lifecycle(node, advertiser, record_max_chunks=1)
    life.activated(spec, cache)
    _record(cache, [8])
    life.tick()
    assert 'cannot keep its boot trace' in caplog.text
    assert len(advertiser.records.writes) == 1


# -- thread and stop ---------------------------------------------------------

def test_stop_stops_workers_and_withdraws(node, advertiser, tmp_path,
                                          workers):
    life = _lifecycle(node, advertiser, hydrate=True)
    spec = make_spec()
    _publish(advertiser, spec.origin_volume_id, [1, 2])
    life.activated(spec, FakeCache(str(tmp_path)))
    life.stop()
    workers.prefetcher.return_value.stop.assert_called_once_with()
    workers.hydrator.return_value.stop.assert_called_once_with()
    assert advertiser.stopped == [True]
    # An image opened after the stop starts nothing.
    other = node_mod.ImageSpec('img-2', 'b' * 64, image_size=1,
                               origin_volume_id=str(uuid.uuid4()))
    life.activated(other, FakeCache(str(tmp_path)))
    assert advertiser.advertised == [spec.origin_volume_id]
    assert workers.prefetcher.call_count == 1


def test_thread_ticks_until_stopped(node, advertiser, cache, workers):
    life = _lifecycle(node, advertiser, record_max_chunks=1)
    spec = make_spec()
    life.activated(spec, cache)
    _record(cache, [3])
    life.start()
    try:
        for _ in range(500):
            if advertiser.records.writes:
                break
            threading.Event().wait(0.01)
    finally:
        life.stop()
    assert not life._thread.is_alive()
    assert len(advertiser.records.writes) == 1
    assert advertiser.stopped == [True]


def test_failing_tick_does_not_end_the_thread(node, advertiser, caplog):
    life = _lifecycle(node, advertiser)
    calls = []

    def tick():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError('boom')

    life.tick = tick
    life.start()
    try:
        for _ in range(500):
            if len(calls) >= 3:
                break
            threading.Event().wait(0.01)
    finally:
        life.stop()
    assert len(calls) >= 3
    assert 'Image lifecycle tick failed' in caplog.text


# -- with a real node --------------------------------------------------------

def test_with_a_real_node(tmp_path):
    """The hook of Node.on_activate over a real ImageCache."""
    # Peers that refuse connections at once: the origin serves.
    described = 'http://127.0.0.1:1'
    advertiser = FakeAdvertiser(['http://127.0.0.1:2', described])
    chunk = 64 * 1024
    image = os.urandom(5 * chunk)
    path = str(tmp_path / 'volume')
    manifest = cache_helpers.write_volume(path, image, chunk)
    volume_id = str(uuid.uuid4())
    node = node_mod.Node('n1', 'http://127.0.0.1:7485',
                         str(tmp_path / 'cache'), cache_helpers.client())
    life = lifecycle.ImageLifecycle(node, make_conf(record_max_chunks=2),
                                    advertiser)
    node.on_activate = life.activated
    node.register(node_mod.ImageSpec(
        IMAGE_ID, manifest.digest(), sources.FileOrigin(path),
        peers=[described], image_size=len(image),
        origin_volume_id=volume_id))
    try:
        assert node.read_image(IMAGE_ID, 3 * chunk, 10) == \
            image[3 * chunk:3 * chunk + 10]
        assert node.read_image(IMAGE_ID, chunk, chunk + 1) == \
            image[chunk:2 * chunk + 1]
        cache = node.cache(IMAGE_ID)
        assert cache.upstream.peers == [described, 'http://127.0.0.1:2']
        life.tick()
        with open(os.path.join(cache.directory, lifecycle.TRACE_FILE)) as f:
            assert trace_mod.decode(f.read(), 5) == [3, 1]
        assert trace_mod.from_metadata(
            advertiser.records.metadata[volume_id]) == \
            trace_mod.encode([3, 1])
        assert cache.observer is None
    finally:
        life.stop()
        node.close()


# -- images gone, eviction ---------------------------------------------------

class GoneAdvertiser(FakeAdvertiser):
    """Cinder answers 404 for the image-volume."""

    def __init__(self):
        super().__init__()
        self.withdrawn = []

    def peers(self, volume_id, include_self=False):
        raise cinder_records.VolumeGone('gone')

    def withdraw(self, volume_id, lock_timeout=-1):
        self.withdrawn.append(volume_id)
        return True


def test_image_gone_after_two_refreshes(node, cache, workers):
    advertiser = GoneAdvertiser()
    spec = make_spec()
    life = _lifecycle(node, advertiser)
    life.activated(spec, cache)  # the first 404
    node.mark_gone.assert_not_called()
    life.tick()
    node.mark_gone.assert_called_once_with(
        IMAGE_ID, 'its image-volume %s was deleted' % spec.origin_volume_id)


def test_forget_stops_workers_and_withdraws(node, cache, workers):
    advertiser = GoneAdvertiser()
    spec = make_spec()
    life = _lifecycle(node, advertiser, hydrate=True)
    life.activated(spec, cache)
    life.forget(IMAGE_ID)
    workers.hydrator.return_value.stop.assert_called_once_with()
    assert advertiser.withdrawn == [spec.origin_volume_id]
    life.forget(IMAGE_ID)  # twice is harmless
    assert advertiser.withdrawn == [spec.origin_volume_id]
    # Opened again later: activated anew (advertised again).
    life.activated(spec, cache)
    assert IMAGE_ID in life._images


def test_trace_state(node, advertiser, cache, workers):
    life = _lifecycle(node, advertiser)
    assert life.trace_state(IMAGE_ID) is None
    life.activated(make_spec(), cache)
    assert life.trace_state(IMAGE_ID) == 'recording'
    life._images[IMAGE_ID].published = True
    assert life.trace_state(IMAGE_ID) == 'recorded'
    life._images[IMAGE_ID].prefetcher = mock.Mock(done=False)
    assert life.trace_state(IMAGE_ID) == 'replaying'


def test_volume_gone(node):
    advertiser = FakeAdvertiser()
    life = _lifecycle(node, advertiser)
    advertiser.records.get_volume = mock.Mock(
        side_effect=cinder_records.VolumeGone('404'))
    assert life.volume_gone('v') is True
    advertiser.records.get_volume.side_effect = (
        cinder_records.RecordsError('x'))
    assert life.volume_gone('v') is False
    assert _lifecycle(node, None).volume_gone('v') is False
