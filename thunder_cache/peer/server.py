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

"""The peer server: a connection is authenticated before it costs a thread.

Requests are parsed by :mod:`thunder_cache.peer.protocol`, authenticated, and
answered by :class:`thunder_cache.cache.node.Node`. A connection goes through
two stages:

unauthenticated
    One thread, the *reactor*, accepts connections and reads their request
    heads without blocking (the TLS handshake too). A new connection must
    finish its handshake and its first request head within
    ``head_timeout`` of being accepted, and holds one of
    ``max_unauthenticated`` slots meanwhile: a socket and at most
    :data:`~thunder_cache.peer.protocol.MAX_HEAD_BYTES` of buffer, no thread.
    When they are all taken the oldest is closed for the newcomer. An
    address holds at most ``max_per_address`` connections: beyond, its
    oldest unauthenticated one is closed for the newcomer, or if all of
    them are authenticated the newcomer is (at accept). The reactor
    answers refusals (400, 401, ...) and unauthenticated ``GET /metrics``
    itself, and closes the connection after them.
authenticated
    A request with a valid token moves its connection to a thread of its
    own, one of ``max_connections`` (beyond: 503). The thread serves that
    request and the following ones of the keep-alive connection, each
    authenticated in turn; ``idle_timeout`` bounds the silence between
    requests and ``head_timeout`` each head from its first byte.

Whoever does not hold the shared secret so costs the node a socket for at
most ``head_timeout`` and never a thread, and cannot take the slots of the
peers that do hold it. Local readers (:class:`LocalServer`, a Unix socket
trusted by its file mode) skip the first stage.

Chunk bytes go from the cache file to the socket with ``sendfile`` (no copy
through Python), or through TLS in slices read with ``pread``; both paced
by the node's upload token bucket when a rate is set.

A connection thread of plain HTTP (or of the Unix socket) keeps its socket
blocking, its waits bounded by the kernel (``SO_RCVTIMEO``,
``SO_SNDTIMEO``): a chunk costs a ``recv``, a ``send`` and one
``sendfile`` of the whole chunk, with no ``poll`` and no switch of the
socket's mode between them. Every thread that leaves the interpreter lock
for a system call takes it back when the call returns, so with many
connections each call saved is a handover of the lock saved too.
"""

import collections
import errno
import logging
import os
import select
import selectors
import socket
import ssl
import stat
import struct
import threading
import time
import typing

from thunder_cache.peer import protocol
from thunder_cache.peer import reply as reply_mod

LOG = logging.getLogger(__name__)

# Bytes sent per sendfile call when the upload rate is limited, and per
# send through TLS.
RATE_SLICE = 256 * 1024
# Connections accepted in a row before the reactor looks at the others.
ACCEPT_BATCH = 64
# Seconds the reactor stops accepting when the process is out of file
# descriptors.
ACCEPT_PAUSE = 0.1
LISTEN_BACKLOG = 512
# Seconds between two log lines about refused requests (the metrics count
# them all): a flood of bad requests must not flood the log.
LOG_INTERVAL = 10.0
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_REFUSED = protocol.response_head(503, [('Connection', 'close')])
_slice_buffers = threading.local()
_pollers = threading.local()


class _Unlimited:
    rate = 0


_UNLIMITED = _Unlimited()


def _set_wait(sock: typing.Any, option: int, seconds: float) -> None:
    """Bound each blocking wait of ``sock`` (``SO_RCVTIMEO``/``SNDTIMEO``).

    At least a millisecond: the kernel reads a zero as no bound at all.
    """
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack(
        'll', whole, int((seconds - whole) * 1e6)))


def _writable(fd: int, timeout: typing.Optional[float]) -> bool:
    """Wait until socket ``fd`` takes more bytes; False after ``timeout``.

    One poll object per thread, reused.
    """
    poller = getattr(_pollers, 'poller', None)
    if poller is None:
        poller = _pollers.poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return bool(poller.poll(None if timeout is None else
                                max(0, int(timeout * 1000))))
    finally:
        poller.unregister(fd)


