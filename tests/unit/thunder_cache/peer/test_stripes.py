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

"""Stripes: several parents per node, one per stripe of the chunks."""

import collections
import hashlib

import pytest

from tests import cache_helpers
from tests.unit.thunder_cache import fake_sources
from thunder_cache.cache import chunkstream
from thunder_cache.cache import image_cache
from thunder_cache.cache import node as node_mod
from thunder_cache.cache import upstream as upstream_mod
from thunder_cache.peer import fanout
from thunder_cache.peer import protocol
from thunder_cache.peer import sources

ROOT = 'http://root:1'


def _holders(count):
    return [ROOT] + ['http://n%d:1' % i for i in range(count)]


def _plan(holders, stripes=2, fan=2):
    return {me: upstream_mod.stripe_parents(holders, me, stripes, fan)
            for me in holders}


# -- the planned trees -----------------------------------------------------

@pytest.mark.parametrize('count', [1, 2, 5, 8, 31, 64])
def test_every_node_forwards_one_stripe_to_at_most_fanout_children(count):
    holders = _holders(count)
    plan = _plan(holders)
    assert plan[ROOT] == [None, None]
    children = collections.Counter()
    inner = collections.defaultdict(set)
    for me, parents in plan.items():
        if me == ROOT:
            continue
        # One parent per stripe, never itself.
        assert None not in parents and me not in parents
        for stripe, parent in enumerate(parents):
            children[parent, stripe] += 1
            inner[parent].add(stripe)
    # The root gives each stripe to one child; the others at most two.
    assert children[ROOT, 0] == children[ROOT, 1] == 1
    assert max(children.values()) <= 2
    # Interior-node-disjoint: a node forwards one stripe at most.
    assert all(len(s) == 1 for u, s in inner.items() if u != ROOT)
    # From 4 nodes on, the two parents of a node differ (two uploads).
    if count >= 4:
        assert all(len(set(p)) == 2 for u, p in plan.items() if u != ROOT)


def test_each_stripe_is_a_tree_under_the_root():
    plan = _plan(_holders(32))
    for stripe in (0, 1):
        for me in plan:
            seen = {me}
            while me != ROOT:
                me = plan[me][stripe]
                assert me not in seen  # no cycle
                seen.add(me)


def test_plan_is_deterministic_and_the_same_for_every_node():
    holders = _holders(16)
    assert _plan(holders) == _plan(list(holders))
    # One stripe, a node not in the list, the root: nothing planned.
    assert upstream_mod.stripe_parents(holders, 'http://n3:1', 1, 2) == [
        None]
    assert upstream_mod.stripe_parents(holders, 'http://x:1', 2, 2) == [
        None, None]


# -- candidates ------------------------------------------------------------

class _Origin(sources.Origin):
    name = 'origin'


def _up(holders, me, stripes=2, **kwargs):
    return upstream_mod.Upstream('img', _Origin(), holders, client=None,
                                 self_url=me, stripes=stripes, fanout=2,
                                 **kwargs)


def _names(up, index, via=()):
    return [getattr(s, 'url', None) or s.name
            for s in up.candidates(via, index)]


def test_stripes_spread_over_the_parents():
    holders = _holders(8)
    up = _up(holders, 'http://n6:1')
    first, second = up.planned
    assert first != second
    for index in range(0, 8, 2):
        assert _names(up, index)[0] == first
    for index in range(1, 8, 2):
        assert _names(up, index)[:2] == [second, first]
    # Then the peers before this node and the origin, as without stripes
    # (n7, after this node in the list, is a planned parent).
    assert (first, second) == ('http://n2:1', 'http://n7:1')
    assert _names(up, 0) == [first, second, ROOT] + [
        'http://n%d:1' % i for i in (0, 1, 3, 4, 5)] + ['origin']


