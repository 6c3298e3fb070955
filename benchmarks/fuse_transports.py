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

"""Peer mode: the FUSE transports, classic /dev/fuse, io_uring, passthrough.

Warm reads of one image through the path a peer-mode volume takes (a loop
device with direct I/O on a file of a FUSE mount, read by ``qemu-img
bench`` with Nova's settings: raw, cache=none, aio=threads), served by:

plain local file
    the image as a local raw file (``cache=none``), the baseline;
native volume server
    ``thunder-volume-server`` (libfuse 3.14, /dev/fuse read and writev by
    4 threads) under a real ``thunder-cache`` daemon, every chunk present
    (a fresh volume of a fully fetched image), as ``cache_io.py`` reads it;
raw classic
    ``benchmarks/fuse_transports.c`` (the kernel's FUSE protocol spoken
    without libfuse; a copy of the image as its backing file, in the page
    cache, as the node cache's data file is): 4 threads on /dev/fuse;
raw io_uring
    the same server with FUSE over io_uring: one queue per CPU, each a
    pinned thread with its own ring (``fuse.enable_uring`` is set to Y if
    it reads N; the run says so);
raw passthrough
    the same server answering OPEN with FOPEN_PASSTHROUGH on its backing
    file: the kernel reads the backing file itself, no request reaches the
    server; the ceiling for a fully present volume.

Every round measures every row in turn (the order rotates from round to
round) on fresh loop devices: sequential 1 MiB reads at queue depth 4 (the
whole image), 4 KiB "random" reads (a large stride, coprime with the
number of blocks) at queue depth 16 and at queue depth 1. The table has
the median and the range over the rounds of each ratio to the plain file
of the same round. Round 1 also checks, with ``qemu-img compare``, that
every raw transport returns the image's bytes.

Run as root::

    tox -e bench -- benchmarks/fuse_transports.py [--size-mib 1024]
        [--repeat 3] [--rand-count 32768] [--rows REGEX] [--json out.json]

Debian packages: qemu-utils, gcc, liburing-dev (the raw server), and what
``cache_io.py`` needs for the native row (make, pkg-config, libfuse3-dev,
zlib1g-dev, fuse3). Loop devices, mounts and servers (stopped by PID) are
removed whatever happens, including SIGTERM and Ctrl-C.
"""

import os
import re
import shutil
import subprocess
import sys
import time

from benchmarks import blockdev_mechanisms as bm
from benchmarks import cache_io
from thunder_cache.volumes import nativevol

MiB = 1024 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, 'fuse_transports.c')
ENABLE_URING = '/sys/module/fuse/parameters/enable_uring'
GOALS = {'rand': 0.9, 'rand_qd1': 1.0}

PLAIN = 'plain local file'
NATIVE = 'native volume server (libfuse)'
CLASSIC = 'raw classic (4 threads)'
URING = 'raw io_uring (1 queue/CPU)'
URING_FREE = 'raw io_uring, threads not pinned'
PASSTHROUGH = 'raw passthrough'
ROWS = (PLAIN, NATIVE, CLASSIC, URING, URING_FREE, PASSTHROUGH)
RAW_ARGS = {CLASSIC: ['--transport', 'classic', '--threads', '4'],
            URING: ['--transport', 'uring', '--depth', '32'],
            URING_FREE: ['--transport', 'uring', '--depth', '32', '--no-pin'],
            PASSTHROUGH: ['--transport', 'classic', '--passthrough']}
KEYS = ('seq', 'rand', 'rand_qd1')


def build_raw(workdir):
    """Build the raw server; (binary, None) or (None, why not)."""
    if not shutil.which('gcc'):
        return None, 'gcc is not installed'
    binary = os.path.join(workdir, 'fuse_transports')
    proc = bm.run(['gcc', '-O2', '-Wall', '-o', binary, SOURCE, '-luring',
                   '-lpthread'], check=False)
    if proc.returncode:
        return None, 'gcc failed (Debian: liburing-dev): %s' % (
            proc.stderr.strip()[-500:])
    return binary, None


