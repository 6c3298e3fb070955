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

"""Bulk provisioning: N emulated compute nodes boot from one image at once.

VMThunder's experiment on one machine. Every node is a network namespace
with one veth link to a bridge (the "switch", in a namespace of its own),
shaped by ``tc`` (tbf) to ``--link-mbit`` in both directions, and runs the
real node cache daemon (``python -m thunder_cache.daemon``). The origin is
one more such node: a ``thunder-cache`` daemon whose cache of the image is
complete (hydrated from the image file before the runs), serving it over
the peer protocol through its own shaped link, so that what it sends is
counted both by its metrics (``bytes_served_to_peers``) and by its qdisc.

Every node then replays the same boot: the block reads of a trace
(``benchmarks/data/boot-trace.json`` when present, else ``--trace
synthetic``), in order, sleeping the trace's think time between
consecutive reads (``--think-scale``), and checks the bytes it read
against the image. The reader reads as ``thunder-volume-server`` does
(``--reader native``): ``ensure_chunks`` on the daemon's control socket
for the chunks it was not told are usable, the bytes with ``pread`` from
the cache file (the daemons then have ``[blockdev]`` on, for the control
socket: their volume files are mounted, no volume is made); or
(``--reader socket``) every read through the daemon's local socket. Four
strategies, each for every N of ``--nodes``:

full-copy
    every node first downloads the whole image from the origin (4 streams
    of chunk requests through its daemon, which verifies and caches them:
    what Nova's image cache and Cinder's download path do), then boots
    from its local copy;
on-demand
    the daemon fetches each missing chunk from the origin only (its peer
    list is the origin alone, which serves every node: no tree);
peer
    the peer mode: every node lists the origin, then every node, in the
    same order; the daemons build their tree with ``max_children = 2``.
    The origin admits one child, as the image-volume is read by the root
    holder only in production (there the origin is RBD, not a peer);
peer+prefetch
    the same with the boot's chunk trace placed for replay
    (``<cache_dir>/<image>/trace``, ``[prefetch] replay = true``).

The two single-origin strategies take N times longer with N nodes: a
run whose origin transfer alone (N * image, or N * the chunks the trace
touches, over one link) would exceed ``--origin-budget`` seconds is not
run but extrapolated linearly from the largest such run, and marked so.

Time to ready is measured from the common start to the node's last read.
The bounds for N nodes reading a working set W over links of B: one
origin, N*W/B; an ideal swarm, W/B (W: the bytes the trace reads). At the
start the machine's capacity is measured (aggregate throughput of 4 nodes
reading from the origin through unshaped links) and the link rate scaled
down so that N_max * B stays within half of it.

    sudo tox -e bench -- benchmarks/bulk_boot.py [--nodes 1,2,4,8,16,32]
        [--link-mbit 1000] [--trace PATH|synthetic] [--image-mib 256]
        [--think-scale 1] [--reader native|socket] [--compare-ref REV
        [--ref-reader native|socket]] [--out doc/source/bulk-boot] [--quick]

Writes ``results.csv``, ``run.json``, ``results.txt`` (the table) and
``makespan.png``, ``origin-bytes.png``, ``mean-ready.png`` into ``--out``.
Namespaces, veths, qdiscs, daemons (by PID) and the temporary directory
are removed whatever happens, including SIGTERM and Ctrl-C.
"""

import argparse
import csv
import datetime
import functools
import hashlib
import json
import math
import multiprocessing
import os
import queue
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import blockdev_mechanisms as bm
from benchmarks import cache_io
from thunder_cache.boot import trace as trace_mod
from thunder_cache.control import client as control_client
from thunder_cache.control import protocol as control_protocol
from thunder_cache import options as cache_options
from thunder_common import manifest as manifest_mod
from thunder_stack import netlab

REPO = cache_io.REPO
MiB = 1024 * 1024
GiB = 1024 * MiB
KiB = 1024
IMAGE_ID = 'bulk-boot'
PORT = 7485
SECRET = b'bulk-boot-benchmark-shared-secret'
DEFAULT_TRACE = os.path.join(REPO, 'benchmarks', 'data', 'boot-trace.json')
DEFAULT_OUT = os.path.join(REPO, 'doc', 'source', 'bulk-boot')
STRATEGIES = ('full-copy', 'on-demand', 'peer', 'peer+prefetch')
READERS = ('native', 'socket')
SUBNET = netlab.SUBNET
#: Share of the measured capacity the busiest run may use.
HEADROOM = 0.5
#: Concurrent chunk requests of a full copy's download, per node.
DOWNLOAD_STREAMS = 4
CALIBRATION_NODES = 4
GIGABIT = 1e9 / 8
# The daemons' network timeouts stretched with the links, and the rate a
# peer's answer must keep up slowed down with them (Bench._timeouts).
SCALED_TIMEOUTS = ('fetch_timeout', 'relay_timeout', 'child_ttl')
SCALED_RATES = ('min_transfer_rate',)


# -- the workload -----------------------------------------------------------