def test_a_failed_parent_moves_only_its_stripe():
    up = _up(_holders(8), 'http://n6:1', retry_interval=30)
    first, second = up.planned
    source = next(iter(up.candidates((), 0)))
    assert source.url == first and source.stripe == 0
    up.report(source, False, image_cache.BadChunk('bad'))
    # Stripe 0 goes to the other parent; stripe 1 keeps its own.
    assert _names(up, 0)[0] == second
    assert _names(up, 1)[0] == second
    assert first not in _names(up, 0) + _names(up, 1)
    up.forgive()
    assert _names(up, 0)[0] == first


def test_redirected_parent_adopted_per_stripe():
    up = _up(_holders(8), 'http://n6:1')
    source = sources.PeerSource(up, 'http://child:1', stripe=1)
    source.redirected = True
    up.report(source, True)
    assert up.parents == [None, 'http://child:1']
    assert _names(up, 1)[:2] == [up.planned[1], 'http://child:1']
    assert 'http://child:1' not in _names(up, 0)[:2]


def test_relayed_request_never_goes_back_to_a_waiting_node():
    up = _up(_holders(8), 'http://n6:1')
    first, second = up.planned
    names = _names(up, 0, via=(first,))
    assert first not in names and names[0] == second


def test_one_stripe_keeps_the_single_parent_order():
    up = _up(_holders(4), 'http://n2:1', stripes=1)
    assert up.planned == [None]
    assert _names(up, 5) == [ROOT, 'http://n0:1', 'http://n1:1', 'origin',
                             'http://n3:1']


# -- the child table per stripe ------------------------------------------

def test_child_table_counts_children_per_stripe():
    table = fanout.ChildTable(1, stripes=2)
    assert table.admit('a', 'http://a:1', 0).serve
    # Another child of the other stripe is served: its own slot.
    assert table.admit('b', 'http://b:1', 1).serve
    # A third is sent to the child of the stripe it asked for.
    assert table.admit('c', 'http://c:1', 2).redirect_url == 'http://a:1'
    assert table.admit('c', 'http://c:1', 3).redirect_url == 'http://b:1'
    assert table.children() == {'a': 'http://a:1', 'b': 'http://b:1'}
    assert len(table) == 2
    table.forget('a')
    assert table.admit('c', 'http://c:1', 0).serve
    with pytest.raises(ValueError):
        fanout.ChildTable(1, stripes=0)


# -- real nodes --------------------------------------------------------------

CHUNK = 64 * 1024


def test_real_nodes_receive_from_two_parents_and_all_upload(cluster,
                                                            tmp_path):
    image, manifest, path = cache_helpers.image_volume(
        tmp_path, CHUNK * 24 + 999, CHUNK)
    origin = cache_helpers.CountingOrigin(path)
    kwargs = dict(max_children=2, stripes=2)
    seed, _ = cluster.start('seed', None, **kwargs)
    nodes = [cluster.start('n%d' % i, None, **kwargs)[0] for i in range(6)]
    holders = [seed.url] + [n.url for n in nodes]
    spec = dict(image_id='img', manifest_digest=manifest.digest(),
                peers=holders, image_size=manifest.image_size)
    seed.register(node_mod.ImageSpec(origin=origin, **spec))
    for node in nodes:
        node.register(node_mod.ImageSpec(**spec))
    results = cache_helpers.read_together(nodes, 'img', len(image), CHUNK)
    expected = hashlib.sha256(image).hexdigest()
    assert results == {n.node_id: expected for n in nodes}
    # The origin was read once per chunk (by the seed).
    assert set(origin.reads.values()) == {1}
    assert len(origin.reads) == manifest.chunk_count
    for node in nodes:
        snap = node.cache('img').counters.snapshot()
        # Every node uploads (it forwards one stripe), none rejected.
        assert snap['bytes_served_to_peers'] > 0, node.node_id
        assert snap['chunks_rejected'] == 0
    for node in [seed] + nodes:
        assert len(node._entry('img').children.children()) <= 4


# -- joining fetches in flight ---------------------------------------------

