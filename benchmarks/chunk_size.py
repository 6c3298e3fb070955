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

"""Chunk sizes compared in one run: bulk_boot.py at each, interleaved.

``benchmarks/bulk_boot.py`` (N emulated compute nodes booting one image
in network namespaces) run once per manifest chunk size of ``--sizes``
and round of ``--rounds``, in the order round 1: A B, round 2: A B, ...,
so that what the machine does meanwhile (other load, thermal throttling,
a slower hour) falls on every size alike rather than on the one run
last. Every run is ``python -m benchmarks.bulk_boot <the arguments after
--> --chunk-kib K --out <out>/round-R/K-kib``, a separate process from
the repository's root; its output is shown prefixed with the round and
size, and kept in ``output.log`` next to its results. The first size is
the baseline (the store's old default comes first in the default,
``256,64``).

For every strategy, N and size the summary gives, over the rounds, as
"min-max" ranges: the time until the last node is ready, that over the
swarm bound max(W/B, think) (W: the bytes the trace reads, B: a link's
rate), the mean time to ready, the bytes the origin served over W, the
bytes a node received (MiB), the daemons' CPU seconds per GiB they
received; and the ratio of the median time until the last node is ready
to the baseline's. Runs bulk_boot.py did not make but extrapolated are
marked ``~``; a run in which a node did not read the image's bytes is
flagged ``FAILED verified/N``. Then a line per run: build, end time, load
averages before and after, link rate.

    sudo tox -e bench -- benchmarks/chunk_size.py [--sizes 256,64]
        [--rounds 2] [--out DIR] -- <bulk_boot.py arguments but
        --chunk-kib and --out>

e.g. ``-- --nodes 8,16 --strategies peer,peer+prefetch --no-scale
--link-mbit 40 --peer-option stripes=2`` (``--no-scale`` keeps the link
rate the same in every run: otherwise each run measures the machine and
chooses its own). Writes ``summary.txt`` (the table) and ``summary.json``
into ``--out``, and every run's ``results.csv``, ``results.txt`` and
``run.json`` into ``round-R/K-kib`` there. SIGTERM, SIGINT (Ctrl-C) and
SIGHUP are passed on to the running bulk_boot.py, which removes its
namespaces and daemons, and waited for; the summary of the runs made so
far is still written. Exit status 1 if a run failed or a node was not
verified.
"""

import argparse
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
DEFAULT_SIZES = (256, 64)
DEFAULT_ROUNDS = 2
DEFAULT_OUT = os.path.join(tempfile.gettempdir(), 'chunk-size')
MIN_KIB = 4
MAX_KIB = 65536
#: bulk_boot.py's options this script sets for every run.
RESERVED = ('--chunk-kib', '--out')
#: bulk_boot.py's order of the strategies (others after, by name).
STRATEGIES = ('full-copy', 'on-demand', 'peer', 'peer+prefetch')
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# -- arguments and commands ---------------------------------------------------

def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--' in argv:
        at = argv.index('--')
        own, passthrough = argv[:at], argv[at + 1:]
    else:
        own, passthrough = argv, []
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        usage='%(prog)s [-h] [--sizes KIB,KIB,...] [--rounds R] [--out DIR] '
        '-- [bulk_boot.py arguments]')
    parser.add_argument('--sizes', default=','.join(map(str, DEFAULT_SIZES)),
                        help='manifest chunk sizes in KiB, powers of two '
                        'within %d-%d; the first is the baseline (default '
                        '%s)' % (MIN_KIB, MAX_KIB,
                                 ','.join(map(str, DEFAULT_SIZES))))
    parser.add_argument('--rounds', type=int, default=DEFAULT_ROUNDS,
                        help='runs of every size, interleaved (default %d)'
                        % DEFAULT_ROUNDS)
    parser.add_argument('--out', default=DEFAULT_OUT,
                        help='results directory (default %s)' % DEFAULT_OUT)
    args, extra = parser.parse_known_args(own)
    if extra:
        parser.error('unrecognized arguments: %s (bulk_boot.py\'s go after '
                     '"--")' % ' '.join(extra))
    try:
        args.sizes = [int(s) for s in args.sizes.split(',')]
    except ValueError:
        parser.error('--sizes %r: not a list of integers (KiB)' % args.sizes)
    for kib in args.sizes:
        if not MIN_KIB <= kib <= MAX_KIB or kib & (kib - 1):
            parser.error('--sizes: %d KiB is not a power of two within '
                         '%d-%d KiB' % (kib, MIN_KIB, MAX_KIB))
    if len(set(args.sizes)) != len(args.sizes):
        parser.error('--sizes: a size is given twice')
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    for arg in passthrough:
        name = arg.partition('=')[0]
        # argparse takes any unambiguous prefix of an option (--chunk).
        if name.startswith('--') and len(name) > 2 and any(
                option.startswith(name) for option in RESERVED):
            parser.error('%s after "--": chunk_size.py sets bulk_boot.py\'s '
                         '--chunk-kib (from --sizes) and --out (a directory '
                         'under its own --out) for every run' % arg)
    args.passthrough = passthrough
    args.out = os.path.abspath(args.out)
    return args


