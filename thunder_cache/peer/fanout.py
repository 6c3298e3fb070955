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

"""Bounded fan-out per image, and the bounded upload rate of a node.

A node serves at most ``max_children`` distinct child nodes per image. A
new node asking while the table is full is sent, with a 307 redirect, to
one of the current children (round robin); it adopts that child as its
parent. The nodes of one image so form a tree of bounded degree, as DADI's
overlaybd P2P does: the origin is read by the root, each node uploads to
at most ``max_children`` others whatever the number of nodes.

A child that has not asked for anything for ``child_ttl`` seconds leaves
the table, freeing its slot.

With ``stripes`` > 1 (``[peer] stripes``) the chunks of an image are dealt
into that many stripes (chunk ``i`` in stripe ``i % stripes``) and the
table is kept per stripe: a node serves at most ``max_children`` children
for each stripe. A child that uses this node for one stripe only takes a
place in that stripe's table only, and receives a ``1 / stripes`` share of
the image from it, so a node still uploads at most ``max_children`` times
the image, whatever the number of stripes (see
:func:`thunder_cache.cache.upstream.stripe_parents`).
"""

import collections
import threading
import time
import typing


class Admission:
    """The answer to a child's request: serve it, or redirect it."""

    __slots__ = ('serve', 'redirect_url')

    def __init__(self, serve: bool,
                 redirect_url: typing.Optional[str] = None) -> None:
        self.serve = serve
        self.redirect_url = redirect_url

    def __repr__(self) -> str:
        if self.serve:
            return '<Admission serve>'
        return '<Admission redirect %s>' % self.redirect_url


SERVE = Admission(True)


class ChildTable:
    """The children of one image on this node; thread-safe."""

    def __init__(self, max_children: int, child_ttl: float = 10.0,
                 clock: typing.Callable[[], float] = time.monotonic,
                 stripes: int = 1) -> None:
        if max_children < 1:
            raise ValueError('max_children must be at least 1')
        if stripes < 1:
            raise ValueError('stripes must be at least 1')
        self.max_children = max_children
        self.child_ttl = child_ttl
        self.stripes = stripes
        self._clock = clock
        self._lock = threading.Lock()
        # Per stripe: node id -> [url, last seen]; insertion ordered.
        self._tables: typing.List[typing.Dict[str, typing.List[typing.Any]]]
        self._tables = [collections.OrderedDict() for _ in range(stripes)]
        self._next = [0] * stripes

    def __len__(self) -> int:
        return len(self.children())

    def children(self) -> typing.Dict[str, str]:
        """{node id: url} of the current children (of every stripe)."""
        with self._lock:
            self._expire(self._clock())
            return {n: v[0] for table in self._tables
                    for n, v in table.items()}

    def _expire(self, now: float) -> None:
        for table in self._tables:
            stale = [n for n, (_u, seen) in table.items()
                     if now - seen > self.child_ttl]
            for node_id in stale:
                del table[node_id]

    def stripe(self, index: int) -> int:
        """The stripe of chunk ``index``."""
        return index % self.stripes

    def admit(self, node_id: str, url: str, index: int = 0) -> Admission:
        """Serve ``node_id`` chunk ``index`` or send it to a child."""
        now = self._clock()
        stripe = self.stripe(index)
        with self._lock:
            table = self._tables[stripe]
            entry = table.get(node_id)
            if entry is not None:
                entry[0] = url
                entry[1] = now
                return SERVE
            self._expire(now)
            if len(table) < self.max_children:
                table[node_id] = [url, now]
                return SERVE
            urls = [u for u, _s in table.values() if u != url]
            if not urls:
                # Cannot happen with distinct nodes; serve rather than
                # send a node to itself.
                return SERVE
            target = urls[self._next[stripe] % len(urls)]
            self._next[stripe] += 1
            return Admission(False, target)

    def forget(self, node_id: str) -> None:
        """Drop ``node_id`` from the children (of every stripe)."""
        with self._lock:
            for table in self._tables:
                table.pop(node_id, None)


class TokenBucket:
    """A byte rate limit shared by every upload of the node.

    ``rate`` bytes per second on average, bursts of up to ``burst`` bytes.
    A rate of 0 means no limit. :meth:`consume` blocks until the bytes may
    be sent; requests larger than the burst are allowed to drive the
    bucket into debt, which later callers wait out, so a large request is
    never starved.
    """

    def __init__(self, rate: float, burst: typing.Optional[float] = None,
                 clock: typing.Callable[[], float] = time.monotonic,
                 sleep: typing.Callable[[float], typing.Any] = time.sleep
                 ) -> None:
        if rate < 0:
            raise ValueError('rate must not be negative')
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._stamp = clock()
        self.waited = 0.0

    def consume(self, amount: float) -> float:
        """Take ``amount`` tokens, sleeping as needed; returns the wait."""
        if not self.rate:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst,
                               self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.waited += wait
        if wait > 0:
            self._sleep(wait)
        return wait
