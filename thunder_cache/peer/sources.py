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

"""Where chunks come from: the origin (the image-volume) and peer nodes.

The origin is the image-volume the thunder Glance store wrote: the image's
bytes from offset 0, then its manifest at
``manifest.volume_offset(image_size)``. :class:`RbdOrigin` reads it through
librbd, :class:`FileOrigin` from a path (a locally attached image-volume, or
a file in tests). :func:`load_manifest` reads the manifest from an origin
and refuses it unless its sha256 is the digest the caller got from the
Glance image record.

:class:`PeerClient` speaks the peer protocol
(:mod:`thunder_cache.peer.protocol`) to other nodes; :class:`PeerSource` is one
peer as a chunk source, following the 307 redirects of a full node. Every peer
request has a deadline for its whole answer (``fetch_timeout`` plus the
expected bytes at the minimum transfer rate), enforced by one :class:`Watchdog`
thread, and goes only to an address the node's
:class:`~thunder_cache.peer.peerpolicy.AddressPolicy` allows.
"""

import heapq
import http.client
import itertools
import logging
import os
import socket
import ssl
import threading
import time
import typing

from oslo_utils import importutils

from thunder_cache.peer import peerpolicy
from thunder_cache.peer import protocol
from thunder_common import manifest as manifest_mod

rados = importutils.try_import('rados')
rbd = importutils.try_import('rbd')

LOG = logging.getLogger(__name__)

# Largest error body read from a peer; anything longer closes the
# connection instead.
MAX_ERROR_BODY = 4096
# A manifest from a peer is read in pieces of this many bytes: memory grows
# with what arrived, not with what the peer announced.
MANIFEST_PIECE = 1024 * 1024
# A chunk read into a stream (cut-through) is published in slices of this
# many bytes at least (the last one may be shorter).
STREAM_SLICE = 32 * 1024
# A read of an answer's body waits in the kernel (SO_RCVLOWAT) until this
# many bytes are there, or the rest of the body if less: on a slow link a
# thread woken for every packet of a few KiB spends more CPU on wake-ups
# than on the bytes.
RECV_LOWAT = 32 * 1024
# Bytes asked of the socket at once while reading an answer's head.
HEAD_READ = 8192

#: Bytes as a source returns them (a bytearray when read into a buffer).
Data = typing.Union[bytes, bytearray]


#: Seconds a source may take for one chunk unless it says otherwise
#: (:meth:`ChunkSource.time_limit`).
SOURCE_TIME_LIMIT = 60.0


class ChunkSource(typing.Protocol):
    """Something that produces the bytes of a chunk: an origin or a peer.

    :class:`Origin` and :class:`PeerSource` are the ones the daemon uses;
    anything with these members fits.
    """

    @property
    def kind(self) -> str:
        """``'origin'`` or ``'peer'``."""

    @property
    def name(self) -> str:
        """What to call it in logs and metrics."""

    @property
    def url(self) -> typing.Optional[str]:
        """The peer's URL; None for an origin."""

    def read_chunk(self, index: int, offset: int, length: int,
                   via: typing.Sequence[str] = (),
                   ticket: typing.Optional[str] = None) -> Data:
        """``length`` bytes of chunk ``index`` (at ``offset`` in the image).

        ``via`` lists the nodes the request was relayed through and
        ``ticket`` identifies the fetch (see the peer protocol). A source
        whose ``streams`` attribute is true also takes ``sink``, a
        :class:`thunder_cache.cache.chunkstream.ChunkStream` it reads the
        bytes into as they arrive (cut-through relaying); the others'
        chunks are published whole once read.
        """

    def time_limit(self, length: int) -> float:
        """Seconds :meth:`read_chunk` of ``length`` bytes may take."""


class SourceChooser(typing.Protocol):
    """The sources of one image in the order to try them (an upstream).

    :class:`thunder_cache.cache.upstream.Upstream` is the one the daemon
    uses.
    """

    def candidates(self, via: typing.Sequence[str] = (),
                   index: typing.Optional[int] = None
                   ) -> typing.Iterator[ChunkSource]:
        """The sources to try for chunk ``index``, best first."""

    def report(self, source: ChunkSource, ok: bool,
               error: typing.Optional[BaseException] = None) -> None:
        """Tell how ``source`` did (``error`` is what it raised)."""

    def forgive(self) -> None:
        """Ask again the sources dropped after failures."""


class OriginError(IOError):
    """The origin could not be read."""


class ManifestError(ValueError):
    """A manifest that is missing, malformed or not the image's."""


# -- origins ---------------------------------------------------------------

