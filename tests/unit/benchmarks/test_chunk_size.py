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

"""benchmarks/chunk_size.py: its arguments, commands and summary.

No benchmark is run: the runs are stood in for by small Python children
that write a run.json as bulk_boot.py does.
"""

import io
import json
import os
import signal
import sys

import pytest

from benchmarks import chunk_size

MiB = 1024 * 1024
W = 10 * MiB


def row(strategy='peer', nodes=8, ready_max=10.0, ready_mean=6.0,
        measured=True, verified=None, origin_bytes=W, node_rx_mean=12 * MiB,
        cpu_gib_rx=1.5, bound_swarm=2.0, think=5.0, errors=''):
    return {'strategy': strategy, 'nodes': nodes, 'measured': measured,
            'ready_max': ready_max, 'ready_mean': ready_mean,
            'origin_bytes': origin_bytes, 'working_set': W,
            'working_set_chunks': W + MiB, 'node_rx_mean': node_rx_mean,
            'cpu_gib_rx': cpu_gib_rx if measured else '',
            'daemon_cpu_s': 3.0, 'bound_swarm': bound_swarm, 'think': think,
            'local_requests': 100 if measured else '',
            'verified': (nodes if verified is None else verified)
            if measured else '', 'errors': errors}


def run_json(kib, rows, build='abc1234', load=('0.10 0.20 0.30',
                                               '1.00 0.90 0.80'),
             rate=5e6, date='2024-05-01 10:00'):
    return {'rows': rows, 'ref_rows': [], 'build': build, 'date': date,
            'load_average_start': load[0], 'load_average_end': load[1],
            'link_bytes_per_second': rate, 'chunk_bytes': kib * 1024,
            'working_set': W, 'working_set_chunks': W + MiB,
            'think_seconds': 5.0, 'seconds': 61.4}


# -- arguments ----------------------------------------------------------------

def test_defaults_and_passthrough():
    args = chunk_size.parse_args(['--rounds', '3', '--', '--nodes', '8,16',
                                  '--no-scale', '--peer-option',
                                  'stripes=2'])
    assert args.sizes == [256, 64]
    assert args.rounds == 3
    assert args.passthrough == ['--nodes', '8,16', '--no-scale',
                                '--peer-option', 'stripes=2']
    assert args.out == chunk_size.DEFAULT_OUT
    args = chunk_size.parse_args(['--sizes', '64,1024', '--out', 'rel'])
    assert args.sizes == [64, 1024]
    assert args.passthrough == []
    assert args.out == os.path.abspath('rel')


@pytest.mark.parametrize('passed', [
    ['--chunk-kib', '64'], ['--chunk-kib=64'], ['--chunk', '64'],
    ['--out', '/tmp/x'], ['--out=/tmp/x'], ['--ou', '/tmp/x'],
    ['--nodes', '8', '--chunk-kib', '64'],
])
def test_refuses_what_it_sets_itself(passed, capsys):
    with pytest.raises(SystemExit) as e:
        chunk_size.parse_args(['--'] + passed)
    assert e.value.code == 2
    assert 'sets bulk_boot.py\'s --chunk-kib' in capsys.readouterr().err


def test_passes_options_that_only_look_alike():
    args = chunk_size.parse_args(['--', '--origin-budget', '60',
                                  '--compare-ref', 'HEAD~1'])
    assert args.passthrough == ['--origin-budget', '60', '--compare-ref',
                                'HEAD~1']


@pytest.mark.parametrize('sizes', ['3', '2', '0', '-64', '96', '131072',
                                   '64,x', '64,64', ''])
def test_refuses_bad_sizes(sizes, capsys):
    with pytest.raises(SystemExit) as e:
        chunk_size.parse_args(['--sizes', sizes])
    assert e.value.code == 2
    assert '--sizes' in capsys.readouterr().err


def test_accepts_the_extreme_sizes():
    assert chunk_size.parse_args(['--sizes', '4,65536']).sizes == [4, 65536]


@pytest.mark.parametrize('rounds', ['0', '-1'])
def test_refuses_no_rounds(rounds, capsys):
    with pytest.raises(SystemExit):
        chunk_size.parse_args(['--rounds', rounds])
    assert '--rounds' in capsys.readouterr().err


