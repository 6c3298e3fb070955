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

"""Bounded fan-out, the upload rate limit and parent selection."""

import hashlib
import threading

import pytest

from tests import cache_helpers
from thunder_cache.cache import image_cache
from thunder_cache.cache import node as node_mod
from thunder_cache.cache import upstream as upstream_mod
from thunder_cache.peer import fanout
from thunder_cache.peer import peerpolicy
from thunder_cache.peer import sources


class Clock:

    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


# -- the child table -------------------------------------------------------

def test_children_admitted_up_to_the_limit_then_redirected():
    table = fanout.ChildTable(2)
    assert table.admit('a', 'http://a:1').serve
    assert table.admit('b', 'http://b:1').serve
    # Known children are always served.
    assert table.admit('a', 'http://a:1').serve
    redirects = [table.admit('c', 'http://c:1') for _ in range(4)]
    assert [r.serve for r in redirects] == [False] * 4
    # Round robin over the children.
    assert [r.redirect_url for r in redirects] == [
        'http://a:1', 'http://b:1', 'http://a:1', 'http://b:1']
    assert table.children() == {'a': 'http://a:1', 'b': 'http://b:1'}


def test_children_expire():
    clock = Clock()
    table = fanout.ChildTable(1, child_ttl=60, clock=clock)
    assert table.admit('a', 'http://a:1').serve
    clock.now += 30
    assert not table.admit('b', 'http://b:1').serve
    assert table.admit('a', 'http://a:1').serve   # refreshes a
    clock.now += 59
    assert not table.admit('b', 'http://b:1').serve
    clock.now += 2
    assert table.admit('b', 'http://b:1').serve
    assert table.children() == {'b': 'http://b:1'}
    table.forget('b')
    assert len(table) == 0


def test_never_redirected_to_itself():
    table = fanout.ChildTable(1)
    table.admit('a', 'http://a:1')
    # Another node id advertising a's URL: serve rather than loop.
    assert table.admit('a2', 'http://a:1').serve


def test_child_table_needs_a_child():
    with pytest.raises(ValueError):
        fanout.ChildTable(0)


# -- the token bucket ------------------------------------------------------

def test_unlimited_bucket_never_waits():
    bucket = fanout.TokenBucket(0)
    assert bucket.consume(10 ** 12) == 0.0


def test_bucket_paces_to_the_rate():
    clock = Clock()
    bucket = fanout.TokenBucket(1000, burst=500, clock=clock,
                                sleep=clock.sleep)
    assert bucket.consume(500) == 0.0         # the burst
    assert bucket.consume(250) == pytest.approx(0.25)
    assert bucket.consume(1000) == pytest.approx(1.0)
    # Over time the average is the rate: 1750 bytes, 1.25 s of waits.
    assert sum(clock.slept) == pytest.approx(1.25)
    clock.now += 10                            # idle: refill to the burst
    assert bucket.consume(500) == 0.0
    assert bucket.waited == pytest.approx(1.25)


def test_bucket_large_request_is_not_starved():
    clock = Clock()
    bucket = fanout.TokenBucket(100, burst=10, clock=clock,
                                sleep=clock.sleep)
    assert bucket.consume(1000) == pytest.approx(9.9)


def test_bucket_rejects_negative_rate():
    with pytest.raises(ValueError):
        fanout.TokenBucket(-1)


# -- parent selection ------------------------------------------------------

class _Origin(sources.Origin):
    kind = 'origin'
    name = 'origin'
    url = None


def _names(up, via=()):
    return [getattr(s, 'url', None) or s.name for s in up.candidates(via)]


def test_candidates_order_and_exclusions():
    clock = Clock()
    origin = _Origin()
    up = upstream_mod.Upstream('img', origin, ['http://p1:1', 'http://p2:1',
                                               'http://me:1', 'http://p1:1'],
                               client=None, self_url='http://me:1',
                               clock=clock)
    assert sorted(_names(up)[:2]) == ['http://p1:1', 'http://p2:1']
    assert _names(up)[2:] == ['origin']
    # Peers a request was relayed through are never asked.
    assert _names(up, via=('http://p1:1',)) == ['http://p2:1', 'origin']
    up.adopt('http://child:1')
    assert _names(up)[0] == 'http://child:1'


def test_failed_peer_dropped_then_retried():
    clock = Clock()
    up = upstream_mod.Upstream('img', _Origin(), ['http://p1:1'],
                               client=None, self_url='http://me:1',
                               retry_interval=30, clock=clock)
    peer = next(iter(up.candidates()))
    up.report(peer, True)
    assert up.parent == 'http://p1:1'
    up.report(peer, False, image_cache.BadChunk('bad'))
    assert up.parent is None
    assert _names(up) == ['origin']
    assert up.banned() == {'http://p1:1'}
    clock.now += 31
    assert _names(up) == ['http://p1:1', 'origin']