class Origin:
    """Base of the origins: a byte-addressed image-volume (a ChunkSource)."""

    kind = 'origin'
    name = 'source'
    url: typing.Optional[str] = None

    def read(self, offset: int, length: int) -> Data:
        """``length`` bytes of the image-volume at ``offset``."""
        raise NotImplementedError

    def time_limit(self, length: int) -> float:
        return SOURCE_TIME_LIMIT

    def read_chunk(self, index: int, offset: int, length: int,
                   via: typing.Sequence[str] = (),
                   ticket: typing.Optional[str] = None) -> Data:
        data = self.read(offset, length)
        if len(data) != length:
            raise OriginError('short read from %s: %d of %d bytes at %d'
                              % (self.name, len(data), length, offset))
        return data

    def close(self) -> None:
        """Release what reading took (connections, descriptors)."""


class FileOrigin(Origin):
    """An image-volume readable as a file (or a block device) at ``path``.

    The file is opened for each read, so an origin that disappears (device
    detached, file moved) fails the reads at once and comes back when it
    does.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = 'file:%s' % path

    def _open(self) -> int:
        """A read-only descriptor of the origin (closed by the caller)."""
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, offset: int, length: int) -> Data:
        try:
            fd = self._open()
        except OSError as e:
            raise OriginError('cannot open origin %s: %s' % (self.path, e))
        try:
            buf = bytearray(length)
            view = memoryview(buf)
            done = 0
            while done < length:
                n = os.preadv(fd, [view[done:]], offset + done)
                if not n:
                    break
                done += n
            return buf if done == length else buf[:done]
        except OSError as e:
            raise OriginError('cannot read origin %s: %s' % (self.path, e))
        finally:
            os.close(fd)


class RbdOrigin(Origin):
    """An image-volume (or a snapshot of it) in RBD, read with librbd.

    Every Ceph operation is bounded by ``timeout`` seconds: connecting
    (``client_mount_timeout``: the binding ignores ``connect``'s own
    timeout), and every monitor and OSD operation behind opening the
    ioctx and the image and behind each read (``rados_mon_op_timeout``,
    ``rados_osd_op_timeout``); an operation that times out fails the read
    with an :class:`OriginError`, and the next read connects again.
    Threads that waited for an open that failed fail with its error
    rather than each trying again in turn.
    """

    #: Ceph operations behind a read on a fresh handle, one after the
    #: other at worst: connect, pool lookup, image open (id, header,
    #: snapshot context), the read itself.
    SERIAL_OPS = 6

    def __init__(self, pool: str, image: str,
                 snapshot: typing.Optional[str] = None,
                 ceph_conf: str = '/etc/ceph/ceph.conf',
                 user: typing.Optional[str] = None,
                 keyring: typing.Optional[str] = None,
                 cluster_name: str = 'ceph', timeout: float = 10) -> None:
        if rados is None or rbd is None:
            raise OriginError('the Ceph Python bindings (python3-rados, '
                              'python3-rbd) are not importable')
        self.pool = pool
        self.image = image
        self.snapshot = snapshot
        self.ceph_conf = ceph_conf
        self.user = user
        self.keyring = keyring
        self.cluster_name = cluster_name
        self.timeout = timeout
        self.name = 'rbd:%s/%s%s' % (pool, image,
                                     '@%s' % snapshot if snapshot else '')
        self._lock = threading.Lock()
        self._client: typing.Any = None
        self._ioctx: typing.Any = None
        self._image: typing.Any = None
        self._failed: typing.Tuple[float, typing.Optional[Exception]] = (
            0.0, None)

    def time_limit(self, length: int) -> float:
        return self.SERIAL_OPS * self.timeout

    def _open(self) -> None:
        conf = {}
        for option in ('rados_osd_op_timeout', 'rados_mon_op_timeout',
                       'client_mount_timeout'):
            conf[option] = str(self.timeout)
        if self.keyring:
            conf['keyring'] = self.keyring
        client = rados.Rados(conffile=self.ceph_conf, rados_id=self.user,
                             clustername=self.cluster_name, conf=conf)
        try:
            client.connect(timeout=self.timeout)
            ioctx = client.open_ioctx(self.pool)
            try:
                image = rbd.Image(ioctx, self.image, snapshot=self.snapshot,
                                  read_only=True)
            except Exception:
                ioctx.close()
                raise
        except Exception:
            client.shutdown()
            raise
        self._client, self._ioctx, self._image = client, ioctx, image

    def _handle(self) -> typing.Any:
        asked = time.monotonic()
        with self._lock:
            if self._image is None:
                failed_at, error = self._failed
                if failed_at >= asked:
                    raise OriginError(str(error))
                try:
                    self._open()
                except Exception as e:
                    error = OriginError('cannot open origin %s: %s'
                                        % (self.name, e))
                    self._failed = (time.monotonic(), error)
                    raise error
            return self._image

    def read(self, offset: int, length: int) -> Data:
        image = self._handle()
        try:
            return image.read(offset, length)
        except Exception as e:
            # Reconnect on the next read.
            self.close()
            raise OriginError('cannot read origin %s: %s' % (self.name, e))

    def close(self) -> None:
        with self._lock:
            handles = (self._image, self._ioctx)
            client = self._client
            self._client = self._ioctx = self._image = None
        for handle in handles:
            if handle is not None:
                try:
                    handle.close()
                except Exception:
                    LOG.debug('closing %s', self.name, exc_info=True)
        if client is not None:
            client.shutdown()


def load_manifest(read: typing.Callable[[int, int], Data],
                  expected_digest: str, offset: int,
                  length: typing.Optional[int] = None
                  ) -> manifest_mod.Manifest:
    """The verified manifest read with ``read(offset, length)``.

    :param expected_digest: sha256 hex digest from the Glance image
        record's location metadata.
    :param length: the manifest's length if known (from the same
        metadata); read from its header otherwise.
    :raises ManifestError: if the bytes are not the expected manifest.
    """
    try:
        if length is None:
            head = bytes(read(offset, manifest_mod.HEADER_SIZE))
            _c, _s, length = manifest_mod.Manifest.parse_header(head)
        data = bytes(read(offset, length))
        return manifest_mod.load_verified(data, expected_digest)
    except ValueError as e:
        raise ManifestError(str(e))


# -- peers -----------------------------------------------------------------

class PeerError(IOError):
    """A peer did not return the chunk; ``status`` is its answer if any.

    ``soft`` errors (the peer is busy, would loop, or lacks the chunk for
    now) skip the peer for this chunk only.
    """

    def __init__(self, message: str, status: typing.Optional[int] = None,
                 soft: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.soft = soft


class Redirect(Exception):
    """A full peer sent the requester to one of its children."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def split_url(url: str) -> typing.Tuple[str, int]:
    """(host, port) of a normalized peer URL."""
    _scheme, host, port = protocol.split_url(url)
    return host, port


