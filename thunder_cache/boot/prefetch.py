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

"""Boot-trace replay (prefetch) and background hydration of an image cache.

A :class:`Prefetcher` fetches the chunks of a boot trace
(:mod:`thunder_cache.boot.trace`) in the trace's order, ahead of the guest that
is booting, with at most ``concurrency`` fetches at a time. A
:class:`Hydrator` fills every missing chunk of the image in index order,
after a delay and under a byte rate limit, so that the node ends up with
the whole image (and can serve all of it to peers) without the image's
first readers paying for it.

Both fetch through :meth:`ImageCache.ensure` with ``background=True``: a
chunk is still fetched once however many want it, verified against the
manifest, and a guest's read of a chunk the prefetch is fetching simply
waits for that fetch. Both yield to demand: while local or peer reads wait
for fetches of their own (:meth:`ImageCache.demand_pending`), a replay
starts a new fetch only while it has fewer than ``demand_allowance`` in
flight. The default allowance of one keeps the replay moving (it cannot
be starved by a stream of misses, and it is most useful exactly when the
guest misses) while leaving the rest of the bandwidth to the guest; 0
makes demand strictly first.

A chunk whose fetch fails is logged, counted and skipped; after
``max_errors`` failures in a row (the sources are down) the replay gives
up, and demand reads report the trouble. :meth:`stop` returns at once: no
fetch starts after it, fetches in flight end on their own (they are
shared with any reader that joined them).
"""

import logging
import threading
import time
import typing
from typing import Optional

from oslo_config import cfg

from thunder_cache.boot import trace
from thunder_cache.cache import image_cache
from thunder_cache.peer import fanout

LOG = logging.getLogger(__name__)

GROUP = 'prefetch'
MiB = 1024 * 1024

opts = [
    cfg.BoolOpt('record',
                default=True,
                help='Record the chunk trace of the first boot of an image '
                     'that has none and publish it for later nodes to '
                     'prefetch. Only the first node of an image records.'),
    cfg.FloatOpt('record_window',
                 default=60.0,
                 min=1.0,
                 help='Seconds of recording, from the first read of the '
                      'image. A cloud image reaches its login prompt and '
                      'runs its first-boot services within a minute; reads '
                      'after that belong to the workload, differ from one '
                      'instance to the next and are not worth prefetching '
                      'everywhere.'),
    cfg.IntOpt('record_max_chunks',
               default=6144,
               min=1,
               max=trace.MAX_RECORD_CHUNKS,
               help='Most chunks a trace records (the recording ends '
                    'there): 6144 are 1.5 GiB of 256 KiB chunks (the '
                    'default size), 384 MiB of 64 KiB ones; a Debian first '
                    'boot reads 927 and 3009. The published trace is '
                    'further cut to what fits 64 Cinder metadata values '
                    '(16320 characters): a run of consecutive chunks takes '
                    'one token, a scattered chunk four or five characters '
                    'in images of up to 1.6 million chunks, so at least '
                    '3263 chunks fit however scattered; the Debian boot '
                    'takes 2713 characters at 256 KiB, 8065 at 64 KiB.'),
    cfg.BoolOpt('replay',
                default=True,
                help='Prefetch the chunks of an image\'s boot trace when '
                     'the image is opened on this node. A wrong trace only '
                     'costs useless (verified) fetches.'),
    cfg.IntOpt('replay_concurrency',
               default=4,
               min=1,
               max=64,
               help='Most prefetch fetches in flight per image. A boot '
                    'reads one or two chunks at a time; four fetches keep '
                    'the prefetch ahead of it while a node never adds more '
                    'than four requests to its parent or the origin.'),
    cfg.IntOpt('demand_allowance',
               default=1,
               min=0,
               max=64,
               help='While reads wait for fetches of their own, a prefetch '
                    'or hydration starts a new fetch only while it has '
                    'fewer than this many in flight. 1 keeps it moving '
                    'whatever the demand (it cannot starve) with the rest '
                    'of the bandwidth left to the reads; 0 stops it until '
                    'the reads are served.'),
    cfg.BoolOpt('hydrate',
                default=False,
                help='Fetch the whole image in the background, so that the '
                     'node holds (and can serve to peers) every chunk. Off '
                     'by default: a boot reads a small part of an image, '
                     'and copying all of it to every node is the transfer '
                     'the peer mode exists to avoid.'),
    cfg.FloatOpt('hydrate_delay',
                 default=300.0,
                 min=0.0,
                 help='Seconds from the opening of an image to the start of '
                      'its hydration: after the boots that opened it, so '
                      'that hydration does not compete with them.'),
    cfg.FloatOpt('hydrate_rate',
                 default=10.0,
                 min=0.0,
                 help='Most MiB per second a hydration fetches, per image '
                      '(0: no limit). 10 MiB/s is under a tenth of a 1 GbE '
                      'link and hydrates a 10 GiB image in about 17 '
                      'minutes.'),
]


def list_opts():
    return [(GROUP, opts)]


