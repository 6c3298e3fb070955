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

"""Peer mode I/O: what a VM reads from a thunder-cache volume.

Reads through the block device Nova would give the guest: a real
``thunder-cache`` daemon (``python -m thunder_cache.daemon``, its own
process, ``[blockdev] enabled = true``) caches an image from a file
origin, a volume of that image is created over its control socket and
attached as the Cinder driver attaches it (``losetup --find --show
--direct-io=on`` on the volume's file of the daemon's FUSE mount). The
reader is ``qemu-img bench`` with Nova's settings for a ``local`` volume
(raw, cache=none, aio=threads), the helpers of
``blockdev_mechanisms.py``; the same reads of a plain local copy of the
image, in the same run, are the baseline. Then the peer server of the same
daemon is read by 8 concurrent peers on loopback, with the lean readers
of ``peer_throughput.py`` (the real signed protocol, each chunk read into a
reused buffer: the figure is the server's more than the Python readers'
sharing its CPUs).

Run as root::

    tox -e bench -- benchmarks/cache_io.py [--size-mib 1024] [--repeat 3]
        [--rand-count 32768] [--chunk-kib 256] [--json out.json]

Every round starts a fresh daemon in a fresh directory (empty cache,
nothing in its FUSE mount) and measures, in this order:

plain file
    the image as a local raw file (``cache=none``: ``O_DIRECT`` from the
    disk, as a fully copied local volume would be read);
thunder volume, cold
    a fresh volume over a freshly registered image: its cache is empty,
    so every chunk is fetched on first read (read from the origin file,
    verified against the manifest, written to the cache file); the origin
    file is local and in the page cache, so this is the cost of the fetch
    path without a network (the file origin has no delay to emulate one);
thunder volume, warm
    every chunk of the image is in the node cache (the cold pass fetched
    them all: the cache's data file is on disk and in the page cache, its
    chunks verified), but the volume is new (empty copy-on-write layer)
    and so is its loop device, and the loop device reads the FUSE file
    with direct I/O: nothing of this volume is in any page cache. This is
    what a VM sees after another volume of the image or a prefetch
    brought the image to the node.

Reads: sequential 1 MiB at queue depth 4 (the whole image); 4 KiB
"random" reads (a large stride, coprime with the number of blocks) at
queue depth 16 and 1. The cold 4 KiB reads each land on a chunk not read
before (one chunk's fetch per 4 KiB read). The median of ``--repeat``
rounds is printed with its ratio to the plain file and issue 14's goals:
warm 4 KiB reads at queue depth 16 at least 0.9x the plain file, at queue
depth 1 at least 1.0x, warm sequential at least 1.0x, at most 0.3 CPU
seconds per GiB, and at least 2 GB/s from the peer server to 8
concurrent readers. Missed goals are reported, not
errors; the exit status is non-zero only if something failed. Loop
devices, the daemon (stopped by its PID) and its mount are removed
whatever happens, including SIGTERM and Ctrl-C.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks import blockdev_mechanisms as bm
from benchmarks import peer_throughput as pt
from thunder_cache.control import client as control_client
from thunder_cache.volumes import nativevol
from thunder_common import manifest as manifest_mod

MiB = 1024 * 1024
CHUNK = manifest_mod.DEFAULT_CHUNK_SIZE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The goals (warm reads as ratios to the plain file).
GOALS = {'rand': 0.9, 'rand_qd1': 1.0, 'seq': 1.0, 'cpu': 0.3,
         'peer_bytes': 2e9}
SERVERS = ('python', 'native')
PEER_READERS = 8

PLAIN = 'plain local file (cache=none)'
COLD = 'thunder volume, cold'
WARM = 'thunder volume, warm'
PEER_FILL = 'cold fill (origin to cache)'
PEER_PREAD = 'plain file pread (baseline)'
PEER = 'peer, warm, lean readers'


def unavailable():
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return 'run as root (loop devices, FUSE mount)'
    if not os.path.exists('/dev/fuse'):
        return '/dev/fuse does not exist'
    for tool, package in (('losetup', 'mount'), ('qemu-img', 'qemu-utils'),
                          ('fusermount3', 'fuse3')):
        if not shutil.which(tool):
            return '%s is not installed (Debian: %s)' % (tool, package)
    try:
        import thunder_cache.volumes.fusefs  # noqa: F401
    except (ImportError, OSError) as e:
        return 'no libfuse 3 for thunder_cache.volumes.fusefs: %s' % e
    return None


def hole_ranges(size):
    """The zero ranges of the test image: 1.5 MiB in every 16 MiB.

    They start off the chunk boundaries, so that some chunks are partly
    zero.
    """
    step = 16 * MiB
    return [(start, min(start + 3 * MiB // 2, size))
            for start in range(5 * MiB + MiB // 2, size, step)]


def write_image(volume, plain, size, chunk=CHUNK):
    """The image: random bytes with holes.

    ``volume`` is the image-volume the file origin reads (image, then its
    manifest, as the functional tests write it); ``plain`` is the same
    image alone, the baseline. Returns the manifest and its serialized
    length.
    """
    builder = manifest_mod.ManifestBuilder(chunk)
    zeros = bytes(4 * MiB)
    with open(volume, 'wb') as vf, open(plain, 'wb') as pf:
        pos = 0
        for start, end in hole_ranges(size) + [(size, size)]:
            while pos < start:
                data = os.urandom(min(start - pos, 4 * MiB))
                vf.write(data)
                pf.write(data)
                builder.update(data)
                pos += len(data)
            while pos < end:
                n = min(end - pos, len(zeros))
                builder.update(zeros[:n])
                pos += n
            vf.seek(pos)
            pf.seek(pos)
        pf.truncate(size)
        manifest = builder.finish()
        serialized = manifest.to_bytes()
        vf.seek(manifest_mod.volume_offset(size))
        vf.write(serialized)
        for f in (vf, pf):
            f.flush()
            os.fsync(f.fileno())
    return manifest, len(serialized)


def mounted(path):
    with open('/proc/self/mounts') as f:
        return any(line.split()[1] == path for line in f)


def unmount(path):
    """Unmount a FUSE mount left behind (a daemon that had to be killed)."""
    for cmd in (['fusermount3', '-u', path], ['umount', '-l', path]):
        if not mounted(path):
            return
        bm.run(cmd, check=False)


def stop_pid_file(path, timeout=10):
    """Stop (SIGTERM, then SIGKILL) the process a PID file names."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not os.path.exists('/proc/%d' % pid) or _zombie(pid):
                return
            time.sleep(0.02)