def test_forgiven_peer_asked_again_at_once():
    up = upstream_mod.Upstream('img', _Origin(), ['http://p1:1'],
                               client=None, self_url='http://me:1',
                               retry_interval=30, clock=Clock())
    up.report(next(iter(up.candidates())), False, IOError('timed out'))
    assert _names(up) == ['origin']
    up.forgive()
    assert up.banned() == set()
    assert _names(up) == ['http://p1:1', 'origin']


def test_soft_errors_do_not_drop_the_peer():
    up = upstream_mod.Upstream('img', None, ['http://p1:1'], client=None,
                               self_url='http://me:1')
    peer = next(iter(up.candidates()))
    up.report(peer, False, sources.PeerError('busy', 503, soft=True))
    assert _names(up) == ['http://p1:1']


def test_no_peers_reads_origin():
    up = upstream_mod.Upstream('img', _Origin(), [], client=None,
                               self_url='http://me:1')
    assert _names(up) == ['origin']


def test_set_peers_keeps_the_parent():
    up = upstream_mod.Upstream('img', None, ['http://p1:1', 'http://p2:1'],
                               client=None, self_url='http://me:1')
    up.adopt('http://child-of-p2:1')
    up.set_peers(['http://p3:1'])
    assert _names(up) == ['http://child-of-p2:1', 'http://p3:1']


def test_peers_after_self_come_after_the_origin():
    """In a list of holders, oldest first, the first one is the root."""
    holders = ['http://a:1', 'http://b:1', 'http://c:1', 'http://d:1']
    first = upstream_mod.Upstream('img', _Origin(), holders, client=None,
                                  self_url='http://a:1')
    assert _names(first) == ['origin', 'http://b:1', 'http://c:1',
                             'http://d:1']
    third = upstream_mod.Upstream('img', _Origin(), holders, client=None,
                                  self_url='http://c:1')
    assert _names(third) == ['http://a:1', 'http://b:1', 'origin',
                             'http://d:1']
    # Without an origin, the younger peers are still tried.
    third.origin = None
    assert _names(third) == ['http://a:1', 'http://b:1', 'http://d:1']
    # A parent found through redirects comes first whoever it is.
    first.adopt('http://d:1')
    assert _names(first)[:2] == ['http://d:1', 'origin']


# -- back-off, address policy, cap -----------------------------------------

def test_backoff_schedule():
    assert [upstream_mod.backoff(n, 5, 300) for n in range(1, 10)] == [
        5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert upstream_mod.backoff(10 ** 6, 5, 300) == 300


def _failing(clock, first=5, longest=300, peers=('http://p1:1',)):
    return upstream_mod.Upstream('img', _Origin(), list(peers), client=None,
                                 self_url='http://me:1',
                                 retry_interval=first,
                                 retry_max_interval=longest, clock=clock)


def _fail(up, url='http://p1:1', error=None):
    source = sources.PeerSource(up, url)
    up.report(source, False, error or sources.PeerError('deadline'))


def _left_out_for(up, clock, url='http://p1:1'):
    """Seconds until ``url`` is asked again (clock moved there)."""
    start = clock.now
    while url in up.banned():
        clock.now += 1
    return clock.now - start


def test_failures_in_a_row_double_the_time_left_out():
    clock = Clock()
    up = _failing(clock)
    waits = []
    for _ in range(8):
        _fail(up)
        assert _names(up) == ['origin']
        waits.append(_left_out_for(up, clock))
        assert _names(up) == ['http://p1:1', 'origin']
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300]


def test_a_served_chunk_ends_the_series():
    clock = Clock()
    up = _failing(clock)
    for _ in range(3):
        _fail(up)
        _left_out_for(up, clock)
    up.report(sources.PeerSource(up, 'http://p1:1'), True)
    _fail(up)
    assert _left_out_for(up, clock) == 5


def test_a_failure_long_after_the_last_starts_a_new_series():
    clock = Clock()
    up = _failing(clock)
    for _ in range(3):
        _fail(up)
        _left_out_for(up, clock)
    clock.now += 601
    _fail(up)
    assert _left_out_for(up, clock) == 5


