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

"""Real ``thunder-cache`` daemons on 127.0.0.1, for functional tests.

Each daemon is a ``python -m thunder_cache.daemon`` subprocess with its own
configuration file, port, cache directory, local socket and PID file,
stopped by its PID (SIGTERM, or SIGKILL to simulate a crash).
"""

import contextlib
import http.server
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

from tests import cache_helpers
from thunder_cache.control import client as control_client
from thunder_common import manifest as manifest_mod
from thunder_stack import services as svc

REPO = cache_helpers.REPO
SECRET = b'functional-test-shared-secret-0123456789'
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """[(name, {label: value}, float value)] of a Prometheus text page."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith('#'):
            continue
        match = _SAMPLE.match(line)
        assert match, 'malformed metrics line %r' % line
        name, labels, value = match.groups()
        samples.append((name, dict(_LABEL.findall(labels or '')),
                        float(value)))
    return samples


class Daemon:
    """One node: configuration, process, metrics, local reader."""

    def __init__(self, workdir, name, max_children=2, upload_rate=0,
                 commit_interval=0.05, extra='', origin_dirs=None,
                 peer_options=(), tls=None):
        """``tls``: (CA file, certificate, key) to speak TLS to peers."""
        self.name = name
        self.dir = os.path.join(workdir, name)
        os.makedirs(os.path.join(self.dir, 'images.d'), exist_ok=True)
        self.port = svc.free_port()
        self.tls = tls
        self.url = '%s://127.0.0.1:%d' % ('https' if tls else 'http',
                                          self.port)
        peer_options = list(peer_options)
        if tls:
            peer_options += ['tls_enabled = true', 'tls_ca_file = %s' % tls[0],
                             'tls_certificate = %s' % tls[1],
                             'tls_key = %s' % tls[2]]
        self.secret_path = os.path.join(workdir, 'secret')
        if not os.path.exists(self.secret_path):
            with open(self.secret_path, 'wb') as f:
                f.write(SECRET)
        self.socket_path = os.path.join(self.dir, 'local.sock')
        self.pid_file = os.path.join(self.dir, 'thunder-cache.pid')
        self.log_path = os.path.join(self.dir, 'daemon.log')
        self.conf_path = os.path.join(self.dir, 'thunder-cache.conf')
        with open(self.conf_path, 'w') as f:
            f.write('\n'.join([
                '[DEFAULT]', 'debug = true',
                '[node]', 'node_id = %s' % name,
                'listen_address = 127.0.0.1',
                'listen_port = %d' % self.port,
                'cache_dir = %s' % os.path.join(self.dir, 'cache'),
                'descriptors_dir = %s' % os.path.join(self.dir, 'images.d'),
                'local_socket = %s' % self.socket_path,
                'pid_file = %s' % self.pid_file,
                '[peer]', 'shared_secret_file = %s' % self.secret_path,
                'max_children = %d' % max_children,
                'upload_rate_limit = %d' % upload_rate,
                'fetch_timeout = 5', 'relay_timeout = 4',
                'peer_retry_interval = 30',
                # Every node of these tests lives on loopback.
                'allowed_networks = 127.0.0.0/8'] + list(peer_options) + [
                '[cache]', 'commit_interval = %s' % commit_interval,
                # The tests' image-volume files live in the work directory.
                '[origin]', 'file_origin_dirs = %s' % ','.join(
                    [workdir] if origin_dirs is None else origin_dirs),
                extra, '']))
        self.proc = None
        self._reader = None
        # Run before the daemon's command (e.g. to change its user).
        self.command_prefix = []

    def cache_path(self, image_id, name='data'):
        return os.path.join(self.dir, 'cache', image_id, name)

    def describe(self, image_id, manifest, origin=None, peers=(),
                 digest=None, origin_volume_id=None):
        """Write the image's descriptor (before start, or then SIGHUP)."""
        descriptor = {'manifest_digest': digest or manifest.digest(),
                      'image_size': manifest.image_size,
                      'origin': origin,
                      'peers': [getattr(p, 'url', p) for p in peers]}
        if origin_volume_id is not None:
            descriptor['origin_volume_id'] = origin_volume_id
        with open(os.path.join(self.dir, 'images.d', image_id + '.json'),
                  'w') as f:
            json.dump(descriptor, f)

    def start(self, timeout=30):
        log = open(self.log_path, 'a')
        self.proc = subprocess.Popen(
            self.command_prefix + [sys.executable, '-m',
                                   'thunder_cache.daemon', '--config-file',
                                   self.conf_path],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError('%s exited with %s; log:\n%s' % (
                    self.name, self.proc.returncode, self.log()))
            try:
                self.metrics_text()
                if os.path.exists(self.socket_path):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError('%s did not start; log:\n%s' % (self.name,
                                                           self.log()))

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self, timeout=15):
        """SIGTERM by PID; wait for the exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.close_reader()
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def kill(self):
        """SIGKILL by PID: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait()
        self.close_reader()

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    # -- reading --------------------------------------------------------------

    @property
    def reader(self):
        if self._reader is None:
            self._reader = control_client.LocalClient(
                self.socket_path, timeout=60)
        return self._reader

    def close_reader(self):
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def read(self, image_id, offset, length):
        return self.reader.read(image_id, offset, length)

    # -- metrics --------------------------------------------------------------

    def metrics_text(self):
        context = None
        if self.tls:
            # The daemon wants a client certificate of its CA.
            context = ssl.create_default_context(cafile=self.tls[0])
            context.load_cert_chain(self.tls[1], self.tls[2])
        return urllib.request.urlopen(self.url + '/metrics', timeout=5,
                                      context=context).read().decode()

    def metric(self, name, **labels):
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for sample, sample_labels, value in parse_metrics(
                self.metrics_text()):
            if sample == name and all(sample_labels.get(k) == v
                                      for k, v in labels.items()):
                total += value
        return total


