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

"""Real guests boot at once from thunder-cache volumes on emulated nodes.

The bulk boot benchmark (``bulk_boot.py``) with real guests instead of
replayed traces, for small N. Run as root::

    tox -e bench -- benchmarks/boot_guests.py [--nodes 1,2] [--link-mbit 100]
        [--repeat 1] [--image /var/tmp/thunder-boot.raw] [--trace PATH]
        [--chunk-kib 256] [--out doc/source/bulk-boot/guests]

1. The bootable Debian image of ``make_boot_trace.py`` (built with its
   functions when ``--image`` is missing: debootstrap, a few minutes) is
   written as an image-volume (the image's bytes, then its manifest).
2. The testbed of ``bulk_boot.py``: an origin and N nodes, each a
   ``thunder-cache`` daemon in a network namespace behind a veth shaped
   to ``--link-mbit`` both ways. The origin's cache is filled first. The
   nodes' daemons also serve volume files (``[blockdev]``); they enter
   their network namespace only (``nsenter --net``), so their FUSE mounts
   are in the initial mount namespace, where qemu runs.
3. For every N and strategy, every node creates a volume of the image over
   its control socket and N qemu guests
   (``thunder_stack.guest.qemu.qemu_command``:
   virtio-blk, raw, ``cache=none``, ``aio=threads``, one vCPU, TCG unless
   ``--accel kvm``) boot those files at once. Strategies: ``local-copy``
   (each guest boots its own copy of the image file: what a full copy
   gives once downloaded; the download, N x image over the origin's
   link, is shown as computed, not run), ``on-demand`` (the nodes' only
   peer is the origin), ``peer`` (origin, then every node;
   ``max_children = 2``, the origin 1), ``peer+prefetch`` (the same,
   with the chunk order of ``benchmarks/data/boot-trace.json`` placed for
   replay).
4. Each guest's times from the common start, read on its serial console:
   the kernel banner, the first-boot service's start (early boot) and
   end (``up``: the system ran its first boot) markers, and qemu's exit
   (the guest powers itself off). The daemons' metrics give the bytes the
   origin served and each node received and sent.

Writes ``guests.csv`` (one row per guest) and ``guests.txt`` (the table,
with the machine, the command and the date) into ``--out``. Daemons (by
PID), FUSE mounts, namespaces, qemu processes and the work directory are
removed whatever happens, including SIGTERM and Ctrl-C.
"""

import argparse
import csv
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks import blockdev_mechanisms as bm
from benchmarks import bulk_boot
from benchmarks import cache_io
from benchmarks import make_boot_trace as mbt
from thunder_cache.control import client as control_client
from thunder_common import manifest as manifest_mod
from thunder_stack.guest import qemu as guest_qemu

REPO = bulk_boot.REPO
MiB = bulk_boot.MiB
DEFAULT_IMAGE = '/var/tmp/thunder-boot.raw'
DEFAULT_OUT = os.path.join(REPO, 'doc', 'source', 'bulk-boot', 'guests')
STRATEGIES = ('local-copy', 'on-demand', 'peer', 'peer+prefetch')
#: (name, text of the console line that marks it), first occurrence.
MARKS = (('kernel', 'Linux version'),
         ('start', mbt.MARK + '-START'),
         ('up', mbt.MARK + '-DONE'),
         ('python', 'python ok'),
         ('perl', 'perl ok'))
#: A line of make_boot_trace.Console's log: seconds since start, text.
CONSOLE_LINE = re.compile(r'^\[\s*(-?\d+\.\d+)\] (.*)$')
COLUMNS = ('round', 'strategy', 'nodes', 'guest', 'ok', 'error', 'kernel',
           'start', 'up', 'off', 'link_mbit', 'origin_bytes',
           'origin_link_bytes', 'node_rx', 'node_tx', 'prefetched',
           'cpu_busy', 'load')


def log(message):
    print('.. %s' % message, file=sys.stderr, flush=True)


# -- console and results (no side effects) -------------------------------

