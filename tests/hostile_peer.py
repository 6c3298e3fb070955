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

"""A peer that answers by script, for the unit and functional tests.

:class:`HostilePeer` listens on a loopback address and answers each request
with the steps ``answer(path)`` returns: bytes sent at once,
:func:`trickle` (bytes sent one at a time, with a pause after each),
:func:`pause`, :func:`gate`, or :data:`HANG` (send nothing more until
stopped). It counts the connections and requests it saw.
:meth:`HostilePeer.stop` closes every socket, which also ends whatever a
client still waits for.
"""

import socket
import threading
import time

HANG = ('hang',)


def trickle(data, interval):
    """Send ``data`` one byte every ``interval`` seconds."""
    return ('trickle', bytes(data), interval)


def pause(seconds):
    return ('pause', seconds)


def gate(event):
    """Send nothing more until ``event`` is set (or the peer stops)."""
    return ('gate', event)


def head(status=200, length=0, headers=()):
    """A response head with a Content-Length."""
    lines = ['HTTP/1.1 %d X' % status]
    lines += ['%s: %s' % h for h in headers]
    lines.append('Content-Length: %d' % length)
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('ascii')


class HostilePeer:
    """A scripted HTTP peer on ``host`` (a loopback address)."""

    def __init__(self, answer, host='127.0.0.1', port=0):
        self.answer = answer
        self.connections = 0
        self.paths = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients = []
        self._threads = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.host, self.port = self._listener.getsockname()[:2]
        self.url = 'http://%s:%d' % (self.host, self.port)
        self._spawn(self._accept)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.stop()

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._clients.append(conn)
            self._spawn(self._serve, conn)

    def _read_head(self, conn):
        data = b''
        conn.settimeout(0.1)
        while b'\r\n\r\n' not in data:
            if self._stop.is_set() or len(data) > 65536:
                return None
            try:
                chunk = conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        line = data.split(b'\r\n', 1)[0].decode('ascii', 'replace')
        parts = line.split(' ')
        return parts[1] if len(parts) == 3 else ''

    def _serve(self, conn):
        try:
            while not self._stop.is_set():
                path = self._read_head(conn)
                if path is None:
                    return
                with self._lock:
                    self.paths.append(path)
                if not self._play(conn, self.answer(path)):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def _play(self, conn, steps):
        """Send the steps; False once the connection should end."""
        for step in steps:
            if isinstance(step, bytes):
                conn.sendall(step)
            elif step[0] == 'trickle':
                _kind, data, interval = step
                for i in range(len(data)):
                    if self._stop.wait(interval if i else 0):
                        return False
                    conn.sendall(data[i:i + 1])
            elif step[0] == 'pause':
                if self._stop.wait(step[1]):
                    return False
            elif step[0] == 'gate':
                while not step[1].wait(0.05):
                    if self._stop.is_set():
                        return False
            elif step == HANG:
                self._stop.wait()
                return False
        return True

    def stop(self):
        self._stop.set()
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Peers:
    """Makes :class:`HostilePeer` objects; :meth:`stop` stops them all."""

    def __init__(self, host='127.0.0.1'):
        self.host = host
        self.made = []

    def __call__(self, answer, host=None):
        peer = HostilePeer(answer, host=host or self.host)
        self.made.append(peer)
        return peer

    def stop(self):
        for peer in self.made:
            peer.stop()


def bounded(call, seconds):
    """Run ``call()`` in a thread; (finished, result or exception, seconds).

    A call still running after ``seconds`` is left to end by itself (the
    test stops what it waits on).
    """
    outcome = {}

    def run():
        try:
            outcome['value'] = call()
        except BaseException as e:
            outcome['value'] = e

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive(), outcome.get('value'),
            time.monotonic() - started)
