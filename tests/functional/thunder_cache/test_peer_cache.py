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

"""The peer mode's node caches: several real daemons on 127.0.0.1.

Every node is a ``thunder-cache`` subprocess on its own port with its own
cache directory, reading an image-volume (the image, then its manifest)
from a file origin or from RBD on the real single-node Ceph. Readers use
each node's local socket, as the block-device layer will.
"""

import hashlib
import http.server
import json
import os
import random
import re
import selectors
import socket
import ssl
import subprocess
import threading
import time
import uuid

import pytest

from tests.functional.thunder_cache import cache_daemons
from tests import hostile_peer
from thunder_cache.cache import chunkmap
from thunder_common import manifest as manifest_mod
from thunder_stack import pki

IMAGE = 'img-functional'
CHUNK = 256 * 1024
SIZE = 32 * 1024 * 1024 + 12345          # 129 chunks, the last one short


@pytest.fixture(scope='module')
def image():
    return os.urandom(SIZE)


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.fixture
def volume(workdir, image):
    path = str(workdir / 'image-volume')
    manifest = manifest_mod.Manifest.build([image], CHUNK)
    with open(path, 'wb') as f:
        f.write(image)
        f.seek(manifest_mod.volume_offset(len(image)))
        f.write(manifest.to_bytes())
    return path, manifest