def test_bulk_boot_options_before_the_separator_are_refused(capsys):
    with pytest.raises(SystemExit):
        chunk_size.parse_args(['--nodes', '8'])
    assert 'go after "--"' in capsys.readouterr().err


# -- the runs -----------------------------------------------------------------

def test_plan_interleaves_the_sizes():
    assert chunk_size.plan([256, 64], 2) == [(1, 256), (1, 64), (2, 256),
                                             (2, 64)]
    assert chunk_size.plan([64], 1) == [(1, 64)]


def test_command_of_one_run():
    out = chunk_size.run_dir('/tmp/x', 2, 64)
    assert out == '/tmp/x/round-2/64-kib'
    cmd = chunk_size.bulk_boot_command(['--nodes', '8,16', '--no-scale'],
                                       64, out, python='/py')
    assert cmd == ['/py', '-m', 'benchmarks.bulk_boot', '--nodes', '8,16',
                   '--no-scale', '--chunk-kib', '64', '--out',
                   '/tmp/x/round-2/64-kib']
    assert chunk_size.bulk_boot_command([], 256, out)[0] == sys.executable


def test_runner_streams_with_a_prefix_and_returns_the_status(tmp_path):
    stream = io.StringIO()
    log = tmp_path / 'output.log'
    status = chunk_size.Runner(stream).run(
        [sys.executable, '-c', 'import sys; print("one"); '
         'print("two", file=sys.stderr); sys.exit(3)'], '[r1 64K] ',
        str(log), cwd=str(tmp_path))
    assert status == 3
    assert stream.getvalue().splitlines() == [
        '[r1 64K] one', '[r1 64K] two']
    assert log.read_text().splitlines() == ['one', 'two']


class _Signaller(io.StringIO):
    """Sends the runner a signal once the child says it is ready."""

    def __init__(self):
        super().__init__()
        self.runner = None

    def write(self, text):
        if 'ready' in text:
            self.runner.forward(signal.SIGTERM)
        return super().write(text)


def test_runner_passes_a_signal_on_and_waits(tmp_path):
    stream = _Signaller()
    runner = chunk_size.Runner(stream)
    stream.runner = runner
    child = ('import signal, sys, time\n'
             'def stop(signum, frame):\n'
             '    print("cleaning up")\n'
             '    sys.exit(128 + signum)\n'
             'signal.signal(signal.SIGTERM, stop)\n'
             'print("ready")\n'
             'time.sleep(30)\n')
    status = runner.run([sys.executable, '-c', child], '> ',
                        cwd=str(tmp_path))
    assert status == 128 + signal.SIGTERM
    assert runner.signum == signal.SIGTERM
    assert runner.child is None
    assert stream.getvalue().splitlines() == ['> ready', '> cleaning up']


def test_load_fresh_ignores_a_run_json_of_an_earlier_run(tmp_path):
    path = tmp_path / 'run.json'
    path.write_text('{"rows": []}')
    os.utime(path, (1000, 1000))
    assert chunk_size.load_fresh(str(path), 2000) is None
    os.utime(path, (2000, 2000))
    assert chunk_size.load_fresh(str(path), 2000) == {'rows': []}
    assert chunk_size.load_fresh(str(tmp_path / 'none.json'), 0) is None


# -- the summary --------------------------------------------------------------

def _runs():
    """2 rounds of 256 then 64 KiB; N=8 peer and an extrapolated one."""
    runs = []
    for rnd, (a, b) in enumerate([((10.0, 20.0), (8.0, 14.0)),
                                  ((12.0, 24.0), (7.0, 18.0))], 1):
        runs.append({'round': rnd, 'kib': 256, 'run': run_json(256, [
            row(ready_max=a[0], ready_mean=a[0] / 2, cpu_gib_rx=1.0),
            row('on-demand', 16, ready_max=a[1], measured=False,
                origin_bytes=16 * W)])})
        runs.append({'round': rnd, 'kib': 64, 'run': run_json(64, [
            row(ready_max=b[0], ready_mean=b[0] / 2, cpu_gib_rx=2.0,
                origin_bytes=W * 1.1 if rnd == 1 else W * 1.3,
                verified=7 if rnd == 2 else None,
                errors='1 nodes not ready in time' if rnd == 2 else ''),
            row('on-demand', 16, ready_max=b[1], measured=False,
                origin_bytes=16 * W)], load=('2.00 2.00 2.00',
                                             '3.00 3.00 3.00'))})
    return runs