def test_bad_chunks_and_refused_redirects_back_off_too():
    clock = Clock()
    up = _failing(clock)
    _fail(up, error=image_cache.BadChunk('bad'))
    assert _left_out_for(up, clock) == 5
    _fail(up, error=sources.PeerError('redirected to 169.254.169.254:80, '
                                      'outside the allowed peer addresses'))
    assert _left_out_for(up, clock) == 10


def test_soft_errors_never_back_off():
    clock = Clock()
    up = _failing(clock)
    for status in (503, 508):
        _fail(up, error=sources.PeerError('busy', status, soft=True))
    assert up.banned() == set()


def test_forgiven_peers_keep_their_count():
    clock = Clock()
    up = _failing(clock)
    _fail(up)
    _fail(up)
    up.forgive()
    assert up.banned() == set()
    _fail(up)
    assert _left_out_for(up, clock) == 20


def test_back_off_records_are_bounded():
    clock = Clock()
    up = _failing(clock)
    for i in range(upstream_mod.MAX_TRACKED + 100):
        _fail(up, url='http://redirected-%d:1' % i)
    assert len(up._failures) <= upstream_mod.MAX_TRACKED


class _Policed:
    """A client whose address policy allows the URLs in ``allowed``."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.asked = []

    def permits(self, url):
        self.asked.append(url)
        return url in self.allowed


def test_refused_peers_are_left_out():
    client = _Policed({'http://p1:1', 'http://p3:1'})
    up = upstream_mod.Upstream(
        'img', _Origin(), ['http://p1:1', 'http://169.254.169.254:80',
                           'http://p3:1', 'http://me:1', 'http://p4:1'],
        client=client, self_url='http://me:1')
    assert _names(up) == ['http://p1:1', 'http://p3:1', 'origin']
    assert 'http://me:1' not in client.asked


def test_peers_per_image_capped(caplog):
    holders = ['http://h%d:1' % i for i in range(10)]
    up = upstream_mod.Upstream('img', _Origin(), holders, client=None,
                               self_url='http://me:1', max_peers=3)
    assert _names(up) == holders[:3] + ['origin']
    # The node's own place is kept; the cap counts the others.
    up.set_peers(holders[:2] + ['http://me:1'] + holders[2:])
    assert _names(up) == holders[:2] + ['origin', holders[2]]
    up.set_peers(holders[:5] + ['http://me:1'])
    assert _names(up) == holders[:3] + ['origin']
    assert 'max_peers_per_image' in caplog.text


def test_redirect_to_a_backed_off_peer_is_skipped():
    clock = Clock()
    up = _failing(clock, peers=['http://p1:1'])
    _fail(up, url='http://child:1')

    class Redirecting:
        calls = []
        timeout = 10.0

        def time_limit(self, length):
            return 10.0

        def get_chunk(self, url, *args, **kwargs):
            self.calls.append(url)
            raise sources.Redirect('http://child:1')

    up.client = Redirecting()
    source = sources.PeerSource(up, 'http://p1:1')
    with pytest.raises(sources.PeerError) as raised:
        source.read_chunk(0, 0, 10)
    assert raised.value.soft
    assert Redirecting.calls == ['http://p1:1']
    assert source.url == 'http://p1:1'


# -- a tree of real nodes --------------------------------------------------

CHUNK = 64 * 1024


@pytest.fixture
def volume(tmp_path):
    return cache_helpers.image_volume(tmp_path, CHUNK * 40 + 999, CHUNK)


def _spec(manifest, origin=None, peers=()):
    return dict(image_id='img', manifest_digest=manifest.digest(),
                origin=origin, peers=peers,
                image_size=manifest.image_size)


@pytest.mark.parametrize('cut_through', [True, False])
def test_nodes_form_a_bounded_tree(cluster, volume, cut_through):
    image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    seed, _ = cluster.start('seed', _spec(manifest, origin),
                            max_children=2, cut_through=cut_through)
    nodes = [cluster.start('n%d' % i, _spec(manifest, peers=[seed.url]),
                           max_children=2, cut_through=cut_through)[0]
             for i in range(7)]
    results = cache_helpers.read_together(nodes, 'img', len(image),
                                          3 * CHUNK + 17)
    expected = hashlib.sha256(image).hexdigest()
    assert results == {n.node_id: expected for n in nodes}
    # The origin was read once per chunk, by the seed only.
    assert sum(origin.reads.values()) == manifest.chunk_count
    assert set(origin.reads.values()) == {1}
    # Nobody served more than two children; full nodes redirected.
    for node in [seed] + nodes:
        assert len(node._entry('img').children.children()) <= 2
    redirects = sum(n.counters.get('redirects_sent') for n in [seed] + nodes)
    assert redirects >= 5
    parents = {n.node_id: n.cache('img').upstream.parent for n in nodes}
    assert list(parents.values()).count(seed.url) == 2
    for node in nodes:
        snap = node.cache('img').counters.snapshot()
        assert snap['chunks_rejected'] == 0
        # Every byte from peers; a chunk twice only when a relayed request
        # could not join the node's own fetch of it (a bypass, which keeps
        # relays between nodes from waiting on each other in a cycle).
        extra = snap['bytes_from_peers'] - len(image)
        assert 0 <= extra <= snap['inflight_bypasses'] * CHUNK, snap


def test_full_node_redirect_loops_are_cut(cluster, volume):
    """Nodes listing each other (no seed) still converge on the origin."""
    image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    a, _ = cluster.start('a', None)
    b, _ = cluster.start('b', None)
    for node, other in ((a, b), (b, a)):
        node.register(node_mod.ImageSpec(
            **_spec(manifest, origin, peers=[other.url])))
    errors = []

    def read(node):
        try:
            assert node.read_image('img', 0, len(image)) == image
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(n,)) for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # Every chunk came from the origin at most twice (both nodes missing it
    # at the same instant), usually once.
    assert max(origin.reads.values()) <= 2
    assert sum(origin.reads.values()) <= 1.5 * manifest.chunk_count
    print('origin reads', sum(origin.reads.values()), 'chunks',
          manifest.chunk_count)


# -- cycles of full nodes --------------------------------------------------

class _Cycle:
    """A client whose peers a and b are full and redirect to each other.

    ``honoured``: whether a node serves a request marked looped (a node of
    this release) or redirects it again (the previous release).
    """

    timeout = 10.0

    def __init__(self, honoured):
        self.honoured = honoured
        self.calls = []

    def time_limit(self, length):
        return 10.0

    def get_chunk(self, url, image_id, index, length, via=(), ticket=None,
                  deadline=None, sink=None, looped=False):
        self.calls.append((url, looped))
        if looped and self.honoured:
            return b'x' * length
        raise sources.Redirect('http://b:1' if url == 'http://a:1'
                               else 'http://a:1')


def _cycle_source(honoured):
    up = _failing(Clock(), peers=['http://a:1', 'http://b:1'])
    up.client = _Cycle(honoured)
    return up, sources.PeerSource(up, 'http://a:1')


def test_a_cycle_of_full_nodes_ends_with_the_first_serving():
    up, source = _cycle_source(honoured=True)
    assert source.read_chunk(0, 0, 10) == b'x' * 10
    # a sent us to b, b back to a: a is asked once more, told so.
    assert up.client.calls == [('http://a:1', False), ('http://b:1', False),
                               ('http://a:1', True)]
    # Served beyond a's fan-out: not adopted as a parent by a redirect.
    assert source.url == 'http://a:1' and not source.redirected


def test_a_cycle_through_nodes_that_ignore_the_mark_fails_softly():
    up, source = _cycle_source(honoured=False)
    with pytest.raises(sources.PeerError, match='redirected in a loop') as e:
        source.read_chunk(0, 0, 10)
    assert e.value.soft
    assert up.client.calls == [('http://a:1', False), ('http://b:1', False),
                               ('http://a:1', True)]
    assert not up.backed_off('http://a:1')


def test_the_redirect_limit_counts_redirects_not_the_looped_retry():
    up, source = _cycle_source(honoured=True)
    up.max_redirects = 0
    with pytest.raises(sources.PeerError, match='more than 0 redirects'):
        source.read_chunk(0, 0, 10)
    assert up.client.calls == [('http://a:1', False)]


def test_a_full_node_serves_a_looped_request(cluster, volume):
    image, manifest, path = volume
    seed, _ = cluster.start('seed', _spec(manifest,
                                          cache_helpers.CountingOrigin(path)),
                            max_children=1)
    length = manifest.chunk_range(0)[1]
    first = cache_helpers.client('first', 'http://127.0.0.1:11')
    second = cache_helpers.client('second', 'http://127.0.0.1:12')
    for c in (first, second):
        c.policy = peerpolicy.AddressPolicy(['127.0.0.0/8'])
    assert first.get_chunk(seed.url, 'img', 0, length) == image[:length]
    with pytest.raises(sources.Redirect):
        second.get_chunk(seed.url, 'img', 0, length)
    assert seed.counters.get('redirects_sent') == 1
    assert second.get_chunk(seed.url, 'img', 0, length,
                            looped=True) == image[:length]
    assert seed.counters.get('loop_admissions') == 1
    # Served, not admitted: the fan-out table still holds the first only.
    assert list(seed._entry('img').children.children()) == ['first']