def synthetic_trace(image_size, seed=1, seconds=5.0, fraction=0.1):
    """A boot-like trace, in the format of ``benchmarks/data``'s.

    A sequential stretch of large reads near the start (boot loader,
    kernel, initramfs: an eighth of the working set), then clusters of
    1-16 sequential reads of 4-256 KiB (files), each cluster near the
    previous one with probability 0.7 (a directory) and elsewhere in the
    image otherwise, until ``fraction`` of the image is read; then a tenth
    of the reads again. Think time: short gaps inside a cluster, long
    (exponential) ones between clusters, scaled to ``seconds`` in all.
    """
    rng = random.Random(seed)
    target = max(int(image_size * fraction), 64 * KiB)
    reads = []          # [gap before, offset, length]
    position = MiB
    kernel_end = min(image_size, MiB + target // 8)
    while position < kernel_end:
        length = min(256 * KiB, kernel_end - position)
        reads.append([0.001, position, length])
        position += length
    total = position - MiB
    while total < target:
        if rng.random() < 0.7:
            position += rng.randrange(-2 * MiB, 2 * MiB)
        else:
            position = int(rng.betavariate(1.2, 2.0) * image_size)
        position = min(max(position, 0), image_size - 4 * KiB) // 4096 * 4096
        gap = rng.expovariate(1.0)
        for _ in range(rng.randint(1, 16)):
            length = min(rng.choice([4, 4, 4, 16, 32, 64, 128, 128, 256]) *
                         KiB, image_size - position)
            if length <= 0:
                break
            reads.append([gap, position, length])
            gap = 0.0002
            position += length
            total += length
    again = rng.sample(range(len(reads)), len(reads) // 10)
    reads += [[rng.expovariate(1.0) * 0.2] + reads[i][1:]
              for i in sorted(again)]
    scale = seconds / sum(r[0] for r in reads)
    clock, out = 0.0, []
    for gap, offset, length in reads:
        clock += gap * scale
        out.append([round(clock, 6), offset, length])
    return {'format': 1,
            'image': {'size': image_size, 'sha256': None,
                      'name': 'synthetic (seed %d)' % seed},
            'boot': {'accel': 'synthetic', 'seconds': seconds},
            'reads': out}


def load_trace(path):
    """A boot trace file, checked."""
    with open(path) as f:
        data = json.load(f)
    if data.get('format') != 1:
        raise ValueError('%s: not a format 1 boot trace' % path)
    size = data['image']['size']
    reads = data['reads']
    if not isinstance(size, int) or size <= 0 or not reads:
        raise ValueError('%s: no image size or no reads' % path)
    last = None
    for read in reads:
        t, offset, length = read
        if (offset < 0 or length <= 0 or offset + length > size or
                (last is not None and t < last)):
            raise ValueError('%s: bad read %r' % (path, read))
        last = t
    return data


def footprint(reads):
    """Bytes of the union of the reads' ranges: the working set W."""
    total, end = 0, -1
    for _, offset, length in sorted(reads, key=lambda r: r[1]):
        start, stop = max(offset, end), offset + length
        if stop > start:
            total += stop - start
        end = max(end, stop)
    return total


def chunk_order(reads, chunk):
    """Chunk indexes in the order the trace first reads them."""
    seen, order = set(), []
    for _, offset, length in reads:
        for index in range(offset // chunk,
                           (offset + length - 1) // chunk + 1):
            if index not in seen:
                seen.add(index)
                order.append(index)
    return order


def write_image(path, size, chunk, seed):
    """The image-volume: ``size`` seeded random bytes, then the manifest."""
    rng = random.Random(seed)
    builder = manifest_mod.ManifestBuilder(chunk)
    with open(path, 'wb') as f:
        for offset in range(0, size, chunk):
            data = rng.randbytes(min(chunk, size - offset))
            builder.update(data)
            f.write(data)
        manifest = builder.finish()
        f.seek(manifest_mod.volume_offset(size))
        f.write(manifest.to_bytes())
    return manifest


def expected_digest(path, reads):
    """sha256 of the image's bytes of every read, in trace order."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for _, offset, length in reads:
            h.update(os.pread(f.fileno(), length, offset))
    return h.hexdigest()


# -- the emulated network ---------------------------------------------------

sh = netlab.sh
Testbed = netlab.Testbed
leftover_namespaces = netlab.leftover_namespaces


# -- the daemons ------------------------------------------------------------

class Node:
    """A thunder-cache daemon in a namespace of the testbed."""

    def __init__(self, workdir, name, host, max_children=2, replay=False,
                 peer_options=(), tree=REPO, control=False):
        self.name = name
        self.tree = tree
        self.ns, self.address, _port = host
        self.url = 'http://%s:%d' % (self.address, PORT)
        self.dir = os.path.join(workdir, name)
        self.cache_dir = os.path.join(self.dir, 'cache')
        self.descriptors = os.path.join(self.dir, 'images.d')
        os.makedirs(self.descriptors, exist_ok=True)
        os.makedirs(self.cache_dir, exist_ok=True)
        self.socket = os.path.join(self.dir, 'local.sock')
        self.log = os.path.join(self.dir, 'daemon.log')
        # The control socket (ensure_chunks) of the native reader: the
        # volume files are mounted (Python FUSE) but never opened.
        self.control = (os.path.join(self.dir, 'control.sock') if control
                        else None)
        blockdev = ['[blockdev]', 'enabled = true', 'volume_server = python',
                    'allow_other = false',
                    'mount_dir = %s' % os.path.join(self.dir, 'volumes'),
                    'layers_dir = %s' % os.path.join(self.dir, 'layers'),
                    'control_socket = %s' % self.control] if control else []
        secret = os.path.join(workdir, 'secret')
        if not os.path.exists(secret):
            with open(secret, 'wb') as f:
                f.write(SECRET)
        self.conf = os.path.join(self.dir, 'thunder-cache.conf')
        with open(self.conf, 'w') as f:
            f.write('\n'.join([
                '[node]', 'node_id = %s' % name,
                'listen_address = %s' % self.address,
                'listen_port = %d' % PORT, 'advertise_url = %s' % self.url,
                'cache_dir = %s' % self.cache_dir,
                'descriptors_dir = %s' % self.descriptors,
                'local_socket = %s' % self.socket,
                'pid_file = %s' % os.path.join(self.dir, 'pid'),
                '[peer]', 'shared_secret_file = %s' % secret,
                # The testbed's network (Testbed), named rather than
                # found from the interface.
                'allowed_networks = %s.0.0/16' % SUBNET,
                'max_children = %d' % max_children] + list(peer_options) + [
                # The origin node reads the image-volume file in workdir.
                '[origin]', 'file_origin_dirs = %s' % workdir,
                '[advertise]', 'enabled = false',
                '[prefetch]', 'record = false',
                'replay = %s' % ('true' if replay else 'false'),
                'hydrate = false'] + blockdev + ['']))
        self.proc = None

    def describe(self, manifest, origin=None, peers=()):
        with open(os.path.join(self.descriptors, IMAGE_ID + '.json'),
                  'w') as f:
            json.dump({'manifest_digest': manifest.digest(),
                       'image_size': manifest.image_size, 'origin': origin,
                       'peers': list(peers)}, f)

    def place_trace(self, indexes):
        directory = os.path.join(self.cache_dir, IMAGE_ID)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, 'trace'), 'w') as f:
            f.write(trace_mod.encode(indexes))

    def start(self, cleanup):
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                ['ip', 'netns', 'exec', self.ns, sys.executable, '-m',
                 'thunder_cache.daemon', '--config-file', self.conf],
                cwd=self.tree, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        cleanup.callback(self.stop)

    def ready(self):
        if self.proc.poll() is not None:
            with open(self.log, errors='replace') as f:
                raise RuntimeError('%s exited with %s: %s' % (
                    self.name, self.proc.returncode, f.read()[-2000:]))
        if not os.path.exists(self.socket) or (
                self.control and not os.path.exists(self.control)):
            return False
        try:
            self.metrics()
        except OSError:
            return False
        return True

    def metrics(self):
        client = control_client.LocalClient(self.socket, timeout=10)
        try:
            text = client._get('/metrics').decode()
        finally:
            client.close()
        if REPO not in sys.path:
            sys.path.append(REPO)
        from tests.functional.thunder_cache import cache_daemons
        totals = {}
        for name, labels, value in cache_daemons.parse_metrics(text):
            if labels.get('image', IMAGE_ID) == IMAGE_ID:
                name = name[len('thunder_cache_'):]
                if name.endswith('_total'):
                    name = name[:-len('_total')]
                totals[name] = totals.get(name, 0.0) + value
        return totals

    def stop(self):
        """SIGTERM by PID, SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def cpu_times(pid):
    """(user, system) CPU seconds of process ``pid``, children included.

    From ``/proc/PID/stat`` (utime, stime, cutime, cstime); (0, 0) if the
    process is gone.
    """
    tick = os.sysconf('SC_CLK_TCK')
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return 0.0, 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + cutime) / tick, (stime + cstime) / tick


def cpu_columns(daemon_cpu, received, uploads, origin_sent):
    """The run's CPU columns: user and system seconds, per GiB moved.

    ``daemon_cpu``: (user, system) of the origin, then of every node;
    ``received``/``uploads``: every node's bytes in and out. ``cpu_gib_rx``
    is the nodes' CPU seconds per GiB they received (the issue's figure),
    ``node_cpu_gib_rx_max`` the worst single node's; ``origin_cpu_gib_tx``
    the origin's per GiB it sent.
    """
    nodes = daemon_cpu[1:]
    user = sum(u for u, _ in nodes)
    system = sum(s for _, s in nodes)
    per_node = [sum(c) / (r / GiB) for c, r in zip(nodes, received) if r]
    origin = sum(daemon_cpu[0])
    return {
        'node_cpu_user_s': round(user, 2), 'node_cpu_sys_s': round(system, 2),
        'origin_cpu_user_s': round(daemon_cpu[0][0], 2),
        'origin_cpu_sys_s': round(daemon_cpu[0][1], 2),
        'cpu_gib_rx': round((user + system) / (sum(received) / GiB), 2)
        if sum(received) else '',
        'node_cpu_gib_rx_max': round(max(per_node), 2) if per_node else '',
        'node_cpu_gib_tx': round((user + system) / (sum(uploads) / GiB), 2)
        if sum(uploads) else '',
        'origin_cpu_gib_tx': round(origin / (origin_sent / GiB), 2)
        if origin_sent else '',
    }


def start_all(nodes, cleanup, timeout=60):
    for node in nodes:
        node.start(cleanup)
    deadline = time.monotonic() + timeout
    waiting = list(nodes)
    while waiting:
        waiting = [n for n in waiting if not n.ready()]
        if waiting and time.monotonic() > deadline:
            raise RuntimeError('%s did not start' % waiting[0].name)
        time.sleep(0.05)


def read_chunks(socket_path, manifest, indexes, streams, whole=False):
    """Read chunks ``indexes`` through a daemon, ``streams`` at a time.

    Only their first byte unless ``whole``: the daemon still fetches,
    verifies and caches every chunk, but does not copy it to us.
    """
    errors = []

    def worker(part):
        client = control_client.LocalClient(socket_path, timeout=300)
        try:
            for index in part:
                offset, length = manifest.chunk_range(index)
                client.read(IMAGE_ID, offset, length if whole else 1)
        except Exception as e:
            errors.append(e)
        finally:
            client.close()

    in_threads(worker, [(indexes[s::streams],) for s in range(streams)])
    if errors:
        raise errors[0]


def in_threads(func, jobs):
    """``func(*job)`` for every job at once, each in a thread."""
    threads = [threading.Thread(target=func, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class NativeReader:
    """Reads an image as the native volume server does for a guest.

    ``thunder-volume-server`` (``volumes/native/volume_server.c``) reads a
    chunk from the cache's data file once the daemon said it is usable;
    for the others it sends ``ensure_chunks`` (one request per run of at
    most 64 of them a read needs) on the control socket, over a kept
    connection, and keeps the map of usable chunks the answer brings (only
    the chunks asked for while the daemon records a boot trace:
    ``observed``). So does this reader, in Python, in the reader process.
    """

    MAX_ENSURE = 64

    def __init__(self, control_path, data_path, manifest, timeout=300):
        self.control_path = control_path
        self.data_path = data_path
        self.manifest = manifest
        self.timeout = timeout
        self.usable = bytearray(manifest.chunk_count)
        self.requests = 0
        self._sock = self._lines = None
        self._fd = None

    def _call(self, request):
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(self.control_path)
            self._sock, self._lines = sock, sock.makefile('rb')
        self._sock.sendall(control_protocol.encode(request))
        reply = json.loads(self._lines.readline(
            control_protocol.MAX_LINE + 1) or b'null')
        if not isinstance(reply, dict) or not reply.get('ok'):
            raise IOError('ensure_chunks %s: %r' % (request, reply))
        return reply['result']

    def _ensure(self, first, last):
        self.requests += 1
        result = self._call({'op': 'ensure_chunks', 'image_id': IMAGE_ID,
                             'first': first, 'last': last})
        usable = result['usable'].encode('ascii')
        if len(usable) != len(self.usable):
            raise IOError('a map of %d chunks, expected %d'
                          % (len(usable), len(self.usable)))
        lo, hi = ((first, last + 1) if result['observed']
                  else (0, len(usable)))
        for index in range(lo, hi):
            if usable[index] == 0x31:       # '1'
                self.usable[index] = 1
        if not all(self.usable[first:last + 1]):
            raise IOError('chunks %d-%d not usable after ensure_chunks'
                          % (first, last))

    def read(self, offset, length):
        """``length`` bytes of the image at ``offset``."""
        chunk = self.manifest.chunk_size
        first, last = offset // chunk, (offset + length - 1) // chunk
        index = first
        while index <= last:
            if self.usable[index]:
                index += 1
                continue
            end = index
            while (end < last and end - index + 1 < self.MAX_ENSURE and
                   not self.usable[end + 1]):
                end += 1
            self._ensure(index, end)
            index = end + 1
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_RDONLY)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise IOError('short read of %s' % self.data_path)
        return data

    def close(self):
        for thing in (self._lines, self._sock):
            if thing is not None:
                thing.close()
        self._sock = self._lines = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def reader_cpu():
    """CPU seconds (user + system) this process used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one boot ---------------------------------------------------------------

def boot(node, manifest, reads, think_scale, download, start_at, results,
         k, reader='native'):
    """A reader process: wait for the start, [download,] replay, report.

    ``reader``: ``native`` reads as the native volume server does
    (:class:`NativeReader`), ``socket`` through the daemon's local socket
    (every read a request the daemon answers). The report says how much
    CPU the replay used (``reader_cpu``: what stands for the volume
    server).
    """
    out = {'node': k, 'ok': False, 'download': None}
    try:
        while time.monotonic() < start_at:
            time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
        cpu = reader_cpu()
        if download:
            read_chunks(node.socket, manifest,
                        list(range(manifest.chunk_count)), DOWNLOAD_STREAMS)
            out['download'] = time.monotonic() - start_at
        if reader == 'native':
            client = NativeReader(node.control, os.path.join(
                node.cache_dir, IMAGE_ID, 'data'), manifest)
            read = client.read
        else:
            client = control_client.LocalClient(node.socket, timeout=300)
            read = functools.partial(client.read, IMAGE_ID)
        h = hashlib.sha256()
        previous = reads[0][0]
        for t, offset, length in reads:
            gap = (t - previous) * think_scale
            previous = t
            if gap > 0:
                time.sleep(gap)
            h.update(read(offset, length))
        out['ready'] = time.monotonic() - start_at
        out['digest'] = h.hexdigest()
        out['requests'] = getattr(client, 'requests', None)
        if out['requests'] is None:     # one request per chunk a read spans
            chunk = manifest.chunk_size
            out['requests'] = sum((o + n - 1) // chunk - o // chunk + 1
                                  for _, o, n in reads)
        out['ok'] = True
        client.close()
        out['reader_cpu'] = reader_cpu() - cpu
    except Exception as e:
        out['error'] = '%s: %s' % (type(e).__name__, e)
    results.put(out)


# -- the runs -----------------------------------------------------------------

def percentile(values, q):
    """Nearest-rank percentile (below 100 values, p99 is the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def _end(proc):
    if proc.is_alive():
        proc.terminate()
    proc.join(10)


class Progress:
    """One status line on stderr (a new line per run when not a tty)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.total = 1
        self.done = 0
        self._last = None

    def say(self, message):
        if self.tty:
            self.stream.write('\r\033[K')
        self.stream.write('.. %s\n' % message)
        self.stream.flush()

    def update(self, label, ready, nodes, seconds):
        width = 30
        filled = int(width * (self.done + ready / max(nodes, 1)) /
                     self.total)
        line = '[%s%s] run %d/%d %-22s %3d/%-3d ready %6.1f s' % (
            '#' * filled, '.' * (width - filled), self.done + 1, self.total,
            label, ready, nodes, seconds)
        if self.tty:
            self.stream.write('\r\033[K' + line)
            self.stream.flush()
        elif ready == nodes and self._last != label:
            self._last = label
            self.stream.write(line + '\n')
            self.stream.flush()

    def finish_run(self):
        self.done += 1
        if self.tty:
            self.stream.write('\n')


class Bench:
    """The testbed, the image, the origin, and the runs."""

    def __init__(self, args, workdir, cleanup, progress):
        self.args = args
        self.workdir = workdir
        self.cleanup = cleanup
        self.progress = progress
        self.trace = args.trace_data
        self.reads = self.trace['reads']
        self.size = self.trace['image']['size']
        self.chunk = args.chunk_kib * KiB
        self.order = chunk_order(self.reads, self.chunk)
        self.W = footprint(self.reads)
        self.Wc = sum(min(self.chunk, self.size - i * self.chunk)
                      for i in self.order)
        self.think = (self.reads[-1][0] - self.reads[0][0]) * args.think_scale
        self.testbed = Testbed('bb%d-' % os.getpid(), max(args.nodes))
        self.volume = os.path.join(workdir, 'image-volume')
        self.run_dir = os.path.join(workdir, 'run')
        self.manifest = None
        self.digest = None
        self.rate = None        # bytes/s of every link, each way
        self.capacity = None
        self.rate_reason = ''
        self.rows = []
        self.mp = multiprocessing.get_context('fork')
        self.timeout_factor = 1.0
        self.peer_options = self._timeouts()
        self.build = git_describe(REPO)
        self.ref_tree = None    # the --compare-ref build's worktree
        self.ref_rows = []

    def checkout_ref(self):
        """A ``git worktree`` of ``--compare-ref`` in the work directory."""
        tree = os.path.join(self.workdir, 'ref')
        bm.run(['git', '-C', REPO, 'worktree', 'add', '--detach', tree,
                self.args.compare_ref])
        self.cleanup.callback(lambda: bm.run(
            ['git', '-C', REPO, 'worktree', 'remove', '--force', tree],
            check=False))
        self.ref_tree = tree

    # -- set-up ------------------------------------------------------------

    def prepare(self):
        self.progress.say('building a %.0f MiB image (seed %d) and its '
                          'manifest, %d KiB chunks' % (
                              self.size / MiB, self.args.seed,
                              self.chunk // KiB))
        self.manifest = write_image(self.volume, self.size, self.chunk,
                                    self.args.seed)
        self.digest = expected_digest(self.volume, self.reads)
        self.progress.say('creating %d network namespaces %s*' % (
            len(self.testbed.namespaces), self.testbed.prefix))
        self.cleanup.callback(self.testbed.close)
        self.testbed.create()
        # The origin's cache is filled once from the image-volume file;
        # every run restarts its daemon over that complete cache.
        self.progress.say('filling the origin\'s cache')
        scope = bm.Cleanup()
        try:
            origin = self._origin(64)
            start_all([origin], scope)
            read_chunks(origin.socket, self.manifest,
                        list(range(self.manifest.chunk_count)), 2)
            deadline = time.monotonic() + 30
            while True:
                # Chunks count as present once committed (grouped commits).
                held = origin.metrics().get('chunks_present')
                if held == self.manifest.chunk_count:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError('the origin holds %s of %d chunks'
                                       % (held, self.manifest.chunk_count))
                time.sleep(0.1)
        finally:
            scope.close()

    def _origin(self, max_children, tree=REPO):
        origin = Node(self.workdir, 'origin', self.testbed.hosts[0],
                      max_children=max_children,
                      peer_options=self.peer_options, tree=tree)
        origin.describe(self.manifest, {'type': 'file', 'path': self.volume})
        return origin

    def calibrate(self):
        """Aggregate MB/s of 4 nodes reading from the origin, unshaped."""
        count = min(CALIBRATION_NODES, max(self.args.nodes))
        self.testbed.shape(None)
        scope = bm.Cleanup()
        try:
            origin = self._origin(64)
            nodes = [Node(self.run_dir, 'c%d' % k, self.testbed.hosts[k + 1])
                     for k in range(count)]
            for node in nodes:
                node.describe(self.manifest, None, [origin.url])
            start_all([origin] + nodes, scope)
            indexes = list(range(min(self.manifest.chunk_count,
                                     max(1, 64 * MiB // self.chunk))))
            moved = count * sum(self.manifest.chunk_range(i)[1]
                                for i in indexes)
            started = time.monotonic()
            in_threads(read_chunks, [(n.socket, self.manifest, indexes, 2,
                                      True) for n in nodes])
            elapsed = time.monotonic() - started
        finally:
            scope.close()
            bm.remove_tree(self.run_dir)
        self.capacity = moved / elapsed
        return self.capacity

    def choose_rate(self):
        requested = self.args.link_mbit * 1e6 / 8
        nmax = max(self.args.nodes)
        if self.capacity is None:
            self.rate = requested
            self.rate_reason = ('%.0f Mbit/s as asked (capacity not '
                                'measured)' % self.args.link_mbit)
        else:
            fit = HEADROOM * self.capacity / nmax
            if fit >= requested:
                self.rate = requested
                self.rate_reason = (
                    '%.0f Mbit/s as asked: %d nodes at line rate move %.0f '
                    'MB/s, within %.0f%% of the measured %.0f MB/s' % (
                        self.args.link_mbit, nmax, nmax * requested / 1e6,
                        HEADROOM * 100, self.capacity / 1e6))
            else:
                mbit = max(1, int(fit * 8 / 1e6 / 5) * 5 or
                           int(fit * 8 / 1e6))
                self.rate = mbit * 1e6 / 8
                self.rate_reason = (
                    'scaled down from %.0f to %d Mbit/s: the machine moves '
                    '%.0f MB/s through the daemons (measured), and %d nodes '
                    'receiving at line rate must stay within %.0f%% of it' %
                    (self.args.link_mbit, mbit, self.capacity / 1e6, nmax,
                     HEADROOM * 100))
        self.testbed.shape(int(self.rate * 8))
        self.timeout_factor = max(1.0, GIGABIT / self.rate)
        self.peer_options = self._timeouts()
        return self.rate

    def _timeouts(self):
        """``[peer]`` lines for the daemons' network timeouts.

        The daemons' defaults are for 1 Gbit/s links (a 1 MiB chunk in
        8 ms). On links slowed down k times, every transfer, and so every
        wait on one, takes k times longer: with ``--daemon-timeouts
        scaled`` (the default) the timeouts are stretched by the same k,
        and the rate a peer's answer must keep up
        (``min_transfer_rate``) is divided by it, as the links are.
        ``--fetch-timeout``/``--relay-timeout`` set one outright.
        """
        lines = []
        scaled = (self.args.daemon_timeouts == 'scaled' and
                  self.timeout_factor != 1.0)
        for name in SCALED_TIMEOUTS:
            value = getattr(self.args, name, None)
            if value is None:
                if not scaled:
                    continue
                value = daemon_default(name) * self.timeout_factor
            kind = type(daemon_default(name))
            lines.append('%s = %s' % (name, kind(round(value, 1))))
        if scaled:
            for name in SCALED_RATES:
                lines.append('%s = %.3g' % (
                    name, daemon_default(name) / self.timeout_factor))
        return lines + ['%s = %s' % tuple(o.split('=', 1))
                        for o in self.args.peer_option]

    def predicted_seconds(self):
        """A rough duration of the whole run, for the plan printed first."""
        total = 0.0
        for n in self.args.nodes:
            per = {'full-copy': n * self.size / self.rate,
                   'on-demand': n * self.Wc / self.rate,
                   'peer': 3 * self.Wc / self.rate,
                   'peer+prefetch': 2 * self.Wc / self.rate}
            for strategy in self.args.strategies:
                if self._skipped(strategy, n):
                    continue
                total += per[strategy] + self.think + 5 + 0.2 * n
        return total

    def _origin_seconds(self, strategy, n):
        """Seconds of the origin's link a single-origin run needs."""
        per_node = {'full-copy': self.size, 'on-demand': self.Wc}
        return n * per_node.get(strategy, 0) / self.rate

    def _skipped(self, strategy, n):
        return (n > min(self.args.nodes) and self._origin_seconds(
            strategy, n) > self.args.origin_budget)

    # -- one run -------------------------------------------------------------

    def run_all(self):
        plan = [(n, s) for n in self.args.nodes for s in self.args.strategies]
        self.progress.total = len(plan)
        for n, strategy in plan:
            if self._skipped(strategy, n):
                self.progress.say('%s N=%d not run: the origin would send '
                                  'for %.0f s (over --origin-budget); '
                                  'extrapolated' % (
                                      strategy, n,
                                      self._origin_seconds(strategy, n)))
                self.progress.finish_run()
                continue
            if self.ref_tree is not None:
                # The previous build first, then this one, on the same
                # testbed, links and image.
                self.ref_rows.append(self.run_one(
                    strategy, n, self.ref_tree, self.args.ref_reader))
            self.rows.append(self.run_one(strategy, n))
            self.progress.finish_run()
        for strategy in ('full-copy', 'on-demand'):
            self._extrapolate(strategy)
        self.rows.sort(key=lambda r: (r['nodes'],
                                      STRATEGIES.index(r['strategy'])))

    def run_one(self, strategy, n, tree=REPO, reader=None):
        reader = reader or self.args.reader
        peer_mode = strategy.startswith('peer')
        label = '%s N=%d' % (strategy, n)
        if tree != REPO:
            label += ' (%s)' % self.args.compare_ref
        scope = bm.Cleanup()
        procs = []
        try:
            origin = self._origin(1 if peer_mode else 64, tree)
            nodes = [Node(self.run_dir, 'n%d' % k, self.testbed.hosts[k + 1],
                          max_children=self.args.max_children,
                          replay=strategy == 'peer+prefetch',
                          peer_options=self.peer_options, tree=tree,
                          control=reader == 'native')
                     for k in range(n)]
            peers = [origin.url]
            if peer_mode:
                peers += [node.url for node in nodes]
            for node in nodes:
                node.describe(self.manifest, None, peers)
                if strategy == 'peer+prefetch':
                    node.place_trace(self.order)
            start_all([origin] + nodes, scope)
            cpu_start = [cpu_times(x.proc.pid) for x in [origin] + nodes]
            sent_before = [self.testbed.sent_bytes(k) for k in range(n + 1)]
            cpu_before = bm.host_cpu()
            results = self.mp.Queue()
            scope.callback(lambda: [_end(p) for p in procs])
            start_at = time.monotonic() + 0.3
            for k, node in enumerate(nodes):
                proc = self.mp.Process(target=boot, args=(
                    node, self.manifest, self.reads,
                    self.args.think_scale, strategy == 'full-copy', start_at,
                    results, k, reader), daemon=True)
                proc.start()
                procs.append(proc)
            limit = 120 + 3 * (self.think + n * self.Wc / self.rate)
            if strategy == 'full-copy':
                limit += 3 * n * self.size / self.rate
            outs = {}
            while len(outs) < n:
                now = time.monotonic()
                self.progress.update(label, len(outs), n,
                                     max(0.0, now - start_at))
                if now > start_at + limit:
                    break
                try:
                    out = results.get(timeout=0.2)
                except queue.Empty:
                    continue
                outs[out['node']] = out
            self.progress.update(label, len(outs), n,
                                 time.monotonic() - start_at)
            elapsed = time.monotonic() - start_at
            busy = (bm.host_cpu() - cpu_before) / (elapsed * os.cpu_count())
            sent = [self.testbed.sent_bytes(k) - sent_before[k]
                    for k in range(n + 1)]
            metrics = [x.metrics() for x in [origin] + nodes]
            daemon_cpu = [
                tuple(b - a for a, b in zip(start, cpu_times(x.proc.pid)))
                for start, x in zip(cpu_start, [origin] + nodes)]
        finally:
            scope.close()
            bm.remove_tree(self.run_dir)
        row = self._row(strategy, n, outs, metrics, sent, busy, daemon_cpu)
        row['reader'] = reader
        row['build'] = (self.args.compare_ref if tree != REPO
                        else self.build)
        return row

    def _row(self, strategy, n, outs, metrics, sent, busy, daemon_cpu):
        good = [o for o in outs.values()
                if o['ok'] and o['digest'] == self.digest]
        errors = sorted(set(o.get('error') or 'wrong bytes'
                            for o in outs.values() if o not in good))
        if len(outs) < n:
            errors.append('%d nodes not ready in time' % (n - len(outs)))
        ready = [o['ready'] for o in good] or [float('nan')]
        node_metrics = metrics[1:]
        received = [m.get('bytes_from_peers', 0) +
                    m.get('bytes_from_origin', 0) for m in node_metrics]
        uploads = [m.get('bytes_served_to_peers', 0) for m in node_metrics]
        downloads = [o['download'] for o in good if o['download'] is not None]

        def total(name):
            return int(sum(m.get(name, 0) for m in node_metrics))

        return {
            'strategy': strategy, 'nodes': n, 'measured': True,
            'link_mbit': round(self.rate * 8 / 1e6, 3),
            'image_bytes': self.size, 'working_set': self.W,
            'working_set_chunks': self.Wc,
            'origin_bytes': int(metrics[0].get('bytes_served_to_peers', 0)),
            'origin_link_bytes': sent[0],
            'origin_per_W': metrics[0].get('bytes_served_to_peers', 0) /
            self.W,
            'node_rx_mean': sum(received) / n, 'node_rx_max': max(received),
            'node_tx_max': max(uploads), 'node_tx_min': min(uploads),
            'node_link_tx_max': max(sent[1:]),
            'ready_mean': sum(ready) / len(ready),
            'ready_p99': percentile(ready, 99), 'ready_max': max(ready),
            'download_max': max(downloads) if downloads else '',
            'bound_single': n * self.W / self.rate,
            'bound_swarm': self.W / self.rate, 'think': self.think,
            'verified': len(good), 'errors': '; '.join(errors),
            'fetch_errors': total('fetch_errors'),
            'fetch_failures': total('fetch_failures'),
            'chunks_rejected': total('chunks_rejected'),
            'redirects': int(sum(m.get('redirects_sent', 0)
                                 for m in metrics)),
            'loop_admissions': int(sum(m.get('loop_admissions', 0)
                                       for m in metrics)),
            'prefetched': total('chunks_prefetched'),
            'inflight_joins': total('inflight_joins'),
            'inflight_bypasses': total('inflight_bypasses'),
            'relays_streamed': total('relays_streamed'),
            'relays_cut': total('relays_cut'),
            'local_requests': round(sum(o['requests'] for o in good) /
                                    len(good)) if good else '',
            'reader_cpu_s': round(sum(o['reader_cpu'] for o in good), 2),
            'reader_cpu_gib_rx': round(
                sum(o['reader_cpu'] for o in good) / (sum(received) / GiB),
                2) if sum(received) else '',
            'cpu_busy': round(busy, 3),
            'daemon_cpu_s': round(sum(map(sum, daemon_cpu)), 1),
            **cpu_columns(daemon_cpu, received, uploads,
                          metrics[0].get('bytes_served_to_peers', 0)),
        }

    def _extrapolate(self, strategy):
        """Runs not made: linear in N from the largest one made.

        Both strategies are bound by the origin's link: it sends N times
        as much for N nodes, so the transfer takes N times as long (a full
        copy's local boot after the download does not grow).
        """
        runs = [r for r in self.rows
                if r['strategy'] == strategy and r['verified']]
        if not runs:
            return
        base = max(runs, key=lambda r: r['nodes'])
        local = (base['ready_max'] - base['download_max']
                 if strategy == 'full-copy' else 0.0)
        for n in self.args.nodes:
            if not self._skipped(strategy, n):
                continue
            grow = n / base['nodes']
            row = {k: '' for k in COLUMNS}
            row.update(
                {k: base[k] for k in ('strategy', 'link_mbit', 'image_bytes',
                                      'working_set', 'working_set_chunks',
                                      'node_rx_mean', 'node_rx_max',
                                      'node_tx_max', 'bound_swarm',
                                      'think')},
                nodes=n, measured=False,
                origin_bytes=(n * self.size if strategy == 'full-copy' else
                              base['origin_bytes'] * grow),
                bound_single=n * self.W / self.rate)
            row['origin_per_W'] = row['origin_bytes'] / self.W
            for key in ('ready_mean', 'ready_p99', 'ready_max'):
                row[key] = local + (base[key] - local) * grow
            self.rows.append(row)

    # -- the goals -----------------------------------------------------------

    def row(self, strategy, n):
        for r in self.rows:
            if r['strategy'] == strategy and r['nodes'] == n:
                return r
        return None

    def goals(self):
        """[(statement, met, measured)] at N = 32 (or the largest N)."""
        sizes = [r['nodes'] for r in self.rows if r['measured']]
        if not sizes:
            return []
        big = 32 if 32 in sizes else max(sizes)
        small = min(sizes)
        floor = max(self.W / self.rate, self.think)
        out = []
        for strategy in ('peer', 'peer+prefetch'):
            r, r1 = self.row(strategy, big), self.row(strategy, small)
            if r is None or r1 is None:
                continue
            out.append(('%s, N=%d: origin bytes <= 1.2 W' % (strategy, big),
                        r['origin_bytes'] <= 1.2 * self.W,
                        '%.2f W (%.2f of the chunks touched)' % (
                            r['origin_bytes'] / self.W,
                            r['origin_bytes'] / self.Wc)))
            out.append(('%s, N=%d: makespan <= 2x N=%d' % (strategy, big,
                                                           small),
                        r['ready_max'] <= 2 * r1['ready_max'],
                        '%.1f s vs %.1f s: %.2fx' % (
                            r['ready_max'], r1['ready_max'],
                            r['ready_max'] / r1['ready_max'])))
            out.append(('%s, N=%d: makespan <= 2x the swarm bound '
                        'max(W/B, think)' % (strategy, big),
                        r['ready_max'] <= 2 * floor,
                        '%.1f s vs %.1f s: %.2fx (%.2fx W/B alone)' % (
                            r['ready_max'], floor, r['ready_max'] / floor,
                            r['ready_max'] * self.rate / self.W)))
        r, p = self.row('peer', big), self.row('peer+prefetch', big)
        if r is not None and p is not None:
            out.append(('N=%d: prefetch lowers the mean time to ready' % big,
                        p['ready_mean'] < r['ready_mean'],
                        '%.1f s with, %.1f s without' % (p['ready_mean'],
                                                         r['ready_mean'])))
        failed = [r for r in self.rows
                  if r['measured'] and r['verified'] != r['nodes']]
        wrong = ['%s N=%d: %s' % (r['strategy'], r['nodes'], r['errors'])
                 for r in failed]
        out.append(('every node read the image\'s bytes', not failed,
                    '; '.join(wrong) or 'all verified'))
        return out


# -- output -------------------------------------------------------------------

COLUMNS = ('strategy', 'nodes', 'measured', 'link_mbit', 'image_bytes',
           'working_set', 'working_set_chunks', 'origin_bytes',
           'origin_link_bytes', 'origin_per_W', 'node_rx_mean',
           'node_rx_max', 'node_tx_max', 'node_tx_min', 'node_link_tx_max',
           'ready_mean',
           'ready_p99', 'ready_max', 'download_max', 'bound_single',
           'bound_swarm', 'think', 'verified', 'errors', 'fetch_errors',
           'fetch_failures', 'chunks_rejected', 'redirects',
           'loop_admissions', 'prefetched',
           'inflight_joins', 'inflight_bypasses', 'relays_streamed',
           'relays_cut', 'cpu_busy', 'daemon_cpu_s',
           'node_cpu_user_s',
           'node_cpu_sys_s', 'origin_cpu_user_s', 'origin_cpu_sys_s',
           'cpu_gib_rx', 'node_cpu_gib_rx_max', 'node_cpu_gib_tx',
           'origin_cpu_gib_tx', 'reader', 'local_requests', 'reader_cpu_s',
           'reader_cpu_gib_rx', 'build')


def cpu_table(rows):
    """The CPU per run: the daemons' user/system, per GiB; the readers'."""
    lines = ['%-14s %3s %-12s %8s %8s %9s %9s %9s %10s %-7s %6s %9s' % (
        'strategy', 'N', 'build', 'user s', 'sys s', 'CPU/GiB', 'worst',
        'CPU/GiBtx', 'origin/GiB', 'reader', 'req', 'rdCPU/GiB')]
    for r in rows:
        if not r['measured']:
            continue
        lines.append('%-14s %3d %-12s %8.1f %8.1f %9s %9s %9s %10s %-7s %6s '
                     '%9s' % (
                         r['strategy'], r['nodes'], r['build'][:12],
                         r['node_cpu_user_s'], r['node_cpu_sys_s'],
                         r['cpu_gib_rx'], r['node_cpu_gib_rx_max'],
                         r['node_cpu_gib_tx'], r['origin_cpu_gib_tx'],
                         r['reader'], r['local_requests'],
                         r['reader_cpu_gib_rx']))
    return lines + [
        'CPU/GiB: the N daemons\' user + system CPU seconds (peer server, '
        'fetches, local and control sockets) per GiB they received; not the '
        'readers.',
        'req: requests a node\'s reader sent its daemon (socket: one per '
        'chunk a read spans; native: ensure_chunks); rdCPU/GiB: the '
        'readers\' CPU per GiB received (native: what stands for '
        'thunder-volume-server, in Python).']


def compare_lines(bench):
    """New vs ``--compare-ref``: the nodes' CPU per GiB received."""
    out = []
    for old in bench.ref_rows:
        new = bench.row(old['strategy'], old['nodes'])
        if new is None or not old['cpu_gib_rx'] or not new['cpu_gib_rx']:
            continue
        out.append('%s N=%d: %.2f CPU-s per GiB received (%s, %s reader), '
                   '%.2f (%s, %s reader): %.2fx lower' % (
                       old['strategy'], old['nodes'], new['cpu_gib_rx'],
                       bench.build, new['reader'], old['cpu_gib_rx'],
                       old['build'], old['reader'],
                       old['cpu_gib_rx'] / new['cpu_gib_rx']))
    return out


def table(bench):
    lines = ['%-14s %3s %10s %7s %9s %9s %7s %7s %7s %8s %6s %5s' % (
        'strategy', 'N', 'origin MiB', 'x W', 'rx/node', 'up max',
        'mean s', 'p99 s', 'max s', 'N*W/B s', 'W/B s', 'ok')]
    for r in bench.rows:
        mark = '' if r['measured'] else '~'
        lines.append('%-14s %3d %10s %7s %9.1f %9.1f %7s %7s %7s %8.1f '
                     '%6.1f %5s' % (
                         r['strategy'], r['nodes'],
                         mark + '%.1f' % (r['origin_bytes'] / MiB),
                         mark + '%.2f' % r['origin_per_W'],
                         r['node_rx_mean'] / MiB, r['node_tx_max'] / MiB,
                         mark + '%.1f' % r['ready_mean'],
                         mark + '%.1f' % r['ready_p99'],
                         mark + '%.1f' % r['ready_max'],
                         r['bound_single'], r['bound_swarm'],
                         '%s/%d' % (r['verified'], r['nodes'])
                         if r['measured'] else 'model'))
    return lines


def header(bench):
    a = bench.args
    return [
        'Bulk boot: %d KiB-chunk image of %.1f MiB, trace %s (%d reads, '
        '%s)' % (bench.chunk // KiB, bench.size / MiB, a.trace_name,
                 len(bench.reads), bench.trace['boot'].get('accel')),
        'working set W = %.1f MiB (%.1f MiB in the %d chunks it touches), '
        'think time %.1f s (x%g)' % (
            bench.W / MiB, bench.Wc / MiB, len(bench.order), bench.think,
            a.think_scale),
        'links %.0f Mbit/s each way (%s)' % (
            bench.rate * 8 / 1e6, bench.rate_reason),
        'daemons: thunder-cache defaults%s' % (
            ''.join(', ' + o for o in bench.peer_options)) + (
            ' (network timeouts x%.0f, as the links)' % bench.timeout_factor
            if bench.timeout_factor > 1 and a.daemon_timeouts == 'scaled'
            else ''),
        'guests read %s' % (
            'as thunder-volume-server does (--reader native: ensure_chunks '
            'for chunks not known usable, pread from the cache file; its CPU '
            'is the reader\'s, not the daemon\'s)' if a.reader == 'native'
            else 'through the daemon\'s local socket (--reader socket: '
            'every read served by the daemon)') + (
            '; the %s runs read with --reader %s' % (a.compare_ref,
                                                     a.ref_reader)
            if a.compare_ref and a.ref_reader != a.reader else ''),
    ]


def plot(bench, out):
    try:
        import matplotlib
        matplotlib.use('Agg')
        from matplotlib import pyplot
    except ImportError:
        return 'matplotlib is not installed: no plots'
    sizes = sorted(set(r['nodes'] for r in bench.rows))
    B = bench.rate
    styles = {'full-copy': 'C3', 'on-demand': 'C1', 'peer': 'C0',
              'peer+prefetch': 'C2'}
    charts = (
        ('makespan.png', 'ready_max', 1.0, 'time until the last node is '
         'ready (s)', [('one origin N*W/B', lambda n: n * bench.W / B, ':'),
                       ('ideal swarm W/B', lambda n: bench.W / B, '--'),
                       ('full copy N*I/B', lambda n: n * bench.size / B,
                        '-.')]),
        ('mean-ready.png', 'ready_mean', 1.0, 'mean time to ready (s)',
         [('ideal swarm W/B', lambda n: bench.W / B, '--'),
          ('think time', lambda n: bench.think, ':')]),
        ('origin-bytes.png', 'origin_bytes', 1.0 / MiB, 'bytes served by '
         'the origin (MiB)', [('N*W', lambda n: n * bench.W / MiB, ':'),
                              ('W (ideal swarm)', lambda n: bench.W / MiB,
                               '--'),
                              ('N*I', lambda n: n * bench.size / MiB,
                               '-.')]),
    )
    for name, key, scale, ylabel, bounds in charts:
        fig, ax = pyplot.subplots(figsize=(7, 4.5))
        for strategy in bench.args.strategies:
            rows = [r for r in bench.rows if r['strategy'] == strategy]
            if not rows:
                continue
            ax.plot([r['nodes'] for r in rows],
                    [r[key] * scale for r in rows], '-', color=styles[
                        strategy], label=strategy)
            for measured, marker in ((True, 'o'), (False, 'o')):
                pts = [r for r in rows if r['measured'] is measured]
                ax.plot([r['nodes'] for r in pts],
                        [r[key] * scale for r in pts], marker,
                        color=styles[strategy],
                        markerfacecolor=None if measured else 'white')
        for label, func, style in bounds:
            ax.plot(sizes, [func(n) for n in sizes], style, color='grey',
                    label=label)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.set_xlabel('nodes booting at once (N)')
        ax.set_ylabel(ylabel)
        ax.set_title('%.0f MiB image, W = %.1f MiB, links %.0f Mbit/s '
                     '(hollow: extrapolated)' % (
                         bench.size / MiB, bench.W / MiB, B * 8 / 1e6),
                     fontsize=9)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=100)
        pyplot.close(fig)
    return 'plots: %s' % ', '.join(c[0] for c in charts)


def write_results(bench, out, lines, meta):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for r in bench.rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v)
                             for k, v in r.items()})
    with open(os.path.join(out, 'results.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(out, 'run.json'), 'w') as f:
        json.dump(dict(meta, rows=bench.rows, ref_rows=bench.ref_rows), f,
                  indent=1, sort_keys=True)
    return plot(bench, out)


# -- main ---------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nodes', help='node counts (default '
                        '1,2,4,8,16,32; --quick: 1,2,4)')
    parser.add_argument('--strategies', default=','.join(STRATEGIES),
                        help='among %s (default: all)' % ', '.join(
                            STRATEGIES))
    parser.add_argument('--link-mbit', type=float, default=1000,
                        help='rate of every link, each way, before scaling '
                        'down to what the machine carries (default 1000)')
    parser.add_argument('--no-scale', action='store_true',
                        help='use --link-mbit as it is: no capacity '
                        'measurement')
    parser.add_argument('--trace', help='a boot trace file, or "synthetic" '
                        '(default: benchmarks/data/boot-trace.json when '
                        'present, else synthetic)')
    parser.add_argument('--image-mib', type=int, help='image size of the '
                        'synthetic trace (default 256; --quick 32)')
    parser.add_argument('--ws-fraction', type=float,
                        help='share of the image the synthetic trace reads '
                        '(default 0.1; --quick 0.25)')
    parser.add_argument('--boot-seconds', type=float,
                        help='think time of the synthetic trace (default 5; '
                        '--quick 1)')
    parser.add_argument('--think-scale', type=float, default=1.0,
                        help='multiplies the gaps between reads (default 1)')
    parser.add_argument('--chunk-kib', type=int,
                        help='manifest chunk size (default %d, the '
                        'store\'s)' % (manifest_mod.DEFAULT_CHUNK_SIZE // KiB))
    parser.add_argument('--fetch-timeout', type=float,
                        help='[peer] fetch_timeout of every daemon (default: '
                        'the daemon\'s)')
    parser.add_argument('--relay-timeout', type=float,
                        help='[peer] relay_timeout of every daemon (default: '
                        'the daemon\'s)')
    parser.add_argument('--max-children', type=int, default=2,
                        help='[peer] max_children of the nodes in the peer '
                        'strategies (default 2, the daemon\'s)')
    parser.add_argument('--peer-option', action='append', default=[],
                        metavar='NAME=VALUE',
                        help='a [peer] option of every daemon (repeatable), '
                        'e.g. max_redirects=64')
    parser.add_argument('--daemon-timeouts', choices=('scaled', 'defaults'),
                        default='scaled',
                        help='the daemons\' fetch_timeout, relay_timeout '
                        'and child_ttl: their defaults (meant for 1 Gbit/s) '
                        'multiplied by how much slower the links are than '
                        '1 Gbit/s (default), or the defaults as they are')
    parser.add_argument('--seed', type=int, default=1,
                        help='seed of the image bytes and synthetic trace')
    parser.add_argument('--origin-budget', type=float,
                        help='seconds of origin transfer above which a full '
                        'copy or on-demand run is extrapolated rather than '
                        'run (default 120; --quick 30)')
    parser.add_argument('--out', help='results directory (default '
                        'doc/source/bulk-boot; --quick: a temporary one)')
    parser.add_argument('--workdir', help='where the temporary directory '
                        'goes (default /dev/shm: every emulated node would '
                        'have its own disk)')
    parser.add_argument('--compare-ref', metavar='REV',
                        help='also run every strategy and N with the '
                        'daemons of git revision REV (a worktree of it), '
                        'just before this build\'s, and print both '
                        'builds\' CPU per GiB')
    parser.add_argument('--reader', choices=READERS, default='native',
                        help='how the emulated guests read: "native" as '
                        'thunder-volume-server does (ensure_chunks on the '
                        'control socket for chunks not known usable, the '
                        'rest read from the cache file; default), or '
                        '"socket", every read a request on the daemon\'s '
                        'local socket')
    parser.add_argument('--ref-reader', choices=READERS,
                        help='the --reader of the --compare-ref runs '
                        '(default: --reader\'s), e.g. "socket" to compare '
                        'with how the previous build was measured')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: N = 1, 2, 4, a 32 MiB image')
    args = parser.parse_args(argv)
    quick = args.quick
    args.nodes = sorted(set(int(n) for n in (
        args.nodes or ('1,2,4' if quick else '1,2,4,8,16,32')).split(',')))
    args.strategies = [s for s in STRATEGIES
                       if s in args.strategies.split(',')]
    if args.ref_reader is None:
        args.ref_reader = args.reader
    if args.image_mib is None:
        args.image_mib = 32 if quick else 256
    if args.chunk_kib is None:
        args.chunk_kib = manifest_mod.DEFAULT_CHUNK_SIZE // KiB
    if args.ws_fraction is None:
        args.ws_fraction = 0.25 if quick else 0.1
    if args.boot_seconds is None:
        args.boot_seconds = 1.0 if quick else 5.0
    if args.origin_budget is None:
        args.origin_budget = 30.0 if quick else 120.0
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), 'bulk-boot-quick')
                    if quick else DEFAULT_OUT)
    if args.workdir is None:
        args.workdir = '/dev/shm' if os.path.isdir('/dev/shm') else None
    if args.trace is None:
        args.trace = ('synthetic' if quick or not os.path.exists(
            DEFAULT_TRACE) else DEFAULT_TRACE)
    if min(args.nodes) < 1 or max(args.nodes) > 250 or not args.strategies:
        parser.error('nodes must be within 1-250; at least one strategy')
    for option in args.peer_option:
        name = option.partition('=')[0]
        if not option.partition('=')[2] or name not in {
                o.name for o in cache_options.peer_opts}:
            parser.error('--peer-option %r: not NAME=VALUE of a [peer] '
                         'option of thunder-cache' % option)
    if args.trace == 'synthetic':
        args.trace_data = synthetic_trace(args.image_mib * MiB, args.seed,
                                          args.boot_seconds,
                                          args.ws_fraction)
        args.trace_name = 'synthetic'
    else:
        args.trace_data = load_trace(args.trace)
        args.trace_name = os.path.relpath(args.trace, REPO)
    return args


