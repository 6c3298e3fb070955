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

"""benchmarks/nova_boot.py: arguments, statistics, table, goals, CSV."""

import argparse

import pytest

from benchmarks import nova_boot


def server(active, marker, copied=0, written=4096, clone=True):
    return {'active_s': active, 'marker_s': marker, 'copied_bytes': copied,
            'after_boot_bytes': written, 'clone': clone}


def runs_of(flow, n, marker_means, copied=0):
    """One run per round, every server of a run at the same times."""
    return [nova_boot.run_row(r + 1, flow, n, 'x', [
        server(m / 2, m, copied) for _ in range(n)], 1, 10.0)
        for r, m in enumerate(marker_means)]


def test_parse_counts_and_flows():
    assert nova_boot.parse_counts('1, 4,8') == [1, 4, 8]
    for bad in ('', '0', '1,-2', 'a'):
        with pytest.raises(ValueError):
            nova_boot.parse_counts(bad)
    assert nova_boot.parse_flows('thunder,ephemeral') == ['thunder',
                                                          'ephemeral']
    with pytest.raises(ValueError, match='unknown flow.*nope'):
        nova_boot.parse_flows('thunder,nope')
    with pytest.raises(ValueError):
        nova_boot.parse_flows(' , ')


def test_parse_args_short_run():
    args = nova_boot.parse_args(['--counts', '1', '--rounds', '1',
                                 '--flows', 'thunder', '--out', 'x'])
    assert (args.counts, args.rounds, args.flows, args.out) == (
        [1], 1, ['thunder'], 'x')
    assert nova_boot.parse_args([]).counts == [1, 4, 8]
    with pytest.raises(SystemExit):
        nova_boot.parse_args(['--rounds', '0'])


def test_flow_order_rotates():
    flows = ['a', 'b', 'c']
    orders = [nova_boot.flow_order(flows, r) for r in range(4)]
    assert orders == [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'],
                      ['a', 'b', 'c']]
    # Every flow runs first once in as many rounds as there are flows.
    assert {o[0] for o in orders[:3]} == set(flows)


def test_run_row_counts_only_booted_servers():
    servers = [server(2.0, 10.0, copied=0), server(4.0, 20.0, copied=0),
               server(5.0, None, copied=8192, written=0, clone=False)]
    row = nova_boot.run_row(2, 'thunder', 3, 'thunder,ephemeral', servers,
                            snapshots=1, seconds=33.333)
    assert row['ok'] == 2
    assert row['active_mean'] == 3.0 and row['active_max'] == 4.0
    assert row['marker_mean'] == 15.0 and row['marker_max'] == 20.0
    assert row['copied_bytes'] == 8192
    assert row['after_boot_bytes'] == 8192
    assert row['clones'] == 2 and row['snapshots'] == 1
    assert row['seconds'] == 33.3 and row['error'] == ''


def test_run_row_without_any_booted_server():
    row = nova_boot.run_row(1, 'ephemeral', 1, 'x', [], 0, 1.0, 'boom')
    assert row['ok'] == 0 and row['marker_mean'] is None
    assert row['error'] == 'boom'


def test_summarize_medians_and_spread():
    runs = (runs_of('thunder', 8, [30.0, 50.0, 40.0]) +
            runs_of('ephemeral', 8, [35.0, 45.0, 60.0]) +
            runs_of('thunder', 1, [9.0, 11.0, 10.0]))
    summaries = nova_boot.summarize(runs)
    assert [(s['n'], s['flow']) for s in summaries] == [
        (1, 'thunder'), (8, 'thunder'), (8, 'ephemeral')]
    thunder8 = summaries[1]
    assert thunder8['marker_mean'] == 40.0
    assert thunder8['marker_mean_spread'] == (30.0, 50.0)
    assert thunder8['active_mean'] == 20.0
    assert thunder8['good'] == thunder8['rounds'] == 3
    assert thunder8['clones'] == thunder8['servers'] == 24
    assert thunder8['snapshots'] == 3


def test_summarize_leaves_failed_runs_out_of_the_medians():
    runs = runs_of('thunder', 4, [10.0, 90.0])
    runs[1]['error'] = 'server X ERROR: boom'
    [s] = nova_boot.summarize(runs)
    assert s['marker_mean'] == 10.0 and s['good'] == 1 and s['rounds'] == 2
    assert s['errors'] == ['server X ERROR: boom']