class Slots:
    """Connection accounting: unauthenticated, authenticated, per address.

    Every connection counts for its address from accept to close, first as
    unauthenticated, then (:meth:`promote`) as authenticated. Thread-safe.

    :param max_per_address: connections one address may hold, or None
        for no limit.
    """

    def __init__(self, max_authenticated: int, max_unauthenticated: int,
                 max_per_address: typing.Optional[int] = None) -> None:
        self.max_authenticated = max_authenticated
        self.max_unauthenticated = max_unauthenticated
        self.max_per_address = max_per_address
        self.authenticated = 0
        self.unauthenticated = 0
        self._per_address: typing.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def open(self, address: typing.Any) -> bool:
        """Count a new connection; False if its address is at its limit."""
        with self._lock:
            if (self.max_per_address is not None and
                    self._per_address[address] >= self.max_per_address):
                return False
            self._per_address[address] += 1
            self.unauthenticated += 1
            return True

    def unauthenticated_full(self) -> bool:
        """True if the unauthenticated connections are over their limit."""
        return self.unauthenticated > self.max_unauthenticated

    def promote(self) -> bool:
        """Make an unauthenticated connection authenticated.

        :returns: False (and changes nothing) if the authenticated slots
            are all taken.
        """
        with self._lock:
            if self.authenticated >= self.max_authenticated:
                return False
            self.authenticated += 1
            self.unauthenticated -= 1
            return True

    def close(self, address: typing.Any, authenticated: bool) -> None:
        with self._lock:
            if authenticated:
                self.authenticated -= 1
            else:
                self.unauthenticated -= 1
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    def of_address(self, address: typing.Any) -> int:
        with self._lock:
            return self._per_address.get(address, 0)


class _Conn:
    """One accepted connection."""

    __slots__ = ('sock', 'address', 'buffer', 'deadline', 'state', 'out',
                 'events', 'wait')

    def __init__(self, sock: typing.Any, address: typing.Any) -> None:
        self.sock = sock
        self.address = address
        self.buffer = protocol.HeadBuffer()
        self.deadline = 0.0
        # handshake, head, write (reactor); served (a thread); closed
        self.state = 'head'
        self.out: typing.Optional[memoryview] = None
        self.events = selectors.EVENT_READ
        # Served by a thread, blocking: the SO_RCVTIMEO it has (seconds);
        # None while Python's timeouts bound its waits (TLS, the reactor).
        self.wait: typing.Optional[float] = None


class _Request:
    """An admitted request: its route, headers, peer and keep-alive."""

    __slots__ = ('route', 'headers', 'peer', 'keep_alive')

    def __init__(self, route: protocol.Route, headers: typing.Dict[str, str],
                 peer: typing.Optional[protocol.Peer], keep_alive: bool
                 ) -> None:
        self.route = route
        self.headers = headers
        self.peer = peer
        self.keep_alive = keep_alive


#: What :meth:`_Serving._admit_request` makes of a head: the request to
#: serve, or the reply to send at once and whether to keep the connection.
_Admitted = typing.Tuple[typing.Optional[_Request],
                         typing.Optional[reply_mod.Reply],
                         typing.Optional[bool]]


class _LogLimiter:
    """At most one line per interval and key; counts what it holds back."""

    def __init__(self, interval: float = LOG_INTERVAL,
                 clock: typing.Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next: typing.Dict[str, float] = {}
        self._held: typing.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, level: int, key: str, message: str, *args: typing.Any
                 ) -> None:
        now = self._clock()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._held[key] += 1
                return
            self._next[key] = now + self.interval
            held = self._held.pop(key, 0)
        if held:
            message += ' (and %d more like it)' % held
        LOG.log(level, message, *args)