def plan(sizes, rounds):
    """[(round, KiB)] in the order of the runs: A B, A B, ..."""
    return [(r, kib) for r in range(1, rounds + 1) for kib in sizes]


def run_dir(out, rnd, kib):
    return os.path.join(out, 'round-%d' % rnd, '%d-kib' % kib)


def bulk_boot_command(passthrough, kib, out, python=None):
    """The command of one run (from the repository's root)."""
    return [python or sys.executable, '-m', 'benchmarks.bulk_boot'] + list(
        passthrough) + ['--chunk-kib', str(kib), '--out', out]


# -- the runs -----------------------------------------------------------------

class Runner:
    """Runs one child at a time; signals received are passed on to it."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.child = None
        self.signum = None

    def forward(self, signum, frame=None):
        if self.signum is None:
            self.signum = signum
        child = self.child
        if child is not None:
            # Nothing if it has been waited for already. bulk_boot.py
            # unwinds through its cleanup on the first signal and ignores
            # later ones.
            child.send_signal(signum)

    def install(self):
        """Handle SIGNALS; returns the previous handlers."""
        return {s: signal.signal(s, self.forward) for s in SIGNALS}

    def run(self, cmd, prefix, log_path=None, cwd=REPO):
        """Run ``cmd``, its output shown with ``prefix``; its exit status."""
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        log = open(log_path, 'wb') if log_path else None
        try:
            # A session of its own: a Ctrl-C at the terminal reaches this
            # process only, which passes it on once.
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
            self.child = proc
            if self.signum is not None:
                proc.send_signal(self.signum)
            try:
                for line in proc.stdout:
                    if log:
                        log.write(line)
                        log.flush()
                    self.stream.write(prefix + line.decode(
                        errors='replace').rstrip('\r\n').split('\r')[-1] +
                        '\n')
                    self.stream.flush()
            except BaseException:
                proc.send_signal(signal.SIGTERM)
                raise
            finally:
                proc.stdout.close()
                status = proc.wait()
                self.child = None
            return status
        finally:
            if log:
                log.close()


def load_fresh(path, since):
    """The JSON at ``path`` if written at ``since`` or later, else None."""
    try:
        if os.stat(path).st_mtime < since - 1:
            return None
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# -- the summary (pure) -------------------------------------------------------

def _number(value):
    """``value`` if a finite number, else None ('' and NaN included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _values(rows, func):
    out = []
    for r in rows:
        try:
            out.append(_number(func(r)))
        except (KeyError, TypeError, ZeroDivisionError):
            out.append(None)
    return out


def _finite(values):
    return [v for v in values if _number(v) is not None]


def fmt_range(values, fmt='%.1f'):
    """'min-max' of the numbers among ``values`` (one if they print alike)."""
    values = _finite(values)
    if not values:
        return '-'
    low, high = fmt % min(values), fmt % max(values)
    return low if low == high else '%s-%s' % (low, high)


def median(values):
    values = _finite(values)
    return statistics.median(values) if values else None


def _strategy_key(strategy):
    if strategy in STRATEGIES:
        return (STRATEGIES.index(strategy), '')
    return (len(STRATEGIES), strategy)


def _failed(row):
    verified = _number(row.get('verified'))
    return bool(row.get('measured')) and (verified is None or
                                          verified < row['nodes'])


def summarize(runs, sizes):
    """The comparison of the runs: a JSON-able dict.

    ``runs``: [{'round': R, 'kib': K, 'run': bulk_boot.py's run.json}].
    ``sizes``: the sizes in KiB, the baseline first.
    """
    base = sizes[0]
    groups = {}
    for run in runs:
        for row in run['run'].get('rows', []):
            key = (row['nodes'], _strategy_key(row['strategy']),
                   row['strategy'])
            groups.setdefault(key, {}).setdefault(run['kib'], []).append(
                (run['round'], row))
    rows = []
    for key in sorted(groups):
        nodes, _, strategy = key
        by_size = groups[key]
        base_median = median(_values(
            [r for _, r in by_size.get(base, [])], lambda r: r['ready_max']))
        for kib in sizes:
            if kib not in by_size:
                continue
            rounds = [n for n, _ in by_size[kib]]
            rs = [r for _, r in by_size[kib]]
            ready_max = _values(rs, lambda r: r['ready_max'])
            med = median(ready_max)
            rows.append({
                'strategy': strategy, 'nodes': nodes, 'kib': kib,
                'rounds': rounds,
                'measured': [bool(r.get('measured')) for r in rs],
                'ready_max': ready_max,
                'over_bound': _values(rs, lambda r: r['ready_max'] / max(
                    r['bound_swarm'], r['think'])),
                'ready_mean': _values(rs, lambda r: r['ready_mean']),
                'origin_per_W': _values(
                    rs, lambda r: r['origin_bytes'] / r['working_set']),
                'rx_mib': _values(rs, lambda r: r['node_rx_mean'] / MiB),
                'cpu_gib_rx': _values(rs, lambda r: r['cpu_gib_rx']),
                'ready_max_median': med,
                'vs_base': (med / base_median
                            if med is not None and base_median else None),
                'failed': [
                    {'round': n, 'verified': r.get('verified'),
                     'nodes': r['nodes'], 'errors': r.get('errors', '')}
                    for n, r in by_size[kib] if _failed(r)],
            })
    meta = []
    for run in runs:
        data = run['run']
        rate = _number(data.get('link_bytes_per_second'))
        meta.append({
            'round': run['round'], 'kib': run['kib'],
            'build': data.get('build'), 'date': data.get('date'),
            'load_average_start': data.get('load_average_start'),
            'load_average_end': data.get('load_average_end'),
            'link_mbit': round(rate * 8 / 1e6, 3) if rate else None,
            'chunk_bytes': data.get('chunk_bytes'),
            'working_set': data.get('working_set'),
            'working_set_chunks': data.get('working_set_chunks'),
            'seconds': data.get('seconds'),
        })
    return {'baseline_kib': base, 'sizes_kib': list(sizes),
            'rows': rows, 'runs': meta,
            'failed': any(r['failed'] for r in rows)}


def _ok_column(row):
    if row['failed']:
        worst = min(row['failed'], key=lambda f: _number(f['verified']) or 0)
        return 'FAILED %s/%d' % (worst['verified'] if worst['verified']
                                 not in ('', None) else 0, worst['nodes'])
    if not any(row['measured']):
        return 'model'
    return '%d/%d' % (row['nodes'], row['nodes']) + (
        '' if all(row['measured']) else ' ~')


TABLE = '%-14s %3s %5s %13s %11s %13s %11s %11s %11s %7s %s'


def summary_lines(summary, command=''):
    """The summary as text: the table, the failures, a line per run."""
    base = summary['baseline_kib']
    rounds = max([m['round'] for m in summary['runs']] or [0])
    lines = [
        'Chunk sizes %s KiB (baseline %d KiB), %d round%s interleaved: '
        'bulk_boot.py at each size in turn' % (
            ', '.join(map(str, summary['sizes_kib'])), base, rounds,
            '' if rounds == 1 else 's')]
    if command:
        lines.append(command)
    lines += ['', TABLE % ('strategy', 'N', 'KiB', 'last s', 'x bound',
                           'mean s', 'origin/W', 'rx MiB', 'CPU/GiB',
                           'vs base', 'ok')]
    for row in summary['rows']:
        mark = '' if all(row['measured']) else '~'
        ratio = ('base' if row['kib'] == base else
                 '-' if row['vs_base'] is None else
                 mark + '%.2f' % row['vs_base'])
        lines.append((TABLE % (
            row['strategy'], row['nodes'], row['kib'],
            mark + fmt_range(row['ready_max']),
            mark + fmt_range(row['over_bound'], '%.2f'),
            mark + fmt_range(row['ready_mean']),
            mark + fmt_range(row['origin_per_W'], '%.2f'),
            fmt_range(row['rx_mib']),
            fmt_range(row['cpu_gib_rx'], '%.2f'), ratio,
            _ok_column(row))).rstrip())
    failures = [(f, row) for row in summary['rows'] for f in row['failed']]
    if failures:
        lines += ['', '!! %d run%s FAILED: not every node read the image\'s '
                  'bytes; their times are over the nodes verified only' % (
                      len(failures), '' if len(failures) == 1 else 's')]
        lines += ['!! FAILED round %d, %d KiB, %s N=%d: %s/%d verified%s' % (
            f['round'], row['kib'], row['strategy'], row['nodes'],
            f['verified'], f['nodes'],
            ': ' + f['errors'] if f['errors'] else '')
            for f, row in failures]
    lines += ['', 'ranges min-max over the rounds; last s: until the last '
              'node is ready; x bound: that over max(W/B, think); '
              'origin/W: bytes the origin served over the working set W; '
              'rx MiB: received per node; CPU/GiB: the daemons\' CPU '
              'seconds per GiB received; vs base: median last s over the '
              'baseline\'s; ~: extrapolated by bulk_boot.py (not run)', '']
    for m in summary['runs']:
        lines.append(
            'round %d, %d KiB: build %s, ended %s, load %s -> %s, links %s '
            'Mbit/s, chunk %s KiB, W %s MiB, Wc %s MiB, %s s' % (
                m['round'], m['kib'], m['build'], m['date'],
                m['load_average_start'], m['load_average_end'],
                '%g' % m['link_mbit'] if m['link_mbit'] else '?',
                m['chunk_bytes'] // 1024 if m['chunk_bytes'] else '?',
                _mib(m['working_set']), _mib(m['working_set_chunks']),
                '%.0f' % m['seconds'] if _number(m['seconds']) is not None
                else '?'))
    rates = set(m['link_mbit'] for m in summary['runs'])
    if len(rates) > 1:
        lines.append('!! the link rate differs between runs (bulk_boot.py '
                     'scales it to the machine in each): pass --no-scale '
                     'and --link-mbit to compare like with like')
    return lines


def _mib(value):
    return '%.1f' % (value / MiB) if _number(value) is not None else '?'


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(out, summary, lines, command):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'summary.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(_json_safe(dict(summary, command=command)), f, indent=1,
                  sort_keys=True)


