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

"""The peer server: HTTP/1.1 keep-alive connections, a thread each.

Requests are parsed by :mod:`thunder_cache.protocol`, authenticated, and
answered by :class:`thunder_cache.node.Node`. Chunk bytes go from the
cache file to the socket with ``sendfile`` (no copy through Python), in
slices paced by the node's upload token bucket when a rate is set.
"""

import logging
import os
import socket
import socketserver
import stat
import threading
import time

from thunder_cache import node as node_mod
from thunder_cache import protocol

LOG = logging.getLogger(__name__)

# Bytes sent per sendfile call when the upload rate is limited.
RATE_SLICE = 256 * 1024


class _Unlimited(object):
    rate = 0


_UNLIMITED = _Unlimited()


class _Fd(object):
    """A file descriptor as socket.sendfile wants it (no seek)."""

    __slots__ = ('_fd',)

    def __init__(self, fd):
        self._fd = fd

    def fileno(self):
        return self._fd


class _Handler(socketserver.BaseRequestHandler):

    def setup(self):
        sock = self.request
        sock.settimeout(self.server.idle_timeout)
        if not self.server.local:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = sock.makefile('rb', buffering=16384)

    def finish(self):
        self.rfile.close()

    def handle(self):
        server = self.server
        while not server.stopping:
            try:
                head = protocol.read_head(self.rfile.readline)
            except protocol.ProtocolError as e:
                server.node.counters.inc('bad_requests')
                self._send(node_mod._error(e.status, e.reason), False)
                return
            except OSError:
                return  # idle timeout, reset, shutdown
            if head is None:
                return
            _method, target, version, headers = head
            keep_alive = (version == 'HTTP/1.1' and
                          headers.get('connection', '').lower() != 'close')
            reply = server.dispatch(target, headers)
            # A client error ends the connection: the peer is broken or
            # hostile. 503 and 508 are ordinary answers of the protocol.
            if reply.status >= 400 and reply.status not in (503, 508):
                keep_alive = False
            if not self._send(reply, keep_alive and not server.stopping):
                return
            if not keep_alive:
                return

    def _send(self, reply, keep_alive):
        server = self.server
        headers = list(reply.headers)
        if not keep_alive:
            headers.append(('Connection', 'close'))
        head = protocol.response_head(reply.status, headers, reply.length)
        server.node.responses.inc(reply.status)
        sock = self.request
        try:
            if reply.span is None:
                sock.sendall(head + reply.body)
                return True
            fd, offset, length = reply.span
            sock.sendall(head, 0 if server.local else socket.MSG_MORE)
            sent = 0
            # Local readers are not uploads.
            bucket = _UNLIMITED if server.local else server.node.bucket
            source = _Fd(fd)
            while sent < length:
                step = length - sent
                if bucket.rate:
                    step = min(step, RATE_SLICE)
                    bucket.consume(step)
                n = sock.sendfile(source, offset + sent, step)
                if not n:
                    break
                sent += n
            if reply.on_sent is not None:
                reply.on_sent(sent)
            return sent == length
        except OSError as e:
            LOG.debug('Peer %s: send failed: %s', self.client_address, e)
            return False