def manifest_limit(length: typing.Optional[int] = None,
                   offset: typing.Optional[int] = None) -> int:
    """The most bytes an image's manifest may have.

    :param length: the manifest's length from the image's location
        metadata, when known: exactly this.
    :param offset: where the manifest starts in the image-volume: the
        image lies before it, so it has at most ``offset / 4 KiB`` chunks.
    """
    most = (manifest_mod.HEADER_SIZE +
            manifest_mod.MAX_CHUNKS * manifest_mod.DIGEST_SIZE)
    if length is not None:
        return min(length, most)
    if offset is not None:
        chunks = -(-offset // manifest_mod.MIN_CHUNK_SIZE)
        return min(most, manifest_mod.HEADER_SIZE +
                   chunks * manifest_mod.DIGEST_SIZE)
    return most


class Watchdog:
    """Runs actions at their deadlines, from one thread.

    The thread runs while actions are armed. An action returning True is
    run again :data:`AGAIN` seconds later, until it is disarmed. An action
    runs with the watchdog's lock held: once :meth:`disarm` returns, it is
    not running and will not run.
    """

    AGAIN = 0.05

    def __init__(self, clock: typing.Callable[[], float] = time.monotonic
                 ) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: typing.List[typing.List[typing.Any]] = []
        self._armed = 0
        self._count = itertools.count()
        self._thread: typing.Optional[threading.Thread] = None

    def arm(self, deadline: float,
            action: typing.Callable[[], typing.Any]
            ) -> typing.List[typing.Any]:
        """Run ``action()`` at ``deadline`` (a ``clock`` time)."""
        entry = [deadline, next(self._count), action]
        with self._cond:
            heapq.heappush(self._heap, entry)
            self._armed += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name='peer-deadlines', daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                # The thread sleeps until the earliest deadline: woken
                # only when that is this one (not for every request).
                self._cond.notify()
        return entry

    def disarm(self, entry: typing.List[typing.Any]) -> None:
        """Stop ``entry`` (what :meth:`arm` returned) from running."""
        with self._cond:
            if entry[2] is not None:
                entry[2] = None
                self._armed -= 1
            if len(self._heap) > 64 and len(self._heap) > 4 * self._armed:
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._thread = None
                    return
                entry = self._heap[0]
                wait = entry[0] - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                try:
                    again = entry[2]()
                except Exception:
                    LOG.exception('Deadline action %r failed', entry[2])
                    again = False
                if again:
                    entry[0] = self._clock() + self.AGAIN
                    heapq.heappush(self._heap, entry)
                else:
                    entry[2] = None
                    self._armed -= 1


_WATCHDOG = Watchdog()


class _Cut:
    """Ends a transfer at its deadline: shuts its connection's socket down.

    Called by the :class:`Watchdog` at the deadline, then every
    :data:`Watchdog.AGAIN` seconds until the transfer ends, so that a
    connection opened after the deadline (a retry) is cut too. The socket
    is held through a ``makefile`` reference while it is shut down, so that
    a concurrent ``close`` in the requesting thread cannot release its
    descriptor (and let it be reused) in between.
    """

    def __init__(self, conns: typing.Dict[str, typing.Any], url: str) -> None:
        self.conns = conns
        self.url = url
        self.fired = False

    def __call__(self) -> bool:
        self.fired = True
        sock = getattr(self.conns.get(self.url), 'sock', None)
        if sock is not None:
            hold = sock.makefile('rb', buffering=0)
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # closed or not connected: nothing to cut
            finally:
                hold.close()
        return True


class _Response:
    """A peer's answer: its status and head; the body is read from it.

    Our peers speak only this protocol's HTTP/1.1: no chunked bodies, no
    informational answers. Parsed here rather than by ``http.client``,
    whose per-response header parsing (the ``email`` package) cost more
    CPU than the rest of a chunk's request.
    """

    __slots__ = ('status', 'headers', 'left', 'keep_alive', '_reader')

    def __init__(self, reader: typing.Any) -> None:
        self._reader = reader
        line = reader.readline(protocol.MAX_REQUEST_LINE + 1)
        if not line:
            raise http.client.RemoteDisconnected('peer closed the '
                                                 'connection')
        try:
            parts = line.decode('ascii').split(None, 2)
            version, status = parts[0], int(parts[1])
            if (version not in ('HTTP/1.1', 'HTTP/1.0') or
                    not 100 <= status <= 599 or not line.endswith(b'\n')):
                raise ValueError(version)
            headers = protocol.read_headers(reader.readline)
            length = int(headers.get('content-length', ''))
        except (ValueError, IndexError, UnicodeDecodeError,
                protocol.ProtocolError) as e:
            raise http.client.HTTPException(
                'malformed answer: %r (%s)' % (line[:80], e))
        if length < 0 or 'transfer-encoding' in headers:
            raise http.client.HTTPException('unsupported body framing')
        self.status = status
        self.headers = headers
        self.left = length
        self.keep_alive = (version == 'HTTP/1.1' and headers.get(
            'connection', '').lower() != 'close')

    def getheader(self, name: str) -> typing.Optional[str]:
        return self.headers.get(name.lower())

    def readinto(self, view: memoryview) -> int:
        """Body bytes into ``view`` (never beyond the body); 0 at its end."""
        if not self.left:
            return 0
        n: int = self._reader.readinto(view[:self.left])
        self.left -= n
        return n

    def read(self) -> bytes:
        """The rest of the body."""
        data = bytearray(self.left)
        view = memoryview(data)
        done = 0
        while done < len(data):
            n = self.readinto(view[done:])
            if not n:
                break
            done += n
        return bytes(data[:done])


class _Reader:
    """What a connection received: heads by the line, bodies in big reads.

    In place of ``socket.makefile('rb')``: bytes beyond a head wait in a
    small buffer; a body is read straight into the caller's buffer, each
    read of the socket waiting until ``lowat`` bytes are there, or fewer
    when the caller asks for fewer. Every byte a caller asks for is one the
    peer is yet to send (what was buffered is handed out first), so the
    wait always ends: with those bytes, the end of the connection, or the
    socket's timeout. ``lowat`` is 1 over TLS, where bytes the TLS layer
    already took from the socket would be missing from the count.
    """

    __slots__ = ('_sock', '_buffer', '_lowat', '_mark')

    def __init__(self, sock: typing.Any, lowat: int) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._lowat = max(1, lowat)
        self._mark = 1  # the socket's SO_RCVLOWAT (the kernel's default)

    def _wait_for(self, count: int) -> None:
        count = max(1, min(count, self._lowat))
        if count != self._mark:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT,
                                  count)
            self._mark = count

    def _take(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def readline(self, limit: int) -> bytes:
        """A line with its end; at most ``limit`` bytes; b'' at the end."""
        buffer = self._buffer
        searched = 0
        while True:
            end = buffer.find(b'\n', searched, limit)
            if end >= 0:
                return self._take(end + 1)
            if len(buffer) >= limit:
                return self._take(limit)
            searched = len(buffer)
            self._wait_for(1)
            data = self._sock.recv(HEAD_READ)
            if not data:
                return self._take(len(buffer))
            buffer += data

    def readinto(self, view: memoryview) -> int:
        """Bytes into ``view``: what is buffered, else one read; 0 at the end.

        A read returns at least ``min(len(view), lowat)`` bytes unless the
        connection ends.
        """
        if not view:
            return 0
        buffer = self._buffer
        if buffer:
            count = min(len(view), len(buffer))
            view[:count] = buffer[:count]
            del buffer[:count]
            return count
        self._wait_for(len(view))
        received: int = self._sock.recv_into(view)
        return received

    def close(self) -> None:
        self._buffer = bytearray()


class _Connection:
    """A kept-alive connection to one peer (``sock`` once connected)."""

    __slots__ = ('sock', 'reader', 'netloc', 'reusable')

    def __init__(self, netloc: str) -> None:
        self.netloc = netloc
        self.sock: typing.Any = None
        self.reader: typing.Any = None
        self.reusable = True

    def close(self) -> None:
        reader, sock, self.reader, self.sock = (self.reader, self.sock,
                                                None, None)
        if reader is not None:
            reader.close()
        if sock is not None:
            sock.close()


class PeerClient:
    """Signed requests to peer nodes.

    One keep-alive connection per peer and thread. Every request has a
    deadline for its whole answer, head and body: :meth:`time_limit`,
    ``timeout`` seconds plus the bytes expected at :attr:`min_rate`
    (``timeout`` also bounds each silent wait on the socket). A peer
    that has not answered in full by then is cut off. Connections go only
    to addresses :attr:`policy` allows. With ``tls_context``
    (:func:`thunder_cache.peer.tls.client_context`) peers are reached over TLS
    (``https://`` URLs), their certificates checked against the
    deployment's CA and the host of their URL.
    """

    #: The :class:`~thunder_cache.peer.peerpolicy.AddressPolicy` every peer
    #: address is checked against before anything is sent to it; None
    #: refuses every peer.
    policy: typing.Optional[peerpolicy.AddressPolicy] = None
    #: Bytes per second an answer must average beyond its first
    #: ``timeout`` seconds.
    min_rate = 1024 * 1024

    def __init__(self, signer: protocol.Signer, timeout: float = 10.0,
                 tls_context: typing.Optional[ssl.SSLContext] = None
                 ) -> None:
        self.signer = signer
        self.timeout = timeout
        self.tls_context = tls_context
        self._local = threading.local()

    def _connection(self, url: str) -> _Connection:
        conns = getattr(self._local, 'conns', None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(url)
        if conn is not None and not conn.reusable:
            self._drop(url)
            conn = None
        if conn is None:
            scheme, _host, _port = protocol.split_url(url)
            if (scheme == 'https') != (self.tls_context is not None):
                raise PeerError('peer %s: this node speaks %s to its peers'
                                % (url, 'TLS' if self.tls_context else
                                   'plain HTTP'))
            conn = conns[url] = _Connection(url.split('://', 1)[1])
        return conn

    def _connect(self, url: str, conn: _Connection) -> None:
        """Connect ``conn`` (through TLS if this node speaks it)."""
        sock = self._open(url, None, self.timeout)
        if self.tls_context is not None:
            try:
                sock = self.tls_context.wrap_socket(
                    sock, server_hostname=split_url(url)[0])
            except BaseException:
                sock.close()
                raise
        conn.sock = sock
        # A read waits for no more than the slowest allowed peer sends in
        # half the time a silent socket is given.
        lowat = (1 if self.tls_context is not None else
                 min(RECV_LOWAT, int(self.min_rate * self.timeout / 2)))
        conn.reader = _Reader(sock, lowat)

    def _drop(self, url: str) -> None:
        conns = getattr(self._local, 'conns', {})
        conn = conns.pop(url, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connections."""
        for url in list(getattr(self._local, 'conns', {})):
            self._drop(url)

    # -- where requests may go ---------------------------------------------

    def permits(self, url: str) -> bool:
        """True if requests may be sent to ``url`` (refusals are logged)."""
        if self.policy is None:
            return False
        return self.policy.permits(split_url(url)[0], url)

    def _open(self, url: str, _address: typing.Any, timeout: float,
              source_address: typing.Any = None) -> socket.socket:
        """Connect to ``url``'s checked address.

        The host is never resolved again here: the policy's checked
        address is what the connection goes to.
        """
        if self.policy is None:
            raise peerpolicy.PeerRefused('no peer address policy is set')
        transfer = getattr(self._local, 'transfer', None)
        if transfer is not None:
            left = transfer.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout('deadline passed before connecting')
            timeout = min(timeout, left)
        host, port = split_url(url)
        address = self.policy.address(host)
        return socket.create_connection((address, port), timeout,
                                        source_address)

    # -- deadlines ---------------------------------------------------------

    def time_limit(self, length: int) -> float:
        """Seconds a request answered with ``length`` bytes may take."""
        return self.timeout + length / self.min_rate

    def _deadline(self, url: str, deadline: float) -> '_Transfer':
        """A context cutting the transfer with ``url`` off at ``deadline``.

        ``deadline`` is a ``time.monotonic()`` time. A transfer cut off
        raises :class:`PeerError`, and its connection is dropped.
        """
        return _Transfer(self, url, deadline)

    # -- requests ----------------------------------------------------------

    def _request(self, url: str, path: str, via: typing.Sequence[str],
                 ticket: typing.Optional[str] = None,
                 looped: bool = False) -> _Response:
        for attempt in (0, 1):
            # A token per attempt: servers accept each token once, and it
            # is valid only for the node it is sent to.
            headers = self.signer.headers('GET', path, via, ticket,
                                          destination=url)
            if looped:
                headers['X-Thunder-Looped'] = '1'
            conn = self._connection(url)
            head = ''.join(['GET %s HTTP/1.1\r\nHost: %s\r\n' % (
                path, conn.netloc)] + ['%s: %s\r\n' % item
                                       for item in headers.items()] +
                ['\r\n']).encode('ascii')
            try:
                if conn.sock is None:
                    self._connect(url, conn)
                conn.sock.sendall(head)
                response = _Response(conn.reader)
                conn.reusable = response.keep_alive
                return response
            except (http.client.RemoteDisconnected,
                    ConnectionResetError, BrokenPipeError) as e:
                # A kept-alive connection the peer closed meanwhile: one
                # retry on a fresh connection.
                self._drop(url)
                if attempt:
                    raise PeerError('peer %s: %s' % (url, e))
            except (OSError, http.client.HTTPException) as e:
                self._drop(url)
                raise PeerError('peer %s: %s' % (url, e))
        raise AssertionError('not reached')

    def _read(self, url: str, response: _Response, length: int,
              sink: typing.Any = None) -> bytearray:
        """Read exactly ``length`` bytes of body; never more.

        ``sink``, a :class:`thunder_cache.cache.chunkstream.ChunkStream`,
        gets the bytes as they arrive (its buffer is read into).
        """
        buf = bytearray(length) if sink is None else sink.begin()
        view = memoryview(buf)
        done = published = 0
        try:
            while done < length:
                n = response.readinto(view[done:])
                if not n:
                    break
                done += n
                if sink is not None and (done - published >= STREAM_SLICE
                                         or done == length):
                    sink.advance(done)
                    published = done
        except (OSError, http.client.HTTPException) as e:
            self._drop(url)
            raise PeerError('peer %s: %s' % (url, e))
        if done != length:
            self._drop(url)
            raise PeerError('peer %s closed after %d of %d bytes'
                            % (url, done, length))
        return buf

    def _body(self, url: str, response: _Response, length: int,
              sink: typing.Any = None) -> bytearray:
        """The body, which must be exactly ``length`` bytes."""
        declared = response.getheader('Content-Length')
        if declared != str(length):
            self._drop(url)
            raise PeerError('peer %s announced %r bytes, expected %d'
                            % (url, declared, length))
        return self._read(url, response, length, sink)

    def _error(self, url: str,
               response: _Response) -> PeerError:
        declared = response.getheader('Content-Length') or ''
        message = ''
        if declared.isdigit() and int(declared) <= MAX_ERROR_BODY:
            try:
                message = response.read().decode('ascii', 'replace')
            except (OSError, http.client.HTTPException):
                self._drop(url)
        else:
            self._drop(url)
        status = response.status
        return PeerError('peer %s answered %d %s' % (url, status,
                                                     message.strip()[:200]),
                         status=status, soft=status in (503, 508))

    def get_chunk(self, url: str, image_id: str, index: int, length: int,
                  via: typing.Sequence[str] = (),
                  ticket: typing.Optional[str] = None,
                  deadline: typing.Optional[float] = None,
                  sink: typing.Any = None,
                  looped: bool = False) -> bytearray:
        """The bytes of a chunk (unverified: the caller verifies).

        :param deadline: ``time.monotonic()`` time by which the answer
            must be complete; by default :meth:`time_limit` from now.
        :param sink: a :class:`thunder_cache.cache.chunkstream.ChunkStream`
            the body is read into as it arrives.
        :param looped: ask to be served beyond the peer's fan-out: the
            last redirects went round a cycle of full nodes.
        :raises Redirect: on a 307 to another node.
        :raises PeerError: on anything else.
        """
        if deadline is None:
            deadline = time.monotonic() + self.time_limit(length)
        path = protocol.chunk_path(image_id, index)
        with self._deadline(url, deadline):
            try:
                response = self._request(url, path, via, ticket, looped)
                if response.status == 200:
                    return self._body(url, response, length, sink)
                if response.status == 307:
                    location = response.getheader('Location') or ''
                    self._error(url, response)  # drain the (empty) body
                    return self._redirect(url, location, path)
                raise self._error(url, response)
            except PeerError:
                raise
            except (OSError, http.client.HTTPException) as e:
                self._drop(url)
                raise PeerError('peer %s: %s' % (url, e))

    def _redirect(self, url: str, location: str,
                  path: str) -> typing.NoReturn:
        if not location.endswith(path):
            raise PeerError('peer %s redirected to another resource: %r'
                            % (url, location[:200]))
        try:
            target = protocol.normalize_url(location[:-len(path)])
        except ValueError as e:
            raise PeerError('peer %s sent a bad redirect: %s' % (url, e))
        if not self.permits(target):
            raise PeerError('peer %s redirected to %s, outside the allowed '
                            'peer addresses' % (url, target))
        raise Redirect(target)

    def get_manifest(self, url: str, image_id: str, expected_digest: str,
                     length: typing.Optional[int] = None,
                     offset: typing.Optional[int] = None
                     ) -> manifest_mod.Manifest:
        """The image's manifest from a peer, verified against the digest.

        :param length: the manifest's length, if known; else it is bounded
            by :func:`manifest_limit` of ``offset``.
        :param offset: where the manifest starts in the image-volume.
        """
        limit = manifest_limit(length, offset)
        path = protocol.manifest_path(image_id)
        deadline = time.monotonic() + self.time_limit(limit)
        with self._deadline(url, deadline):
            response = self._request(url, path, ())
            if response.status != 200:
                raise self._error(url, response)
            declared = response.getheader('Content-Length') or ''
            if (not declared.isdigit() or int(declared) > limit or
                    int(declared) < manifest_mod.HEADER_SIZE or
                    (length is not None and int(declared) != length)):
                self._drop(url)
                raise PeerError('peer %s sent a manifest of %r bytes; at '
                                'most %d expected' % (url, declared[:20],
                                                      limit))
            data = self._manifest_body(url, response, int(declared))
        try:
            return manifest_mod.load_verified(bytes(data), expected_digest)
        except ValueError as e:
            raise ManifestError('manifest from peer %s: %s' % (url, e))

    def _manifest_body(self, url: str, response: _Response,
                       declared: int) -> bytearray:
        """A manifest body, header first (it must agree with ``declared``).

        The rest is kept only as it arrives.
        """
        data = self._read(url, response, manifest_mod.HEADER_SIZE)
        try:
            _c, _s, length = manifest_mod.Manifest.parse_header(bytes(data))
        except ValueError as e:
            self._drop(url)
            raise ManifestError('manifest from peer %s: %s' % (url, e))
        if length != declared:
            self._drop(url)
            raise ManifestError('manifest from peer %s: its header says %d '
                                'bytes, the peer announced %d'
                                % (url, length, declared))
        while len(data) < length:
            data += self._read(url, response,
                               min(MANIFEST_PIECE, length - len(data)))
        return data


class _Transfer:
    """:meth:`PeerClient._deadline`'s context."""

    def __init__(self, client: PeerClient, url: str,
                 deadline: float) -> None:
        self.client = client
        self.url = url
        self.deadline = deadline
        self.cut: typing.Optional[_Cut] = None
        self.entry: typing.Optional[typing.List[typing.Any]] = None

    def __enter__(self) -> '_Transfer':
        local = self.client._local
        if time.monotonic() >= self.deadline:
            raise PeerError('peer %s: deadline passed before the request'
                            % self.url)
        conns = getattr(local, 'conns', None)
        if conns is None:
            conns = local.conns = {}
        self.cut = _Cut(conns, self.url)
        local.transfer = self
        self.entry = _WATCHDOG.arm(self.deadline, self.cut)
        return self

    def __exit__(self, kind: typing.Any, error: typing.Any,
                 _tb: typing.Any) -> typing.Literal[False]:
        assert self.entry is not None and self.cut is not None
        _WATCHDOG.disarm(self.entry)
        self.client._local.transfer = None
        if self.cut.fired:
            timed_out = isinstance(error, (OSError,
                                           http.client.HTTPException))
        else:
            # A silent wait bounded by the per-recv timeout may end just
            # before the watchdog cuts the socket: past the deadline, it
            # is the deadline that ended the transfer.
            timed_out = (time.monotonic() >= self.deadline and
                         isinstance(error, OSError) and
                         not getattr(error, 'soft', False))
            if not timed_out:
                return False
        self.client._drop(self.url)
        if timed_out:
            client = self.client
            raise PeerError('peer %s: no complete answer by the deadline '
                            '(%g s, and the expected bytes at %g MiB/s)'
                            % (self.url, client.timeout,
                               client.min_rate / 1048576.0)) from None
        return False


class PeerSource:
    """One peer as a chunk source; follows redirects to a node's children.

    ``url`` is the node currently asked. After redirects it is the child
    the full nodes sent us to; if that child serves the chunk, the
    upstream adopts it as our parent (``redirected`` tells it to) for
    ``stripe``, the stripe of the chunk asked. The redirects and the final
    answer share one deadline. Redirects that come back to a node already
    asked (full nodes whose children lead back to each other, as child
    tables of different ages can) end with the first node asked once
    more, told so (``X-Thunder-Looped``): it serves beyond its fan-out.
    """

    kind = 'peer'
    #: read_chunk takes a ``sink`` (see :class:`ChunkSource`).
    streams = True

    def __init__(self, upstream: typing.Any, url: str,
                 stripe: int = 0) -> None:
        self.upstream = upstream
        self.url = url
        self.stripe = stripe
        self.redirected = False

    @property
    def name(self) -> str:
        return 'peer:%s' % self.url

    def time_limit(self, length: int) -> float:
        limit: float = self.upstream.client.time_limit(length)
        return limit

    def read_chunk(self, index: int, offset: int, length: int,
                   via: typing.Sequence[str] = (),
                   ticket: typing.Optional[str] = None,
                   sink: typing.Any = None) -> Data:
        """The chunk from this peer (or the nodes it redirects to).

        A soft error (busy, loop) is one only when it came quickly: one
        that took more than half of ``fetch_timeout`` costs the reader as
        much as a failure, and counts as one (so that the peer is backed
        off, rather than asked again for every chunk).
        """
        started = time.monotonic()
        try:
            return self._read_chunk(index, length, via, ticket, sink)
        except PeerError as e:
            took = time.monotonic() - started
            if e.soft and took > self.upstream.client.timeout / 2:
                raise PeerError('%s (after %.1f s)' % (e, took), e.status)
            raise

    def _read_chunk(self, index: int, length: int, via: typing.Sequence[str],
                    ticket: typing.Optional[str], sink: typing.Any) -> Data:
        upstream = self.upstream
        first = self.url
        seen = {self.url}
        deadline = time.monotonic() + self.time_limit(length)
        looped = False
        followed = 0
        while True:
            try:
                return upstream.client.get_chunk(
                    self.url, upstream.image_id, index, length, via, ticket,
                    deadline=deadline, sink=sink, looped=looped)
            except Redirect as r:
                if (r.url in seen or r.url in via or
                        r.url == upstream.self_url):
                    self.url, self.redirected = first, False
                    if not looped:
                        # Every node of the cycle is full: the first one
                        # serves us anyway once told.
                        LOG.debug('Image %s: redirected round a cycle of '
                                  'full nodes from %s; asking it again',
                                  upstream.image_id, first)
                        looped = True
                        continue
                    # A node that ignores the request (an older release):
                    # try other sources for this chunk, without holding it
                    # against them.
                    raise PeerError('peer %s redirected in a loop to %s'
                                    % (first, r.url), soft=True)
                if upstream.backed_off(r.url):
                    self.url, self.redirected = first, False
                    raise PeerError('peer %s redirected to %s, which failed '
                                    'lately' % (first, r.url), soft=True)
                if followed == upstream.max_redirects:
                    break
                seen.add(r.url)
                LOG.debug('Image %s: %s redirected us to %s',
                          upstream.image_id, self.url, r.url)
                self.url = r.url
                self.redirected = True
                followed += 1
        self.url, self.redirected = first, False
        raise PeerError('more than %d redirects from %s'
                        % (upstream.max_redirects, first), soft=True)


# -- local readers ---------------------------------------------------------
