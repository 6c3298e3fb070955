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

"""Parent selection: which source a node asks for a chunk.

A node knows a list of peer URLs that hold (part of) the image. It asks one
of them, its *parent*: the first that served it, or the child a full node
redirected it to (:class:`thunder_cache.peer.sources.PeerSource` follows at
most ``max_redirects`` redirects; the upstream adopts the node that served the
chunk). A redirect loop (every node of it full) skips the peer for that
chunk only. On an error, a timeout (a transfer past its deadline
included) or a chunk that fails verification the peer is dropped and the
next source is tried at once; the peer is then *backed off*: left out for
``retry_interval`` seconds after its first failure in a row, twice as long
after each further one, at most ``retry_max_interval``; a chunk it serves
ends the series. The origin comes after the peers listed before this node
(see :meth:`Upstream.set_peers`). A node with no peers reads from the
origin.

Only peers the client's address policy permits are kept, and at most
``max_peers`` of them (the first ones listed), so that a list written by
someone else cannot make a node try many bogus peers for every chunk.

Peers that a request was relayed through (its ``via`` list) and the node
itself are never asked, so a relayed request cannot come back to a node
that waits for it. A peer that answers 503 or 508 (busy, or the request
would loop) is skipped for that chunk only, if it answered quickly (see
:meth:`thunder_cache.peer.sources.PeerSource.read_chunk`).
"""

import logging
import threading
import time
import typing

from thunder_cache.cache import image_cache
from thunder_cache.peer import sources

LOG = logging.getLogger(__name__)

# Back-off records kept at most; expired ones are dropped beyond this (a
# hostile peer redirecting to ever new URLs cannot grow the table).
MAX_TRACKED = 1024


class _Failures:
    """A peer's failures in a row: how many, when it may be asked again."""

    __slots__ = ('count', 'until', 'last')

    def __init__(self, count: int, until: float, last: float) -> None:
        self.count = count
        self.until = until
        self.last = last