# -- main ---------------------------------------------------------------------

def say(message):
    print('chunk_size: %s' % message, file=sys.stderr, flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = 'tox -e bench -- benchmarks/chunk_size.py ' + ' '.join(argv)
    runner = Runner()
    previous = runner.install()
    runs = []
    status = 0
    started = time.monotonic()
    try:
        todo = plan(args.sizes, args.rounds)
        for k, (rnd, kib) in enumerate(todo):
            if runner.signum is not None:
                break
            out = run_dir(args.out, rnd, kib)
            os.makedirs(out, exist_ok=True)
            cmd = bulk_boot_command(args.passthrough, kib, out)
            say('run %d/%d (round %d, %d KiB) at %s: %s' % (
                k + 1, len(todo), rnd, kib,
                datetime.datetime.now().strftime('%H:%M'),
                ' '.join(cmd[1:])))
            since = time.time()
            code = runner.run(cmd, '[r%d %dK] ' % (rnd, kib),
                              os.path.join(out, 'output.log'))
            if runner.signum is not None:
                say('stopped by signal %d: round %d, %d KiB not finished'
                    % (runner.signum, rnd, kib))
                break
            data = load_fresh(os.path.join(out, 'run.json'), since)
            if data is None:
                say('FAILED: round %d, %d KiB: bulk_boot.py exited with %d '
                    'and wrote no run.json (its output: %s); no more runs'
                    % (rnd, kib, code, os.path.join(out, 'output.log')))
                status = 1
                break
            runs.append({'round': rnd, 'kib': kib, 'run': data})
            if code:
                say('!! round %d, %d KiB: bulk_boot.py exited with %d: a '
                    'node was not verified (flagged in the summary); '
                    'going on' % (rnd, kib, code))
                status = 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if runs:
        summary = summarize(runs, args.sizes)
        lines = summary_lines(summary, command)
        write_summary(args.out, summary, lines, command)
        print('\n'.join(lines))
        print('\nsummary in %s (summary.txt, summary.json); %.0f s in all'
              % (args.out, time.monotonic() - started))
        if summary['failed']:
            status = 1
    if runner.signum is not None:
        return 128 + runner.signum
    return status


if __name__ == '__main__':
    sys.exit(main())