def test_a_planned_child_joins_its_parents_younger_fetch():
    holders = _holders(8)
    parent = _up(holders, 'http://n2:1')
    child = 'http://n6:1'
    assert upstream_mod.stripe_parents(holders, child, 2, 2)[0] == (
        'http://n2:1')
    assert parent.rank(None, 0) < parent.rank(child, 0)
    assert parent.rank(ROOT, 0) == -1
    assert parent.rank('http://stranger:1', 0) == float('inf')
    old = protocol.new_ticket(clock=lambda: 1000.0)
    young = image_cache._new_fetch(None, rank=parent.rank(None, 0))
    # The child's ticket is older, yet it waits on its parent's fetch...
    assert image_cache._may_join(young, old, parent.rank(child, 0))
    # ...and a fetch never waits on one ordered after it.
    child_fetch = image_cache._new_fetch(old, rank=parent.rank(child, 0))
    assert not image_cache._may_join(child_fetch, young.ticket,
                                     parent.rank(None, 0))
    # Without stripes every rank is 0: the tickets decide, as before.
    flat = _up(holders, 'http://n2:1', stripes=1)
    assert flat.rank(child, 0) == flat.rank(None, 0) == 0
    flat_young = image_cache._new_fetch(None, rank=0)
    assert not image_cache._may_join(flat_young, old, 0)
    assert image_cache._may_join(child_fetch, flat_young.ticket,
                                 parent.rank(child, 0))


def test_a_parents_fetch_in_flight_serves_every_planned_descendant(
        tmp_path):
    # Node n2's fetch of a chunk of stripe 0, started for one child's
    # request or a grandchild's relayed through it, is joined by the
    # other child; a request from an ancestor fetches on its own.
    holders = _holders(8)
    me = 'http://n2:1'
    plan = _plan(holders)
    children = sorted(u for u, p in plan.items() if p[0] == me)
    grandchildren = sorted(u for u, p in plan.items() if p[0] in children)
    assert len(children) == 2 and grandchildren
    grandchild = grandchildren[-1]
    child, sibling = children
    if plan[grandchild][0] == sibling:
        child, sibling = sibling, child
    ancestor = plan[me][0]
    image, manifest, _path = cache_helpers.image_volume(tmp_path, CHUNK * 4,
                                                        CHUNK)
    source = fake_sources.FakeSource(image, kind='peer', url=ancestor)
    cache = fake_sources.cache_over(tmp_path, manifest, source)
    cache.upstream.rank = _up(holders, me).rank
    jobs = []
    # The deepest node's request, relayed by its parent, with the oldest
    # ticket of all: ordered by who started it, no one could join it.
    tickets = [protocol.new_ticket(clock=lambda: 1000.0 + n)
               for n in range(3)]
    stream = cache.relay(0, (grandchild, child), tickets[0], jobs.append)
    assert stream is not None and len(jobs) == 1
    assert cache.relay(0, (sibling,), tickets[1], jobs.append) is stream
    assert cache.relay(0, (child,), tickets[2], jobs.append) is stream
    assert len(jobs) == 1
    # A node placed above the parent (off the plan) is not made to wait
    # on it: it fetches on its own (the parent's own parent would be
    # refused, a loop).
    rank = cache.upstream.rank
    above = [u for u in holders
             if rank(u, 0) < rank(None, 0) and u != ancestor]
    assert above
    assert cache.relay(0, (above[0],), tickets[2], jobs.append) is not stream
    with pytest.raises(image_cache.LoopError):
        cache.relay(0, (ancestor,), tickets[2], jobs.append)
    snap = cache.counters.snapshot()
    assert (snap['inflight_joins'], snap['inflight_bypasses']) == (2, 1)
    for job in jobs:
        job()
    assert cache.has(0)
    reader = chunkstream.Reader(stream)
    reader.start(float('inf'))
    assert bytes(reader.next()) == image[:CHUNK]
    cache.close()


def test_planned_parents_respect_the_peer_cap():
    holders = _holders(8)
    up = _up(holders, 'http://n6:1', max_peers=4)
    # Planned from the first four others and this node only.
    assert set(up.planned) <= set(holders[:4])
    names = set(_names(up, 0)) | set(_names(up, 1))
    assert names - {'origin'} <= set(holders[:4])