def git_describe(tree):
    """The commit checked out in ``tree`` (short), '+' if modified."""
    head = bm.run(['git', '-C', tree, 'rev-parse', '--short', 'HEAD'],
                  check=False).stdout.strip() or 'unknown'
    dirty = bm.run(['git', '-C', tree, 'status', '--porcelain',
                    '--untracked-files=no'], check=False).stdout.strip()
    return head + ('+' if dirty else '')


def daemon_default(name):
    """The default of a ``[peer]`` option of thunder-cache."""
    for opt in cache_options.peer_opts:
        if opt.name == name:
            return opt.default
    raise KeyError(name)


def unavailable():
    if os.geteuid() != 0:
        return 'run as root (network namespaces, tc)'
    for tool in ('ip', 'tc'):
        if not bm.run(['which', tool], check=False).stdout:
            return '%s is not installed (Debian: iproute2)' % tool
    return None


def main(argv=None):
    args = parse_args(argv)
    why = unavailable()
    if why:
        print('bulk_boot: cannot run: %s' % why, file=sys.stderr)
        return 2
    workdir, cleanup = cache_io.run_as_benchmark('bulk-boot-', args.workdir)
    try:
        return _main(args, workdir, cleanup)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print('\nbulk_boot: FAILED: %s' % e, file=sys.stderr)
        return 1
    finally:
        cleanup.close()