def _zombie(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


class Daemon:
    """A thunder-cache daemon with its volume files, in ``workdir``.

    :param native: the path of a built thunder-volume-server: the volume
        files are served by it (``volume_server = native``); None: by the
        daemon.
    """

    def __init__(self, workdir, cleanup, native=None):
        self.dir = workdir
        self.mount_dir = os.path.join(workdir, 'mnt')
        self.control_socket = os.path.join(workdir, 'control.sock')
        self.cache_dir = os.path.join(workdir, 'cache')
        self.native_socket = os.path.join(workdir, 'native.sock')
        self.native = native
        secret = os.path.join(workdir, 'secret')
        with open(secret, 'wb') as f:
            f.write(pt.SECRET)
        conf = os.path.join(workdir, 'thunder-cache.conf')
        with open(conf, 'w') as f:
            f.write('\n'.join([
                '[node]', 'node_id = cache-io-bench',
                'listen_address = 127.0.0.1', 'listen_port = 0',
                'cache_dir = %s' % self.cache_dir,
                'local_socket = %s' % os.path.join(workdir, 'local.sock'),
                'pid_file = %s' % os.path.join(workdir, 'thunder-cache.pid'),
                '[peer]', 'shared_secret_file = %s' % secret,
                # Every benchmark reader is a distinct peer: serve them all
                # rather than redirect them to each other.
                'max_children = 64',
                # The image-volume file is in the run's directory, the
                # parent of this round's.
                '[origin]',
                'file_origin_dirs = %s' % os.path.dirname(workdir),
                '[blockdev]', 'enabled = true',
                'mount_dir = %s' % self.mount_dir,
                'layers_dir = %s' % os.path.join(workdir, 'layers'),
                'control_socket = %s' % self.control_socket,
                ] + ([
                    'volume_server = native',
                    'native_server_binary = %s' % native,
                    'native_server_socket = %s' % self.native_socket,
                ] if native else ['volume_server = python']) + [
                '[advertise]', 'enabled = false',
                '[prefetch]', 'record = false', 'hydrate = false', '']))
        self.client = control_client.ControlClient(
            self.control_socket, timeout=60)
        # Undone in reverse: stop the daemon by its PID (it unmounts), then
        # unmount whatever a killed daemon left.
        cleanup.callback(unmount, self.mount_dir)
        cleanup.callback(stop_pid_file, self.native_socket + '.pid')
        cleanup.callback(lambda: self.server.stop())
        self._cmd = [sys.executable, '-m', 'thunder_cache.daemon',
                     '--config-file', conf]
        self.start()
        self.url = self.client.call('ping')['url']

    def start(self):
        """Start the daemon; return once it answers (and is mounted)."""
        # Stopped by the callback above, whichever process runs then.
        self.server = bm.Server(bm.Cleanup(), self._cmd, 'thunder-cache',
                                os.path.join(self.dir, 'daemon.log'))
        bm.wait_for(self._ready, self.server, 'thunder-cache to start')

    def kill(self):
        """SIGKILL the daemon (a crash); its volume server stays."""
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.proc.wait()

    def _ready(self):
        try:
            self.client.call('ping')
        except control_client.ControlError:
            return False
        return mounted(self.mount_dir)

    @property
    def pid(self):
        return self.server.pid

    @property
    def pids(self):
        """The daemon's and the native server's PIDs (what serves I/O)."""
        pids = [self.server.pid]
        if self.native:  # the server, not its holder (the pid file's)
            pids.append(nativevol.NativeServer(self.native_socket).ping())
        return pids

    def register(self, image_id, manifest, manifest_length, origin):
        return self.client.call(
            'register_image', image_id=image_id,
            manifest_digest=manifest.digest(),
            manifest_offset=manifest_mod.volume_offset(manifest.image_size),
            manifest_length=manifest_length,
            origin={'type': 'file', 'path': origin})

    def wait_complete(self, image_id, env, timeout=30):
        """Wait until the cache holds (and has committed) every chunk."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.register(image_id, env['manifest'],
                                 env['manifest_length'], env['volume'])
            if held['chunks_present'] == held['chunks']:
                return
            if time.monotonic() > deadline:
                raise RuntimeError('the cache of %s holds %d of %d chunks'
                                   % (image_id, held['chunks_present'],
                                      held['chunks']))
            time.sleep(0.1)

    def delete_volume(self, volume_id, timeout=30):
        """Delete a volume once the kernel has let go of its file.

        A detached loop device may close its backing file a little later
        (while udev still probes the device), so a busy volume is retried.
        """
        return self.client.delete_volume(volume_id, busy_wait=timeout)

    def cache_data(self, image_id):
        return os.path.join(self.cache_dir, image_id, 'data')


class Volume:
    """A fresh volume of an image on a fresh direct-I/O loop device."""

    def __init__(self, daemon, volume_id, image_id, size):
        self.cleanup = bm.Cleanup()
        try:
            daemon.client.call('create_volume', volume_id=volume_id,
                               size=size, image_id=image_id)
            self.cleanup.callback(daemon.delete_volume, volume_id)
            # losetup --find --show --direct-io=on, and a check that
            # losetup -n -O DIO says 1, as the Cinder driver attaches it.
            self.device = bm.loop_attach(
                self.cleanup, os.path.join(daemon.mount_dir, volume_id),
                readonly=False, direct_io=True)
            self.target = bm.Target(self.device, device=self.device,
                                    pids=daemon.pids)
        except BaseException:
            self.cleanup.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup.close()


def seq_pass(target, size):
    seconds = bm.bench(target, size // MiB, MiB, 4)[0]
    return size / seconds / 1e6


def rand_pass(target, count, step, depth):
    seconds = bm.bench(target, count, 4096, depth, step)[0]
    return count / seconds


def measure_round(args, env, results, round_no):
    """One round: the plain file, then each volume server's own daemon."""
    size = env['size']
    rand_step = bm.random_step(size, 4096)
    qd1_count = max(1, args.rand_count // 4)
    plain = bm.Target(env['plain'])
    results.add(PLAIN, 'seq', seq_pass(plain, size))
    results.add(PLAIN, 'rand', rand_pass(plain, args.rand_count,
                                         rand_step, 16))
    results.add(PLAIN, 'rand_qd1', rand_pass(plain, qd1_count,
                                             rand_step, 1))
    for server in env['servers']:
        workdir = tempfile.mkdtemp(prefix='round-%d-%s-' % (round_no, server),
                                   dir=env['workdir'])
        cleanup = bm.Cleanup()
        cleanup.callback(bm.remove_tree, workdir)
        try:
            step('round %d: starting thunder-cache, %s volume server'
                 % (round_no, server))
            daemon = Daemon(workdir, cleanup,
                            native=env['native'] if server == 'native'
                            else None)
            measure_server(args, env, results, round_no, daemon, server)
            if server == env['servers'][0]:
                step('round %d: peer server, %d readers'
                     % (round_no, PEER_READERS))
                measure_peer(daemon, env, results)
        finally:
            cleanup.close()


def measure_server(args, env, results, round_no, daemon, server):
    """Cold and warm reads of fresh volumes of one daemon."""
    size = env['size']
    rand_step = bm.random_step(size, 4096)
    chunk_step = bm.random_step(size, args.chunk)
    qd1_count = max(1, args.rand_count // 4)
    cold_count = min(args.cold_rand_count, size // args.chunk)
    cold, warm = row_name(COLD, server), row_name(WARM, server)
    image = 'img-seq'
    daemon.register(image, env['manifest'], env['manifest_length'],
                    env['volume'])
    step('round %d: %s cold sequential' % (round_no, server))
    with Volume(daemon, 'vol-cold-seq', image, size) as vol:
        results.add(cold, 'seq', seq_pass(vol.target, size))
    daemon.wait_complete(image, env)
    step('round %d: %s warm' % (round_no, server))
    with Volume(daemon, 'vol-warm-seq', image, size) as vol:
        used = bm.proc_cpu(daemon.pids)
        results.add(warm, 'seq', seq_pass(vol.target, size))
        results.add(warm, 'cpu', (bm.proc_cpu(daemon.pids) - used) *
                    bm.GiB / size)
        if round_no == 1:
            step('round 1: qemu-img compare of a volume with the image')
            bm.run(['qemu-img', 'compare', '-q', '-f', 'raw', '-F',
                    'raw', env['plain'], vol.device])
            results.add(warm, 'verified', 1)
    with Volume(daemon, 'vol-warm-rand', image, size) as vol:
        results.add(warm, 'rand', rand_pass(vol.target, args.rand_count,
                                            rand_step, 16))
    with Volume(daemon, 'vol-warm-qd1', image, size) as vol:
        results.add(warm, 'rand_qd1', rand_pass(vol.target, qd1_count,
                                                rand_step, 1))
    step('round %d: %s cold random' % (round_no, server))
    image = 'img-rand'
    daemon.register(image, env['manifest'], env['manifest_length'],
                    env['volume'])
    with Volume(daemon, 'vol-cold-rand', image, size) as vol:
        results.add(cold, 'rand', rand_pass(vol.target, cold_count,
                                            chunk_step, 16))


def row_name(kind, server):
    return '%s (%s)' % (kind, server)


def measure_peer(daemon, env, results):
    """peer_throughput.py's readers against this round's daemon."""
    manifest = env['manifest']
    daemon.register(pt.IMAGE_ID, manifest, env['manifest_length'],
                    env['volume'])
    chunks = manifest.chunk_count
    sizes = [manifest.chunk_range(i)[1] for i in range(chunks)]
    # Each reader reads at least 1 GiB, as peer_throughput.py's defaults.
    rounds = max(1, -(-1024 * MiB // env['size']))
    total, elapsed = pt.run(pt._peer_reader, [(daemon.url, 0, chunks, sizes,
                                               1, 0)], 'inline')
    results.add(PEER_FILL, 'rate', total / elapsed / 1e6)
    jobs = [(daemon.cache_data(pt.IMAGE_ID), r, chunks, sizes, rounds, r,
             manifest.chunk_size) for r in range(PEER_READERS)]
    total, elapsed = pt.run(pt._file_reader, jobs, 'processes')
    results.add(PEER_PREAD, 'rate', total / elapsed / 1e6)
    jobs = [(daemon.url, r + 1, chunks, sizes, rounds, r)
            for r in range(PEER_READERS)]
    total, elapsed = pt.run(pt._lean_reader, jobs, 'processes')
    if total != PEER_READERS * rounds * manifest.image_size:
        raise RuntimeError('peer readers got %d bytes' % total)
    results.add(PEER, 'rate', total / elapsed / 1e6)


def step(message):
    print('.. %s' % message, file=sys.stderr, flush=True)


def ratio(value, base):
    return value / base if value is not None and base else None


def fmt(value, pattern='%.0f'):
    return '-' if value is None else pattern % value


def goals_of(row, plain_cpu=None):
    """The issue's goals for one volume server's warm reads."""
    def at_least(key, goal):
        return row[key] is not None and row[key] >= goal
    cpu = row['cpu_s_per_gib']
    return {'warm_rand': at_least('rand_ratio', GOALS['rand']),
            'warm_qd1': at_least('rand_qd1_ratio', GOALS['rand_qd1']),
            'warm_seq': at_least('seq_ratio', GOALS['seq']),
            'cpu': cpu is not None and cpu <= GOALS['cpu']}


def summarize(args, env, results):
    """Medians, ratios and goals, as printed and as written to --json."""
    rows = {}
    names = [PLAIN] + [row_name(kind, server) for server in env['servers']
                       for kind in (COLD, WARM)]
    for name in names:
        row = rows[name] = {}
        for key in ('seq', 'rand', 'rand_qd1'):
            value = results.median(name, key)
            row[key] = value
            row[key + '_ratio'] = ratio(value, results.median(PLAIN, key))
        row['cpu_s_per_gib'] = results.median(name, 'cpu')
    peer = {name: results.median(name, 'rate')
            for name in (PEER_FILL, PEER_PREAD, PEER)}
    goals = {server: goals_of(rows[row_name(WARM, server)])
             for server in env['servers']}
    goals['peer'] = (peer[PEER] is not None and
                     peer[PEER] * 1e6 >= GOALS['peer_bytes'])
    return {
        'date': env['date'],
        'machine': env['machine'],
        'load_average': {'start': env['load_start'],
                         'end': bm.load_average()},
        'size_mib': args.size_mib, 'chunk_kib': args.chunk // 1024,
        'holes_mib': env['holes'] / MiB, 'repeat': args.repeat,
        'rand_count': args.rand_count,
        'cold_rand_count': min(args.cold_rand_count,
                               env['size'] // args.chunk),
        'servers': env['servers'],
        'rows': rows, 'peer_mb_s': peer, 'goals': goals,
        'verified': [server for server in env['servers']
                     if results.count(row_name(WARM, server), 'verified')],
        'rounds': results.data,
    }


def print_table(widths, header, rows):
    """A table: the first column left-aligned, the others right."""
    line = '%%-%ds' % widths[0] + ''.join(' %%%ds' % w for w in widths[1:])
    for row in [header] + rows:
        print(line % tuple(row))


def print_conditions(summary):
    """The run's date, machine and load average (``summarize``'s keys)."""
    print('%s; %s; load average %s at the start, %s at the end' % (
        summary['date'], summary['machine'],
        summary['load_average']['start'], summary['load_average']['end']))


def report(summary):
    met = {True: 'met', False: 'NOT met'}
    print()
    print('Peer-mode volume I/O: %d MiB image (%.1f MiB of holes), %d KiB '
          'chunks, median of %d rounds' % (
              summary['size_mib'], summary['holes_mib'],
              summary['chunk_kib'], summary['repeat']))
    print_conditions(summary)
    print('qemu-img bench, raw, cache=none, aio=threads; seq = 1 MiB reads '
          'at QD4; 4K = %d 4 KiB reads at QD16 (QD1: %d);' % (
              summary['rand_count'], max(1, summary['rand_count'] // 4)))
    print('thunder volumes on a direct-I/O loop device; cold 4K: %d reads, '
          'each on a chunk not yet fetched; CPU: daemon + volume server, '
          'warm seq' % summary['cold_rand_count'])
    print()
    print_table((34, 9, 6, 9, 6, 9, 6, 6), (
        '', 'seq MB/s', 'ratio', '4K IOPS', 'ratio', 'QD1 IOPS', 'ratio',
        's/GiB'), [(
            name, fmt(row['seq']), fmt(row['seq_ratio'], '%.2fx'),
            fmt(row['rand']), fmt(row['rand_ratio'], '%.2fx'),
            fmt(row['rand_qd1']), fmt(row['rand_qd1_ratio'], '%.2fx'),
            fmt(row['cpu_s_per_gib'], '%.2f'))
            for name, row in summary['rows'].items()])
    print()
    peer = summary['peer_mb_s']
    print('Peer server on loopback (the same daemon, peer_throughput.py\'s '
          'lean readers as processes)')
    print('%-34s %9s %9s' % ('', 'readers', 'MB/s'))
    print('%-34s %9d %9s' % (PEER_FILL, 1, fmt(peer[PEER_FILL])))
    print('%-34s %9d %9s' % (PEER_PREAD, PEER_READERS, fmt(peer[PEER_PREAD])))
    print('%-34s %9d %9s' % (PEER, PEER_READERS, fmt(peer[PEER])))
    print()
    for server in summary['servers']:
        row = summary['rows'][row_name(WARM, server)]
        goals = summary['goals'][server]
        print('goals, %s volume server: 4K QD16 >= %.1fx %s (%s), QD1 >= '
              '%.1fx %s (%s), seq >= %.1fx %s (%s), CPU <= %.1f s/GiB %s '
              '(%s)' % (
                  server, GOALS['rand'], met[goals['warm_rand']],
                  fmt(row['rand_ratio'], '%.2fx'), GOALS['rand_qd1'],
                  met[goals['warm_qd1']],
                  fmt(row['rand_qd1_ratio'], '%.2fx'),
                  GOALS['seq'], met[goals['warm_seq']],
                  fmt(row['seq_ratio'], '%.2fx'), GOALS['cpu'],
                  met[goals['cpu']], fmt(row['cpu_s_per_gib'], '%.2f')))
    print('goal: peer server >= %d MB/s with %d readers: %s (%s MB/s)' % (
        GOALS['peer_bytes'] / 1e6, PEER_READERS, met[summary['goals']['peer']],
        fmt(peer[PEER])))
    print('volume read back equal to the image (qemu-img compare): %s' % (
        ', '.join(summary['verified']) or 'not checked'))


def machine():
    name = platform.platform()
    try:
        with open('/etc/os-release') as f:
            for line in f:
                if line.startswith('PRETTY_NAME='):
                    name = line.split('=', 1)[1].strip().strip('"')
    except OSError:
        pass
    return '%s, kernel %s, %d CPUs' % (name, platform.release(),
                                       os.cpu_count())


_stopping = []


def _terminate(signum, frame):
    # The first signal unwinds (every cleanup runs); later ones are ignored
    # so that they do not interrupt the cleanup.
    if not _stopping:
        _stopping.append(signum)
        raise SystemExit(128 + signum)


def run_as_benchmark(prefix, parent):
    """Set this process up for a benchmark; its work directory and cleanup.

    The daemons it starts (``python -m thunder_cache.daemon``) run this
    tree's code; SIGTERM, SIGINT and SIGHUP unwind through the cleanup,
    which removes the temporary directory (made under ``parent``) last.
    """
    os.environ['PYTHONPATH'] = os.pathsep.join(
        [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _terminate)
    workdir = tempfile.mkdtemp(prefix=prefix, dir=parent)
    cleanup = bm.Cleanup()
    cleanup.callback(bm.remove_tree, workdir)
    return workdir, cleanup


def read_args_parser(doc, repeat_help):
    """The options of the benchmarks that read a volume as Nova would.

    Size, rounds, 4 KiB reads, ``--json`` and ``--workdir`` (this one's,
    and ``fuse_transports.py``'s); check them with ``check_read_args``.
    """
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('--size-mib', type=int, default=1024,
                        help='image size in MiB (default 1024)')
    parser.add_argument('--repeat', type=int, default=3, help=repeat_help)
    parser.add_argument('--rand-count', type=int, default=32768,
                        help='4 KiB reads per QD16 pass (a quarter at QD1; '
                        'default 32768)')
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--workdir', default='/var/tmp',
                        help='where the temporary directory goes (default '
                        '/var/tmp)')
    return parser


def check_read_args(parser, args):
    if args.size_mib < 1 or args.repeat < 1 or args.rand_count < 1:
        parser.error('sizes and counts must be positive')


def parse_args(argv):
    parser = read_args_parser(__doc__, 'rounds; medians are printed '
                              '(default 3)')
    parser.add_argument('--cold-rand-count', type=int, default=512,
                        help='cold 4 KiB reads, on distinct chunks (at most '
                        'one per chunk; default 512)')
    parser.add_argument('--servers', default=','.join(SERVERS),
                        help='volume servers to measure, comma-separated '
                        '(default %s)' % ','.join(SERVERS))
    parser.add_argument('--chunk-kib', type=int,
                        default=CHUNK // 1024,
                        help='manifest chunk size in KiB (default %d, the '
                        'store\'s)' % (CHUNK // 1024))
    args = parser.parse_args(argv)
    args.chunk = args.chunk_kib * 1024
    try:
        manifest_mod.check_chunk_size(args.chunk)
    except ValueError as e:
        parser.error('--chunk-kib: %s' % e)
    args.servers = args.servers.split(',')
    if not args.servers or set(args.servers) - set(SERVERS):
        parser.error('--servers: a list of %s' % ', '.join(SERVERS))
    check_read_args(parser, args)
    return args


FAILURES = (RuntimeError, OSError, subprocess.SubprocessError,
            control_client.ControlError, nativevol.NativeError)


def run_main(name, run, args):
    """``run(args, workdir, cleanup)`` as a benchmark; the exit status.

    Skipped (0) where it cannot run, 1 with the reason on a failure; the
    work directory and whatever the cleanup holds are removed either way.
    """
    why = unavailable()
    if why:
        print('%s: skipped: %s' % (name, why), file=sys.stderr)
        return 0
    workdir, cleanup = run_as_benchmark(name + '-', args.workdir)
    try:
        return run(args, workdir, cleanup)
    except FAILURES as e:
        print('%s: FAILED: %s' % (name, e), file=sys.stderr)
        return 1
    finally:
        cleanup.close()


def main(argv=None):
    return run_main('cache_io', _main, parse_args(argv))


def write_json(path, data):
    """``--json``: the results, if a path was given."""
    if path:
        with open(path, 'w') as f:
            json.dump(data, f, indent=2, sort_keys=True)


def image_env(args, workdir):
    """A run's environment, its image written (``write_image``)."""
    size = args.size_mib * MiB
    env = {
        'size': size, 'workdir': workdir,
        'volume': os.path.join(workdir, 'image-volume'),
        'plain': os.path.join(workdir, 'plain.raw'),
        'load_start': bm.load_average(), 'machine': machine(),
        'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
        'holes': sum(end - start for start, end in hole_ranges(size)),
    }
    step('writing a %d MiB image and its manifest in %s' % (
        args.size_mib, workdir))
    env['manifest'], env['manifest_length'] = write_image(
        env['volume'], env['plain'], size, getattr(args, 'chunk', CHUNK))
    return env


def _main(args, workdir, cleanup):
    env = image_env(args, workdir)
    env['servers'] = args.servers
    if 'native' in args.servers:
        step('building thunder-volume-server')
        env['native'] = nativevol.build(os.path.join(workdir, 'native'))
    results = bm.Results()
    for round_no in range(1, args.repeat + 1):
        measure_round(args, env, results, round_no)
    summary = summarize(args, env, results)
    report(summary)
    write_json(args.json, summary)
    return 0


if __name__ == '__main__':
    sys.exit(main())
