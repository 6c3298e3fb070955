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

"""The bounded cache: the policy, evictions on real caches, disk full."""

import errno
import logging
import os
import threading
import time
import types
from unittest import mock

import pytest

from tests import cache_helpers
from thunder_cache.cache import eviction
from thunder_cache.cache import image_cache
from thunder_cache.cache import node as node_mod
from thunder_cache.peer import protocol
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

CHUNK = manifest_mod.MIN_CHUNK_SIZE
SIZE = CHUNK * 6 + 100
C = eviction.Candidate


# -- the policy ---------------------------------------------------------------

def test_nothing_under_the_limit():
    cands = [C('a', 40, 1.0, None), C('b', 60, 2.0, None)]
    assert eviction.plan(cands, 100, 50) == []


def test_no_limit_evicts_nothing():
    assert eviction.plan([C('a', 10 ** 12, 1.0, None)], 0, 50) == []


def test_least_recently_used_first_down_to_low_water():
    cands = [C('new', 30, 30.0, None), C('old', 30, 10.0, None),
             C('mid', 30, 20.0, None), C('newest', 30, 40.0, None)]
    # 120 bytes over a limit of 100; low water 70 % = 70: two go.
    victims = eviction.plan(cands, 100, 70)
    assert [v.image_id for v in victims] == ['old', 'mid']


def test_in_use_never_evicted():
    cands = [C('used', 80, 1.0, 'a volume reads it'),
             C('idle', 30, 5.0, None), C('busy', 30, 2.0, 'a fetch')]
    victims = eviction.plan(cands, 100, 10)
    # Only the idle one goes, even though the caches stay over the limit.
    assert [v.image_id for v in victims] == ['idle']


def test_ties_broken_by_image_id():
    cands = [C('b', 60, 1.0, None), C('a', 60, 1.0, None)]
    assert [v.image_id for v in eviction.plan(cands, 100, 90)] == ['a']


def test_low_water_100_evicts_just_enough():
    cands = [C('a', 50, 1.0, None), C('b', 50, 2.0, None),
             C('c', 50, 3.0, None)]
    assert [v.image_id for v in eviction.plan(cands, 100, 100)] == ['a']


def test_last_used_stamp(tmp_path):
    assert eviction.last_used(str(tmp_path / 'missing')) == 0.0
    eviction.save_last_used(str(tmp_path), 1000.0)
    assert eviction.last_used(str(tmp_path)) == 1000.0
    eviction.save_last_used(str(tmp_path), 500.0)  # never goes back
    assert eviction.last_used(str(tmp_path)) == 1000.0


# -- real caches -------------------------------------------------------------

class Images:
    """A node with images on file origins, in a temporary directory."""

    def __init__(self, tmp_path, count=3, **node_options):
        self.tmp_path = tmp_path
        self.node = node_mod.Node('node-1', 'http://127.0.0.1:9',
                                  str(tmp_path / 'cache'),
                                  cache_helpers.client(), **node_options)
        self.data = {}
        for n in range(count):
            self.add('img-%d' % n)

    def add(self, image_id):
        image = os.urandom(SIZE)
        path = str(self.tmp_path / (image_id + '.vol'))
        manifest = cache_helpers.write_volume(path, image, CHUNK)
        self.node.register(node_mod.ImageSpec(
            image_id, manifest.digest(), sources.FileOrigin(path),
            image_size=SIZE))
        self.data[image_id] = image

    def fill(self, image_id, when):
        assert self.node.read_image(image_id, 0, SIZE) == self.data[image_id]
        self.node.cache(image_id).last_used = when

    def dir(self, image_id):
        return os.path.join(self.node.cache_dir, image_id)


@pytest.fixture
def images(tmp_path):
    images = Images(tmp_path)
    yield images
    images.node.close()


def conf(**values):
    defaults = {opt.dest: opt.default for opt in eviction.opts}
    defaults.update(values)
    return types.SimpleNamespace(**defaults)


def test_evict_removes_the_directory(images):
    images.fill('img-0', 1.0)
    assert os.path.isdir(images.dir('img-0'))
    freed = images.node.evict('img-0')
    assert freed >= SIZE
    assert not os.path.exists(images.dir('img-0'))
    assert os.listdir(images.node.cache_dir) == []  # nothing half-removed
    # A local read opens a new cache, fetched again, same bytes.
    assert images.node.read_image('img-0', 0, SIZE) == images.data['img-0']


def test_evicted_image_is_not_reopened_by_peers(images):
    images.fill('img-0', 1.0)
    images.node.evict('img-0')
    peer = types.SimpleNamespace(via=(), url='http://127.0.0.2:1',
                                 node_id='peer', ticket=None)
    assert images.node.serve_chunk(peer, 'img-0', 0).status == 404
    assert images.node.serve_manifest(peer, 'img-0').status == 404
    assert not os.path.exists(images.dir('img-0'))