class _Serving:
    """The reactor, the connection threads and the answers (a base)."""

    local = False

    def _setup(self, listener: socket.socket, node: typing.Any,
               secret: typing.Optional[bytes], idle_timeout: float,
               head_timeout: float, max_connections: int,
               max_unauthenticated: int, max_per_address: typing.Optional[int],
               metrics_auth: bool, clock: typing.Callable[[], float],
               tls_context: typing.Optional[ssl.SSLContext] = None,
               replay_cache_size: typing.Optional[int] = None,
               accept_v1_tokens: bool = False) -> None:
        self.node = node
        self.secret = secret
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.metrics_auth = metrics_auth
        self.clock = clock
        self.tls_context = tls_context
        self.replays = (protocol.ReplayCache(replay_cache_size)
                        if replay_cache_size else None)
        self.accept_v1_tokens = accept_v1_tokens
        self.stopping = False
        self.slots = Slots(max_connections, max_unauthenticated,
                           max_per_address)
        self.socket = listener
        self.server_address = listener.getsockname()
        listener.setblocking(False)
        # Reactor thread only: unauthenticated connections, oldest
        # deadline first (they all get the same head_timeout).
        self._pending: typing.OrderedDict[_Conn, None] = (
            collections.OrderedDict())
        # The same, by address: {address: OrderedDict}, oldest first.
        self._pending_of: typing.Dict[
            str, typing.OrderedDict[_Conn, None]] = {}
        # Connections served by threads.
        self._served: typing.Set[_Conn] = set()
        self._served_lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, 'wake')
        self._shutdown_request = False
        self._closed = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._accept_paused_until: typing.Optional[float] = None
        self._log = _LogLimiter()

    # -- the reactor ----------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and read heads until :meth:`shutdown`."""
        if self._shutdown_request:
            return
        self._stopped.clear()
        try:
            while not self._shutdown_request:
                for key, _mask in self._selector.select(
                        self._select_timeout(poll_interval)):
                    if key.data is None:
                        self._accept()
                    elif key.data == 'wake':
                        self._drain_wake()
                    else:
                        self._step(key.data)
                self._expire()
        finally:
            self._stopped.set()

    def _select_timeout(self, poll_interval: float) -> float:
        timeout = poll_interval
        now = time.monotonic()
        if self._pending:
            first = next(iter(self._pending))
            timeout = min(timeout, first.deadline - now)
        if self._accept_paused_until is not None:
            timeout = min(timeout, self._accept_paused_until - now)
        return max(0.0, timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b'x')
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def shutdown(self) -> None:
        """Stop the reactor; wait until :meth:`serve_forever` returned."""
        self._shutdown_request = True
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket and the unauthenticated connections."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._pending):
            self._close(conn)
        for sock in (self.socket, self._wake_r, self._wake_w):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._selector.close()

    def _count(self, name: str) -> None:
        if self.node is not None:
            self.node.counters.inc(name)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    self._log(logging.WARNING, 'fds', 'Peer server: cannot '
                              'accept connections (%s); closing the oldest '
                              'unauthenticated one and pausing', e)
                    if self._pending:
                        self._drop(next(iter(self._pending)),
                                   'out of file descriptors')
                    self._pause_accept()
                return
            self._admit(sock, address)

    def _pause_accept(self) -> None:
        self._selector.unregister(self.socket)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    @staticmethod
    def _address_of(address: typing.Any) -> str:
        return address[0] if isinstance(address, tuple) else 'local'

    def _admit(self, sock: typing.Any, address: typing.Any) -> None:
        host = self._address_of(address)
        if not self.slots.open(host):
            # The oldest unauthenticated connection of the address makes
            # room: half-sent heads cannot lock out a peer that shares
            # their address.
            oldest = self._pending_of.get(host)
            if oldest:
                self._drop(next(iter(oldest)), '%s holds %s connections'
                           % (host, self.slots.max_per_address))
            if not oldest or not self.slots.open(host):
                self._count('connections_dropped')
                self._log(logging.WARNING, 'address', 'Peer server: %s '
                          'holds %d authenticated connections already; '
                          'closing a new one', host,
                          self.slots.max_per_address)
                self._refuse(sock)
                return
        conn = _Conn(sock, host)
        if self.local:
            if not self.slots.promote():
                self.slots.close(host, False)
                self._refuse(sock)
                return
            self._start_thread(conn, None)
            return
        if self.slots.unauthenticated_full() and self._pending:
            self._drop(next(iter(self._pending)), '%d unauthenticated '
                       'connections' % self.slots.max_unauthenticated)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                conn.sock = self.tls_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False)
                conn.state = 'handshake'
        except OSError as e:
            LOG.debug('Connection from %s lost at accept: %s', host, e)
            sock.close()
            self.slots.close(host, False)
            return
        conn.deadline = time.monotonic() + self.head_timeout
        self._pending[conn] = None
        self._pending_of.setdefault(host, collections.OrderedDict())[
            conn] = None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _refuse(self, sock: typing.Any) -> None:
        """Close a connection beyond the limits, with a 503 if cheap."""
        if self.tls_context is None:
            try:
                sock.send(_REFUSED, socket.MSG_DONTWAIT)
                # What the client sent already, read, so that the close is
                # not a reset that would discard the 503.
                sock.recv(protocol.MAX_HEAD_BYTES, socket.MSG_DONTWAIT)
            except OSError:
                pass
        sock.close()

    def _drop(self, conn: _Conn, why: str) -> None:
        """Close an unauthenticated connection for a newcomer."""
        self._count('connections_dropped')
        self._log(logging.WARNING, 'drop', 'Peer server: %s; closing the '
                  'oldest unauthenticated one (from %s)', why, conn.address)
        self._close(conn)

    def _unpend(self, conn: _Conn) -> None:
        """Forget an unauthenticated connection (closed, or promoted)."""
        self._pending.pop(conn, None)
        of_address = self._pending_of.get(conn.address)
        if of_address is not None:
            of_address.pop(conn, None)
            if not of_address:
                del self._pending_of[conn.address]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            conn = next(iter(self._pending))
            if conn.deadline > now:
                break
            self._count('head_timeouts')
            LOG.debug('Closing a connection from %s: no complete request '
                      'within %s s', conn.address, self.head_timeout)
            self._close(conn)
        if (self._accept_paused_until is not None and
                now >= self._accept_paused_until):
            self._accept_paused_until = None
            self._selector.register(self.socket, selectors.EVENT_READ, None)

    def _close(self, conn: _Conn) -> None:
        """Close a connection of the reactor (not one a thread serves)."""
        if conn.state in ('closed', 'served'):
            return
        conn.state = 'closed'
        self._unpend(conn)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.slots.close(conn.address, False)

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.state in ('closed', 'served'):
            return
        if conn.events != events:
            self._selector.modify(conn.sock, events, conn)
            conn.events = events

    def _step(self, conn: _Conn) -> None:
        """Advance a connection of the reactor as far as it goes."""
        if conn.state in ('closed', 'served'):
            return
        try:
            if conn.state == 'handshake':
                try:
                    conn.sock.do_handshake()
                except ssl.SSLError as e:
                    if isinstance(e, (ssl.SSLWantReadError,
                                      ssl.SSLWantWriteError)):
                        raise
                    self._count('tls_handshake_failures')
                    LOG.debug('TLS handshake with %s failed: %s',
                              conn.address, e)
                    self._close(conn)
                    return
                conn.state = 'head'
                self._want(conn, selectors.EVENT_READ)
            if conn.state == 'head':
                self._receive(conn)
            elif conn.state == 'write':
                self._flush(conn)
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
        except (BlockingIOError, InterruptedError):
            self._want(conn, selectors.EVENT_WRITE if conn.state == 'write'
                       else selectors.EVENT_READ)
        except OSError as e:
            LOG.debug('Connection from %s lost: %s', conn.address, e)
            self._close(conn)
        except Exception:
            LOG.exception('Error on a connection from %s', conn.address)
            self._close(conn)

    def _receive(self, conn: _Conn) -> None:
        """Read what the connection sent; act on a complete head."""
        while conn.state == 'head':
            data = conn.sock.recv(min(conn.buffer.room(), 65536))
            if not data:
                self._close(conn)
                return
            conn.buffer.feed(data)
            if b'\n' not in data and conn.buffer.room():
                continue  # a head ends with a line: nothing to parse yet
            try:
                head = conn.buffer.take()
            except protocol.ProtocolError as e:
                self._queue(conn, self._refusal(e))
                return
            if head is not None:
                self._on_head(conn, head)

    def _on_head(self, conn: _Conn, head: protocol.Head) -> None:
        request, reply, _keep_alive = self._admit_request(head)
        if reply is not None:
            self._queue(conn, reply)
            return
        if not self.slots.promote():
            self._log(logging.WARNING, 'busy', 'Peer server: %d '
                      'authenticated connections; refusing one from %s',
                      self.slots.max_authenticated, conn.address)
            self._queue(conn, reply_mod.error(503, 'too many connections'))
            return
        # The connection leaves the reactor for a thread of its own.
        self._unpend(conn)
        self._selector.unregister(conn.sock)
        self._start_thread(conn, request)

    def _queue(self, conn: _Conn, reply: reply_mod.Reply) -> None:
        """Send a small reply from the reactor, then close.

        The reactor keeps no connection alive: what it answers is a
        refusal, or ``/metrics`` to a scraper without a token.
        """
        conn.out = memoryview(self._response_head(reply, False) +
                              reply.body)
        conn.state = 'write'
        conn.deadline = time.monotonic() + self.head_timeout
        self._pending.move_to_end(conn)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            sent = conn.sock.send(conn.out)
            conn.out = conn.out[sent:]
        self._close(conn)

    # -- connection threads -----------------------------------------------

    def _start_thread(self, conn: _Conn, request: typing.Optional[_Request]
                      ) -> None:
        conn.state = 'served'
        with self._served_lock:
            self._served.add(conn)
        thread = threading.Thread(target=self._serve, args=(conn, request),
                                  name='peer-connection', daemon=True)
        try:
            thread.start()
        except RuntimeError as e:
            LOG.error('Cannot start a thread for a connection from %s: %s',
                      conn.address, e)
            self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        with self._served_lock:
            self._served.discard(conn)
        try:
            conn.sock.close()
        except OSError:
            pass
        self.slots.close(conn.address, True)

    def _block(self, conn: _Conn) -> None:
        """Make a plain connection blocking, its waits bounded by the kernel.

        ``idle_timeout`` bounds each wait to send, and each wait for a
        request head until :meth:`_read_head` sets another bound.
        """
        sock = conn.sock
        sock.setblocking(True)
        _set_wait(sock, socket.SO_SNDTIMEO, self.idle_timeout)
        _set_wait(sock, socket.SO_RCVTIMEO, self.idle_timeout)
        conn.wait = self.idle_timeout

    def _serve(self, conn: _Conn, request: typing.Optional[_Request]) -> None:
        """Serve a connection's requests, ``request`` (if any) first."""
        try:
            if self.tls_context is None:
                try:
                    self._block(conn)
                except OSError as e:
                    LOG.debug('Connection from %s lost: %s', conn.address, e)
                    return
            while not self.stopping:
                reply = keep_alive = None
                if request is None:
                    try:
                        head = self._read_head(conn)
                    except protocol.ProtocolError as e:
                        self._send(conn, self._refusal(e), False)
                        return
                    if head is None:
                        return
                    request, reply, keep_alive = self._admit_request(head)
                if reply is None:
                    assert request is not None  # no reply: a request
                    reply = self._answer(request)
                    keep_alive = request.keep_alive
                keep_alive = bool(keep_alive and self._keeps_alive(reply)
                                  and not self.stopping)
                if not self._send(conn, reply, keep_alive) or not keep_alive:
                    return
                request = None
        except Exception:
            LOG.exception('Error on a connection from %s', conn.address)
        finally:
            self._finish(conn)

    def _read_head(self, conn: _Conn) -> typing.Optional[protocol.Head]:
        """The next request head; None at the end of the connection.

        ``idle_timeout`` bounds the wait for the head's first byte,
        ``head_timeout`` the whole head from there.
        """
        sock = conn.sock
        buffer = conn.buffer
        deadline = None
        while True:
            head = buffer.take()
            if head is not None:
                return head
            now = time.monotonic()
            if len(buffer) and deadline is None:
                deadline = now + self.head_timeout
            timeout = self.idle_timeout if deadline is None else (
                deadline - now)
            if timeout <= 0:
                self._count('head_timeouts')
                return None
            try:
                if conn.wait is None:
                    sock.settimeout(timeout)
                elif timeout != conn.wait:
                    # Only within a head sent in parts: a whole one
                    # waits for idle_timeout, the bound already set.
                    _set_wait(sock, socket.SO_RCVTIMEO, timeout)
                    conn.wait = timeout
                data = sock.recv(min(buffer.room(), 65536))
            except (socket.timeout, BlockingIOError):
                # BlockingIOError: a blocking socket's SO_RCVTIMEO passed.
                if deadline is not None:
                    self._count('head_timeouts')
                return None
            except OSError:
                return None  # reset, shutdown, TLS error
            if not data:
                return None
            buffer.feed(data)

    def _send(self, conn: _Conn, reply: reply_mod.Reply, keep_alive: bool
              ) -> bool:
        sock = conn.sock
        head = self._response_head(reply, keep_alive)
        try:
            if conn.wait is None:
                sock.settimeout(self.idle_timeout)
            if reply.span is None and reply.stream is None:
                sock.sendall(head + reply.body)
                return True
            length = reply.length
            # Local readers are not uploads.
            bucket = _UNLIMITED if self.local else self.node.bucket
            if self.tls_context is not None:
                sock.sendall(head)
            else:
                sock.sendall(head, 0 if self.local else socket.MSG_MORE)
            if reply.stream is not None:
                sent = self._send_stream(sock, reply.stream, bucket)
            else:
                assert reply.span is not None
                fd, offset, _length = reply.span
                send = (self._send_slices if self.tls_context is not None
                        else self._sendfile)
                sent = send(sock, fd, offset, length, bucket)
            if reply.on_sent is not None:
                reply.on_sent(sent)
            return sent == length
        except OSError as e:
            LOG.debug('Peer %s: send failed: %s', conn.address, e)
            return False
        finally:
            if reply.release is not None:
                reply.release()

    @staticmethod
    def _sendfile(sock: typing.Any, fd: int, offset: int, length: int,
                  bucket: typing.Any) -> int:
        """``os.sendfile`` on the socket; a chunk in one call if not paced.

        A blocking socket (no Python timeout) waits in the kernel, each
        wait bounded by its ``SO_SNDTIMEO``. A socket with a timeout does
        not block: a full send buffer is waited for up to that timeout
        with a reused poll object (``socket.sendfile`` builds a selector
        per call). Either way a wait that passes its bound raises
        :class:`socket.timeout`.
        """
        out = sock.fileno()
        timeout = sock.gettimeout()
        sent = 0
        while sent < length:
            step = length - sent
            if bucket.rate:
                step = min(step, RATE_SLICE)
                bucket.consume(step)
            try:
                n = os.sendfile(out, fd, offset + sent, step)
            except BlockingIOError:
                if timeout is None:
                    raise socket.timeout('send timed out')
                n = None
            if n is None:
                if not _writable(out, timeout):
                    raise socket.timeout('send timed out')
                continue
            if not n:
                break
            sent += n
        return sent

    @staticmethod
    def _send_stream(sock: typing.Any, reader: typing.Any,
                     bucket: typing.Any) -> int:
        """A chunk's bytes as its fetch receives them (cut-through).

        Returns short of the length if the fetch broke off: the caller
        then closes the connection, so the peer sees an incomplete body.
        """
        sent = 0
        while sent < reader.length:
            view = reader.next()
            if view is None:
                break
            while view:
                step = view[:RATE_SLICE] if bucket.rate else view
                if bucket.rate:
                    bucket.consume(len(step))
                sock.sendall(step)
                sent += len(step)
                view = view[len(step):]
        return sent

    @staticmethod
    def _send_slices(sock: typing.Any, fd: int, offset: int, length: int,
                     bucket: typing.Any) -> int:
        """The body through TLS (sendfile cannot encrypt), in slices."""
        buffer = getattr(_slice_buffers, 'buffer', None)
        if buffer is None:
            # One per connection thread, reused for every slice.
            buffer = _slice_buffers.buffer = memoryview(bytearray(
                RATE_SLICE))
        sent = 0
        while sent < length:
            step = min(length - sent, RATE_SLICE)
            if bucket.rate:
                bucket.consume(step)
            n = os.preadv(fd, [buffer[:step]], offset + sent)
            if not n:
                break
            sock.sendall(buffer[:n])
            sent += n
        return sent

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let current responses finish, close."""
        self.stopping = True
        self.shutdown()
        self.server_close()
        with self._served_lock:
            connections = list(self._served)
        for conn in connections:
            try:
                # Wakes idle keep-alive connections; a response being sent
                # finishes first. The plain socket's shutdown, also under
                # TLS: the thread still owns the TLS state.
                socket.socket.shutdown(conn.sock, socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._served_lock:
                if not self._served:
                    break
            time.sleep(0.02)

    # -- requests -----------------------------------------------------------

    @staticmethod
    def _keeps_alive(reply: reply_mod.Reply) -> bool:
        # A client error ends the connection: the peer is broken or
        # hostile. 503 and 508 are ordinary answers of the protocol.
        return reply.status < 400 or reply.status in (503, 508)

    def _response_head(self, reply: reply_mod.Reply, keep_alive: bool
                       ) -> bytes:
        headers = list(reply.headers)
        if not keep_alive:
            headers.append(('Connection', 'close'))
        if self.node is not None:
            self.node.responses.inc(reply.status)
        return protocol.response_head(reply.status, headers, reply.length)

    def _admit_request(self, head: protocol.Head
                       ) -> '_Admitted':
        """(request, None, None) to serve, or (None, reply, keep_alive).

        Answers at once what needs no thread: malformed requests, refused
        tokens and unauthenticated ``GET /metrics``.
        """
        _method, target, version, headers = head
        keep_alive = (version == 'HTTP/1.1' and
                      headers.get('connection', '').lower() != 'close')
        try:
            route = protocol.route(target)
            if self.local:
                peer = None
            elif route.kind == 'metrics' and not self.metrics_auth:
                return None, self._metrics(), keep_alive
            else:
                peer = self._authenticate(target, headers)
        except protocol.ProtocolError as e:
            return None, self._refusal(e, target), False
        return _Request(route, headers, peer, keep_alive), None, None

    def _authenticate(self, target: str, headers: typing.Dict[str, str]
                      ) -> protocol.Peer:
        assert self.secret is not None  # the local server authenticates none
        peer = protocol.authenticate(
            self.secret, 'GET', target, headers, clock=self.clock,
            destination=self.node.url, replays=self.replays,
            accept_v1=self.accept_v1_tokens)
        if peer.version == 1:
            self._count('v1_tokens')
        return peer

    def _refusal(self, error: protocol.ProtocolError, target: str = ''
                 ) -> reply_mod.Reply:
        """The reply to a request refused with ``error``, counted."""
        if isinstance(error, protocol.AuthError):
            self._count('auth_failures')
            if isinstance(error, protocol.ReplayError):
                self._count('replays_refused')
            self._log(logging.INFO, 'auth', 'Refused a request for %s: %s',
                      target[:100], error.reason)
            return reply_mod.Reply(401)
        if isinstance(error, protocol.ReplayWindowError):
            self._log(logging.WARNING, 'replay', 'Peer server: more tokens '
                      'than [peer] replay_cache_size within their lifetime;'
                      ' refusing the older ones (503)')
        else:
            self._count('bad_requests')
        return reply_mod.error(error.status, error.reason)

    def _answer(self, request: _Request) -> reply_mod.Reply:
        """The reply to an admitted request."""
        node = self.node
        route = request.route
        try:
            if route.kind == 'metrics':
                return self._metrics()
            if route.kind == 'manifest':
                return node.serve_manifest(request.peer, route.image_id)
            range_header = request.headers.get('range')
            if self.local:
                return node.serve_local(route.image_id, route.index,
                                        range_header)
            return node.serve_chunk(
                request.peer, route.image_id, route.index, range_header,
                looped=protocol.parse_looped(request.headers))
        except protocol.ProtocolError as e:
            return self._refusal(e)
        except Exception:
            LOG.exception('Error serving %s', route)
            return reply_mod.error(500, 'internal error')

    def _metrics(self) -> reply_mod.Reply:
        body = self.node.metrics_text().encode('utf-8')
        return reply_mod.Reply(
            200, [('Content-Type', 'text/plain; version=0.0.4')], body)


def _listen(address: typing.Any) -> socket.socket:
    family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET
    return socket.create_server(address, family=family,
                                backlog=LISTEN_BACKLOG)


class PeerServer(_Serving):
    """Serves a :class:`~thunder_cache.cache.node.Node` to its peers over TCP.

    :param tls_context: a :func:`thunder_cache.peer.tls.server_context` to
        serve over TLS, or None for plain HTTP.
    :param replay_cache_size: nonces remembered against replays (see
        :class:`~thunder_cache.peer.protocol.ReplayCache`).
    :param accept_v1_tokens: accept version 1 tokens (rolling upgrades).
    """

    def __init__(self, address: typing.Any, node: typing.Any,
                 secret: typing.Optional[bytes], idle_timeout: float = 60.0,
                 max_connections: int = 256, metrics_auth: bool = False,
                 clock: typing.Callable[[], float] = time.time,
                 head_timeout: float = 5.0, max_unauthenticated: int = 256,
                 max_per_address: typing.Optional[int] = 64,
                 tls_context: typing.Optional[ssl.SSLContext] = None,
                 replay_cache_size: typing.Optional[int] = 100000,
                 accept_v1_tokens: bool = False) -> None:
        self._setup(_listen(address), node, secret, idle_timeout,
                    head_timeout, max_connections, max_unauthenticated,
                    max_per_address, metrics_auth, clock, tls_context,
                    replay_cache_size, accept_v1_tokens)

    @property
    def port(self) -> int:
        return self.server_address[1]


class LocalServer(_Serving):
    """Serves the node's own readers on a Unix socket.

    The same requests as the peer protocol, without tokens (the socket's
    permissions decide who may read: mode 0660), without fan-out and
    without the upload rate limit. The block-device layer and the Cinder
    driver of the node read images through it.
    """

    local = True

    def __init__(self, path: str, node: typing.Any,
                 idle_timeout: float = 600.0, max_connections: int = 64,
                 mode: int = 0o660, head_timeout: float = 5.0) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, mode)
            listener.listen(LISTEN_BACKLOG)
        except OSError:
            listener.close()
            raise
        self.path = path
        self._setup(listener, node, None, idle_timeout, head_timeout,
                    max_connections, 0, None, False, time.time)

    def server_close(self) -> None:
        super().server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