def uring_enabled():
    """Make sure FUSE over io_uring is on; None or why it cannot be."""
    try:
        with open(ENABLE_URING) as f:
            if f.read().strip() == 'Y':
                return None
        cache_io.step('setting %s to Y (it read N)' % ENABLE_URING)
        with open(ENABLE_URING, 'w') as f:
            f.write('Y')
        return None
    except OSError as e:
        return 'no FUSE over io_uring in this kernel (%s)' % e


class RawServer:
    """The raw server mounted on ``mount_dir``, stopped by its PID."""

    def __init__(self, cleanup, binary, args, backing, mount_dir, log):
        os.makedirs(mount_dir, exist_ok=True)
        self.file = os.path.join(mount_dir, 'volume')
        self.server = bm.fuse_mount(cleanup, [binary] + args + [
            backing, mount_dir], mount_dir, 'fuse_transports', log)
        self.log = log

    def served(self):
        """The last "served" line the server printed, or ''."""
        with open(self.log, errors='replace') as f:
            lines = [line for line in f if line.startswith('served')]
        return lines[-1].strip() if lines else ''


def on_loop(cleanup, path, pids):
    """A fresh read-only direct-I/O loop device on ``path``."""
    device = bm.loop_attach(cleanup, path, readonly=True, direct_io=True)
    return bm.Target(device, device=device, pids=pids)


def measure_raw(args, env, results, name, round_no):
    cleanup = bm.Cleanup()
    try:
        mount_dir = os.path.join(env['workdir'], 'mnt-%d' % round_no)
        log = os.path.join(env['workdir'], 'raw-%d.log' % round_no)
        raw = RawServer(cleanup, env['raw'], RAW_ARGS[name], env['backing'],
                        mount_dir, log)
        for key in KEYS:
            loop = bm.Cleanup()
            try:
                target = on_loop(loop, raw.file, [raw.server.pid])
                measure_one(args, env, results, name, key, target)
                if round_no == 1 and key == 'seq':
                    bm.run(['qemu-img', 'compare', '-q', '-f', 'raw', '-F',
                            'raw', '-T', 'none', env['plain'], target.device])
                    results.add(name, 'verified', 1)
            finally:
                loop.close()
        raw.server.stop()       # it prints what each transport served
        results.add(name, 'served', raw.served())
    finally:
        cleanup.close()