def test_pinned_cache_is_not_evicted(images):
    images.fill('img-0', 1.0)
    with images.node.using('img-0'):
        with pytest.raises(node_mod.ImageBusy, match='in progress'):
            images.node.evict('img-0')
    assert images.node.evict('img-0') > 0


def test_peer_reply_pins_until_sent(images):
    images.fill('img-0', 1.0)
    peer = types.SimpleNamespace(via=(), url='http://127.0.0.2:1',
                                 node_id='peer', ticket=None)
    images.node.entries()['img-0'].children.child_ttl = 0  # not counted
    reply = images.node.serve_chunk(peer, 'img-0', 1)
    assert reply.status == 200 and reply.span is not None
    time.sleep(0.01)
    with pytest.raises(node_mod.ImageBusy, match='in progress'):
        images.node.evict('img-0')
    reply.release()
    assert images.node.evict('img-0') > 0


def test_children_being_served_refuse(images):
    images.fill('img-0', 1.0)
    peer = types.SimpleNamespace(via=(), url='http://127.0.0.2:1',
                                 node_id='child-1', ticket=None)
    images.node.serve_chunk(peer, 'img-0', 1).release()
    with pytest.raises(node_mod.ImageBusy, match='serving 1 peers'):
        images.node.evict('img-0')
    [candidate] = eviction.Evictor(images.node, conf()).candidates()
    assert candidate.busy == 'serving 1 peers (child-1)'
    images.node.entries()['img-0'].children.child_ttl = 0
    time.sleep(0.01)
    assert images.node.evict('img-0') > 0


def test_in_use_refuses(images):
    images.fill('img-0', 1.0)
    with pytest.raises(node_mod.ImageBusy, match='vol-1'):
        images.node.evict('img-0', in_use=lambda i: 'vol-1 reads it')
    assert images.node.read_image('img-0', 0, 10) == images.data['img-0'][:10]


def test_fetch_in_flight_refuses(images):
    cache = images.node.cache('img-0')
    gate = threading.Event()
    started = threading.Event()
    origin = cache.upstream.origin
    real = origin.read_chunk

    def slow(*args, **kwargs):
        started.set()
        gate.wait(10)
        return real(*args, **kwargs)

    with mock.patch.object(origin, 'read_chunk', side_effect=slow):
        reader = threading.Thread(target=cache.ensure, args=(0,),
                                  kwargs={'background': True})
        reader.start()
        assert started.wait(10)
        with pytest.raises(node_mod.ImageBusy, match='fetch in flight'):
            images.node.evict('img-0')
        gate.set()
        reader.join(10)
    assert images.node.evict('img-0') > 0


def test_evict_forget_unregisters(images):
    images.fill('img-1', 1.0)
    images.node.mark_gone('img-1', 'test')
    images.node.evict('img-1', forget=True)
    assert 'img-1' not in images.node.image_ids()
    with pytest.raises(KeyError):
        images.node.cache('img-1')


def test_registered_again_is_not_gone(images):
    images.fill('img-1', 1.0)
    images.node.mark_gone('img-1', 'test')
    spec = images.node.entries()['img-1'].spec
    images.node.register(node_mod.ImageSpec(
        'img-1', spec.manifest_digest, spec.origin, image_size=SIZE))
    assert images.node.entries()['img-1'].gone is None
    with pytest.raises(node_mod.ImageBusy, match='registered again'):
        images.node.evict('img-1', forget=True)
    assert 'img-1' in images.node.image_ids()


def test_unregistered_directory_is_evicted(images, tmp_path):
    images.fill('img-2', 1.0)
    images.node.mark_gone('img-2', 'test')
    images.node.evict('img-2', forget=True)
    orphan = os.path.join(images.node.cache_dir, 'orphan')
    os.makedirs(orphan)
    with open(os.path.join(orphan, 'chunkmap'), 'wb') as f:
        f.write(b'x' * 8192)
    assert 'orphan' in images.node.cache_dirs()
    assert images.node.evict('orphan') >= 8192
    assert not os.path.exists(orphan)


def test_cache_dirs_skips_what_is_no_cache(images):
    images.fill('img-0', 1.0)
    for name in ('layers', 'images.d', '.evicted-x.1'):
        os.makedirs(os.path.join(images.node.cache_dir, name))
    layers = os.path.join(images.node.cache_dir, 'layers')
    with open(os.path.join(layers, 'manifest'), 'w'):
        pass
    assert sorted(images.node.cache_dirs()) == ['img-0', 'layers']
    assert sorted(images.node.cache_dirs(exclude=[layers])) == ['img-0']
    images.node.remove_trash()
    assert not os.path.exists(os.path.join(images.node.cache_dir,
                                           '.evicted-x.1'))