class _Serving(object):
    """Connection accounting, graceful stop and dispatch (a mixin)."""

    daemon_threads = True
    request_queue_size = 128
    local = False

    def _setup(self, node, secret, idle_timeout, max_connections,
               metrics_auth, clock):
        self.node = node
        self.secret = secret
        self.idle_timeout = idle_timeout
        self.metrics_auth = metrics_auth
        self.clock = clock
        self.stopping = False
        self._slots = threading.BoundedSemaphore(max_connections)
        self._connections = set()
        self._conn_lock = threading.Lock()

    # -- connections --------------------------------------------------------

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(protocol.response_head(
                    503, [('Connection', 'close')]))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._conn_lock:
            self._connections.add(request)
        try:
            super().process_request(request, client_address)
        except Exception:
            self._release(request)
            raise

    def _release(self, request):
        with self._conn_lock:
            if request in self._connections:
                self._connections.discard(request)
                self._slots.release()

    def shutdown_request(self, request):
        self._release(request)
        super().shutdown_request(request)

    def stop(self, grace=5.0):
        """Stop accepting, let current responses finish, close."""
        self.stopping = True
        self.shutdown()
        self.server_close()
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                # Wakes idle keep-alive connections; a response being sent
                # finishes first.
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._conn_lock:
                if not self._connections:
                    break
            time.sleep(0.02)

    # -- requests -----------------------------------------------------------

    def dispatch(self, target, headers):
        node = self.node
        try:
            route = protocol.route(target)
        except protocol.ProtocolError as e:
            node.counters.inc('bad_requests')
            return node_mod._error(e.status, e.reason)
        if self.local:
            return self._dispatch_local(route, headers)
        if route.kind == 'metrics' and not self.metrics_auth:
            return self._metrics()
        try:
            peer = protocol.authenticate(self.secret, 'GET', target, headers,
                                         clock=self.clock)
        except protocol.AuthError as e:
            node.counters.inc('auth_failures')
            LOG.info('Refused a request for %s: %s', target[:100], e.reason)
            return node_mod.Reply(401)
        except protocol.ProtocolError as e:
            node.counters.inc('bad_requests')
            return node_mod._error(e.status, e.reason)
        try:
            if route.kind == 'metrics':
                return self._metrics()
            if route.kind == 'manifest':
                return node.serve_manifest(peer, route.image_id)
            return node.serve_chunk(peer, route.image_id, route.index,
                                    headers.get('range'))
        except protocol.ProtocolError as e:
            node.counters.inc('bad_requests')
            return node_mod._error(e.status, e.reason)
        except Exception:
            LOG.exception('Error serving %s', target)
            return node_mod._error(500, 'internal error')

    def _dispatch_local(self, route, headers):
        """Requests of local readers: trusted by file permissions."""
        node = self.node
        try:
            if route.kind == 'metrics':
                return self._metrics()
            if route.kind == 'manifest':
                return node.serve_manifest(None, route.image_id)
            return node.serve_local(route.image_id, route.index,
                                    headers.get('range'))
        except protocol.ProtocolError as e:
            node.counters.inc('bad_requests')
            return node_mod._error(e.status, e.reason)
        except Exception:
            LOG.exception('Error serving a local read of %s', route)
            return node_mod._error(500, 'internal error')

    def _metrics(self):
        body = self.node.metrics_text().encode('utf-8')
        return node_mod.Reply(
            200, [('Content-Type', 'text/plain; version=0.0.4')], body)


class PeerServer(_Serving, socketserver.ThreadingMixIn,
                 socketserver.TCPServer):
    """Serves a :class:`~thunder_cache.node.Node` to its peers over TCP."""

    allow_reuse_address = True

    def __init__(self, address, node, secret, idle_timeout=60.0,
                 max_connections=256, metrics_auth=False, clock=time.time):
        self._setup(node, secret, idle_timeout, max_connections,
                    metrics_auth, clock)
        socketserver.TCPServer.__init__(self, address, _Handler)

    @property
    def port(self):
        return self.server_address[1]


class LocalServer(_Serving, socketserver.ThreadingMixIn,
                  socketserver.UnixStreamServer):
    """Serves the node's own readers on a Unix socket.

    The same requests as the peer protocol, without tokens (the socket's
    permissions decide who may read: mode 0660), without fan-out and
    without the upload rate limit. The block-device layer and the Cinder
    driver of the node read images through it.
    """

    local = True

    def __init__(self, path, node, idle_timeout=600.0, max_connections=64,
                 mode=0o660):
        self._setup(node, None, idle_timeout, max_connections, False,
                    time.time)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        socketserver.UnixStreamServer.__init__(self, path, _Handler)
        os.chmod(path, mode)
        self.path = path

    def server_close(self):
        super().server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