def measure_one(args, env, results, name, key, target):
    size = env['size']
    step = bm.random_step(size, 4096)
    if key == 'seq':
        results.add(name, key, cache_io.seq_pass(target, size))
        return
    count = args.rand_count if key == 'rand' else max(
        1, args.rand_count // 4)
    seconds, _, server_cpu, _ = bm.bench(target, count, 4096,
                                         16 if key == 'rand' else 1, step)
    results.add(name, key, count / seconds)
    if key == 'rand' and target.pids:
        # What the server's processes spent per 4 KiB read (user + system,
        # all threads): less swayed by the machine's load than IOPS.
        results.add(name, 'cpu_us', server_cpu / count * 1e6)


def measure_native(args, env, results, daemon, round_no):
    for key in KEYS:
        volume_id = 'vol-%d-%s' % (round_no, key.replace('_', '-'))
        with cache_io.Volume(daemon, volume_id, 'img', env['size']) as vol:
            measure_one(args, env, results, NATIVE, key, vol.target)


def start_native(args, env, cleanup):
    """A thunder-cache daemon with the native server, the image fetched."""
    workdir = os.path.join(env['workdir'], 'daemon')
    os.makedirs(workdir)
    cache_io.step('building thunder-volume-server, starting thunder-cache')
    native = nativevol.build(os.path.join(env['workdir'], 'native'))
    daemon = cache_io.Daemon(workdir, cleanup, native=native)
    daemon.register('img', env['manifest'], env['manifest_length'],
                    env['volume'])
    with cache_io.Volume(daemon, 'vol-fill', 'img', env['size']) as vol:
        cache_io.seq_pass(vol.target, env['size'])
    daemon.wait_complete('img', env)
    return daemon


def measure_round(args, env, results, round_no, daemon):
    rows = env['rows']
    shift = (round_no - 1) % len(rows)
    for name in rows[shift:] + rows[:shift]:
        cache_io.step('round %d: %s' % (round_no, name))
        if name == PLAIN:
            for key in KEYS:
                measure_one(args, env, results, PLAIN, key,
                            bm.Target(env['plain']))
        elif name == NATIVE:
            measure_native(args, env, results, daemon, round_no)
        else:
            measure_raw(args, env, results, name, round_no)


def summarize(args, env, results):
    rows = {}
    rounds = args.repeat
    for name in env['rows']:
        row = rows[name] = {}
        for key in KEYS:
            values = results.data.get(name, {}).get(key, [])
            bases = results.data.get(PLAIN, {}).get(key, [])
            ratios = [v / b for v, b in zip(values, bases) if b]
            row[key] = results.median(name, key)
            row[key + '_ratios'] = ratios
        row['cpu_us'] = results.data.get(name, {}).get('cpu_us', [])
        row['served'] = results.data.get(name, {}).get('served', [])
        row['verified'] = bool(results.count(name, 'verified'))
    return {
        'date': env['date'], 'machine': env['machine'],
        'load_average': {'start': env['load_start'],
                         'end': bm.load_average()},
        'size_mib': args.size_mib, 'repeat': rounds,
        'rand_count': args.rand_count, 'rows': rows,
        'skipped': env['skipped'], 'uring_note': env['uring_note'],
    }


def span(ratios):
    if not ratios:
        return '-'
    low, high = min(ratios), max(ratios)
    if len(ratios) == 1 or '%.2f' % low == '%.2f' % high:
        return '%.2fx' % low
    return '%.2f-%.2fx' % (low, high)


def report(summary):
    print()
    print('FUSE transports: warm reads of a %d MiB image, %d rounds '
          '(median value; range of the per-round ratios to the plain file)'
          % (summary['size_mib'], summary['repeat']))
    cache_io.print_conditions(summary)
    print('qemu-img bench, raw, cache=none, aio=threads, on a direct-I/O '
          'loop device (the plain file: directly); seq = 1 MiB at QD4;')
    print('4K = %d 4 KiB reads at QD16; QD1 = %d; us/4K: the server\'s '
          'CPU (all its threads, user + system) per 4K read, range' % (
              summary['rand_count'], max(1, summary['rand_count'] // 4)))
    if summary['uring_note']:
        print(summary['uring_note'])
    print()
    cache_io.print_table((32, 8, 11, 8, 11, 8, 11, 9), (
        '', 'seq MB/s', 'ratio', '4K IOPS', 'ratio', 'QD1 IOPS', 'ratio',
        'us/4K'), [(
            name, cache_io.fmt(row['seq']), span(row['seq_ratios']),
            cache_io.fmt(row['rand']), span(row['rand_ratios']),
            cache_io.fmt(row['rand_qd1']), span(row['rand_qd1_ratios']),
            '%.1f-%.1f' % (min(row['cpu_us']), max(row['cpu_us']))
            if row['cpu_us'] else '-')
            for name, row in summary['rows'].items()])
    print()
    for name, why in summary['skipped'].items():
        print('skipped: %s: %s' % (name, why))
    for name, row in summary['rows'].items():
        if row['served']:
            print('%s: requests %s (last round)%s' % (
                name, row['served'][-1],
                '; read back equal to the image' if row['verified'] else ''))
        if name == PLAIN:
            continue
        ratios = {key: row[key + '_ratios'] for key in ('rand', 'rand_qd1')}
        met = all(ratios['rand']) and all(
            r >= GOALS[key] for key in ratios for r in ratios[key])
        print('goals, %s: 4K QD16 >= %.1fx and QD1 >= %.1fx on every '
              'round: %s' % (name, GOALS['rand'], GOALS['rand_qd1'],
                             'met' if met else 'NOT met'))


# ---------------------------------------------------------------------------
# The hand-over test: the mount kept by a holder, the server replaced.
# ---------------------------------------------------------------------------

FUSECTL = '/sys/fs/fuse/connections'


def fuse_connection(mount_dir):
    """The fusectl name of a mount's connection (its device minor)."""
    return str(os.minor(os.stat(mount_dir).st_dev))


def abort_connection(name):
    """Fail whatever the mount still waits for (so that nothing hangs).

    fusectl is mounted for the while if it is not (systemd mounts it;
    this machine may not).
    """
    mounted_here = not os.path.ismount(FUSECTL) and not bm.run(
        ['mount', '-t', 'fusectl', 'fusectl', FUSECTL],
        check=False).returncode
    try:
        with open(os.path.join(FUSECTL, name, 'abort'), 'w') as f:
            f.write('1')
    except OSError:
        pass
    finally:
        if mounted_here:
            bm.run(['umount', FUSECTL], check=False)


def start_process(cleanup, cmd, log, pass_fds=()):
    with open(log, 'ab') as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, pass_fds=pass_fds,
                                start_new_session=True)
    cleanup.callback(stop_process, proc)
    return proc


def stop_process(proc):
    """SIGKILL; a process still in a FUSE request gets 30 s to go."""
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            print('!! pid %d did not exit (a request of the dead server?)'
                  % proc.pid, file=sys.stderr)


def wait_ready(proc, log, deadline=10):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with open(log, errors='replace') as f:
            if 'ready' in f.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    with open(log, errors='replace') as f:
        raise RuntimeError('fuse_transports did not start: %s'
                           % f.read()[-1000:])


def handover(args, env, transport, kill_after, round_no):
    """Kill the server while a reader runs, start another on the same fd.

    The holder (this process) opened /dev/fuse and mounted it, as
    volume_server.c's holder does; the reader is ``qemu-img compare`` of
    the loop device with the image. Returns a dict of what was seen.
    """
    cleanup = bm.Cleanup()
    mount_dir = os.path.join(env['workdir'], 'handover-%s-%d'
                             % (transport, round_no))
    log = mount_dir + '.log'    # the servers': .1, .2; the reader's
    os.makedirs(mount_dir)
    try:
        fd = os.open('/dev/fuse', os.O_RDWR)
        cleanup.callback(os.close, fd)
        bm.run(['mount', '-i', '-t', 'fuse.fuse_transports', '-o',
                'fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other'
                % fd, 'fuse_transports', mount_dir], pass_fds=(fd,))
        cleanup.callback(cache_io.unmount, mount_dir)
        server = [env['raw'], '--transport', transport, '--fd', str(fd)]
        first = start_process(cleanup, server + [env['backing'], mount_dir],
                              log + '.1', (fd,))
        wait_ready(first, log + '.1')
        connection = fuse_connection(mount_dir)
        # Before the unmount and after the reader (undone in reverse): no
        # request may wait on a dead server at the end.
        cleanup.callback(abort_connection, connection)
        device = bm.loop_attach(cleanup, os.path.join(mount_dir, 'volume'),
                                readonly=True, direct_io=True)
        reader = start_process(cleanup, [
            'qemu-img', 'compare', '-q', '-f', 'raw', '-F', 'raw', '-T',
            'none', env['plain'], device], log + '.reader')
        cleanup.callback(abort_connection, connection)
        time.sleep(kill_after)
        if reader.poll() is not None:
            raise RuntimeError('the reader ended before the kill: '
                               'use a larger --size-mib')
        first.kill()
        first.wait()
        killed = time.monotonic()
        second = start_process(cleanup, server + [
            '--resume', env['backing'], mount_dir], log + '.2', (fd,))
        wait_ready(second, log + '.2')
        try:
            status = reader.wait(args.handover_wait)
            result = {'reader_exit': status,
                      'resumed_after_s': round(time.monotonic() - killed, 2)}
        except subprocess.TimeoutExpired:
            result = {'reader_exit': None}
        # A new reader on the same device, after the hand-over.
        fresh = bm.run(['timeout', '10', 'dd', 'if=%s' % device,
                        'of=/dev/null', 'bs=4096', 'count=256',
                        'iflag=direct', 'skip=%d' % (env['size'] // 8192)],
                       check=False)
        result['fresh_read_exit'] = fresh.returncode
        with open(log + '.reader', errors='replace') as f:
            result['reader_said'] = f.read().strip()[-300:]
        return result
    finally:
        cleanup.close()


def run_handover(args, env):
    results = []
    for round_no in range(1, args.repeat + 1):
        for transport in ('classic', 'uring'):
            cache_io.step('hand-over %d, %s: kill the server %.1f s into a '
                          'read' % (round_no, transport, args.kill_after))
            results.append((transport, handover(
                args, env, transport, args.kill_after, round_no)))
    print()
    print('Server replaced under a reader (the mount kept by the holder of '
          'the /dev/fuse fd; %d MiB read by qemu-img compare, the server '
          'SIGKILLed %.1f s in, a new one started on the same fd with '
          'FUSE_NOTIFY_RESEND)' % (args.size_mib, args.kill_after))
    for transport, result in results:
        exit_status = result['reader_exit']
        print('%-8s reader: %s; a new read afterwards: %s%s' % (
            transport,
            'stalled (no answer in %d s)' % args.handover_wait
            if exit_status is None else
            'exit %d (%s) after %.2f s' % (
                exit_status, 'every byte equal' if exit_status == 0 else
                'ERROR', result['resumed_after_s']),
            'ok' if result['fresh_read_exit'] == 0 else
            'exit %d' % result['fresh_read_exit'],
            ('; it said: %s' % result['reader_said'])
            if result['reader_said'] else ''))
    return results


def parse_args(argv):
    parser = cache_io.read_args_parser(
        __doc__, 'rounds (default 3; --handover: kills of each transport)')
    parser.add_argument('--rows', default='.',
                        help='only the rows matching this regular '
                        'expression (the plain file is always measured)')
    parser.add_argument('--handover', action='store_true',
                        help='instead of the table: kill each raw server '
                        'while a reader runs and start another on the same '
                        '/dev/fuse descriptor (does I/O resume?)')
    parser.add_argument('--kill-after', type=float, default=0.5,
                        help='--handover: seconds into the read (0.5)')
    parser.add_argument('--handover-wait', type=int, default=20,
                        help='--handover: seconds the reader may take '
                        'after the kill before it counts as stalled (20)')
    args = parser.parse_args(argv)
    cache_io.check_read_args(parser, args)
    return args


def _main(args, workdir, cleanup):
    env = cache_io.image_env(args, workdir)
    env.update(backing=os.path.join(workdir, 'backing.raw'), skipped={},
               uring_note=None)
    rows = [name for name in ROWS
            if name == PLAIN or re.search(args.rows, name)]
    shutil.copyfile(env['plain'], env['backing'])
    if args.handover:
        env['raw'], why = build_raw(workdir)
        if why or uring_enabled():
            raise RuntimeError(why or uring_enabled())
        results = run_handover(args, env)
        cache_io.write_json(args.json, results)
        return 0
    if any(name in RAW_ARGS for name in rows):
        env['raw'], why = build_raw(workdir)
        if why:
            for name in RAW_ARGS:
                env['skipped'][name] = why
    if {URING, URING_FREE} & set(rows) and URING not in env['skipped']:
        with open(ENABLE_URING) if os.path.exists(ENABLE_URING) else \
                open(os.devnull) as f:
            before = f.read().strip()
        why = uring_enabled()
        if why:
            env['skipped'][URING] = env['skipped'][URING_FREE] = why
        elif before == 'N':
            env['uring_note'] = ('%s was N: this run set it to Y'
                                 % ENABLE_URING)
    env['rows'] = [name for name in rows if name not in env['skipped']]
    daemon = (start_native(args, env, cleanup) if NATIVE in env['rows']
              else None)
    results = bm.Results()
    for round_no in range(1, args.repeat + 1):
        measure_round(args, env, results, round_no, daemon)
    summary = summarize(args, env, results)
    report(summary)
    cache_io.write_json(args.json, summary)
    return 0


def main(argv=None):
    return cache_io.run_main('fuse_transports', _main, parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