@pytest.fixture
def daemons(workdir):
    """Make daemons; every one still running is stopped by PID after."""
    made = []

    def make(name, **kwargs):
        d = cache_daemons.Daemon(str(workdir), name, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        try:
            d.stop()
        except Exception:
            d.kill()


def boot_trace(seed=4, fraction=0.4):
    """A boot-like read trace: (offset, length) pairs.

    Sequential runs of small and large reads over ``fraction`` of the
    image, scattered, some regions read twice.
    """
    rng = random.Random(seed)
    trace = []
    target = int(SIZE * fraction)
    covered = 0
    while covered < target:
        offset = rng.randrange(0, SIZE - 1)
        for _ in range(rng.randint(1, 12)):
            length = rng.choice([512, 4096, 4096, 16384, 65536, 131072,
                                 524288])
            length = min(length, SIZE - offset)
            if length <= 0:
                break
            trace.append((offset, length))
            offset += length
            covered += length
    trace += trace[:len(trace) // 10]
    return trace


def chunks_of(trace):
    touched = set()
    for offset, length in trace:
        touched.update(range(offset // CHUNK, (offset + length - 1) // CHUNK
                             + 1))
    return touched


def replay(daemon, trace, image, errors, digests, key=None):
    try:
        h = hashlib.sha256()
        for offset, length in trace:
            data = daemon.read(IMAGE, offset, length)
            if data != image[offset:offset + length]:
                errors.append('%s: wrong bytes at %d+%d'
                              % (daemon.name, offset, length))
                return
            h.update(data)
        digests[key or daemon.name] = h.hexdigest()
    except Exception as e:
        errors.append('%s: %r' % (daemon.name, e))


def run_parallel(jobs, timeout=300):
    threads = [threading.Thread(target=f, args=a) for f, a in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), 'a reader hung'


def expected_digest(trace, image):
    h = hashlib.sha256()
    for offset, length in trace:
        h.update(image[offset:offset + length])
    return h.hexdigest()


def total(nodes, name):
    return sum(d.metric(name, image=IMAGE) for d in nodes)


# -- 8 nodes, one trace ----------------------------------------------------

@pytest.mark.parametrize('topology', ['seed', 'mesh', 'rotated'])
def test_eight_nodes_read_one_trace(daemons, volume, image, topology):
    """Every byte right, the origin read about once per chunk.

    ``seed``: every node lists the first node as its peer (and may read
    the origin); full nodes redirect, forming a tree. ``mesh``: every node
    lists all the nodes, as when peers come from the image's advertised
    locations. ``rotated``: every node lists the others, each in another
    order: no common root, requests cross in every direction; fetch
    tickets keep relayed fetches from waiting on each other in a cycle.
    """
    path, manifest = volume
    nodes = [daemons('n%d' % i, peer_options=['cut_through = true'])
             for i in range(8)]
    origin = {'type': 'file', 'path': path}
    for i, d in enumerate(nodes):
        if topology == 'seed':
            peers = [] if i == 0 else [nodes[0]]
        elif topology == 'mesh':
            # All the holders, in the same order everywhere, the node
            # itself included (as the image's advertised locations).
            peers = nodes
        else:
            # The worst case: every node lists the others, each starting
            # with a different one, so that requests cross everywhere.
            peers = nodes[i + 1:] + nodes[:i]
        d.describe(IMAGE, manifest, origin, peers)
    for d in nodes:
        d.start()
    trace = boot_trace()
    touched = chunks_of(trace)
    errors, digests = [], {}
    # Two readers per node replay the trace at once: a boot and a
    # concurrent reader of the same blocks.
    run_parallel([(replay, (d, trace, image, errors, digests, (d.name, k)))
                  for d in nodes for k in range(2)])
    assert not errors, errors
    expected = expected_digest(trace, image)
    assert digests == {(d.name, k): expected for d in nodes
                       for k in range(2)}
    from_origin = total(nodes, 'thunder_cache_chunks_from_origin_total')
    print('%s: %d chunks touched, origin served %d (%.3fx), peers %d, '
          'in-flight joins %d, redirects %d' % (
              topology, len(touched), from_origin,
              from_origin / len(touched),
              total(nodes, 'thunder_cache_chunks_from_peers_total'),
              total(nodes, 'thunder_cache_inflight_joins_total'),
              sum(d.metric('thunder_cache_redirects_sent_total')
                  for d in nodes)))
    assert from_origin <= 1.1 * len(touched)
    # Chunks were shared in flight (two readers per node at least), and
    # relayed cut-through: sent on by nodes still fetching them.
    assert total(nodes, 'thunder_cache_inflight_joins_total') > 0
    assert sum(d.metric('thunder_cache_relays_streamed_total')
               for d in nodes) > 0
    assert total(nodes, 'thunder_cache_chunks_rejected_total') == 0
    # The fan-out bound held everywhere.
    for d in nodes:
        assert d.metric('thunder_cache_children', image=IMAGE) <= 2
    if topology == 'seed':
        assert sum(d.metric('thunder_cache_redirects_sent_total')
                   for d in nodes) > 0


# -- a peer that lies ------------------------------------------------------

class _LyingPeer(http.server.ThreadingHTTPServer):
    """Answers every chunk request with well-formed garbage."""

    daemon_threads = True

    def __init__(self, chunk_sizes):
        self.requests = 0
        self.chunk_sizes = chunk_sizes
        super().__init__(('127.0.0.1', 0), _LyingHandler)

    @property
    def url(self):
        return 'http://127.0.0.1:%d' % self.server_address[1]


class _LyingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_GET(self):
        self.server.requests += 1
        try:
            index = int(self.path.rsplit('/', 1)[1])
            length = self.server.chunk_sizes[index]
        except (ValueError, IndexError):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(length))
        self.end_headers()
        self.wfile.write(os.urandom(length))

    def log_message(self, *args):
        pass


def test_corrupt_peers_are_caught_and_bypassed(daemons, volume, image):
    path, manifest = volume
    liar = _LyingPeer([manifest.chunk_range(i)[1]
                       for i in range(manifest.chunk_count)])
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    try:
        good = daemons('good')
        good.describe(IMAGE, manifest, {'type': 'file', 'path': path})
        good.start()
        # Warm the good node, then damage its cache file behind its back:
        # it serves chunk 3 from its page cache, wrong.
        assert good.read(IMAGE, 0, SIZE) == image
        with open(good.cache_path(IMAGE), 'r+b') as f:
            f.seek(3 * CHUNK + 100)
            f.write(b'\x00rot\x00')
        node = daemons('reader')
        node.describe(IMAGE, manifest, {'type': 'file', 'path': path},
                      peers=[liar.url, good])
        node.start()
        assert node.read(IMAGE, 0, SIZE) == image
        # The liar's first chunk and chunk 3 from the good node were
        # thrown away; each peer was dropped after its first bad chunk, and
        # the origin served the rest.
        assert node.metric('thunder_cache_chunks_rejected_total') == 2
        assert liar.requests == 1
        assert node.metric('thunder_cache_chunks_from_peers_total') == 3
        assert node.metric('thunder_cache_chunks_from_origin_total') == (
            manifest.chunk_count - 3)
    finally:
        liar.shutdown()
        liar.server_close()


# -- failures --------------------------------------------------------------

def full_seeds(daemons, volume, image, **options):
    """Two daemons holding the whole image, then the origin gone.

    Returns (origin spec, manifest, seeds, errors, digests).
    """
    path, manifest = volume
    origin = {'type': 'file', 'path': path}
    seeds = [daemons('s0', **options), daemons('s1', **options)]
    for d in seeds:
        d.describe(IMAGE, manifest, origin)
        d.start()
    errors, digests = [], {}
    run_parallel([(replay, (d, [(0, SIZE)], image, errors, digests))
                  for d in seeds])
    assert not errors, errors
    os.rename(path, path + '.gone')
    return origin, manifest, seeds, errors, digests


def test_killed_peer_and_stopped_origin(daemons, volume, image):
    """A peer killed mid-transfer, no origin: other nodes serve the reads."""
    origin, manifest, seeds, errors, digests = full_seeds(
        daemons, volume, image, max_children=2)
    nodes = [daemons('n%d' % i) for i in range(6)]
    for d in nodes:
        d.describe(IMAGE, manifest, origin, peers=seeds)
        d.start()
    trace = [(offset, 64 * 1024) for offset in range(0, SIZE, 64 * 1024)]

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if seeds[0].metric('thunder_cache_chunks_served_to_peers_total',
                               image=IMAGE) >= 10:
                break
            time.sleep(0.005)
        seeds[0].kill()

    jobs = [(replay, (d, trace, image, errors, digests)) for d in nodes]
    jobs.append((kill_when_busy, ()))
    run_parallel(jobs)
    assert not errors, errors
    expected = expected_digest(trace, image)
    assert digests == dict({d.name: expected for d in nodes},
                           s0=digests['s0'], s1=digests['s1'])
    assert not seeds[0].running
    assert total(nodes, 'thunder_cache_chunks_from_origin_total') == 0
    assert total(nodes, 'thunder_cache_fetch_errors_total') >= 1


def test_two_parents_serve_stripes_and_one_is_killed(daemons, volume,
                                                     image):
    """A node fetches its two stripes from two full peers; one dies."""
    stripes = ['stripes = 2']   # the default is 1: one parent
    origin, manifest, seeds, errors, digests = full_seeds(
        daemons, volume, image, peer_options=stripes)
    node = daemons('n', peer_options=stripes)
    # The holders' list, the node in it: stripe 0 from s1, 1 from s0.
    node.describe(IMAGE, manifest, origin, peers=seeds + [node])
    node.start()
    served = 'thunder_cache_bytes_served_to_peers_total'
    before_kill = {}

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if seeds[0].metric(served, image=IMAGE) >= 10 * CHUNK:
                break
            time.sleep(0.005)
        before_kill['s0'] = seeds[0].metric(served, image=IMAGE)
        before_kill['s1'] = seeds[1].metric(served, image=IMAGE)
        seeds[0].kill()

    trace = [(offset, 64 * 1024) for offset in range(0, SIZE, 64 * 1024)]
    run_parallel([(replay, (node, trace, image, errors, digests)),
                  (kill_when_busy, ())])
    assert not errors, errors
    assert digests['n'] == expected_digest(trace, image)
    assert not seeds[0].running
    # Both parents served before the kill, s1 the rest after it.
    assert before_kill['s0'] >= 10 * CHUNK
    assert before_kill['s1'] > 0
    assert seeds[1].metric(served, image=IMAGE) > before_kill['s1']
    assert node.metric('thunder_cache_chunks_from_origin_total') == 0
    assert node.metric('thunder_cache_chunks_rejected_total') == 0
    assert node.metric('thunder_cache_chunks_verified_total') == (
        manifest.chunk_count)


def test_sigkill_mid_fill_then_restart(daemons, volume, image):
    path, manifest = volume
    node = daemons('victim', commit_interval=0.05)
    node.describe(IMAGE, manifest, {'type': 'file', 'path': path})
    node.start()
    errors = []

    def fill():
        try:
            for offset in range(0, SIZE, CHUNK):
                node.read(IMAGE, offset, CHUNK)
                # Paced, so that the kill below lands mid-fill however
                # fast the origin file is read (a quarter of the chunks
                # takes at least 0.3 s; the poll below looks every 10 ms).
                time.sleep(0.01)
        except Exception as e:
            errors.append(e)

    filler = threading.Thread(target=fill)
    filler.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        present = node.metric('thunder_cache_chunks_present', image=IMAGE)
        if present >= manifest.chunk_count // 4:
            break
        time.sleep(0.01)
    node.kill()
    filler.join(30)
    assert errors, 'the fill finished before the kill'
    # What the map claims after the crash is verified data.
    bits = chunkmap.read_map(node.cache_path(IMAGE, 'chunkmap'),
                             manifest.digest(), CHUNK, SIZE,
                             manifest.chunk_count)
    claimed = [i for i in range(manifest.chunk_count)
               if bits[i >> 3] & (1 << (i & 7))]
    assert 0 < len(claimed) < manifest.chunk_count
    with open(node.cache_path(IMAGE), 'r+b') as f:
        for index in claimed:
            offset, length = manifest.chunk_range(index)
            f.seek(offset)
            assert manifest.verify_chunk(index, f.read(length))
        # Damage one claimed chunk while the daemon is down.
        f.seek(manifest.chunk_range(claimed[0])[0])
        f.write(b'bitrot')
    node.start()
    # A peer reads everything through the restarted node.
    peer = daemons('peer')
    peer.describe(IMAGE, manifest, None, peers=[node])
    peer.start()
    assert peer.read(IMAGE, 0, SIZE) == image
    assert peer.metric('thunder_cache_chunks_rejected_total') == 0
    assert node.metric('thunder_cache_local_corrupt_total') == 1
    assert node.metric('thunder_cache_chunks_reverified_total') == (
        len(claimed) - 1)
    assert node.metric('thunder_cache_chunks_from_origin_total') == (
        manifest.chunk_count - len(claimed) + 1)


def test_graceful_stop_and_pid_file(daemons, volume, image):
    path, manifest = volume
    node = daemons('calm')
    node.describe(IMAGE, manifest, {'type': 'file', 'path': path})
    node.start()
    with open(node.pid_file) as f:
        assert int(f.read()) == node.pid
    # A second daemon with the same PID file refuses to start.
    twin = cache_daemons.Daemon(os.path.dirname(node.dir), 'calm')
    with pytest.raises(RuntimeError, match='exited with 1'):
        twin.start()
    assert node.read(IMAGE, 0, CHUNK * 4) == image[:CHUNK * 4]
    node.stop()
    assert node.proc.returncode == 0
    assert not os.path.exists(node.pid_file)
    assert not os.path.exists(node.socket_path)
    # Stopped cleanly: the chunks read are all in the map.
    bits = chunkmap.read_map(node.cache_path(IMAGE, 'chunkmap'),
                             manifest.digest(), CHUNK, SIZE,
                             manifest.chunk_count)
    assert bits[0] == 0x0f


def pool_read_bytes(conf, pool):
    """Bytes the OSDs served from ``pool``, once Ceph's stats settle.

    OSDs report their statistics every few seconds: the value is taken
    when it has not changed for 7 seconds.
    """
    last, since = None, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = subprocess.check_output(['rados', '-c', conf, 'df', '--format',
                                       'json'], timeout=30)
        value = [p['read_bytes'] for p in json.loads(out)['pools']
                 if p['name'] == pool][0]
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= 7:
            return value
        time.sleep(1)
    raise AssertionError('Ceph pool statistics did not settle')


# -- RBD origin ------------------------------------------------------------

def test_rbd_origin(daemons, ceph, image):
    """Four nodes over an image-volume in RBD on the real Ceph."""
    volume_id = str(uuid.uuid4())
    name = 'volume-%s' % volume_id
    manifest = manifest_mod.Manifest.build([image], CHUNK)
    with cache_daemons.rbd_image_volume(ceph, 'volumes', name, image,
                                        manifest):
        # The daemons read it with their own [origin] Ceph configuration.
        origin = {'type': 'rbd', 'pool': 'volumes', 'image': name}
        extra = '[origin]\nrbd_ceph_conf = %s' % ceph
        nodes = [daemons('r%d' % i, extra=extra) for i in range(4)]
        for i, d in enumerate(nodes):
            d.describe(IMAGE, manifest, origin,
                       peers=[] if i == 0 else [nodes[0]],
                       origin_volume_id=volume_id)
            d.start()
        trace = boot_trace(seed=9)
        before = pool_read_bytes(ceph, 'volumes')
        errors, digests = [], {}
        run_parallel([(replay, (d, trace, image, errors, digests))
                      for d in nodes])
        assert not errors, errors
        expected = expected_digest(trace, image)
        assert digests == {d.name: expected for d in nodes}
        touched = chunks_of(trace)
        from_origin = total(nodes, 'thunder_cache_chunks_from_origin_total')
        assert from_origin <= 1.1 * len(touched)
        # Counted at the origin itself: the bytes Ceph's OSD served from
        # the pool. Besides the chunks: each node's manifest read (its
        # header, then the whole) and librbd's own metadata reads.
        served = pool_read_bytes(ceph, 'volumes') - before
        touched_bytes = sum(manifest.chunk_range(i)[1] for i in touched)
        overhead = len(nodes) * (len(manifest.to_bytes()) + 64 * 1024)
        print('rbd: %d chunks touched (%d bytes); Ceph served %d bytes '
              '(%.3fx)' % (len(touched), touched_bytes, served,
                           served / touched_bytes))
        assert served <= 1.1 * touched_bytes + overhead
        # A wrong digest for the image record: the image is refused.
        bad = daemons('liar-record', extra=extra)
        bad.describe(IMAGE, manifest, origin, digest='0' * 64,
                     origin_volume_id=volume_id)
        bad.start()
        with pytest.raises(IOError, match='503'):
            bad.read(IMAGE, 0, 10)
        for d in nodes + [bad]:
            d.stop()


# -- hostile and stuck peers ------------------------------------------------
#
# The daemons run with fetch_timeout = 5 and min_transfer_rate = 1 MiB/s:
# a peer's answer for a 256 KiB chunk must be complete within 5.25 s. The
# hostile peers listen on other loopback addresses (127.0.0.3 and up).

# The bound on every read below: the deadline, then the next source, with
# a wide margin. A peer trickling a byte a second would hold the base code
# for days (each silent wait alone was timed).
READ_BOUND = 40


@pytest.fixture
def hostile(daemons):
    """Make scripted peers (tests.hostile_peer); all stopped after."""
    made = hostile_peer.Peers('127.0.0.3')
    yield made
    made.stop()


def _trickle_chunks(manifest, where):
    """Answers of a peer that trickles a byte a second into ``where``."""
    def answer(path):
        if path.endswith('/manifest'):
            return [hostile_peer.head(404)]
        index = int(path.rsplit('/', 1)[1])
        length = manifest.chunk_range(index)[1]
        if where == 'body':
            return [hostile_peer.head(200, length),
                    hostile_peer.trickle(b'\0' * length, 1.0)]
        return [hostile_peer.trickle(hostile_peer.head(200, length) +
                                     b'\0' * length, 1.0)]
    return answer


def _read_bounded(daemon, offset, length, seconds=READ_BOUND):
    reader = cache_daemons.control_client.LocalClient(daemon.socket_path,
                                                      timeout=seconds + 30)
    try:
        done, value, took = hostile_peer.bounded(
            lambda: reader.read(IMAGE, offset, length), seconds)
    finally:
        reader.close()
    assert done, '%s: the read still waits after %.0f s' % (daemon.name,
                                                            took)
    return value


@pytest.mark.parametrize('where', ['body', 'head'])
@pytest.mark.parametrize('fallback', ['origin', 'next-peer'])
def test_a_trickling_peer_costs_one_deadline(daemons, hostile, volume,
                                             image, where, fallback):
    """A peer trickling its answer is cut at its deadline, then backed off.

    The read completes from the next source with the right bytes; a
    second reader waiting on the same chunk meanwhile is released with
    them too, and the trickler is asked once.
    """
    path, manifest = volume
    origin = {'type': 'file', 'path': path}
    trickler = hostile(_trickle_chunks(manifest, where))
    peers = [trickler.url]
    if fallback == 'next-peer':
        seed = daemons('seed')
        seed.describe(IMAGE, manifest, origin)
        seed.start()
        assert seed.read(IMAGE, 0, 8 * CHUNK) == image[:8 * CHUNK]
        peers.append(seed.url)
        origin = None
    node = daemons('reader')
    node.describe(IMAGE, manifest, origin, peers)
    node.start()
    results = {}

    def read(key):
        results[key] = _read_bounded(node, 0, 2 * CHUNK)

    first = threading.Thread(target=read, args=('first',))
    first.start()
    # The waiter joins the fetch held by the trickler.
    deadline = time.monotonic() + 10
    while not trickler.paths and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    read('waiter')
    first.join(READ_BOUND + 5)
    assert results == {'first': image[:2 * CHUNK],
                       'waiter': image[:2 * CHUNK]}
    assert node.metric('thunder_cache_inflight_joins_total',
                       image=IMAGE) >= 1
    # The rest comes without asking the trickler again.
    assert _read_bounded(node, 2 * CHUNK, 6 * CHUNK) == \
        image[2 * CHUNK:8 * CHUNK]
    assert len([p for p in trickler.paths if '/chunks/' in p]) == 1
    assert node.metric('thunder_cache_fetch_errors_total',
                       image=IMAGE) == 1
    assert node.metric('thunder_cache_chunks_from_%s_total' % (
        'origin' if fallback == 'origin' else 'peers'), image=IMAGE) == 8


def _rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS for %d' % pid)


@pytest.mark.parametrize('declared', ['oversized', 'exact'])
def test_a_trickled_manifest_is_cut_and_memory_stays_bounded(
        daemons, hostile, volume, image, declared):
    """A hostile manifest: refused, or cut; never kept growing.

    A peer announcing a manifest far beyond what the descriptor allows is
    refused before its body; one announcing the right size but trickling
    it is cut at the deadline. Either way the read fails in bounded time
    (no origin, no other peer) and the daemon does not grow.
    """
    _path, manifest = volume
    raw = manifest.to_bytes()
    size = 64 * 1024 * 1024 if declared == 'oversized' else len(raw)

    def answer(path):
        if not path.endswith('/manifest'):
            return [hostile_peer.head(404)]
        return [hostile_peer.head(200, size),
                hostile_peer.trickle(raw + b'\0' * 1024, 1.0)]

    liar = hostile(answer)
    node = daemons('no-origin')
    node.describe(IMAGE, manifest, None, [liar.url])
    node.start()
    before = _rss_kib(node.pid)
    error = _read_bounded(node, 0, 10)
    assert isinstance(error, IOError), error
    assert '503' in str(error)
    assert len(liar.paths) == 1
    # Nothing like the 64 MiB announced was allocated.
    assert _rss_kib(node.pid) - before < 24 * 1024
    assert 'manifest' in node.log()


def test_redirect_to_a_refused_address_is_not_followed(daemons, hostile,
                                                       volume, image):
    """A peer redirecting to an address outside allowed_networks.

    The node's policy allows 127.0.0.3/32 only: the redirect target, a
    canary listening on 127.0.0.4, must never see a connection; the
    redirecting peer is backed off and the origin serves.
    """
    path, manifest = volume
    canary = hostile(lambda p: [hostile_peer.head(200, CHUNK),
                                b'\0' * CHUNK], host='127.0.0.4')
    redirector = hostile(lambda p: [hostile_peer.head(
        307, 0, [('Location', canary.url + p)])])
    node = daemons('redirected', extra='\n'.join([
        '[peer]', 'allowed_networks = 127.0.0.3/32']))
    node.describe(IMAGE, manifest, {'type': 'file', 'path': path},
                  [redirector.url])
    node.start()
    assert _read_bounded(node, 0, 4 * CHUNK) == image[:4 * CHUNK]
    assert canary.connections == 0
    assert len(redirector.paths) == 1
    assert 'outside the allowed peer addresses' in node.log()


# -- advertisements ---------------------------------------------------------

def test_bogus_advertisements_cost_at_most_one_deadline_each(
        daemons, hostile, volume, image):
    """Advertised black holes: an implausible since, a cap, back-off.

    The image-volume's metadata (in a fake Cinder) lists four peers that
    accept connections and never answer: one claiming to hold the image
    since before its image-volume existed (ignored: never contacted), and
    three plausible ones, oldest first, of which the node takes two
    ([peer] max_peers_per_image = 2). Each of those is contacted once,
    cut at its deadline and backed off: the whole image is read with two
    failed requests, not one per chunk.
    """
    path, manifest = volume
    volume_id = str(uuid.uuid4())
    now = int(time.time())
    created = now - 3600
    holes = [hostile(lambda p: [hostile_peer.HANG], host='127.0.0.%d' % i)
             for i in range(5, 9)]
    metadata = {
        'thunder_peer_early': '%s %d %d' % (holes[0].url, created - 600,
                                            now + 300),
    }
    for i, hole in enumerate(holes[1:]):
        metadata['thunder_peer_hole%d' % i] = '%s %d %d' % (
            hole.url, created + 10 + i, now + 300)
    cinder = cache_daemons.FakeCinder(volume_id, time.strftime(
        '%Y-%m-%dT%H:%M:%S.000000', time.gmtime(created)), metadata)
    cinder.start()
    try:
        node = daemons('advertised', extra='\n'.join([
            '[peer]', 'max_peers_per_image = 2'] + cinder.options()))
        with open(os.path.join(node.dir, 'images.d', IMAGE + '.json'),
                  'w') as f:
            json.dump({'manifest_digest': manifest.digest(),
                       'image_size': manifest.image_size,
                       'origin': {'type': 'file', 'path': path},
                       'origin_volume_id': volume_id, 'peers': []}, f)
        node.start()
        assert _read_bounded(node, 0, SIZE, seconds=90) == image
        assert cinder.gets >= 1
        assert holes[0].connections == 0
        assert [len(h.paths) for h in holes[1:]] == [1, 1, 0]
        assert node.metric('thunder_cache_fetch_errors_total',
                           image=IMAGE) == 2
        # This node advertised itself.
        assert 'thunder_peer_advertised' in cinder.metadata
    finally:
        cinder.stop()


# -- hostile clients of the peer server --------------------------------------

HALF_HEAD = ('GET /v1/images/%s/chunks/0 HTTP/1.1\r\nHost: x\r\n'
             'X-Slow: ' % IMAGE).encode()


class _Slowloris:
    """Keeps half-sent request heads open, from many addresses.

    ``sources`` has the source address of each connection; every one the
    server closes is opened again at once, and the open ones get one more
    byte of their head every 0.5 s (no wait is long enough for an idle
    timeout). ``lifetimes`` are the seconds each lived.
    """

    def __init__(self, port, sources):
        self.port = port
        self.sources = sources
        self.lifetimes = []
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 60
        while self.opened < len(self.sources):
            assert time.monotonic() < deadline, 'the flood did not start'
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _open(self, source):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect(('127.0.0.1', self.port))
            s.sendall(HALF_HEAD)
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def _run(self):
        live = {}
        selector = selectors.DefaultSelector()
        trickle = 0.0
        try:
            while not self._stop.is_set():
                for source in self.sources[len(live):]:
                    s = self._open(source)
                    if s is not None:
                        live[s] = time.monotonic()
                        selector.register(s, selectors.EVENT_READ)
                closed = [key.fileobj for key, _ in selector.select(0.1)]
                if time.monotonic() >= trickle:
                    trickle = time.monotonic() + 0.5
                    for s in live:
                        try:
                            s.send(b'z')
                        except OSError:
                            closed.append(s)
                for s in set(closed):
                    try:
                        if s.recv(4096):
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    self.lifetimes.append(time.monotonic() - live.pop(s))
                    selector.unregister(s)
                    s.close()
        finally:
            for s in live:
                s.close()
            selector.close()


def _threads(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('Threads:'):
                return int(line.split()[1])


def test_slowloris_flood_does_not_stop_peer_serving(daemons, volume, image):
    """300 half-sent heads from 11 addresses; a real peer still reads.

    100 of them come from the peer's own address (more than an address
    may hold), 200 from 127.0.0.2 to 127.0.0.11. The flooded node answers
    its peer with chunks (200, never 503), keeps no thread per hostile
    connection, and closes each of them at the head deadline however
    slowly it trickles.
    """
    path, manifest = volume
    seed = daemons('flooded', peer_options=['head_timeout = 2'])
    seed.describe(IMAGE, manifest, {'type': 'file', 'path': path})
    seed.start()
    # No origin: every chunk must come from the flooded node.
    peer = daemons('peer', extra='read_retry = 5')
    peer.describe(IMAGE, manifest, None, peers=[seed])
    peer.start()
    threads = _threads(seed.pid)
    sources = ['127.0.0.1'] * 100 + ['127.0.0.%d' % (2 + i // 20)
                                     for i in range(200)]
    with _Slowloris(seed.port, sources) as flood:
        assert peer.read(IMAGE, 0, SIZE) == image
        # No thread per hostile connection (a few for the peer's).
        assert _threads(seed.pid) <= threads + 8
        time.sleep(3)   # past the head deadline of every hostile head
    assert peer.metric('thunder_cache_chunks_from_peers_total') == (
        manifest.chunk_count)
    assert seed.metric('thunder_cache_responses_total', status='503') == 0
    assert seed.metric('thunder_cache_chunks_served_to_peers_total') == (
        manifest.chunk_count)
    print('flood: %d hostile connections, %d closed by the server, longest '
          'lived %.1f s; flooded node at %d threads' % (
              flood.opened, len(flood.lifetimes), max(flood.lifetimes),
              threads))
    assert len(flood.lifetimes) >= 300
    # head_timeout is 2 s; the base code never closed them.
    assert max(flood.lifetimes) < 2 + 10
    assert seed.metric('thunder_cache_head_timeouts_total') > 0


class _Recorder:
    """A TCP relay to ``port`` that records the bytes clients send."""

    def __init__(self, port=None):
        self.port = port
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.url = 'http://127.0.0.1:%d' % self.listener.getsockname()[1]
        self.sent = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(('127.0.0.1', self.port))
            record = bytearray()
            self.sent.append(record)
            threading.Thread(target=self._pump, args=(client, upstream,
                                                      record),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client,
                                                      None),
                             daemon=True).start()

    @staticmethod
    def _pump(source, sink, record):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record is not None:
                    record += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def requests(self):
        """The request heads clients sent, in order."""
        heads = []
        for record in self.sent:
            heads += [bytes(h) + b'\r\n\r\n' for h in bytes(record).split(
                b'\r\n\r\n') if h]
        return heads

    def close(self):
        self.listener.close()


def _replay(port, request):
    """Send captured bytes as they are; the answer's status line."""
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = b''
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    return answer.split(b'\r\n', 1)[0]


def test_captured_request_cannot_be_replayed(daemons, volume, image):
    """A request seen on the wire is refused by its node and by others."""
    path, manifest = volume
    origin = {'type': 'file', 'path': path}
    recorder = _Recorder()
    try:
        # The target is known to its peers by the recorder's address,
        # which sees every byte they send it.
        target = daemons('target', extra='[node]\nadvertise_url = %s'
                         % recorder.url)
        recorder.port = target.port
        target.describe(IMAGE, manifest, origin)
        target.start()
        other = daemons('other')
        other.describe(IMAGE, manifest, origin)
        other.start()
        requester = daemons('requester')
        requester.describe(IMAGE, manifest, None, peers=[recorder.url])
        requester.start()
        assert requester.read(IMAGE, 0, CHUNK) == image[:CHUNK]
        captured = [r for r in recorder.requests() if r.startswith(
            b'GET /v1/images/%s/chunks/0 ' % IMAGE.encode())]
        assert len(captured) == 1
        # The same bytes again, to the node they were sent to, and to
        # another node of the deployment.
        assert _replay(target.port, captured[0]) == (
            b'HTTP/1.1 401 Unauthorized')
        assert _replay(other.port, captured[0]) == (
            b'HTTP/1.1 401 Unauthorized')
        assert target.metric('thunder_cache_replays_refused_total') == 1
        assert other.metric('thunder_cache_auth_failures_total') == 1
        assert other.metric('thunder_cache_chunks_served_to_peers_total',
                            image=IMAGE) == 0
        assert target.metric('thunder_cache_chunks_served_to_peers_total',
                             image=IMAGE) == 1
        # Restarted, the target has forgotten the nonces it saw: it
        # refuses every token made before the second it started in.
        issued = int(re.search(rb'X-Thunder-Auth: v2:([0-9]+):',
                               captured[0]).group(1))
        target.stop()
        while int(time.time()) <= issued:
            time.sleep(0.05)
        target.start()
        assert _replay(target.port, captured[0]) == (
            b'HTTP/1.1 503 Service Unavailable')
        assert target.metric('thunder_cache_chunks_served_to_peers_total',
                             image=IMAGE) == 0
    finally:
        recorder.close()


def test_tls_between_daemons(daemons, volume, image, workdir):
    """Image bytes over TLS; a node of another CA and plain HTTP get none."""
    path, manifest = volume
    ours = pki.Pki(str(workdir / 'pki'))
    seed = daemons('tls-seed', tls=(ours.ca_file,) + ours.node(
        'tls-seed', ['127.0.0.1']))
    seed.describe(IMAGE, manifest, {'type': 'file', 'path': path})
    seed.start()
    reader = daemons('tls-reader', tls=(ours.ca_file,) + ours.node(
        'tls-reader', ['127.0.0.1']))
    reader.describe(IMAGE, manifest, None, peers=[seed])
    reader.start()
    assert reader.url.startswith('https://')
    assert reader.read(IMAGE, 0, SIZE) == image
    assert reader.metric('thunder_cache_chunks_from_peers_total') == (
        manifest.chunk_count)
    served = seed.metric('thunder_cache_bytes_served_to_peers_total')
    assert served == SIZE

    # A node whose certificate another CA signed: refused both ways.
    theirs = pki.Pki(str(workdir / 'other-pki'), name='another CA')
    rogue_files = theirs.node('rogue', ['127.0.0.1'])
    rogue = daemons('tls-rogue', tls=(theirs.ca_file,) + rogue_files,
                    extra='read_retry = 2')
    rogue.describe(IMAGE, manifest, None, peers=[seed])
    rogue.start()
    with pytest.raises(IOError, match='503'):
        rogue.read(IMAGE, 0, CHUNK)
    context = ssl.create_default_context(cafile=ours.ca_file)
    context.load_cert_chain(*rogue_files)
    failures = seed.metric('thunder_cache_tls_handshake_failures_total')
    with socket.create_connection(('127.0.0.1', seed.port), timeout=10) as s:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(s, server_hostname='127.0.0.1') as t:
                t.sendall(b'GET /metrics HTTP/1.1\r\n\r\n')
                # TLS 1.3: the refusal arrives with the first read.
                assert t.recv(100) == b''
                raise ConnectionError('closed without an answer')
    # Plain HTTP to the TLS port: no HTTP answer at all.
    with socket.create_connection(('127.0.0.1', seed.port), timeout=10) as s:
        s.sendall(b'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n')
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            answer = b''
        assert b'HTTP/1.1' not in answer
    assert seed.metric('thunder_cache_tls_handshake_failures_total') >= (
        failures + 2)
    assert seed.metric('thunder_cache_bytes_served_to_peers_total') == served