class _Replay:
    """Worker threads fetching chunks in background, yielding to demand."""

    #: cache counter of the chunks this kind of replay fetched
    counter: Optional[str] = None
    kind = 'replay'

    def __init__(self, cache: image_cache.ImageCache, concurrency: int,
                 demand_allowance: int, max_errors: int,
                 poll_interval: float) -> None:
        if concurrency < 1:
            raise ValueError('concurrency must be at least 1')
        if demand_allowance < 0 or max_errors < 1:
            raise ValueError('demand_allowance must not be negative, '
                             'max_errors must be at least 1')
        self.cache = cache
        self.concurrency = concurrency
        self.demand_allowance = demand_allowance
        self.max_errors = max_errors
        self.poll_interval = poll_interval
        self.fetched = 0
        self.skipped = 0
        self.errors = 0
        self.gave_up = False
        self._errors_in_row = 0
        self._in_flight = 0
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._cond = threading.Condition()
        self._thread = None

    def __repr__(self):
        return '<%s %s: %d fetched, %d skipped, %d errors%s>' % (
            type(self).__name__, self.cache.image_id, self.fetched,
            self.skipped, self.errors, ', done' if self.done else '')

    # -- control ------------------------------------------------------------

    def start(self):
        if self._thread is not None:
            raise RuntimeError('%r was started already' % self)
        self._thread = threading.Thread(
            target=self._main, daemon=True,
            name='%s-%s' % (self.kind, self.cache.image_id[:16]))
        self._thread.start()
        return self

    def stop(self):
        """Start no more fetches; returns at once (see :meth:`wait`)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    @property
    def stopped(self):
        return self._stop.is_set()

    @property
    def done(self):
        """True once every worker has ended (complete, stopped, gave up)."""
        return self._finished.is_set()

    def wait(self, timeout=None):
        """Wait until :attr:`done`; returns it."""
        return self._finished.wait(timeout)

    def in_flight(self):
        with self._cond:
            return self._in_flight

    def stats(self):
        return {'fetched': self.fetched, 'skipped': self.skipped,
                'errors': self.errors}

    # -- the work -----------------------------------------------------------

    def _prepare(self):
        """Runs before the workers start; False to end at once."""
        return True

    def _next(self):
        """The next chunk to fetch, None when finished, or _WAIT.

        Called with ``self._cond`` held.
        """
        raise NotImplementedError

    def _before_fetch(self, index):
        """Called outside the lock before fetching ``index``."""

    def _demand_over(self):
        # The cache's demand reads are all served: workers yielding to
        # them look again now.
        with self._cond:
            self._cond.notify_all()

    def _main(self):
        self.cache.watch_demand(self._demand_over)
        try:
            if self._prepare() and not self._stop.is_set():
                name = '%s-%s' % (self.kind, self.cache.image_id[:16])
                workers = [threading.Thread(target=self._worker, daemon=True,
                                            name='%s-%d' % (name, n))
                           for n in range(self.concurrency)]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
        except Exception:
            LOG.exception('Image %s: %s failed', self.cache.image_id,
                          self.kind)
        finally:
            self.cache.unwatch_demand(self._demand_over)
            LOG.info('Image %s: %s ended%s: %d chunks fetched, %d skipped, '
                     '%d errors', self.cache.image_id, self.kind,
                     ' (stopped)' if self._stop.is_set() else '',
                     self.fetched, self.skipped, self.errors)
            self._finished.set()

    def _may_start(self):
        return (self._in_flight < self.demand_allowance or
                not self.cache.demand_pending())

    def _claim(self):
        with self._cond:
            while not self._stop.is_set():
                if self._may_start():
                    index = self._next()
                    if index is None:
                        return None
                    if index is not _WAIT:
                        self._in_flight += 1
                        return index
                # Woken when the demand ends (_demand_over); the timeout
                # is a safety net.
                self._cond.wait(self.poll_interval)
            return None

    def _worker(self):
        while True:
            index = self._claim()
            if index is None:
                return
            try:
                self._before_fetch(index)
                fetched = (not self._stop.is_set() and
                           self.cache.ensure(index, background=True))
            except Exception as e:
                self._failed(index, e)
            else:
                with self._cond:
                    self._errors_in_row = 0
                    if fetched:
                        self.fetched += 1
                    else:
                        self.skipped += 1
                if fetched:
                    self.cache.counters.inc(self.counter)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()

    def _failed(self, index, error):
        LOG.warning('Image %s: %s of chunk %d failed: %s',
                    self.cache.image_id, self.kind, index, error)
        with self._cond:
            self.errors += 1
            self._errors_in_row += 1
            if self._errors_in_row < self.max_errors:
                return
            self.gave_up = True
        LOG.warning('Image %s: %s gives up after %d failures in a row',
                    self.cache.image_id, self.kind, self.max_errors)
        self.stop()


class _Wait:
    def __repr__(self):
        return '<wait>'


_WAIT = _Wait()

#: Longest wait of a worker yielding to demand reads: the cache tells the
#: prefetcher when they end (ImageCache.watch_demand), so this is a
#: safety net. (Polling every 5 ms, as before, was a sixth to a quarter
#: of the CPU samples of a bulk-boot node's daemon.)
POLL_INTERVAL = 0.25


class Prefetcher(_Replay):
    """Replays a boot trace: fetches its chunks in order, ahead of demand.

    :param cache: the :class:`thunder_cache.cache.image_cache.ImageCache`.
    :param indexes: chunk indexes in trace order (from
        :func:`thunder_cache.boot.trace.decode`).
    :param concurrency: most fetches in flight.
    :param demand_allowance: most fetches in flight while demand reads
        wait for fetches of their own (see the module's description).
    :param max_errors: failures in a row after which the replay gives up.
    :param poll_interval: longest wait while yielding to demand reads
        before looking at them again (the cache wakes the workers when
        they end: a safety net).
    """

    counter = 'chunks_prefetched'
    kind = 'prefetch'

    def __init__(self, cache: image_cache.ImageCache,
                 indexes: typing.Iterable[int], concurrency: int = 4,
                 demand_allowance: int = 1, max_errors: int = 8,
                 poll_interval: float = POLL_INTERVAL) -> None:
        super().__init__(cache, concurrency, demand_allowance, max_errors,
                         poll_interval)
        count = cache.manifest.chunk_count
        self.indexes = list(indexes)
        for index in self.indexes:
            if not 0 <= index < count:
                raise ValueError('chunk %r is not in image %s'
                                 % (index, cache.image_id))
        self._cursor = 0

    def _next(self):
        while self._cursor < len(self.indexes):
            index = self.indexes[self._cursor]
            self._cursor += 1
            if self.cache.has(index):
                self.skipped += 1
                continue
            return index
        return None


class Hydrator(_Replay):
    """Fills every missing chunk of the image, slowly, in index order.

    :param cache: the :class:`thunder_cache.cache.image_cache.ImageCache`.
    :param rate_bytes: most bytes fetched per second (0: no limit).
    :param delay: seconds to wait after :meth:`start`.
    :param concurrency: most fetches in flight.
    :param demand_allowance, max_errors, poll_interval: as for
        :class:`Prefetcher`.
    :param clock, sleep: time source and sleep for the delay and the rate
        limit; the default sleep ends at once on :meth:`stop`.

    Chunks skipped because a reader was fetching them, or whose fetch
    failed, are tried again in a later pass; the hydration ends when
    every chunk is present, when stopped, when a pass fetched nothing and
    had failures, or after ``max_errors`` failures in a row.
    """

    counter = 'chunks_hydrated'
    kind = 'hydration'

    def __init__(self, cache: image_cache.ImageCache, rate_bytes: int,
                 delay: float = 0.0, concurrency: int = 2,
                 demand_allowance: int = 1, max_errors: int = 8,
                 poll_interval: float = POLL_INTERVAL,
                 clock: typing.Callable[[], float] = time.monotonic,
                 sleep: typing.Optional[
                     typing.Callable[[float], typing.Any]] = None
                 ) -> None:
        super().__init__(cache, concurrency, demand_allowance, max_errors,
                         poll_interval)
        if delay < 0:
            raise ValueError('delay must not be negative')
        self.delay = delay
        self._sleep = sleep or self._stop.wait
        self.bucket = fanout.TokenBucket(rate_bytes, clock=clock,
                                         sleep=self._sleep)
        self.passes = 0
        self._todo = None
        self._cursor = 0
        self._pass_fetched = 0
        self._pass_errors = 0

    def _prepare(self):
        if self.delay:
            self._sleep(self.delay)
        return True

    def _before_fetch(self, index):
        self.bucket.consume(self.cache.manifest.chunk_range(index)[1])

    def _next(self):
        if self._todo is None:
            self._start_pass(range(self.cache.manifest.chunk_count))
        while self._cursor < len(self._todo):
            index = self._todo[self._cursor]
            self._cursor += 1
            if not self.cache.has(index):
                return index
        # End of a pass: settle it once its fetches are over.
        if self._in_flight:
            return _WAIT
        missing = [i for i in self._todo if not self.cache.has(i)]
        if not missing:
            return None
        fetched = self.fetched - self._pass_fetched
        failed = self.errors - self._pass_errors
        if not fetched and failed:
            LOG.warning('Image %s: hydration stops with %d chunks missing',
                        self.cache.image_id, len(missing))
            return None
        self._start_pass(missing)
        if not fetched:
            # Only chunks in flight for readers were left: let them land.
            return _WAIT
        return self._next()

    def _start_pass(self, todo):
        self.passes += 1
        self._todo = todo
        self._cursor = 0
        self._pass_fetched = self.fetched
        self._pass_errors = self.errors


def hydrate_rate_bytes(group):
    """The hydration rate in bytes per second of a ``[prefetch]`` group."""
    return int(group.hydrate_rate * MiB)