def test_goals_met_within_the_baseline_spread():
    runs = (runs_of('thunder', 8, [40.0, 50.0, 52.0]) +
            runs_of('ephemeral', 8, [35.0, 45.0, 60.0]))
    results = nova_boot.goals(nova_boot.summarize(runs))
    assert [(text.split(' ')[1], met) for text, met, _ in results] == [
        ('request', True), ('0', True)]
    assert 'thunder median 50.0 s vs ephemeral median 45.0 s' in \
        results[0][2]


def test_goals_missed():
    runs = (runs_of('thunder', 8, [70.0, 80.0, 90.0], copied=1 << 20) +
            runs_of('ephemeral', 8, [35.0, 45.0, 60.0]))
    results = nova_boot.goals(nova_boot.summarize(runs))
    assert [met for _, met, _ in results] == [False, False]
    lines = nova_boot.goal_lines(results)
    assert all(' MISSED ' in line for line in lines)
    assert 'at most 8.0 MiB per run' in lines[1]     # 8 x 1 MiB


def test_goals_need_both_flows_at_8():
    assert nova_boot.goals(nova_boot.summarize(
        runs_of('thunder', 8, [1.0]))) == []


def test_table_lines():
    runs = (runs_of('thunder', 1, [10.0]) + runs_of('ephemeral', 1, [12.0],
                                                    copied=64 << 20))
    lines = nova_boot.table(nova_boot.summarize(runs))
    assert len(lines) == 4
    assert lines[0].split()[:3] == ['N', 'flow', 'rounds']
    thunder = lines[2].split()
    assert thunder[:3] == ['1', 'thunder', '1/1']
    assert thunder[5:7] == ['10.0', '10.0-10.0']
    assert '0 B' in lines[2] and '64.0 MiB' in lines[3]


def test_csv_round_trip(tmp_path):
    runs = runs_of('thunder', 4, [10.0, 12.5])
    runs[1]['error'] = 'x'
    runs[1]['active_max'] = None
    path = str(tmp_path / 'runs.csv')
    nova_boot.write_csv(runs, nova_boot.RUN_COLUMNS, path)
    back = nova_boot.read_runs(path)
    assert [r['marker_mean'] for r in back] == [10.0, 12.5]
    assert back[1]['active_max'] is None and back[1]['error'] == 'x'
    assert back[0]['n'] == 4 and back[0]['clones'] == 4
    assert nova_boot.summarize(back) == nova_boot.summarize(runs)


def test_disk_of():
    ephemeral = {'id': 'S'}
    assert nova_boot.disk_of('ephemeral', ephemeral) == 'S_disk'
    bfv = {'id': 'S', 'os-extended-volumes:volumes_attached': [
        {'id': 'V', 'delete_on_termination': True}]}
    assert nova_boot.disk_of('thunder', bfv) == 'volume-V'
    assert nova_boot.disk_of('rbd-volume', {'id': 'S'}) is None


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip('matplotlib')
    runs = (runs_of('thunder', 1, [10.0]) + runs_of('thunder', 4, [20.0]) +
            runs_of('ephemeral', 1, [11.0]))
    note = nova_boot.plot(nova_boot.summarize(runs), str(tmp_path))
    assert note == 'plots: marker.png, active.png'
    for name in ('marker.png', 'active.png'):
        with open(tmp_path / name, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_main_refuses_without_a_stack(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('THUNDER_STACK_DIR', str(tmp_path / 'none'))
    assert nova_boot.main(['--counts', '1', '--rounds', '1']) == 2
    assert 'not up' in capsys.readouterr().err


def test_args_namespace_of_the_demo():
    """What ``tools/thunder-stack demo --nova-args`` may pass parses."""
    args = nova_boot.parse_args(['--counts', '1', '--rounds', '1',
                                 '--out=/tmp/x'])
    assert isinstance(args, argparse.Namespace) and args.out == '/tmp/x'


def test_another_round_fits():
    assert nova_boot.another_round_fits(1000.0, 0, 10.0)
    assert nova_boot.another_round_fits(1000.0, 5, None)
    # Two rounds took 600 s: a third ends at 900 s.
    assert nova_boot.another_round_fits(600.0, 2, 900.0)
    assert not nova_boot.another_round_fits(600.0, 2, 899.0)


def test_run_line():
    [row] = runs_of('thunder', 2, [12.0])
    assert nova_boot.run_line(row) == (
        '2/2 ready, marker mean 12.0 s, max 12.0 s, copied 0 B, 1 '
        'snapshots, 10 s')
    row['error'] = 'boom'
    assert nova_boot.run_line(row).endswith('; FAILED: boom')