def stripe_parents(holders: typing.Sequence[str], me: str, stripes: int,
                   fanout: int) -> typing.List[typing.Optional[str]]:
    """The planned parent of node ``me`` for each stripe (None: none).

    ``holders`` is the image's list of holders as every node sees it
    (oldest first); its first is the root, which reads the origin and
    gives each stripe to one child. The others, in list order, are dealt
    round robin into ``stripes`` groups: group ``s`` owns stripe ``s``.
    Stripe ``s``'s tree is a heap of degree ``fanout`` over the owners of
    ``s`` first, then everybody else, so its inner nodes are owners: with
    ``fanout == stripes`` every node forwards its own stripe to
    ``fanout`` children and is a leaf of the others' trees. Every node
    then uploads the image about once and receives each stripe from a
    different parent, as SplitStream's interior-node-disjoint trees. A
    node not in the list, or its root, has no planned parents.
    """
    if stripes < 2 or me not in holders or holders[0] == me:
        return [None] * max(1, stripes)
    parents: typing.List[typing.Optional[str]] = []
    for order in stripe_orders(holders, stripes):
        place = order.index(me)
        parents.append(holders[0] if place == 0
                       else order[(place - 1) // fanout])
    return parents


def stripe_orders(holders: typing.Sequence[str], stripes: int
                  ) -> typing.List[typing.List[str]]:
    """Per stripe, the holders but the first, owners first (heap order)."""
    rest = list(holders[1:])
    return [[u for j, u in enumerate(rest) if j % stripes == stripe] +
            [u for j, u in enumerate(rest) if j % stripes != stripe]
            for stripe in range(stripes)]


def backoff(count: int, first: float, longest: float) -> float:
    """Seconds a peer is left out after ``count`` failures in a row."""
    return min(longest, first * 2 ** min(count - 1, 32))


class Upstream:
    """The sources of one image on one node.

    :param retry_interval: seconds a peer is left out after a failure;
        doubled for each further failure in a row.
    :param retry_max_interval: the longest a peer is left out.
    :param max_peers: peers taken from :meth:`set_peers` at most (None:
        all).
    :param stripes: stripes of the image, each with its own parents.
    :param fanout: the children per stripe a node serves
        (``[peer] max_children``), the degree of the planned trees.
    """

    def __init__(self, image_id: str,
                 origin: typing.Optional[sources.ChunkSource],
                 peers: typing.Iterable[str],
                 client: typing.Optional[sources.PeerClient],
                 self_url: typing.Optional[str], max_redirects: int = 16,
                 retry_interval: float = 30.0,
                 retry_max_interval: float = 300.0,
                 max_peers: typing.Optional[int] = None,
                 clock: typing.Callable[[], float] = time.monotonic,
                 stripes: int = 1, fanout: int = 2) -> None:
        self.image_id = image_id
        self.origin = origin
        self.client = client
        self.self_url = self_url
        self.max_redirects = max_redirects
        self.retry_interval = retry_interval
        self.retry_max_interval = max(retry_interval, retry_max_interval)
        self.max_peers = max_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: typing.Dict[str, _Failures] = {}
        self._capped = 0
        self.stripes = max(1, stripes)
        self.fanout = fanout
        # Per stripe: the parent a redirect gave, the planned one.
        self.parents: typing.List[typing.Optional[str]] = (
            [None] * self.stripes)
        self.planned: typing.List[typing.Optional[str]] = (
            [None] * self.stripes)
        self._ranks: typing.List[typing.Dict[str, int]] = []
        self.peers: typing.List[str] = []
        self.later_peers: typing.List[str] = []
        self.set_peers(peers)

    def set_peers(self, peers: typing.Iterable[str]) -> None:
        """Replace the known peers (the parent stays until it fails).

        Peers are asked in the order given. When every node lists the
        holders of an image in the same order, oldest first (as the
        image's advertised locations are), they all contact the same node
        first and its redirects build one tree under it. A node that finds
        itself in the list asks the peers before it, then the origin, and
        the peers after it only when the origin fails: the oldest holder
        is the root and reads the origin. (Shuffled lists, measured with 8
        nodes listing each other, made several trees and up to 1.09 origin
        reads per chunk, against 1.00.)

        Peers the client's address policy refuses are left out (with a
        warning, once per peer); of the others, the first ``max_peers``
        are kept. With stripes, the planned parents
        (:func:`stripe_parents`) come from that list: nodes listing more
        than ``max_peers`` others plan from different lists (each its own
        place after the first ``max_peers``), and their trees meet through
        redirects instead.
        """
        permits = getattr(self.client, 'permits', None)
        seen: typing.Set[str] = set()
        ordered: typing.List[str] = []
        others = 0
        capped = 0
        for url in peers:
            if url in seen:
                continue
            seen.add(url)
            if url != self.self_url:
                if permits is not None and not permits(url):
                    continue
                if self.max_peers is not None and others >= self.max_peers:
                    capped += 1
                    continue
                others += 1
            ordered.append(url)
        if capped and capped != self._capped:
            LOG.warning('Image %s: %d peers beyond the first %d left out '
                        '([peer] max_peers_per_image)', self.image_id,
                        capped, self.max_peers)
        if self.self_url in ordered:
            mine = ordered.index(self.self_url)
            before, after = ordered[:mine], ordered[mine + 1:]
        else:
            before, after = ordered, []
        holders = ordered
        planned = stripe_parents(holders, self.self_url or '', self.stripes,
                                 self.fanout)
        ranks: typing.List[typing.Dict[str, int]] = []
        if self.stripes > 1 and self.self_url in holders:
            for order in stripe_orders(holders, self.stripes):
                ranks.append({u: place for place, u in enumerate(order)})
                ranks[-1][holders[0]] = -1
        with self._lock:
            self._ranks = ranks
            self._capped = capped
            self.peers = before
            self.later_peers = after
            self.planned = planned

    @property
    def parent(self) -> typing.Optional[str]:
        """The parent of stripe 0 (of every chunk without stripes)."""
        return self.parents[0]

    def rank(self, url: typing.Optional[str], index: int) -> float:
        """Where ``url`` (None: this node) is in chunk ``index``'s tree.

        Its place in the planned tree of the chunk's stripe (the root
        -1), infinite for a node outside the plan; 0 for every node
        without stripes or when this node is not in its list of holders
        (lists that differ between nodes, written by hand each in another
        order, would order fetches differently on each node: only tickets
        order them then). Fetches are ordered by it, then by ticket (see
        :meth:`thunder_cache.cache.image_cache.ImageCache.ensure`).
        """
        ranks = self._ranks
        if not ranks:
            return 0
        key = (self.self_url if url is None else url) or ''
        return ranks[self.stripe(index)].get(key, float('inf'))

    def stripe(self, index: typing.Optional[int]) -> int:
        """The stripe of chunk ``index`` (0 for None)."""
        return 0 if index is None else index % self.stripes

    def adopt(self, url: str, stripe: int = 0) -> None:
        """Make ``url`` the parent of ``stripe`` (a full node sent us)."""
        with self._lock:
            self.parents[stripe] = url
            self._failures.pop(url, None)

    def forgive(self) -> None:
        """Ask the peers left out for their failures again (a retried read).

        Their counts of failures stay: one that fails again is left out
        for twice as long as before.
        """
        with self._lock:
            for entry in self._failures.values():
                entry.until = 0.0

    def banned(self) -> typing.Set[str]:
        """The URLs of the peers left out now."""
        now = self._clock()
        with self._lock:
            return {u for u, f in self._failures.items() if f.until > now}

    def backed_off(self, url: str) -> bool:
        """True if ``url`` is left out now."""
        with self._lock:
            entry = self._failures.get(url)
            return entry is not None and entry.until > self._clock()

    def candidates(self, via: typing.Sequence[str] = (),
                   index: typing.Optional[int] = None
                   ) -> typing.Iterator[sources.ChunkSource]:
        """The sources to try for chunk ``index``, best first."""
        skip = set(via) | self.banned() | {self.self_url}
        stripe = self.stripe(index)
        with self._lock:
            first: typing.List[str] = []
            for s in [stripe] + [t for t in range(self.stripes)
                                 if t != stripe]:
                first.extend(u for u in (self.planned[s], self.parents[s])
                             if u is not None and u not in first)
            order = first + [p for p in self.peers if p not in first]
            later = [p for p in self.later_peers if p not in first]
        for url in order:
            if url not in skip:
                yield sources.PeerSource(self, url, stripe)
        if self.origin is not None:
            yield self.origin
        for url in later:
            if url not in skip:
                yield sources.PeerSource(self, url, stripe)

    def report(self, source: sources.ChunkSource, ok: bool,
               error: typing.Optional[BaseException] = None) -> None:
        """What a fetch from ``source`` gave."""
        url = source.url
        if source.kind != 'peer' or url is None:
            return
        stripe = getattr(source, 'stripe', 0)
        with self._lock:
            if ok:
                # A full node's child that served us is our new parent
                # (of this stripe); a planned parent needs no adopting.
                if (getattr(source, 'redirected', False) or (
                        self.parents[stripe] is None and
                        url != self.planned[stripe])):
                    self.parents[stripe] = url
                self._failures.pop(url, None)
                return
            if getattr(error, 'soft', False):
                return
            pause = self._failed(url)
            self.parents = [None if p == url else p for p in self.parents]
        if isinstance(error, image_cache.BadChunk):
            LOG.warning('Image %s: dropping peer %s for %g s: it sent a '
                        'chunk that failed verification', self.image_id,
                        url, pause)
        else:
            LOG.info('Image %s: dropping peer %s for %g s: %s',
                     self.image_id, url, pause, error)

    def _failed(self, url: str) -> float:
        """Count a failure of ``url`` (lock held); the seconds left out."""
        now = self._clock()
        entry = self._failures.get(url)
        if entry is None or now - entry.last > 2 * self.retry_max_interval:
            count = 1
        else:
            count = entry.count + 1
        pause = backoff(count, self.retry_interval, self.retry_max_interval)
        if entry is None and len(self._failures) >= MAX_TRACKED:
            for old in [u for u, f in self._failures.items()
                        if f.until <= now]:
                del self._failures[old]
            while len(self._failures) >= MAX_TRACKED:
                del self._failures[next(iter(self._failures))]
        self._failures[url] = _Failures(count, now + pause, now)
        return pause