def _main(args, workdir, cleanup):
    progress = Progress()
    bench = Bench(args, workdir, cleanup, progress)
    started = time.monotonic()
    load_start = bm.load_average()
    bench.prepare()
    if args.compare_ref:
        bench.checkout_ref()
    if not args.no_scale:
        progress.say('measuring the machine: %d nodes read from the origin '
                     'through unshaped links' % min(CALIBRATION_NODES,
                                                    max(args.nodes)))
        bench.calibrate()
    bench.choose_rate()
    for line in header(bench):
        progress.say(line)
    progress.say('nodes %s, strategies %s; predicted duration about %.0f '
                 'min' % (','.join(map(str, args.nodes)),
                          ', '.join(args.strategies),
                          bench.predicted_seconds() / 60))
    bench.run_all()
    goals = bench.goals()
    lines = header(bench) + [''] + table(bench) + [''] + cpu_table(
        bench.ref_rows + bench.rows) + compare_lines(bench) + [''] + [
        'goal: %-62s %-8s %s' % (text, 'met' if ok else 'MISSED', detail)
        for text, ok, detail in goals]
    lines += ['', '~: extrapolated (not run), see --origin-budget; p99 '
              'is nearest-rank (the maximum below 100 nodes)']
    print('\n'.join(lines))
    meta = {
        'machine': cache_io.machine(),
        'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
        'command': 'tox -e bench -- benchmarks/bulk_boot.py ' + ' '.join(
            sys.argv[1:] if __name__ == '__main__' else []),
        'load_average_start': load_start,
        'load_average_end': bm.load_average(),
        'seconds': round(time.monotonic() - started, 1),
        'capacity_bytes_per_second': bench.capacity,
        'link_bytes_per_second': bench.rate,
        'rate_reason': bench.rate_reason,
        'daemon_options': bench.peer_options,
        'trace': args.trace_name, 'reads': len(bench.reads),
        'image_bytes': bench.size, 'chunk_bytes': bench.chunk,
        'working_set': bench.W, 'working_set_chunks': bench.Wc,
        'chunks_touched': len(bench.order), 'think_seconds': bench.think,
        'namespaces': bench.testbed.namespaces, 'workdir': workdir,
        'build': bench.build, 'compare_ref': args.compare_ref,
        'goals': [{'goal': t, 'met': ok, 'measured': d}
                  for t, ok, d in goals],
    }
    note = write_results(bench, args.out, lines, meta)
    print('\nresults in %s (%s); %s; %.0f s in all' % (
        args.out, 'results.csv, results.txt, run.json', note,
        meta['seconds']))
    return 0 if all(r['verified'] == r['nodes'] for r in bench.rows
                    if r['measured']) else 1


if __name__ == '__main__':
    sys.exit(main())