def parse_console(text):
    """``{mark: seconds}`` of the first console line with each marker."""
    marks = {}
    for line in text.splitlines():
        match = CONSOLE_LINE.match(line)
        if not match:
            continue
        for name, needle in MARKS:
            if name not in marks and needle in match.group(2):
                marks[name] = float(match.group(1))
    return marks


def boot_failure(marks, returncode, timed_out=None):
    """Why a boot failed (None if it did not) from its console marks."""
    if timed_out:
        return timed_out
    if 'up' not in marks:
        return 'qemu exited (%s) before the first boot was done' % (
            returncode)
    if 'python' not in marks or 'perl' not in marks:
        return 'the first-boot service\'s python3 or perl failed'
    if returncode != 0:
        return 'qemu exited with %s after the first boot' % returncode
    return None


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize(rows):
    """One summary per (strategy, nodes), over its rounds, in row order."""
    runs = {}
    for row in rows:
        runs.setdefault((row['strategy'], row['nodes']), []).append(row)
    out = []
    for (strategy, n), guests in runs.items():
        good = [g for g in guests if g['ok']]
        out.append({
            'strategy': strategy, 'nodes': n, 'ok': len(good),
            'guests': len(guests),
            'kernel': _mean([g['kernel'] for g in good]),
            'start': _mean([g['start'] for g in good]),
            'up_mean': _mean([g['up'] for g in good]),
            'up_min': min([g['up'] for g in good], default=None),
            'up_max': max([g['up'] for g in good], default=None),
            'off_max': max([g['off'] for g in good], default=None),
            # Every guest of a round has its round's figures: the means
            # over the guests are the means over the rounds.
            'origin_bytes': _mean([g['origin_bytes'] for g in guests
                                   if g['origin_bytes'] != '']),
            'node_rx': _mean([g['node_rx'] for g in guests
                              if g['node_rx'] != '']),
            'cpu_busy': _mean([g['cpu_busy'] for g in guests]),
            'link_mbit': guests[0]['link_mbit'],
            'errors': sorted(set(g['error'] for g in guests if g['error'])),
        })
    return out


def _cell(value, fmt, scale=1.0):
    if value is None or value == '':
        return '-'
    return fmt % (value * scale)


def table(summaries, image_bytes):
    """The text table: one line per (strategy, N), seconds from start."""
    lines = ['%-14s %2s %7s %7s %7s %11s %7s %9s %9s %6s %5s %5s' % (
        'strategy', 'N', 'kernel', 'start', 'up', 'up min-max', 'off max',
        'origin', 'rx/node', 'copy', 'cpu', 'ok')]
    for s in summaries:
        copy = (s['nodes'] * image_bytes * 8 / (s['link_mbit'] * 1e6)
                if s['strategy'] == 'local-copy' else None)
        spread = (None if s['up_min'] is None else
                  '%.1f-%.1f' % (s['up_min'], s['up_max']))
        lines.append('%-14s %2d %7s %7s %7s %11s %7s %9s %9s %6s %5s %5s' % (
            s['strategy'], s['nodes'], _cell(s['kernel'], '%.1f'),
            _cell(s['start'], '%.1f'), _cell(s['up_mean'], '%.1f'),
            spread or '-', _cell(s['off_max'], '%.1f'),
            _cell(s['origin_bytes'], '%.0f M', 1.0 / MiB),
            _cell(s['node_rx'], '%.0f M', 1.0 / MiB),
            _cell(copy, '+%.0f'), _cell(s['cpu_busy'], '%.0f%%', 100),
            '%d/%d' % (s['ok'], s['guests'])))
    return lines


def write_csv(rows, path):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v)
                             for k, v in row.items() if k in COLUMNS})


# -- the image ----------------------------------------------------------------

def ensure_image(path, mirror):
    """Build the bootable image with make_boot_trace's functions if absent."""
    if os.path.exists(path):
        log('reusing the image %s' % path)
        return
    log('building %s (debootstrap from %s, a few minutes)' % (path, mirror))
    mbt.ensure_tools()
    workdir = tempfile.mkdtemp(prefix='boot-image-', dir='/var/tmp')
    try:
        mbt.build_image(argparse.Namespace(image=path, size_mib=1024,
                                           mirror=mirror), workdir)
    finally:
        shutil.rmtree(workdir, True)


