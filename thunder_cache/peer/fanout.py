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
                 clock: typing.Callable[[], float] = time.monotonic) -> None:
        if max_children < 1:
            raise ValueError('max_children must be at least 1')
        self.max_children = max_children
        self.child_ttl = child_ttl
        self._clock = clock
        self._lock = threading.Lock()
        # node id -> [url, last seen]; insertion ordered.
        self._children: typing.Dict[str, typing.List[typing.Any]] = (
            collections.OrderedDict())
        self._next = 0

    def __len__(self) -> int:
        return len(self._children)

    def children(self) -> typing.Dict[str, str]:
        """{node id: url} of the current children."""
        with self._lock:
            self._expire(self._clock())
            return {n: v[0] for n, v in self._children.items()}

    def _expire(self, now: float) -> None:
        stale = [n for n, (_u, seen) in self._children.items()
                 if now - seen > self.child_ttl]
        for node_id in stale:
            del self._children[node_id]

    def admit(self, node_id: str, url: str) -> Admission:
        """Serve ``node_id`` or send it to one of the children."""
        now = self._clock()
        with self._lock:
            entry = self._children.get(node_id)
            if entry is not None:
                entry[0] = url
                entry[1] = now
                return SERVE
            self._expire(now)
            if len(self._children) < self.max_children:
                self._children[node_id] = [url, now]
                return SERVE
            urls = [u for u, _s in self._children.values() if u != url]
            if not urls:
                # Cannot happen with distinct nodes; serve rather than
                # send a node to itself.
                return SERVE
            target = urls[self._next % len(urls)]
            self._next += 1
            return Admission(False, target)

    def forget(self, node_id: str) -> None:
        """Drop ``node_id`` from the children."""
        with self._lock:
            self._children.pop(node_id, None)


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