def _line(lines, *start):
    found = [line.split() for line in lines
             if line.split()[:len(start)] == list(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_summary_ranges_and_ratio_to_the_baseline():
    summary = chunk_size.summarize(_runs(), [256, 64])
    rows = {(r['strategy'], r['nodes'], r['kib']): r
            for r in summary['rows']}
    assert [(r['nodes'], r['strategy'], r['kib'])
            for r in summary['rows']] == [
        (8, 'peer', 256), (8, 'peer', 64), (16, 'on-demand', 256),
        (16, 'on-demand', 64)]
    peer64 = rows['peer', 8, 64]
    assert peer64['ready_max'] == [8.0, 7.0]
    assert peer64['rounds'] == [1, 2]
    # Medians: 7.5 vs 11.
    assert peer64['vs_base'] == pytest.approx(7.5 / 11.0)
    assert rows['peer', 8, 256]['vs_base'] == pytest.approx(1.0)
    # Over max(W/B = 2, think = 5).
    assert peer64['over_bound'] == [8.0 / 5, 7.0 / 5]
    assert peer64['origin_per_W'] == pytest.approx([1.1, 1.3])
    lines = chunk_size.summary_lines(summary, 'the command')
    assert lines[1] == 'the command'
    assert _line(lines, 'peer', '8', '256') == [
        'peer', '8', '256', '10.0-12.0', '2.00-2.40', '5.0-6.0', '1.00',
        '12.0', '1.00', 'base', '8/8']
    assert _line(lines, 'peer', '8', '64')[3:10] == [
        '7.0-8.0', '1.40-1.60', '3.5-4.0', '1.10-1.30', '12.0', '2.00',
        '%.2f' % (7.5 / 11)]


def test_summary_flags_a_run_not_verified_loudly():
    summary = chunk_size.summarize(_runs(), [256, 64])
    assert summary['failed']
    lines = chunk_size.summary_lines(summary)
    assert _line(lines, 'peer', '8', '64')[-2:] == ['FAILED', '7/8']
    assert _line(lines, 'peer', '8', '256')[-1] == '8/8'
    assert ('!! FAILED round 2, 64 KiB, peer N=8: 7/8 verified: 1 nodes '
            'not ready in time') in lines
    ok = chunk_size.summarize(
        [r for r in _runs() if r['round'] == 1], [256, 64])
    assert not ok['failed']
    assert not any('FAILED' in line
                   for line in chunk_size.summary_lines(ok))


def test_summary_marks_extrapolated_rows():
    summary = chunk_size.summarize(_runs(), [256, 64])
    lines = chunk_size.summary_lines(summary)
    model = _line(lines, 'on-demand', '16', '64')
    assert model[3] == '~14.0-18.0'
    assert model[4] == '~2.80-3.60'
    assert model[6] == '~16.00'
    assert model[8] == '-'  # no CPU figures for a run not made
    assert model[9] == '~%.2f' % (16.0 / 22.0)
    assert model[-1] == 'model'
    assert not any(line.startswith('!! FAILED') and 'on-demand' in line
                   for line in lines)
    assert not _line(lines, 'peer', '8', '64')[3].startswith('~')


def test_summary_has_a_line_per_run():
    lines = chunk_size.summary_lines(chunk_size.summarize(_runs(), [256, 64]))
    runs = [line for line in lines if line.startswith('round ')]
    assert len(runs) == 4
    assert runs[1] == (
        'round 1, 64 KiB: build abc1234, ended 2024-05-01 10:00, load 2.00 '
        '2.00 2.00 -> 3.00 3.00 3.00, links 40 Mbit/s, chunk 64 KiB, W 10.0 '
        'MiB, Wc 11.0 MiB, 61 s')
    assert not any('link rate differs' in line for line in lines)


def test_summary_warns_when_the_link_rate_differs():
    runs = _runs()
    runs[1]['run']['link_bytes_per_second'] = 6e6
    lines = chunk_size.summary_lines(chunk_size.summarize(runs, [256, 64]))
    assert any('link rate differs' in line for line in lines)


def test_ratio_without_a_baseline_and_no_ready_time():
    runs = [{'round': 1, 'kib': 64, 'run': run_json(64, [
        row(ready_max=float('nan'), verified=0)])}]
    summary = chunk_size.summarize(runs, [256, 64])
    (only,) = summary['rows']
    assert only['vs_base'] is None
    assert only['ready_max'] == [None]
    line = _line(chunk_size.summary_lines(summary), 'peer', '8', '64')
    assert line[3] == '-'
    assert line[9] == '-'
    assert line[-2:] == ['FAILED', '0/8']


def test_fmt_range():
    assert chunk_size.fmt_range([3.0, 1.0, 2.0]) == '1.0-3.0'
    assert chunk_size.fmt_range([1.01, 1.04]) == '1.0'
    assert chunk_size.fmt_range(['', None]) == '-'
    assert chunk_size.fmt_range([0.5, 1.25], '%.2f') == '0.50-1.25'


# -- main, with bulk_boot.py stood in for -------------------------------------

FAKE = '''
import json, os, sys
argv = sys.argv[1:]
kib = int(argv[argv.index('--chunk-kib') + 1])
out = argv[argv.index('--out') + 1]
with open(os.path.join(os.path.dirname(os.path.dirname(out)), 'order'),
          'a') as f:
    f.write('%d\\n' % kib)
if kib == int(os.environ.get('FAKE_FAIL_KIB', 0)):
    print('boom')
    sys.exit(2)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, 'run.json'), 'w') as f:
    json.dump(RUN % kib, f)
print('ran', kib)
'''


def _fake_command(tmp_path, monkeypatch, run):
    script = tmp_path / 'fake_bulk_boot.py'
    script.write_text(FAKE.replace('RUN % kib', 'json.loads(%r)' % (
        json.dumps(run))))

    def command(passthrough, kib, out, python=None):
        return [sys.executable, str(script)] + list(passthrough) + [
            '--chunk-kib', str(kib), '--out', out]
    monkeypatch.setattr(chunk_size, 'bulk_boot_command', command)


def test_main_runs_interleaved_and_writes_the_summary(
        tmp_path, monkeypatch, capsys):
    _fake_command(tmp_path, monkeypatch, run_json(64, [row()]))
    out = tmp_path / 'out'
    handler = signal.getsignal(signal.SIGTERM)
    assert chunk_size.main(['--rounds', '2', '--out', str(out), '--',
                            '--nodes', '8']) == 0
    assert (out / 'order').read_text().split() == ['256', '64', '256', '64']
    for rnd in (1, 2):
        for kib in (256, 64):
            assert (out / ('round-%d' % rnd) / ('%d-kib' % kib) /
                    'run.json').exists()
    lines = (out / 'summary.txt').read_text().splitlines()
    assert _line(lines, 'peer', '8', '64')[-2:] == ['1.00', '8/8']
    assert _line(lines, 'peer', '8', '256')[-2:] == ['base', '8/8']
    summary = json.loads((out / 'summary.json').read_text())
    assert [r['kib'] for r in summary['rows']] == [256, 64]
    assert summary['rows'][1]['vs_base'] == 1.0
    assert '--nodes 8' in summary['command']
    printed = capsys.readouterr().out
    assert '[r2 64K] ran 64' in printed
    assert signal.getsignal(signal.SIGTERM) == handler


def test_main_stops_at_a_failed_run(tmp_path, monkeypatch, capsys):
    _fake_command(tmp_path, monkeypatch, run_json(64, [row()]))
    monkeypatch.setenv('FAKE_FAIL_KIB', '64')
    out = tmp_path / 'out'
    assert chunk_size.main(['--out', str(out)]) == 1
    assert (out / 'order').read_text().split() == ['256', '64']
    captured = capsys.readouterr()
    assert 'FAILED: round 1, 64 KiB: bulk_boot.py exited with 2' in (
        captured.err)
    assert '[r1 64K] boom' in captured.out
    # The runs made are still summed up.
    summary = json.loads((out / 'summary.json').read_text())
    assert [r['kib'] for r in summary['rows']] == [256]


def test_main_fails_on_nodes_not_verified(tmp_path, monkeypatch, capsys):
    _fake_command(tmp_path, monkeypatch, run_json(64, [row(verified=7)]))
    out = tmp_path / 'out'
    assert chunk_size.main(['--rounds', '1', '--out', str(out)]) == 1
    assert 'FAILED 7/8' in (out / 'summary.txt').read_text()