def write_volume(image, path, chunk):
    """The image-volume of ``image``: its bytes (sparse), its manifest."""
    builder = manifest_mod.ManifestBuilder(chunk)
    size = os.path.getsize(image)
    with open(image, 'rb') as src, open(path, 'wb') as dst:
        for offset in range(0, size, chunk):
            data = src.read(min(chunk, size - offset))
            builder.update(data)
            if data.count(0) != len(data):
                dst.seek(offset)
                dst.write(data)
        manifest = builder.finish()
        dst.seek(manifest_mod.volume_offset(size))
        dst.write(manifest.to_bytes())
    return manifest


# -- nodes and guests ---------------------------------------------------------

class VolumeNode(bulk_boot.Node):
    """A bulk_boot node whose daemon also serves volume files."""

    def __init__(self, workdir, name, host, **kwargs):
        super().__init__(workdir, name, host, **kwargs)
        self.mount_dir = os.path.join(self.dir, 'mnt')
        self.control = control_client.ControlClient(
            os.path.join(self.dir, 'control.sock'))
        with open(self.conf, 'a') as f:
            f.write('\n'.join([
                '[blockdev]', 'enabled = true', 'volume_server = python',
                'mount_dir = %s' % self.mount_dir,
                'layers_dir = %s' % os.path.join(self.dir, 'layers'),
                'control_socket = %s' % self.control.path, '']))

    def start(self, cleanup):
        """Start in the node's network namespace, not a mount namespace.

        ``ip netns exec`` would also give the daemon a mount namespace of
        its own, hiding its FUSE mount from qemu.
        """
        cleanup.callback(cache_io.unmount, self.mount_dir)
        with open(self.log, 'ab') as out:
            self.proc = subprocess.Popen(
                ['nsenter', '--net=/run/netns/%s' % self.ns,
                 sys.executable, '-m', 'thunder_cache.daemon',
                 '--config-file', self.conf],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        cleanup.callback(self.stop)

    def ready(self):
        return (super().ready() and
                cache_io.mounted(self.mount_dir))

    def create_volume(self, volume_id, size):
        """A volume of the image; returns its file's path."""
        self.control.call('create_volume', volume_id=volume_id, size=size,
                          image_id=bulk_boot.IMAGE_ID)
        return os.path.join(self.mount_dir, volume_id)


class Guest:
    """One qemu guest booting ``disk``; its console in a log file."""

    def __init__(self, name, disk, logdir, args):
        self.name = name
        self.cmd = guest_qemu.qemu_command(args.accel, disk,
                                           args.memory_mib)
        self.console_log = os.path.join(logdir, name + '.console.log')
        self.stderr_log = os.path.join(logdir, name + '.qemu.log')
        self.proc = None
        self.console = None
        self.off = None
        self.failure = None

    def start(self, cleanup, t0):
        with open(self.stderr_log, 'wb') as err:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=err, start_new_session=True)
        cleanup.callback(self.kill)
        self.console = mbt.Console(self.proc.stdout, self.console_log, t0)
        self.console.start()

    def kill(self):
        """SIGTERM its process group, SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def result(self):
        self.console.join(10)
        with open(self.console_log, errors='replace') as f:
            marks = parse_console(f.read())
        error = boot_failure(marks, self.proc.returncode, self.failure)
        row = {'guest': self.name, 'ok': error is None, 'error': error or '',
               'off': round(self.off, 2) if self.off is not None else ''}
        for name in ('kernel', 'start', 'up'):
            row[name] = marks.get(name, '')
        return row


def boot_all(guests, cleanup, timeout, stall):
    """Start every guest at once, wait until all powered off (or failed)."""
    t0 = time.time()
    for guest in guests:
        guest.start(cleanup, t0)
    running = list(guests)
    while running:
        time.sleep(0.1)
        now = time.time()
        for guest in list(running):
            if guest.proc.poll() is not None:
                guest.off = now - t0
            elif now - t0 > timeout:
                guest.failure = 'no power-off after %d s' % timeout
            elif now - guest.console.last > stall:
                guest.failure = 'no console output for %d s' % stall
            else:
                continue
            guest.kill()
            running.remove(guest)
    return [guest.result() for guest in guests]


# -- the runs -----------------------------------------------------------------

class GuestBench:
    """The image-volume, the testbed, the origin, and the runs."""

    def __init__(self, args, workdir, cleanup):
        self.args = args
        self.cleanup = cleanup
        self.chunk = args.chunk_kib * 1024
        self.size = os.path.getsize(args.image)
        trace = bulk_boot.load_trace(args.trace)
        if trace['image']['size'] != self.size:
            raise RuntimeError('%s is of a %d-byte image, %s has %d bytes'
                               % (args.trace, trace['image']['size'],
                                  args.image, self.size))
        self.order = bulk_boot.chunk_order(trace['reads'], self.chunk)
        self.testbed = bulk_boot.Testbed('bg%d-' % os.getpid(),
                                         max(args.nodes))
        self.volume = os.path.join(workdir, 'image-volume')
        self.run_dir = os.path.join(workdir, 'run')
        self.rate = args.link_mbit * 1e6 / 8
        self.manifest = None
        self.rows = []

    def prepare(self):
        log('writing the image-volume (%d KiB chunks)' % (self.chunk // 1024))
        self.manifest = write_volume(self.args.image, self.volume,
                                     self.chunk)
        log('creating %d network namespaces %s*, links %g Mbit/s' % (
            len(self.testbed.namespaces), self.testbed.prefix,
            self.args.link_mbit))
        self.cleanup.callback(self.testbed.close)
        self.testbed.create()
        self.testbed.shape(int(self.rate * 8))
        log('filling the origin\'s cache')
        scope = bm.Cleanup()
        try:
            origin = self.origin(64)
            bulk_boot.start_all([origin], scope)
            count = self.manifest.chunk_count
            bulk_boot.read_chunks(origin.socket, self.manifest,
                                  list(range(count)), 2)
            deadline = time.monotonic() + 60
            while origin.metrics().get('chunks_present') != count:
                if time.monotonic() > deadline:
                    raise RuntimeError('the origin\'s cache is incomplete')
                time.sleep(0.2)
        finally:
            scope.close()

    def origin(self, max_children):
        node = bulk_boot.Node(self.args.workdir_path, 'origin',
                              self.testbed.hosts[0],
                              max_children=max_children)
        node.describe(self.manifest, {'type': 'file', 'path': self.volume})
        return node

    def run_all(self):
        """Every (N, strategy) once a round, round after round.

        A drift of the machine then touches every strategy alike.
        """
        plan = [(r, n, strategy) for r in range(self.args.repeat)
                for n in self.args.nodes for strategy in self.args.strategies]
        for r, n, strategy in plan:
            log('round %d, %s, N=%d (load %s)' % (
                r + 1, strategy, n, bm.load_average()))
            rows = self.run_one(strategy, n)
            for row in rows:
                row['round'] = r + 1
            self.rows.extend(rows)
            for s in summarize(rows):
                log('up %s s (max %s), off max %s s, %d/%d booted%s' % (
                    _cell(s['up_mean'], '%.1f'), _cell(s['up_max'], '%.1f'),
                    _cell(s['off_max'], '%.1f'), s['ok'], n,
                    ''.join('; ' + e for e in s['errors'])))

    def run_one(self, strategy, n):
        scope = bm.Cleanup()
        os.makedirs(self.run_dir)
        try:
            load = bm.load_average()
            if strategy == 'local-copy':
                disks = []
                for k in range(n):
                    disks.append(os.path.join(self.run_dir, 'disk%d' % k))
                    bm.run(['cp', '--sparse=always', self.args.image,
                            disks[-1]])
                hosts = []
            else:
                hosts = self._start_nodes(strategy, n, scope)
                sent_before = [self.testbed.sent_bytes(k)
                               for k in range(n + 1)]
                disks = [node.create_volume('volume-' + node.name, self.size)
                         for node in hosts[1:]]
            guests = [Guest('%s-N%d-g%d' % (strategy, n, k), disk,
                            self.args.logs, self.args)
                      for k, disk in enumerate(disks)]
            cpu = bm.host_cpu()
            started = time.monotonic()
            rows = boot_all(guests, scope, self.args.timeout,
                            self.args.stall)
            busy = (bm.host_cpu() - cpu) / (
                (time.monotonic() - started) * os.cpu_count())
            extra = {'origin_bytes': '', 'origin_link_bytes': '',
                     'node_rx': '', 'node_tx': '', 'prefetched': ''}
            metrics = [h.metrics() for h in hosts]
            if hosts:
                extra.update(
                    origin_bytes=int(metrics[0].get('bytes_served_to_peers',
                                                    0)),
                    origin_link_bytes=(self.testbed.sent_bytes(0) -
                                       sent_before[0]))
        finally:
            scope.close()
            bm.remove_tree(self.run_dir)
        for k, row in enumerate(rows):
            row.update(extra, strategy=strategy, nodes=n,
                       link_mbit=self.args.link_mbit,
                       cpu_busy=round(busy, 3), load=load)
            if hosts:
                m = metrics[k + 1]
                row.update(node_rx=int(m.get('bytes_from_peers', 0) +
                                       m.get('bytes_from_origin', 0)),
                           node_tx=int(m.get('bytes_served_to_peers', 0)),
                           prefetched=int(m.get('chunks_prefetched', 0)))
        return rows

    def _start_nodes(self, strategy, n, scope):
        """[origin] + n volume nodes of ``strategy``, started."""
        peer_mode = strategy.startswith('peer')
        origin = self.origin(1 if peer_mode else 64)
        nodes = [VolumeNode(self.run_dir, 'n%d' % k,
                            self.testbed.hosts[k + 1], max_children=2,
                            replay=strategy == 'peer+prefetch')
                 for k in range(n)]
        peers = [origin.url]
        if peer_mode:
            peers += [node.url for node in nodes]
        for node in nodes:
            node.describe(self.manifest, None, peers)
            if strategy == 'peer+prefetch':
                node.place_trace(self.order)
        bulk_boot.start_all([origin] + nodes, scope)
        return [origin] + nodes


# -- main ---------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--nodes', default='1,2',
                        help='node counts (default 1,2; every guest is one '
                        'TCG vCPU: more than the cores slows every boot)')
    parser.add_argument('--strategies', default=','.join(STRATEGIES),
                        help='among %s (default: all)' % ', '.join(
                            STRATEGIES))
    parser.add_argument('--repeat', type=int, default=1,
                        help='rounds of every run (default 1)')
    parser.add_argument('--link-mbit', type=float, default=100,
                        help='rate of every link, each way (default 100)')
    parser.add_argument('--image', default=DEFAULT_IMAGE,
                        help='the bootable image (built when missing)')
    parser.add_argument('--mirror', default=mbt.MIRROR)
    parser.add_argument('--trace', default=bulk_boot.DEFAULT_TRACE,
                        help='boot trace whose chunk order is prefetched')
    parser.add_argument('--chunk-kib', type=int,
                        default=manifest_mod.DEFAULT_CHUNK_SIZE // 1024,
                        help='manifest chunk size (default %d, the store\'s)'
                        % (manifest_mod.DEFAULT_CHUNK_SIZE // 1024))
    parser.add_argument('--accel', choices=('tcg', 'kvm'), default='tcg')
    parser.add_argument('--memory-mib', type=int, default=1024,
                        help='guest memory (default 1024, as the trace)')
    parser.add_argument('--timeout', type=int, default=900,
                        help='seconds a boot may take (default 900)')
    parser.add_argument('--stall', type=int, default=180,
                        help='seconds without console output that fail a '
                        'boot (default 180)')
    parser.add_argument('--out', default=DEFAULT_OUT)
    parser.add_argument('--workdir', default='/dev/shm',
                        help='where the temporary directory goes (default '
                        '/dev/shm)')
    args = parser.parse_args(argv)
    args.nodes = sorted(set(int(n) for n in args.nodes.split(',')))
    args.strategies = [s for s in STRATEGIES
                       if s in args.strategies.split(',')]
    if min(args.nodes) < 1 or max(args.nodes) > 16 or not args.strategies:
        parser.error('nodes must be within 1-16; at least one strategy')
    return args


def unavailable():
    for tool in ('nsenter', 'qemu-system-x86_64'):
        if not shutil.which(tool):
            return '%s is not installed' % tool
    return bulk_boot.unavailable() or cache_io.unavailable()


def _shown(path):
    """``path`` relative to the checkout when inside it."""
    relative = os.path.relpath(path, REPO)
    return path if relative.startswith(os.pardir) else relative


def main(argv=None):
    args = parse_args(argv)
    why = unavailable()
    if why:
        print('boot_guests: cannot run: %s' % why, file=sys.stderr)
        return 2
    workdir, cleanup = cache_io.run_as_benchmark('boot-guests-',
                                                 args.workdir)
    args.workdir_path = workdir
    args.logs = os.path.join(workdir, 'consoles')
    os.makedirs(args.logs)
    try:
        return _main(args, argv, cleanup)
    except (RuntimeError, OSError, subprocess.SubprocessError,
            control_client.ControlError) as e:
        print('\nboot_guests: FAILED: %s' % e, file=sys.stderr)
        return 1
    finally:
        cleanup.close()


def _main(args, argv, cleanup):
    ensure_image(args.image, args.mirror)
    load_start = bm.load_average()
    started = time.monotonic()
    bench = GuestBench(args, args.workdir_path, cleanup)
    bench.prepare()
    bench.run_all()
    qemu = bm.run(['qemu-system-x86_64', '--version']).stdout.splitlines()[0]
    image_used = os.stat(args.image).st_blocks * 512
    lines = [
        'Real guests booting at once (benchmarks/boot_guests.py)',
        'command: tox -e bench -- benchmarks/boot_guests.py %s' % ' '.join(
            sys.argv[1:] if argv is None else argv),
        'date: %s; machine: %s, %s' % (
            datetime.datetime.now(datetime.timezone.utc).strftime(
                '%Y-%m-%d %H:%M UTC'), mbt.cpu_model(), cache_io.machine()),
        'load average: %s at the start, %s at the end' % (
            load_start, bm.load_average()),
        'image: %s, %d MiB (%d MiB allocated), %d KiB chunks; prefetch: '
        '%d chunks of %s' % (
            os.path.basename(args.image), bench.size // MiB,
            image_used // MiB, bench.chunk // 1024, len(bench.order),
            _shown(args.trace)),
        'guests: %s, -accel %s, 1 vCPU, %d MiB, virtio-blk raw cache=none '
        'aio=threads; links %g Mbit/s each way' % (
            qemu, args.accel, args.memory_mib, args.link_mbit),
        '']
    lines += table(summarize(bench.rows), bench.size)
    lines += [
        '',
        'kernel, start, up: mean seconds from the common start to the '
        'kernel banner, the first-boot',
        'service\'s start and end markers on the console, over every '
        'guest of every round; up min-max:',
        'the fastest and slowest guest\'s end marker; off max: the '
        'slowest power-off. origin: bytes',
        'the origin served; rx/node: bytes a node received (daemon '
        'metrics; means over the rounds).',
        'copy: seconds a full copy of the image to N nodes from one '
        'origin adds before the boot',
        '(N x image / link rate; computed, not run). cpu: the machine\'s '
        'busy share during the boots.']
    print('\n'.join(lines))
    os.makedirs(args.out, exist_ok=True)
    write_csv(bench.rows, os.path.join(args.out, 'guests.csv'))
    with open(os.path.join(args.out, 'guests.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    log('results in %s (guests.csv, guests.txt); %.0f s in all' % (
        args.out, time.monotonic() - started))
    return 0 if all(r['ok'] for r in bench.rows) else 1


if __name__ == '__main__':
    sys.exit(main())
