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

"""Clients of the daemon: its control socket and its local reader.

:class:`ControlClient` calls the control socket (what the Cinder driver
and ``thunder-cache-manage`` use); :class:`LocalClient` reads image bytes
through the daemon's local Unix socket (the peer protocol's paths).
"""

import http.client
import json
import socket
import threading
import time
import typing

from thunder_cache.control import protocol
from thunder_cache.peer import protocol as peer_protocol
from thunder_common import manifest as manifest_mod


class ControlError(Exception):
    """An error the daemon reported, or a failure to reach it.

    ``kind`` is the name of the daemon-side exception (``VolumeNotFound``,
    ``VolumeExists``, ``VolumeBusy``, ``BadRequest``, ...) or
    ``Unavailable`` when the daemon cannot be reached.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__('%s: %s' % (kind, message))
        self.kind = kind
        self.message = message


class ControlClient:
    """Calls the daemon's control socket; one connection per call.

    :param path: the daemon's ``control_socket``.
    :param timeout: seconds to wait for an answer.
    """

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: typing.Any) -> typing.Any:
        """The result of ``op``; :class:`ControlError` on any failure."""
        request = dict(args, op=op)
        line = protocol.encode(request)
        if len(line) > protocol.MAX_LINE:
            raise ControlError('BadRequest', 'request too large')
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except OSError as e:
                raise ControlError(
                    'Unavailable', 'cannot reach thunder-cache at %s: %s'
                    % (self.path, e))
            sent_error: typing.Optional[OSError]
            try:
                sock.sendall(line)
            except OSError as e:
                # A daemon refusing the connection (Busy) answers and closes
                # without reading: its answer may be waiting all the same.
                sent_error = e
            else:
                sent_error = None
            try:
                with sock.makefile('rb') as f:
                    answer = f.readline(protocol.MAX_LINE + 1)
            except OSError as e:
                answer = b''
                sent_error = sent_error or e
            if not answer and sent_error is not None:
                raise ControlError('Unavailable', 'thunder-cache at %s: %s'
                                   % (self.path, sent_error))
        finally:
            sock.close()
        try:
            reply = json.loads(answer)
            ok = reply['ok']
        except (ValueError, KeyError, TypeError):
            raise ControlError('Unavailable', 'thunder-cache at %s sent an '
                               'unreadable answer' % self.path)
        if not ok:
            raise ControlError(str(reply.get('error', 'Error')),
                               str(reply.get('message', '')))
        return reply.get('result')

    def delete_volume(self, volume_id: str, busy_wait: float = 0.0,
                      interval: float = 0.1) -> None:
        """Delete a volume, waiting up to ``busy_wait`` s while it is open.

        The kernel tells the daemon of a close asynchronously: a volume
        file closed, or a loop device detached, a moment ago may still be
        open for the daemon, which answers ``VolumeBusy`` meanwhile.
        """
        deadline = time.monotonic() + busy_wait
        while True:
            try:
                return self.call('delete_volume', volume_id=volume_id)
            except ControlError as e:
                if e.kind != 'VolumeBusy' or time.monotonic() >= deadline:
                    raise
            time.sleep(interval)


class _UnixConnection(http.client.HTTPConnection):

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__('localhost', timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class LocalClient:
    """Reads images through the node's own daemon (its Unix socket).

    :param socket_path: the daemon's ``local_socket``.
    """

    def __init__(self, socket_path: str, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._local = threading.local()
        self._manifests: typing.Dict[str, manifest_mod.Manifest] = {}

    def _conn(self) -> _UnixConnection:
        conn = getattr(self._local, 'conn', None)
        if conn is None:
            conn = self._local.conn = _UnixConnection(self.socket_path,
                                                      self.timeout)
        return conn

    def close(self) -> None:
        conn = getattr(self._local, 'conn', None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _get(self, path: str,
             headers: typing.Optional[typing.Dict[str, str]] = None
             ) -> bytes:
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request('GET', path, headers=headers or {})
                response = conn.getresponse()
                body = response.read()
                if response.status not in (200, 206):
                    raise IOError('thunder-cache answered %d to %s: %s'
                                  % (response.status, path,
                                     body[:200].decode('ascii', 'replace')))
                return body
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError):
                self.close()
                if attempt:
                    raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise
        raise AssertionError('not reached')

    def manifest(self, image_id: str,
                 expected_digest: typing.Optional[str] = None
                 ) -> manifest_mod.Manifest:
        """The image's manifest (checked if a digest is given)."""
        manifest = self._manifests.get(image_id)
        if manifest is None:
            data = self._get(peer_protocol.manifest_path(image_id))
            if expected_digest is not None:
                manifest = manifest_mod.load_verified(data, expected_digest)
            else:
                manifest = manifest_mod.Manifest.from_bytes(data)
            self._manifests[image_id] = manifest
        return manifest

    def read(self, image_id: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset`` (short at the end)."""
        manifest = self.manifest(image_id)
        if offset < 0 or length < 0:
            raise ValueError('negative offset or length')
        end = min(manifest.image_size, offset + length)
        chunk = manifest.chunk_size
        out = bytearray()
        position = offset
        while position < end:
            index = position // chunk
            start = position - index * chunk
            stop = min(end - index * chunk, manifest.chunk_range(index)[1])
            headers = None
            if start or stop != manifest.chunk_range(index)[1]:
                headers = {'Range': 'bytes=%d-%d' % (start, stop - 1)}
            path = peer_protocol.chunk_path(image_id, index)
            data = self._get(path, headers)
            if len(data) != stop - start:
                raise IOError('thunder-cache sent %d bytes, expected %d'
                              % (len(data), stop - start))
            out += data
            position += len(data)
        return bytes(out)
