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

"""The tree the peer protocol builds, for several ``max_children``.

Starts ``--nodes`` in-process nodes (real peer servers on 127.0.0.1) that
all list one seed, the only node with the origin, and lets them read the
whole image at once. For each fan-out it prints the tree's depth, the
largest upload of any node in image sizes (the load a node's link must
carry), the origin reads per chunk and the wall time. On one machine the
time says little about a real network; depth and upload per node do not
depend on it: they are what ``max_children`` trades.

    tox -e bench -- benchmarks/fanout_tree.py [--nodes 16] [--fanouts 1,2,4,8]
"""

import argparse
import collections
import os
import shutil
import sys
import tempfile
import threading
import time

from thunder_cache.cache import node as node_mod
from thunder_cache.peer import peerpolicy
from thunder_cache.peer import protocol
from thunder_cache.peer import server as server_mod
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

SECRET = b'fanout-tree-benchmark-secret-000'


class CountingOrigin(sources.FileOrigin):

    def __init__(self, path):
        super().__init__(path)
        self.reads = collections.Counter()
        self.lock = threading.Lock()

    def read_chunk(self, index, offset, length, via=(), ticket=None):
        with self.lock:
            self.reads[index] += 1
        return super().read_chunk(index, offset, length, via)


def start(workdir, name, spec, max_children):
    srv = server_mod.PeerServer(('127.0.0.1', 0), None, SECRET)
    url = 'http://127.0.0.1:%d' % srv.port
    client = sources.PeerClient(protocol.Signer(SECRET, name, url),
                                timeout=30)
    client.policy = peerpolicy.AddressPolicy(['127.0.0.0/8'])
    node = node_mod.Node(name, url, os.path.join(workdir, name), client,
                         max_children=max_children, relay_timeout=25,
                         commit_interval=0.05)
    srv.node = node
    node.register(node_mod.ImageSpec(**spec))
    threading.Thread(target=srv.serve_forever, args=(0.05,),
                     daemon=True).start()
    return node, srv


def depth(parents, seed_url, url):
    hops = 0
    while url != seed_url and url is not None and hops < 100:
        url = parents.get(url)
        hops += 1
    return hops


def run(workdir, volume, manifest, nodes, fanout):
    origin = CountingOrigin(volume)
    base = dict(image_id='img', manifest_digest=manifest.digest(),
                image_size=manifest.image_size)
    seed = start(workdir, 'seed', dict(base, origin=origin), fanout)
    others = [start(workdir, 'n%d' % i, dict(base, peers=[seed[0].url]),
                    fanout) for i in range(nodes)]
    barrier = threading.Barrier(nodes)
    errors = []

    def read(node):
        barrier.wait()
        try:
            cache = node.cache('img')
            for index in range(manifest.chunk_count):
                cache.ensure(index)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=read, args=(n,)) for n, _ in others]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if errors:
        raise errors[0]
    everyone = [seed] + others
    uploads = [n.counters.get('upload_bytes') for n, _ in everyone]
    parents = {n.url: n.cache('img').upstream.parent for n, _ in others}
    deepest = max(depth(parents, seed[0].url, n.url) for n, _ in others)
    for node, srv in everyone:
        srv.stop(grace=1)
        node.close()
    return (deepest, max(uploads) / manifest.image_size,
            sum(origin.reads.values()) / manifest.chunk_count, elapsed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nodes', type=int, default=16)
    parser.add_argument('--fanouts', default='1,2,4,8')
    parser.add_argument('--size-mib', type=int, default=32)
    parser.add_argument('--chunk-kib', type=int, default=256)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix='thunder-fanout-')
    try:
        volume = os.path.join(workdir, 'volume')
        image = os.urandom(args.size_mib * 1024 * 1024)
        manifest = manifest_mod.Manifest.build([image],
                                               args.chunk_kib * 1024)
        with open(volume, 'wb') as f:
            f.write(image)
            f.seek(manifest_mod.volume_offset(len(image)))
            f.write(manifest.to_bytes())
        print('%d nodes reading a %d MiB image (%d KiB chunks) from one '
              'seed at once\n' % (args.nodes, args.size_mib,
                                  args.chunk_kib))
        print('%12s %6s %22s %18s %9s' % ('max_children', 'depth',
                                          'max upload (images)',
                                          'origin reads/chunk', 'seconds'))
        for fanout in [int(f) for f in args.fanouts.split(',')]:
            sub = os.path.join(workdir, 'f%d' % fanout)
            os.mkdir(sub)
            deepest, upload, origin, elapsed = run(sub, volume, manifest,
                                                   args.nodes, fanout)
            print('%12d %6d %22.2f %18.2f %9.2f' % (fanout, deepest, upload,
                                                    origin, elapsed))
            shutil.rmtree(sub, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
