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

"""The read-only, origin-shaped cache of one image on one node.

Two files in the image's directory:

``data``
    A sparse file of exactly the image's size; chunk ``i`` lives at its
    offset in the image.
``chunkmap``
    Which chunks of ``data`` hold verified bytes
    (:mod:`thunder_cache.cache.chunkmap`).

A chunk missing on read is fetched once, however many threads want it: the
first creates a future in the in-flight table and fetches, the others wait
on that future and share its result or its error. The fetcher tries the
upstream's sources in order (parent peer, other peers, origin); every chunk
is checked against the manifest before it is written, a chunk that does not
match is thrown away, its source reported bad, and the next source tried.
The waiters wait as long as the fetch moves on within each source's time
limit (:meth:`~thunder_cache.peer.sources.ChunkSource.time_limit`); one that
overruns it releases them with a :class:`FetchError` (a local reader then
retries, see ``read_retry``).

Write ordering: the chunk is written to ``data`` with ``pwrite``, the data
file is ``fdatasync``'ed, and only then is its bit set in the map (which is
synced in turn). Commits are grouped: whichever fetcher takes the commit
lock makes durable every chunk written so far with one ``fdatasync`` of
each file. A chunk becomes readable (and servable) once it is committed.

Chunks already marked in a map found at start are verified again before
their first use (``verify_persisted``), so a cache file damaged behind the
daemon's back (disk error, a stray write) is never served: a chunk that
fails is cleared from the map and fetched again.

A full cache filesystem: a chunk's blocks are reserved (``fallocate``)
before its bytes are written, so ENOSPC or EDQUOT comes before any byte
lands. The chunk is then not stored, its bit never set, the failure counted
(``cache_full_errors``) and :attr:`ImageCache.on_full` told (the node's
evictor makes room); the read fails with :class:`CacheFull`, which a local
reader retries like any failed fetch. A commit whose ``fdatasync`` fails
makes the chunks it was committing unusable again (fetched anew), so a
chunk whose bytes may not have reached the disk is never served from it.

Eviction (:mod:`thunder_cache.cache.eviction`): users of a cache :meth:`pin` it
while they read it; :meth:`ImageCache.retire` succeeds only for a cache
nobody pins and nothing fetches, and a retired cache can be pinned no more
(its users look the image up again and open a new cache).
"""

import concurrent.futures
import errno
import itertools
import logging
import os
import threading
import time
import typing

from thunder_cache.cache import chunkmap
from thunder_cache.cache import chunkstream
from thunder_cache import fsutil
from thunder_cache import metrics
from thunder_cache.peer import protocol
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

LOG = logging.getLogger(__name__)

DATA_FILE = 'data'
MAP_FILE = 'chunkmap'
# Back-off of a local read's retries (seconds): first pause, longest.
RETRY_FIRST = 0.25
RETRY_MAX = 4.0
#: Seconds a fetch may spend on its own work (re-verifying a cached chunk,
#: writing and committing a fetched one) before its waiters give up.
SETTLE_TIME = 30.0
#: Seconds waiters allow a fetch beyond its source's time limit, to move on
#: to the next source.
WAIT_GRACE = 2.0
_USABLE_CHARS = bytes.maketrans(b'\x00\x01', b'01')


class FetchError(IOError):
    """A chunk could not be fetched from any source."""


class LoopError(FetchError):
    """Waiting for this chunk would wait on the requester itself."""


class BadChunk(FetchError):
    """A source returned bytes that do not match the manifest."""


class CacheFull(FetchError):
    """The cache filesystem has no room for a fetched chunk."""


class Retired(FetchError):
    """The cache was evicted; look the image up again."""