def test_evictor_keeps_the_limit_lru(images):
    forgotten = []
    for n, image_id in enumerate(['img-0', 'img-1', 'img-2']):
        images.fill(image_id, 100.0 + n)
    one = node_mod.disk_usage(images.dir('img-0'))
    evictor = eviction.Evictor(images.node, conf(max_size=2 * one + one // 2),
                               forget=forgotten.append)
    assert evictor.check() == ['img-0']
    assert forgotten == ['img-0']
    assert sorted(images.node.cache_dirs()) == ['img-1', 'img-2']
    assert evictor.counters.get('images_evicted') == 1
    assert evictor.counters.get('bytes_evicted') == one
    # The order was saved: a fresh evictor after a restart sees it.
    assert eviction.last_used(images.dir('img-1')) == 101.0


def test_evictor_never_evicts_in_use(images, caplog):
    for n, image_id in enumerate(['img-0', 'img-1', 'img-2']):
        images.fill(image_id, 100.0 + n)
    evictor = eviction.Evictor(
        images.node, conf(max_size=1, low_water_percent=1),
        in_use=lambda i: 'volume' if i == 'img-1' else None)
    assert evictor.check() == ['img-0', 'img-2']
    assert sorted(images.node.cache_dirs()) == ['img-1']
    assert evictor.check() == []
    # Said once, not at every check.
    assert caplog.text.count('the images left are in use') == 1


def test_disk_full_evicts_idle_images(images):
    for n, image_id in enumerate(['img-0', 'img-1', 'img-2']):
        images.fill(image_id, 100.0 + n)
    evictor = eviction.Evictor(images.node, conf(low_water_percent=60))
    assert evictor.check() == []  # no limit configured
    evictor.cache_full(images.node.cache('img-0'))
    # img-0 was being fetched: spared.
    assert evictor.check() == ['img-1', 'img-2']
    assert evictor.counters.get('cache_full_events') == 1
    assert evictor.check() == []  # not full any more


def test_gone_image_removed_once_unused(images, tmp_path):
    descriptors = tmp_path / 'images.d'
    descriptors.mkdir()
    (descriptors / 'img-0.json').write_text('{}')
    images.fill('img-0', 1.0)
    volumes = {'img-0': 'vol-1 reads it'}
    forgotten = []
    evictor = eviction.Evictor(images.node, conf(), in_use=volumes.get,
                               forget=forgotten.append,
                               descriptors_dir=str(descriptors))
    images.node.mark_gone('img-0', 'test')
    assert evictor.check() == []
    assert 'img-0' in images.node.image_ids()
    del volumes['img-0']
    assert evictor.check() == ['img-0']
    assert 'img-0' not in images.node.image_ids()
    assert not (descriptors / 'img-0.json').exists()
    assert forgotten == ['img-0']


def test_unopened_gone_image_checked_in_cinder(images):
    images.node.register(node_mod.ImageSpec(
        'img-v', 'b' * 64, image_size=SIZE,
        origin_volume_id='6f1c9a8e-1111-4222-8333-944455556666'))
    asked = []

    def gone(volume_id):
        asked.append(volume_id)
        return True

    evictor = eviction.Evictor(images.node, conf(), volume_gone=gone)
    evictor.check()
    assert asked == ['6f1c9a8e-1111-4222-8333-944455556666']
    assert 'img-v' not in images.node.image_ids()
    evictor.check()  # not asked again before GONE_CHECK_INTERVAL
    assert len(asked) == 1


def test_removed_descriptor_marks_gone(images, tmp_path):
    descriptors = tmp_path / 'd'
    descriptors.mkdir()
    images.node.load_descriptors(str(descriptors), None)
    assert all(images.node.entries()[i].gone for i in images.node.image_ids())


def test_metrics(images):
    images.fill('img-0', 1.0)
    evictor = eviction.Evictor(images.node, conf(max_size=10 ** 9))
    images.node.metrics_hooks.append(evictor.add_metrics)
    evictor.check()
    text = images.node.metrics_text()
    assert 'thunder_cache_cache_limit_bytes{node="node-1"} 1000000000' in text
    assert 'thunder_cache_images_evicted_total{node="node-1"} 0' in text


def test_limit_percent(images):
    evictor = eviction.Evictor(images.node, conf(max_size_percent=50))
    st = os.statvfs(images.node.cache_dir)
    assert evictor.limit() == st.f_blocks * st.f_frsize * 50 // 100
    evictor.max_size = 1000
    assert evictor.limit() == 1000


# -- disk full mid-fetch -----------------------------------------------------

def _full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize('commit_interval', [0.0, 0.01])
def test_disk_full_never_marks_nor_serves(images, commit_interval, caplog):
    caplog.set_level(logging.INFO, logger=image_cache.__name__)
    images.node.commit_interval = commit_interval
    told = []
    images.node.on_full = told.append
    cache = images.node.cache('img-0')
    with mock.patch.object(image_cache.os, 'posix_fallocate', _full):
        for index in (0, 1):
            with pytest.raises(image_cache.CacheFull, match='no room'):
                cache.read(index * CHUNK, 10)
    assert told == [cache, cache]
    assert not cache.has(0) and not cache.map.has(0)
    assert cache.counters.get('cache_full_errors') == 2
    errors = [r for r in caplog.records if r.levelname == 'ERROR']
    assert len(errors) == 1  # once per episode
    assert 'the cache filesystem is full (No space left on device)' in (
        errors[0].getMessage())
    # Space is back: the same read succeeds, bytes verified.
    assert cache.read(0, SIZE) == images.data['img-0']
    assert 'has room again' in caplog.text


def test_disk_full_local_read_retries_then_succeeds(images):
    cache = images.node.cache('img-0')
    cache.read_retry = 5.0
    calls = []
    real = os.posix_fallocate

    def full_twice(*args):
        calls.append(args)
        if len(calls) <= 2:
            _full()
        return real(*args)

    with mock.patch.object(image_cache.os, 'posix_fallocate', full_twice), \
            mock.patch.object(image_cache, 'RETRY_FIRST', 0.01):
        assert cache.read(0, CHUNK) == images.data['img-0'][:CHUNK]
    assert cache.counters.get('read_retries') == 2


def test_failed_sync_makes_chunks_unusable(images):
    images.node.commit_interval = 0.0
    cache = images.node.cache('img-0')
    with mock.patch.object(image_cache.os, 'fdatasync', _full):
        with pytest.raises(image_cache.CacheFull):
            cache.read(0, 10)
    assert not cache.has(0) and not cache.map.has(0)
    assert cache.read(0, 10) == images.data['img-0'][:10]


def _peer():
    return types.SimpleNamespace(via=(), url='http://127.0.0.2:1',
                                 node_id='peer', ticket=protocol.new_ticket())


def test_peer_gets_503_when_full(tmp_path):
    images = Images(tmp_path, cut_through=False)
    try:
        cache = images.node.cache('img-0')
        with mock.patch.object(image_cache.os, 'posix_fallocate', _full):
            assert images.node.serve_chunk(_peer(), 'img-0', 0).status == 503
        assert cache.busy() is None  # the pin was released
    finally:
        images.node.close()


def test_cut_through_peer_gets_the_verified_chunk_when_full(tmp_path,
                                                            request):
    """Verified bytes this node could not store still reach the peer."""
    images = Images(tmp_path, cut_through=True)
    request.addfinalizer(images.node.close)
    cache = images.node.cache('img-0')
    with mock.patch.object(image_cache.os, 'posix_fallocate', _full):
        reply = images.node.serve_chunk(_peer(), 'img-0', 0)
        assert reply.status == 200 and reply.stream is not None
        sent = bytearray()
        while len(sent) < reply.length:
            piece = reply.stream.next()
            assert piece is not None
            sent += piece
    assert bytes(sent) == images.data['img-0'][:CHUNK]
    assert not cache.has(0)
    reply.release()
    assert cache.busy() is None  # the pin was released


def test_disk_full_opening_a_cache(images):
    told = []
    images.node.on_full = told.append
    with mock.patch.object(image_cache.os, 'posix_fallocate', _full):
        with pytest.raises(sources.ManifestError, match='No space'):
            images.node.cache('img-0')
    assert told == [None]
    assert not os.path.exists(images.dir('img-0'))  # nothing left


def test_real_server_unpins_after_sending(tmp_path):
    """A chunk sent through the peer server leaves its cache evictable."""
    image = os.urandom(SIZE)
    path = str(tmp_path / 'vol')
    manifest = cache_helpers.write_volume(path, image, CHUNK)
    cluster = cache_helpers.Cluster(tmp_path)
    try:
        node, srv = cluster.start('seed', {
            'image_id': 'img', 'manifest_digest': manifest.digest(),
            'origin': sources.FileOrigin(path), 'image_size': SIZE},
            child_ttl=0.2)
        client = cache_helpers.client()
        for index in (0, 1, 0):
            offset, length = manifest.chunk_range(index)
            assert client.get_chunk(node.url, 'img', index, length) == (
                image[offset:offset + length])
        cache = node.cache('img')
        assert cache_helpers.eventually(lambda: cache.busy() is None)
        with pytest.raises(node_mod.ImageBusy, match='serving 1 peers'):
            node.evict('img')
        time.sleep(0.3)  # the child's place expires
        assert node.evict('img') > 0
        offset, length = manifest.chunk_range(2)
        # Evicted: peers are told it is not here.
        with pytest.raises(sources.PeerError, match='404'):
            client.get_chunk(node.url, 'img', 2, length)
        client.close()
    finally:
        cluster.stop_all()
