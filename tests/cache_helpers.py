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

"""In-process node caches and peer servers on 127.0.0.1, for tests."""

import collections
import hashlib
import os
import subprocess
import sys
import threading
import time

from thunder_cache.cache import node as node_mod
from thunder_cache.peer import peerpolicy
from thunder_cache.peer import protocol
from thunder_cache.peer import server as server_mod
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

#: The checkout (the working directory of the processes tests start).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b'unit-test-shared-secret-0123456789'


def write_volume(path, image, chunk_size):
    """Write an image-volume (image, then manifest); return the manifest."""
    manifest = manifest_mod.Manifest.build([image], chunk_size)
    with open(path, 'wb') as f:
        f.write(image)
        f.seek(manifest_mod.volume_offset(len(image)))
        f.write(manifest.to_bytes())
    return manifest


def image_volume(directory, size, chunk_size):
    """(image, manifest, path) of a random image written as an image-volume."""
    image = os.urandom(size)
    path = os.path.join(str(directory), 'volume')
    return image, write_volume(path, image, chunk_size), path


class CountingOrigin(sources.FileOrigin):
    """A FileOrigin that counts the chunk reads it serves."""

    def __init__(self, path):
        super().__init__(path)
        self.reads = collections.Counter()
        self.lock = threading.Lock()
        self.down = False

    def read_chunk(self, index, offset, length, via=(), ticket=None):
        if self.down:
            raise sources.OriginError('origin is down')
        with self.lock:
            self.reads[index] += 1
        return super().read_chunk(index, offset, length, via)


class Cluster:
    """Nodes with their servers; stop() stops them all."""

    def __init__(self, tmp_path, client_tls=None):
        self.tmp_path = tmp_path
        self.nodes = []
        # The TLS client context of the nodes' own clients, if TLS is on.
        self.client_tls = client_tls

    def start(self, name, spec_kwargs, secret=SECRET, server_kwargs=None,
              **node_kwargs):
        server_kwargs = dict(server_kwargs or {})
        server_kwargs.setdefault('idle_timeout', 5)
        srv = server_mod.PeerServer(('127.0.0.1', 0), None, secret,
                                    **server_kwargs)
        url = '%s://127.0.0.1:%d' % (protocol.url_scheme(), srv.port)
        client = peer_client(protocol.Signer(secret, name, url),
                             tls_context=self.client_tls)
        node_kwargs.setdefault('relay_timeout', 4)
        node = node_mod.Node(name, url, str(self.tmp_path / name), client,
                             **node_kwargs)
        srv.node = node
        if spec_kwargs is not None:
            node.register(node_mod.ImageSpec(**spec_kwargs))
        thread = threading.Thread(target=srv.serve_forever, args=(0.05,),
                                  daemon=True)
        thread.start()
        self.nodes.append((node, srv))
        return node, srv

    def stop(self, node):
        for n, srv in list(self.nodes):
            if n is node:
                srv.stop(grace=1)
                n.close()
                self.nodes.remove((n, srv))

    def stop_all(self):
        for node, _srv in list(self.nodes):
            self.stop(node)


def read_together(nodes, image_id, size, step):
    """Every node reads the whole image at once, ``step`` bytes a read.

    Returns {node id: sha256 of what it read}.
    """
    results = {}
    barrier = threading.Barrier(len(nodes))

    def read(node):
        barrier.wait()
        data = bytearray()
        for offset in range(0, size, step):
            data += node.read_image(image_id, offset, step)
        results[node.node_id] = hashlib.sha256(data).hexdigest()

    threads = [threading.Thread(target=read, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def peer_client(signer, tls_context=None):
    """A PeerClient allowed to reach the tests' peers on loopback."""
    client = sources.PeerClient(signer, timeout=5, tls_context=tls_context)
    client.policy = peerpolicy.AddressPolicy(['127.0.0.0/8'])
    return client


def client(name='tester', url='http://127.0.0.1:9', secret=SECRET):
    return peer_client(protocol.Signer(secret, name, url))


def eventually(predicate, timeout=10):
    """True once ``predicate()`` is (polled until ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run_daemon(directory, extra):
    """Run ``thunder-cache`` with a minimal configuration plus ``extra``.

    A process of its own (main() installs signal handlers and logging)
    that is expected to exit: its CompletedProcess, output as text.
    """
    with open(os.path.join(directory, 'secret'), 'w') as f:
        f.write('s' * 32)
    conf = os.path.join(directory, 'thunder-cache.conf')
    with open(conf, 'w') as f:
        f.write('[node]\nnode_id = t1\nlisten_address = 127.0.0.1\n'
                'listen_port = 0\ncache_dir = {d}/cache\n'
                'local_socket = {d}/local.sock\npid_file = {d}/pid\n'
                '[peer]\nshared_secret_file = {d}/secret\n'.format(
                    d=directory))
        f.write(extra)
    return subprocess.run(
        [sys.executable, '-m', 'thunder_cache.daemon', '--config-file',
         conf], capture_output=True, text=True, timeout=60)