class VolumeDaemon(Daemon):
    """A daemon that serves volume files ([blockdev]) and its control socket.

    ``paths`` has the ``mount``, ``layers`` and ``control`` paths;
    ``control`` is a :class:`~thunder_cache.control.client.ControlClient`.
    """

    def __init__(self, workdir, name, extra='', native=None, **kwargs):
        """``native``: a built thunder-volume-server serves the files.

        None: the daemon itself (``volume_server = python``).
        """
        base = os.path.join(workdir, name)
        self.paths = {'mount': os.path.join(base, 'volumes'),
                      'layers': os.path.join(base, 'layers'),
                      'control': os.path.join(base, 'control.sock'),
                      'native': os.path.join(base, 'native.sock')}
        native_opts = [
            'volume_server = native', 'native_server_binary = %s' % native,
            'native_server_socket = %s' % self.paths['native'],
            'native_fetch_wait = 30'] if native else [
                'volume_server = python']
        super().__init__(workdir, name, extra='\n'.join([
            '[blockdev]', 'enabled = true',
            'mount_dir = %s' % self.paths['mount'],
            'layers_dir = %s' % self.paths['layers'],
            'control_socket = %s' % self.paths['control']] + native_opts + [
            '[prefetch]', 'record = false', extra]), **kwargs)
        self.control = control_client.ControlClient(self.paths['control'])

    def start(self, timeout=30):
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.control.call('ping')
                return self
            except control_client.ControlError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.1)

    def delete_volume(self, volume_id, timeout=10):
        """Delete a volume once the kernel has released its file."""
        return self.control.delete_volume(volume_id, busy_wait=timeout)


class FakeCinder(http.server.ThreadingHTTPServer):
    """The Cinder volume API the daemon's advertiser uses, in memory.

    One image-volume, ``volume_id``; ``deleted = True`` makes it answer
    404 as a deleted volume does. Options for the daemon: :meth:`options`.
    """

    daemon_threads = True

    def __init__(self, volume_id, created_at, metadata):
        self.volume_id = volume_id
        self.created_at = created_at
        self.metadata = dict(metadata)
        self.gets = 0
        self.deleted = False
        super().__init__(('127.0.0.1', 0), CinderHandler)

    @property
    def endpoint(self):
        return 'http://127.0.0.1:%d/v3/project' % self.server_address[1]

    def options(self):
        """The daemon's ``[advertise]`` lines to use this Cinder."""
        return ['[advertise]', 'enabled = true', 'auth_type = none',
                'cinder_endpoint_override = %s' % self.endpoint,
                'timeout = 5']

    def start(self):
        threading.Thread(target=self.serve_forever, args=(0.1,),
                         daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


class CinderHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _volume(self):
        parts = self.path.split('/')
        server = self.server
        if (len(parts) < 5 or parts[4] != server.volume_id or
                server.deleted):
            self._reply(404, {'itemNotFound': {'message': 'no volume'}})
            return None
        return parts[5:]

    def do_GET(self):
        rest = self._volume()
        if rest is None:
            return
        self.server.gets += 1
        self._reply(200, {'volume': {
            'id': self.server.volume_id, 'status': 'available',
            'created_at': self.server.created_at,
            'metadata': self.server.metadata}})

    def do_POST(self):
        rest = self._volume()
        if rest is None:
            return
        length = int(self.headers.get('Content-Length', 0))
        body = json.loads(self.rfile.read(length) or b'{}')
        self.server.metadata.update(body.get('metadata', {}))
        self._reply(200, {'metadata': self.server.metadata})

    def do_DELETE(self):
        rest = self._volume()
        if rest is None:
            return
        self.server.metadata.pop(rest[-1], None)
        self._reply(200, {})

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def rbd_image_volume(ceph, pool, name, image, manifest, snapshot='sealed'):
    """An image-volume in RBD as the thunder store writes it.

    The image's bytes, the sealed snapshot, then the manifest at
    ``volume_offset`` (in the head only, as the store writes it after
    sealing). Yields ``(fsid, pool, name, snapshot)``; removed after.
    """
    import rados
    import rbd

    client = rados.Rados(conffile=ceph)
    client.connect(timeout=10)
    ioctx = client.open_ioctx(pool)
    size = len(image)
    try:
        rbd.RBD().create(ioctx, name, manifest_mod.volume_bytes_needed(
            size, manifest.chunk_size))
        with rbd.Image(ioctx, name) as img:
            step = 4 * 1024 * 1024
            for offset in range(0, size, step):
                img.write(image[offset:offset + step], offset)
            img.create_snap(snapshot)
            img.write(manifest.to_bytes(), manifest_mod.volume_offset(size))
        yield client.get_fsid(), pool, name, snapshot
    finally:
        try:
            with rbd.Image(ioctx, name) as img:
                img.remove_snap(snapshot)
            rbd.RBD().remove(ioctx, name)
        except rbd.ImageNotFound:
            pass
        ioctx.close()
        client.shutdown()