#: errno values of a full filesystem (or quota).
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _new_fetch(ticket, background=False, rank=0, length=None):
    """A fetch's future; with ``length``, its bytes stream to relays."""
    future = concurrent.futures.Future()
    future.source = None
    # When waiters stop waiting for it (time.monotonic()); moved on as the
    # fetch goes from source to source.
    future.deadline = time.monotonic() + SETTLE_TIME
    future.background = background
    future.ticket = ticket or protocol.new_ticket()
    # Fetches are ordered by (rank, ticket): see ImageCache.ensure.
    future.key = (rank, protocol.ticket_key(future.ticket))
    future.stream = None if length is None else chunkstream.ChunkStream(
        length, future.deadline)
    # The sources to try, when chosen before the fetch runs.
    future.candidates = None
    return future


def _set_deadline(future, deadline):
    """Move the time ``future``'s waiters (and relays) wait until."""
    future.deadline = deadline
    if future.stream is not None:
        future.stream.deadline = deadline


def _may_join(future, ticket, rank=0):
    """May a peer's fetch (``ticket``, ``rank``) wait for ``future``?"""
    source = future.source
    if source is not None and source.kind == 'origin':
        return True  # the origin waits on nobody
    return (rank, protocol.ticket_key(ticket)) > future.key


class ImageCache:
    """The cache of one image.

    :param directory: where the image's files live (created if missing).
    :param image_id: the Glance image id (for logs and metrics).
    :param manifest: the image's verified :class:`Manifest`.
    :param upstream: a :class:`~thunder_cache.peer.sources.SourceChooser`
        (:class:`~thunder_cache.cache.upstream.Upstream`); the error it is
        told of is :class:`BadChunk` for bytes that failed verification.
    :param verify_persisted: verify chunks found in the map at start
        before their first use.
    :param read_retry: seconds a local reader's fetch that failed on
        every source is retried (with back-off) before the read fails;
        peers' requests are never retried (the peer asks elsewhere).
    :param commit_interval: 0 to make each chunk durable (data, then map)
        before it is served; otherwise a background thread commits the
        chunks written in the last ``commit_interval`` seconds together,
        and chunks are served as soon as they are verified and written.
        The map never marks a chunk before its data is durable either way.

    :attr:`observer`, when not None, is called with the index of every
    chunk a local reader asks for (hit or miss; peers' requests and
    background fetches excluded): a
    :class:`thunder_cache.boot.trace.TraceRecorder`'s ``touch``.
    """

    #: callable(index) told of every local demand read; see above.
    observer = None
    #: callable(cache) told when a chunk could not be stored for want of
    #: space (the node's evictor); it must not block.
    on_full = None

    def __init__(self, directory: str, image_id: str,
                 manifest: manifest_mod.Manifest,
                 upstream: sources.SourceChooser,
                 verify_persisted: bool = True, commit_interval: float = 0.0,
                 read_retry: float = 0.0,
                 clock: typing.Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.read_retry = read_retry
        self.image_id = image_id
        self.manifest = manifest
        self.upstream = upstream
        self.counters = metrics.Counters(metrics.IMAGE_COUNTERS)
        self.fetch_latency = {'origin': metrics.Histogram(),
                              'peer': metrics.Histogram()}
        self._clock = clock
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._inflight: typing.Dict[int, concurrent.futures.Future] = {}
        self._pending: typing.Set[int] = set()
        # Demand calls waiting for a demand fetch; background fetches in
        # flight (see ensure()).
        self._demand = 0
        self._background = 0
        # Told each time the demand count drops to 0 (watch_demand).
        self._demand_watchers: typing.List[typing.Callable[[], None]] = []
        self.commit_interval = commit_interval
        self._committer = None
        self._closing = False
        self._wake = threading.Condition(self._lock)
        # Whether a full filesystem was logged and not yet followed by a
        # stored chunk.
        self._full_logged = False
        # Users holding the cache open (pin()), and whether it is retired.
        self._pins = 0
        self.retired = False
        #: time.time() of the last read (local or peer); a plain store per
        #: read, persisted by the evictor at most once per check.
        self.last_used = time.time()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.data_path = os.path.join(directory, DATA_FILE)
        self.map_path = os.path.join(directory, MAP_FILE)
        size = manifest.image_size
        try:
            data_ok = os.path.getsize(self.data_path) == size
        except OSError:
            data_ok = False
        if not data_ok:
            # Data file missing or of another size: no bit may survive.
            chunkmap.remove_map(self.map_path)
        self.map, self.reset = chunkmap.open_map(
            self.map_path, manifest.digest(), manifest.chunk_size, size,
            manifest.chunk_count, on_reset=self._empty_data)
        self._fd = os.open(self.data_path, os.O_RDWR)
        # Chunks that may be served: verified in this process (fetched, or
        # re-verified after a restart) and written to the data file.
        self._usable = bytearray(manifest.chunk_count)
        # Chunks a background fetch filled that no demand read used yet.
        self._prefetched = bytearray(manifest.chunk_count)
        if not verify_persisted:
            for index in self.map.present():
                self._usable[index] = 1
        if commit_interval:
            self._committer = threading.Thread(
                target=self._commit_loop, daemon=True,
                name='commit-%s' % image_id[:16])
            self._committer.start()
        if self.reset:
            LOG.info('Image %s: new cache of %d chunks in %s', image_id,
                     manifest.chunk_count, directory)
        else:
            LOG.info('Image %s: cache of %d chunks in %s holds %d', image_id,
                     manifest.chunk_count, directory, self.map.count())

    def _empty_data(self):
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, self.manifest.image_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsutil.fsync_parent(self.data_path)

    def __repr__(self):
        return '<ImageCache %s: %d/%d chunks>' % (
            self.image_id, self.map.count(), self.manifest.chunk_count)

    # -- state ------------------------------------------------------------

    @property
    def fileno(self):
        """The data file's descriptor, for sendfile."""
        return self._fd

    def has(self, index):
        """True if chunk ``index`` is cached and may be served as it is."""
        self.manifest.chunk_range(index)  # validates the index
        return bool(self._usable[index])

    def usable_map(self):
        """One character per chunk: '1' if :meth:`has`, else '0'."""
        return bytes(self._usable).translate(_USABLE_CHARS).decode('ascii')

    def present_count(self):
        return self.map.count()

    def complete(self):
        return self.map.complete()

    def demand_pending(self):
        """Demand reads waiting for a fetch (not for a background one)."""
        return self._demand

    def watch_demand(self, watcher: typing.Callable[[], None]) -> None:
        """Call ``watcher()`` each time :meth:`demand_pending` drops to 0.

        It is called without the cache's lock held, in the thread whose
        demand ended; it must not block (a prefetcher that yields to
        demand reads wakes its workers with it instead of polling).
        """
        with self._lock:
            self._demand_watchers.append(watcher)

    def unwatch_demand(self, watcher: typing.Callable[[], None]) -> None:
        """Stop calling ``watcher`` (see :meth:`watch_demand`)."""
        with self._lock:
            if watcher in self._demand_watchers:
                self._demand_watchers.remove(watcher)

    def background_pending(self):
        """Background fetches in flight."""
        return self._background

    # -- pins (eviction) ----------------------------------------------------

    def pin(self):
        """Hold the cache open; False if it is retired (evicted)."""
        with self._lock:
            if self.retired:
                return False
            self._pins += 1
            return True

    def unpin(self):
        with self._lock:
            self._pins -= 1

    def busy(self):
        """Why the cache cannot be retired now, or None."""
        if self._pins:
            return '%d reads or transfers in progress' % self._pins
        if self._inflight or self._demand or self._background:
            return 'a fetch in flight'
        return None

    def retire(self):
        """Refuse new pins if nothing uses the cache; the reason if busy.

        :returns: None once retired (close it, then remove its files), or
            why it is busy (nothing changed).
        """
        with self._lock:
            reason = self.busy()
            if reason is None:
                self.retired = True
            return reason

    # -- reading ----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset`` (short at the end).

        :raises ValueError: for a negative offset or length.
        :raises FetchError: if a chunk could not be fetched.
        """
        if offset < 0 or length < 0:
            raise ValueError('negative offset or length')
        size = self.manifest.image_size
        if offset >= size or not length:
            return b''
        end = min(size, offset + length)
        chunk = self.manifest.chunk_size
        out = bytearray()
        for index in range(offset // chunk, (end - 1) // chunk + 1):
            self.ensure(index)
            start = max(offset, index * chunk)
            stop = min(end, (index + 1) * chunk)
            out += self._pread(stop - start, start)
        return bytes(out)

    def _pread(self, length, offset):
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FetchError('short read from the cache file of image %s'
                             % self.image_id)
        return data

    def read_chunk(self, index: int) -> bytes:
        """The verified bytes of chunk ``index`` (fetching it if needed)."""
        self.ensure(index)
        offset, length = self.manifest.chunk_range(index)
        return self._pread(length, offset)

    def ensure(self, index: int, via: typing.Sequence[str] = (),
               timeout: typing.Optional[float] = None,
               ticket: typing.Optional[str] = None,
               background: bool = False) -> typing.Any:
        """Make chunk ``index`` present; fetch it at most once.

        :param via: URLs of the nodes this fetch is made for (a peer
            request relayed here); their requests are not joined to a
            fetch that waits on one of them.
        :param timeout: seconds to wait for a fetch started by another
            thread.
        :param ticket: the ticket of the peer's fetch this call serves
            (:func:`thunder_cache.peer.protocol.new_ticket`); None for local
            readers. Fetches started here carry it upstream.
        :param background: a prefetch or hydration fetch, not a read:
            it never waits (a chunk already in flight is left to its
            fetch), is not counted as a hit or a miss, and does not count
            in :meth:`demand_pending`. Demand reads join it as any other.
        :returns: for a background call, True if this call fetched the
            chunk; None for a demand call.
        :raises FetchError: if no source could provide the chunk (for a
            local reader: for ``read_retry`` seconds).
        :raises IndexError: for an index outside the image.

        A peer's request joins a fetch already in flight only if that
        fetch reads the origin, or if the request's ticket is younger
        than the fetch's. Otherwise it is served by a fetch of its own
        (``inflight_bypasses``): waits between fetches then always go from
        a younger ticket to an older one (or to the origin), so fetches
        relayed between nodes that list each other can never wait on each
        other in a cycle. With stripes, fetches are ordered by a rank
        first, then by ticket: the place in the chunk's planned stripe
        tree (:meth:`thunder_cache.cache.upstream.Upstream.rank`, the
        root's the least) of the highest placed node a request went
        through (``via``), and for a fetch it starts, of that node and
        this one. A request joins a fetch ranked below its own; a fetch
        started for a request ranks no higher than the request. So along
        any chain of waits the order never rises and a join lowers it: no
        cycle. And a planned child's request joins whatever fetch of the
        chunk its parent has in flight: the parent's own, or one for
        another child or for a descendant, each ranked at the parent's
        place, below the child's (ranked by the node that started the
        chain instead, a request arriving just after a deeper node's
        fetch of the chunk started made a second fetch up to the root).
        Requests from the node's ancestors (off the plan) still fetch on
        their own.
        """
        self.manifest.chunk_range(index)  # validates the index
        if background:
            return self._ensure_background(index)
        self.last_used = time.time()
        if ticket is not None or via:
            return self._ensure_demand(index, via, timeout, ticket)
        observer = self.observer
        if observer is not None:
            self._observe(observer, index)
        return self._ensure_local(index, timeout)

    def _ensure_local(self, index, timeout):
        """A local reader's :meth:`ensure`: retried until ``read_retry``.

        A guest's read that fails is an I/O error in the guest; a chunk
        that no source could provide a moment ago (every peer busy or
        timing out, the origin unreachable for a while) usually comes a
        few seconds later. Sources dropped for an error are asked again
        on each retry.
        """
        deadline = self._clock() + self.read_retry
        delay = RETRY_FIRST
        while True:
            try:
                return self._ensure_demand(index, (), timeout, None)
            except FetchError as e:
                left = deadline - self._clock()
                if left <= 0:
                    raise
                self.counters.inc('read_retries')
                pause = min(delay, left)
                LOG.warning('Image %s: chunk %d not available (%s); '
                            'retrying in %.1f s', self.image_id, index, e,
                            pause)
                time.sleep(pause)
                delay = min(delay * 2, RETRY_MAX)
                self.upstream.forgive()

    def _ensure_demand(self, index, via, timeout, ticket):
        if self.has(index):
            self._hit(index)
            return
        with self._lock:
            if self.has(index):
                self._hit(index, locked=True)
                return
            if self.retired:
                raise Retired('the cache of image %s was evicted'
                              % self.image_id)
            future, fetcher, bypass, rank = self._take_fetch(index, via,
                                                             ticket)
            # A demand read waiting on a prefetch is not counted: holding
            # the prefetcher back would not serve it sooner.
            waits_demand = bypass or not future.background
            if waits_demand:
                self._demand += 1
        try:
            if bypass:
                self.counters.inc('inflight_bypasses')
                self._fill(index, via, _new_fetch(ticket, rank=rank))
            elif not fetcher:
                self._join(index, future, timeout)
            else:
                self._run_fetch(index, via, future)
        finally:
            if waits_demand:
                self._demand_done()

    def _take_fetch(self, index, via, ticket):
        """The fetch a demand for chunk ``index`` waits on (lock held).

        :returns: (future, whether the caller starts it, whether the
            caller must fetch on its own instead (a bypass: see
            :meth:`ensure`), the rank of the caller's fetches).
        :raises LoopError: if the fetch in flight reads a node in ``via``.
        """
        future = self._inflight.get(index)
        join_rank, rank = self._ranks(via, index)
        if future is None:
            future = _new_fetch(ticket, rank=rank,
                                length=self.manifest.chunk_range(index)[1])
            self._inflight[index] = future
            return future, True, False, rank
        target = getattr(future.source, 'url', None)
        if via and target in via:
            raise LoopError('chunk %d of image %s is being fetched from %s, '
                            'which asked for it'
                            % (index, self.image_id, target))
        bypass = ticket is not None and not _may_join(future, ticket,
                                                      join_rank)
        return future, False, bypass, rank

    def relay(self, index: int, via: typing.Sequence[str], ticket: str,
              run: typing.Callable[[typing.Callable[[], typing.Any]],
                                   typing.Any]
              ) -> typing.Optional[chunkstream.ChunkStream]:
        """A peer's request for chunk ``index``, answered as it arrives.

        The same fetch as :meth:`ensure` with ``via`` and ``ticket`` starts
        or joins (with its rules for joins, bypasses and loops), but this
        call does not wait for it: a fetch to start is handed to ``run``
        (the node's relay threads) and the caller sends the chunk's bytes
        from the returned stream as they arrive (cut-through).

        :returns: the fetch's stream; None if the chunk is here already.
        :raises LoopError: as :meth:`ensure`.
        :raises Retired: if the cache was evicted.
        """
        self.manifest.chunk_range(index)  # validates the index
        self.last_used = time.time()
        if self.has(index):
            self._hit(index)
            return None
        with self._lock:
            if self.has(index):
                self._hit(index, locked=True)
                return None
            if self.retired:
                raise Retired('the cache of image %s was evicted'
                              % self.image_id)
            future, fetcher, bypass, rank = self._take_fetch(index, via,
                                                             ticket)
            if fetcher:
                # Chosen now, not when a relay thread runs the fetch:
                # whether a request may join it depends on its source.
                future.candidates = self._first_source(future, via, index)
            if bypass:
                future = _new_fetch(ticket, rank=rank,
                                    length=self.manifest.chunk_range(
                                        index)[1])
            waits_demand = bypass or not future.background
            if waits_demand:
                self._demand += 1
        if waits_demand:
            future.add_done_callback(self._demand_done)
        if bypass:
            self.counters.inc('inflight_bypasses')
            job = self._run_bypass
        elif fetcher:
            job = self._run_fetch
        else:
            self.counters.inc('inflight_joins')
            if future.background:
                future.add_done_callback(
                    lambda _f: self._joined_prefetch(index))
            return future.stream
        try:
            run(lambda: job(index, via, future))
        except BaseException as e:
            # No thread to run it (the node is closing): settle it here.
            self._settle(index, future, e, registered=fetcher)
            raise
        return future.stream

    def _first_source(self, future, via, index):
        """The sources of ``future``'s fetch, its first one set on it."""
        candidates = iter(self.upstream.candidates(via, index))
        first = next(candidates, None)
        if first is None:
            return iter(())
        future.source = first
        return itertools.chain((first,), candidates)

    def _demand_done(self, _future=None):
        """A demand read stopped waiting (a future's callback, or not)."""
        with self._lock:
            self._demand -= 1
            watchers = () if self._demand else tuple(self._demand_watchers)
        for watcher in watchers:
            watcher()

    def _joined_prefetch(self, index):
        with self._lock:
            self._prefetched[index] = 0
        self.counters.inc('prefetch_joins')

    def _run_bypass(self, index, via, future):
        """Fill chunk ``index`` with a fetch of its own (not registered)."""
        try:
            self._fill(index, via, future)
        except BaseException as e:
            self._settle(index, future, e, registered=False)
            if not isinstance(e, Exception):
                raise
            return
        self._settle(index, future, None, registered=False)

    def _settle(self, index, future, error, registered=True):
        """End ``future`` (a fetch of chunk ``index``) with ``error``."""
        if registered:
            with self._lock:
                del self._inflight[index]
        if future.stream is not None:
            future.stream.abort()  # nothing, if it was verified
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _rank(self, url, index):
        """The rank of the fetches ``url`` (None: this node) starts."""
        rank = getattr(self.upstream, 'rank', None)
        return 0 if rank is None else rank(url, index)

    def _ranks(self, via, index):
        """The ranks of a request for chunk ``index`` relayed via ``via``.

        :returns: (the rank it joins a fetch in flight with, the rank of
            the fetch it starts here): the least rank of the nodes it went
            through, and the least of those and this node's (see
            :meth:`ensure`).
        """
        own = self._rank(None, index)
        if not via:
            return own, own
        theirs = min(self._rank(url, index) for url in via)
        return theirs, min(theirs, own)

    def _observe(self, observer, index):
        try:
            observer(index)
        except Exception:
            # A broken observer must not fail reads; it is dropped.
            LOG.exception('Image %s: read observer %r failed; detached',
                          self.image_id, observer)
            self.observer = None

    def _hit(self, index, locked=False):
        """Count a hit (``locked``: ``self._lock`` is held)."""
        self.counters.inc('chunk_hits')
        if not self._prefetched[index]:
            return
        if locked:
            self._hit_prefetched(index)
        else:
            with self._lock:
                self._hit_prefetched(index)

    def _hit_prefetched(self, index):
        # The first demand read of a chunk a background fetch brought.
        if self._prefetched[index]:
            self._prefetched[index] = 0
            self.counters.inc('prefetch_hits')

    def _join(self, index, future, timeout):
        """Wait for another thread's fetch of chunk ``index``.

        The wait ends with a :class:`FetchError` after ``timeout`` seconds
        (if given), or as soon as the fetch overruns its deadline: the time
        limit of the source it is reading plus :data:`WAIT_GRACE`. A fetch
        moving from source to source within their limits is waited for.
        """
        self.counters.inc('inflight_joins')
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:
            limit = future.deadline
            if give_up is not None:
                limit = min(limit, give_up)
            try:
                future.result(max(0.0, limit - time.monotonic()))
                break
            except concurrent.futures.TimeoutError:
                now = time.monotonic()
                if give_up is not None and now >= give_up:
                    raise FetchError('timed out waiting for chunk %d of '
                                     'image %s' % (index, self.image_id))
                if now >= future.deadline:
                    self.counters.inc('inflight_overdue')
                    raise FetchError('the fetch of chunk %d of image %s '
                                     'from %s is overdue' % (
                                         index, self.image_id,
                                         getattr(future.source, 'name',
                                                 'its sources')))
        if future.background:
            with self._lock:
                self._prefetched[index] = 0
            self.counters.inc('prefetch_joins')

    def _ensure_background(self, index):
        if self.has(index):
            return False
        with self._lock:
            if self.has(index) or index in self._inflight or self.retired:
                return False
            future = _new_fetch(None, background=True,
                                rank=self._rank(None, index),
                                length=self.manifest.chunk_range(index)[1])
            self._inflight[index] = future
            self._background += 1
        try:
            return self._run_fetch(index, (), future)
        finally:
            with self._lock:
                self._background -= 1

    def _run_fetch(self, index, via, future):
        """Fill chunk ``index`` as the owner of ``future``; settle it."""
        try:
            fetched = self._fill(index, via, future)
        except BaseException as e:
            self._settle(index, future, e)
            raise
        self._settle(index, future, None)
        return fetched

    def _fill(self, index, via, future):
        """Verify or fetch chunk ``index``; True if it was fetched."""
        offset, length = self.manifest.chunk_range(index)
        if self.has(index):
            return False  # filled meanwhile (by a concurrent bypass)
        if self.map.has(index):
            # In the map from before a restart: check the bytes once.
            data = self._pread(length, offset)
            if self.manifest.verify_chunk(index, data):
                self.counters.inc('chunks_reverified')
                self._usable[index] = 1
                if not future.background:
                    self.counters.inc('chunk_hits')
                return False
            LOG.warning('Image %s: cached chunk %d does not match the '
                        'manifest; fetching it again', self.image_id, index)
            self.counters.inc('local_corrupt')
            self.map.clear([index])
        if not future.background:
            self.counters.inc('chunk_misses')
        data, source = self._fetch(index, offset, length, via, future)
        self._store(index, offset, data)
        with self._lock:
            self._pending.add(index)
            if future.background:
                self._prefetched[index] = 1
            if self._committer is not None:
                # Verified and in the page cache: servable now, durable
                # at the next commit.
                self._usable[index] = 1
                self._wake.notify()
        if self._committer is None:
            try:
                self._commit()
            except OSError as e:
                if e.errno in FULL_ERRNOS:
                    self._full(index, e)
                raise FetchError('chunk %d of image %s: cannot commit it to '
                                 'the cache: %s' % (index, self.image_id, e))
        kind = source.kind
        self.counters.inc('chunks_from_%s' % ('origin' if kind == 'origin'
                                              else 'peers'))
        self.counters.inc('bytes_from_%s' % ('origin' if kind == 'origin'
                                             else 'peers'), length)
        return True

    def _fetch(self, index, offset, length, via, future):
        errors = []
        stream = future.stream
        candidates = future.candidates
        if candidates is None:
            candidates = self.upstream.candidates(via, index)
        for source in candidates:
            future.source = source
            _set_deadline(future, time.monotonic() +
                          source.time_limit(length) + WAIT_GRACE)
            started = self._clock()
            try:
                if stream is not None and getattr(source, 'streams', False):
                    data = source.read_chunk(index, offset, length, via,
                                             future.ticket, sink=stream)
                else:
                    data = source.read_chunk(index, offset, length, via,
                                             future.ticket)
                if stream is not None:
                    stream.complete(data)
            except Exception as e:
                if stream is not None:
                    stream.fail()
                self.counters.inc('fetch_errors')
                errors.append('%s: %s' % (source.name, e))
                LOG.info('Image %s: chunk %d from %s failed: %s',
                         self.image_id, index, source.name, e)
                self.upstream.report(source, False, e)
                continue
            if not self.manifest.verify_chunk(index, data):
                if stream is not None:
                    stream.fail()
                self.counters.inc('chunks_rejected')
                self.counters.inc('fetch_errors')
                errors.append('%s: bad data' % source.name)
                LOG.warning('Image %s: chunk %d from %s does not match the '
                            'manifest; discarded', self.image_id, index,
                            source.name)
                self.upstream.report(source, False, BadChunk(
                    'chunk %d failed verification' % index))
                continue
            self.counters.inc('chunks_verified')
            if stream is not None:
                stream.verified()
            _set_deadline(future, time.monotonic() + SETTLE_TIME)
            self.fetch_latency['origin' if source.kind == 'origin'
                               else 'peer'].observe(self._clock() - started)
            self.upstream.report(source, True, None)
            return data, source
        self.counters.inc('fetch_failures')
        raise FetchError('chunk %d of image %s: no source could provide it'
                         '%s' % (index, self.image_id,
                                 (' (%s)' % '; '.join(errors))
                                 if errors else ''))

    def _store(self, index, offset, data):
        """Write a verified chunk; :class:`CacheFull` if there is no room.

        The blocks are reserved first, so a full filesystem fails before
        any byte is written (the chunk's bit stays clear either way).
        """
        length = len(data)
        try:
            os.posix_fallocate(self._fd, offset, length)
            written = os.pwrite(self._fd, data, offset)
        except OSError as e:
            if e.errno not in FULL_ERRNOS:
                raise
            self._full(index, e)
        if self._full_logged:
            self._full_logged = False
            LOG.info('Image %s: the cache filesystem has room again',
                     self.image_id)
        if written != length:
            raise FetchError('short write to the cache file of image %s'
                             % self.image_id)

    def _full(self, index, error):
        self.counters.inc('cache_full_errors')
        # Once per episode at ERROR: every chunk fails alike meanwhile.
        LOG.log(logging.DEBUG if self._full_logged else logging.ERROR,
                'Image %s: the cache filesystem is full (%s): chunk %d not '
                'stored; evicting unused images', self.image_id,
                os.strerror(error.errno), index)
        self._full_logged = True
        on_full = self.on_full
        if on_full is not None:
            try:
                on_full(self)
            except Exception:
                LOG.exception('Image %s: the disk-full hook failed',
                              self.image_id)
        raise CacheFull('chunk %d of image %s: no room in the cache (%s)'
                        % (index, self.image_id, os.strerror(error.errno)))

    def _commit(self):
        """Make every written chunk durable, then mark it present."""
        with self._commit_lock:
            with self._lock:
                pending, self._pending = self._pending, set()
            if not pending:
                return  # another fetcher committed ours
            try:
                os.fdatasync(self._fd)
            except OSError:
                # Their bytes may not be on disk: never serve them from it.
                with self._lock:
                    for index in pending:
                        self._usable[index] = 0
                raise
            self.map.set_durable(pending)
            for index in pending:
                self._usable[index] = 1

    def _commit_loop(self):
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if self._closing and not self._pending:
                    return
            # Let more chunks arrive, then commit them together.
            time.sleep(self.commit_interval)
            try:
                self._commit()
            except OSError as e:
                if e.errno in FULL_ERRNOS:
                    self.counters.inc('cache_full_errors')
                LOG.error('Image %s: cannot commit the cache (%s); its '
                          'last chunks will be fetched again', self.image_id,
                          e)

    # -- lifecycle --------------------------------------------------------

    def close(self):
        """Commit what is pending and close the files."""
        if self._committer is not None:
            with self._lock:
                self._closing = True
                self._wake.notify()
            self._committer.join()
            self._committer = None
        if self._fd is not None:
            self._commit()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self.map.close()
