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

"""The daemon's control socket: how the Cinder driver manages volumes.

cinder-volume on the node asks the ``thunder-cache`` daemon to register
images and to create, resize and delete volume layers. The channel is a
Unix socket (mode 0660: its group decides who may manage volumes) carrying
one JSON object per line each way::

    -> {"op": "create_volume", "volume_id": "volume-...", "size": 1073741824,
        "image_id": "..."}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "VolumeNotFound", "message": "..."}

Requests are parsed strictly: a line longer than :data:`protocol.MAX_LINE`, a
request that is not a JSON object, an unknown operation or an argument of
the wrong type is refused with ``BadRequest``. Handlers are plain
callables registered by the daemon, so this module knows nothing about
volumes or images.
"""

import grp
import inspect
import logging
import os
import socketserver
import stat
import threading
import typing

from thunder_cache.control import protocol
from thunder_cache import errors

LOG = logging.getLogger(__name__)

# Connections served at once; more are answered "Busy" and closed.
MAX_CONNECTIONS = 64
# Seconds a connection may stay silent before it is closed.
IDLE_TIMEOUT = 60

#: Answers an operation: called with the request's arguments, returns a
#: JSON-able result.
Handler = typing.Callable[..., typing.Any]


class _Handler(socketserver.StreamRequestHandler):

    timeout = IDLE_TIMEOUT

    server: 'ControlServer'

    def handle(self) -> None:
        server = self.server
        while not server.stopping:
            try:
                line = self.rfile.readline(protocol.MAX_LINE + 1)
            except OSError:
                return
            if not line:
                return
            if len(line) > protocol.MAX_LINE or not line.endswith(b'\n'):
                self._reply({'ok': False, 'error': 'BadRequest',
                             'message': 'request line too long or not '
                                        'ended by a newline'})
                return
            self._reply(server.dispatch(line))

    def _reply(self, reply: protocol.Reply) -> None:
        try:
            self.wfile.write(protocol.encode(reply))
            self.wfile.flush()
        except OSError:
            pass


class ControlServer(socketserver.ThreadingMixIn,
                    socketserver.UnixStreamServer):
    """Answers control requests with registered handlers.

    :param path: the socket's path (an old socket there is replaced).
    :param handlers: ``{op: callable(**args) -> JSON-able result}``. An
        exception raised by a handler is reported by its class name and
        message; arguments that do not fit its signature are
        ``BadRequest``.
    :param expected: exception classes that are answers, not faults
        (logged without a traceback), besides ValueError, LookupError and
        OSError.
    :param group: name of the group that may use the socket (mode 0660).
    :param max_connections: connections served at once (a thread each);
        more are answered ``Busy`` and closed.
    """

    daemon_threads = True
    # Connections waiting to be accepted: a full backlog makes a client's
    # connect fail at once (EAGAIN), so it takes a burst of calls.
    request_queue_size = 128

    def __init__(self, path: str,
                 handlers: typing.Mapping[str, Handler],
                 expected: typing.Iterable[typing.Type[BaseException]] = (),
                 mode: int = 0o660, group: typing.Optional[str] = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.handlers = dict(handlers)
        # inspect.signature of each handler, computed once.
        self._signatures: typing.Dict[Handler, inspect.Signature] = {}
        self.expected = tuple(expected) + (ValueError, LookupError, OSError)
        self.stopping = False
        self.path = path
        self._bound = False
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        socketserver.UnixStreamServer.__init__(self, path, _Handler)
        self._bound = True
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)

    def process_request(self, request: typing.Any,
                        client_address: typing.Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(protocol.encode({
                    'ok': False, 'error': 'Busy',
                    'message': 'too many control connections at once'}))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: typing.Any,
                               client_address: typing.Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def dispatch(self, line: bytes) -> protocol.Reply:
        """The reply to one request line."""
        try:
            op, args = protocol.parse_request(line)
            handler = self.handlers.get(op)
            if handler is None:
                raise errors.BadRequest('unknown operation %r' % op)
            signature = self._signatures.get(handler)
            if signature is None:
                signature = inspect.signature(handler)
                self._signatures[handler] = signature
            try:
                signature.bind(**args)
            except TypeError as e:
                raise errors.BadRequest('bad arguments for %s: %s' % (op, e))
            result = handler(**args)
        except errors.BadRequest as e:
            return {'ok': False, 'error': 'BadRequest', 'message': str(e)}
        except Exception as e:
            if not isinstance(e, self.expected):
                LOG.exception('Control request %s failed', line[:200])
            return {'ok': False, 'error': type(e).__name__,
                    'message': str(e)}
        return {'ok': True, 'result': result}

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (returned)."""
        thread = threading.Thread(target=self.serve_forever, args=(0.2,),
                                  name='control-server', daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop serving and remove the socket."""
        self.stopping = True
        self.shutdown()
        self.server_close()

    def server_close(self) -> None:
        super().server_close()
        if not self._bound:
            return  # bind failed: what is at path is not ours
        self._bound = False
        try:
            os.unlink(self.path)
        except OSError:
            pass
