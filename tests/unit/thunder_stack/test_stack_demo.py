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

"""Tests for ``tools/thunder-stack demo --bulk-boot`` (thunder_stack.demo).

The benchmark's process is a mock: what is checked is the command the demo
builds, and how the demo reports the benchmark's outcome.
"""

import argparse
import json
import os
from unittest import mock

import pytest

from thunder_stack import cli
from thunder_stack import clients
from thunder_stack import demo
from thunder_stack import flows
from thunder_stack import layout
from thunder_stack import services as svc
from thunder_stack import stack as stack_mod

BENCHMARK = os.path.join(layout.CHECKOUT, 'benchmarks', 'bulk_boot.py')


@pytest.fixture
def stack(tmp_path):
    return stack_mod.Stack(root=str(tmp_path / 'stack'))


@pytest.fixture
def root():
    with mock.patch.object(os, 'geteuid', return_value=0):
        yield


def demo_args(tmp_path, bulk_boot_args='--quick', flows=''):
    return argparse.Namespace(
        flows=flows, bulk_boot=True, bulk_boot_args=bulk_boot_args,
        json=str(tmp_path / 'demo.json'), volumes=[10], image_size_mib=1024,
        keep=False, timeout=900, rounds=1)


def fake_benchmark(returncode, rows=(), goals=()):
    """A Popen stand-in whose process writes run.json into its --out."""
    def popen(command, env):
        out = command[command.index('--out') + 1]
        if rows:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, 'run.json'), 'w') as f:
                json.dump({'rows': list(rows), 'goals': list(goals)}, f)
        proc = mock.Mock()
        proc.wait.return_value = returncode
        return proc
    return mock.patch.object(demo.subprocess, 'Popen', side_effect=popen)


def test_command_default_is_quick_into_the_stack(stack, root, tmp_path):
    command, out = demo.bulk_boot_command(stack, demo_args(tmp_path))
    assert out == stack.path('data', 'demo', 'bulk-boot')
    assert command == [stack.python, BENCHMARK, '--quick', '--out', out]


def test_command_splits_its_arguments(stack, root, tmp_path):
    args = demo_args(tmp_path, "--quick --nodes 1,2 --strategies "
                               "'peer,peer+prefetch'")
    command, out = demo.bulk_boot_command(stack, args)
    assert command[2:] == ['--quick', '--nodes', '1,2', '--strategies',
                           'peer,peer+prefetch', '--out', out]


def test_command_full_benchmark(stack, root, tmp_path):
    command, out = demo.bulk_boot_command(stack, demo_args(tmp_path, ''))
    assert command == [stack.python, BENCHMARK, '--out', out]


@pytest.mark.parametrize('given', [['--out', 'elsewhere'],
                                   ['--out=elsewhere']])
def test_command_keeps_an_out_given(stack, root, tmp_path, given):
    args = demo_args(tmp_path, ' '.join(['--nodes', '1'] + given))
    command, out = demo.bulk_boot_command(stack, args)
    assert command[2:] == ['--nodes', '1'] + given
    assert out == os.path.abspath('elsewhere')


def test_command_unbalanced_quote(stack, root, tmp_path):
    with pytest.raises(svc.StackError, match='--bulk-boot-args'):
        demo.bulk_boot_command(stack, demo_args(tmp_path, "--nodes '1"))


def test_command_needs_root(stack, tmp_path):
    with mock.patch.object(os, 'geteuid', return_value=1000):
        with pytest.raises(svc.StackError, match='needs root'):
            demo.bulk_boot_command(stack, demo_args(tmp_path))


def test_main_says_so_before_up_when_not_root(capsys):
    with mock.patch.object(stack_mod, 'Stack') as stack_cls, \
            mock.patch.object(os, 'geteuid', return_value=1000):
        assert cli.main(['demo', '--bulk-boot']) == 1
    assert not stack_cls.return_value.up.called
    assert not stack_cls.return_value.is_up.called
    assert '--bulk-boot needs root' in capsys.readouterr().err


def parsed(argv):
    """The arguments ``main`` hands run_demo, as root."""
    with mock.patch.object(stack_mod, 'Stack') as stack_cls, \
            mock.patch('thunder_stack.demo.run_demo',
                       return_value=0) as run_demo, \
            mock.patch.object(os, 'geteuid', return_value=0):
        stack_cls.return_value.python = '/stack/venv/bin/python'
        stack_cls.return_value.path.return_value = '/stack/data/bulk'
        assert cli.main(argv) == 0
    return run_demo.call_args[0][1]


def test_main_parses_the_flags():
    args = parsed(['demo'])
    assert not args.bulk_boot and args.bulk_boot_args == '--quick'
    args = parsed(['demo', '--bulk-boot', '--bulk-boot-args',
                   '--nodes 1,2,4'])
    assert args.bulk_boot and args.bulk_boot_args == '--nodes 1,2,4'
    args = parsed(['demo', '--bulk-boot', '--bulk-boot-args=--quick'])
    assert args.bulk_boot_args == '--quick'
    assert parsed(['demo', '--bulk-boot', '--bulk-boot-args',
                   '']).bulk_boot_args == ''


def test_bulk_boot_success(stack, root, tmp_path, capsys):
    rows = [{'measured': True, 'nodes': n, 'verified': n}
            for n in (1, 2)] + [{'measured': False, 'nodes': 4,
                                 'verified': ''}]
    goals = [{'goal': 'a', 'met': True}, {'goal': 'b', 'met': False}]
    args = demo_args(tmp_path)
    with fake_benchmark(0, rows, goals) as popen:
        assert demo.run_demo(stack, args) == 0
    command = popen.call_args[0][0]
    assert command[:3] == [stack.python, BENCHMARK, '--quick']
    env = popen.call_args[1]['env']
    assert env['PYTHONPATH'].split(os.pathsep)[0] == layout.CHECKOUT
    out = stack.path('data', 'demo', 'bulk-boot')
    summary = capsys.readouterr().out
    assert ('bulk boot: ok; 2 runs, every node verified its bytes; goals '
            'met: 1 of 2 (results.txt); results in %s' % out) in summary
    with open(args.json) as f:
        [result] = json.load(f)
    assert result['flow'] == 'bulk-boot'
    assert result['returncode'] == 0 and result['error'] is None
    assert result['results_dir'] == out
    assert result['command'] == command
    assert result['runs'] == 2 and result['unverified_nodes'] == 0


def test_bulk_boot_failure_fails_the_demo(stack, root, tmp_path, capsys):
    rows = [{'measured': True, 'nodes': 2, 'verified': 1}]
    args = demo_args(tmp_path)
    with fake_benchmark(1, rows):
        assert demo.run_demo(stack, args) == 1
    summary = capsys.readouterr().out
    assert ('bulk boot: FAILED: benchmarks/bulk_boot.py exited with 1; '
            '1 runs, 1 nodes NOT verified') in summary
    with open(args.json) as f:
        [result] = json.load(f)
    assert result['returncode'] == 1
    assert result['error'] == 'benchmarks/bulk_boot.py exited with 1'


def test_bulk_boot_ignores_an_earlier_run(stack, root, tmp_path, capsys):
    """A run.json older than this run is not this run's."""
    out = stack.path('data', 'demo', 'bulk-boot')
    os.makedirs(out)
    with open(os.path.join(out, 'run.json'), 'w') as f:
        json.dump({'rows': [{'measured': True, 'nodes': 1,
                             'verified': 1}]}, f)
    os.utime(os.path.join(out, 'run.json'), (0, 0))
    with fake_benchmark(2):
        assert demo.run_demo(stack, demo_args(tmp_path)) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == ('bulk boot: FAILED: benchmarks/bulk_boot.py exited '
                    'with 2; results in %s' % out)


def test_bulk_boot_cannot_start(stack, root, tmp_path):
    args = demo_args(tmp_path)
    with mock.patch.object(demo.subprocess, 'Popen',
                           side_effect=FileNotFoundError(2, 'No such file')):
        assert demo.run_demo(stack, args) == 1
    with open(args.json) as f:
        [result] = json.load(f)
    assert result['error'].startswith('cannot start %s' % stack.python)


def test_flows_run_before_the_bulk_boot(stack, root, tmp_path):
    order = []

    def run_flow(stack, api, name, image, args, count):
        order.append(name)
        return {'flow': name, 'error': None}

    args = demo_args(tmp_path, flows='thunder')
    with mock.patch.object(flows, 'make_image'), \
            mock.patch.object(clients, 'Api'), \
            mock.patch.object(flows, 'print_table'), \
            mock.patch.object(flows, 'run_flow', side_effect=run_flow), \
            fake_benchmark(0) as popen:
        popen.side_effect = lambda *a, **k: order.append('bulk-boot') or (
            mock.Mock(**{'wait.return_value': 0}))
        assert demo.run_demo(stack, args) == 0
    assert order == ['thunder', 'bulk-boot']
    with open(args.json) as f:
        assert [r['flow'] for r in json.load(f)] == ['thunder', 'bulk-boot']


def test_no_flag_no_benchmark(stack, tmp_path):
    args = demo_args(tmp_path)
    args.bulk_boot = False
    with mock.patch.object(demo.subprocess, 'Popen') as popen, \
            mock.patch.object(os, 'geteuid', return_value=1000):
        assert demo.run_demo(stack, args) == 0
    assert not popen.called
    with open(args.json) as f:
        assert json.load(f) == []


# -- demo --nova --------------------------------------------------------------

NOVA_BOOT = os.path.join(layout.CHECKOUT, 'benchmarks', 'nova_boot.py')


def nova_args(tmp_path, nova_args=''):
    args = demo_args(tmp_path)
    args.bulk_boot = False
    args.nova, args.nova_args = True, nova_args
    return args


def test_nova_command(stack, tmp_path):
    command, out = demo.nova_boot_command(stack, nova_args(tmp_path))
    assert out == stack.path('data', 'demo', 'nova-boot')
    assert command == [stack.python, NOVA_BOOT, '--out', out]
    command, out = demo.nova_boot_command(stack, nova_args(
        tmp_path, '--counts 1 --rounds 1 --out=x'))
    assert command[2:] == ['--counts', '1', '--rounds', '1', '--out=x']
    assert out == os.path.abspath('x')
    with pytest.raises(svc.StackError, match='--nova-args'):
        demo.nova_boot_command(stack, nova_args(tmp_path, "--counts '1"))


def test_main_parses_the_nova_flags():
    args = parsed(['demo', '--nova', '--nova-args', '--counts 1'])
    assert args.nova and args.nova_args == '--counts 1'
    args = parsed(['demo'])
    assert not args.nova and args.nova_args == ''


def fake_nova_boot(returncode, goal_lines):
    """A Popen stand-in whose process writes results.txt into its --out."""
    def popen(command, env):
        out = command[command.index('--out') + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, 'results.txt'), 'w') as f:
            f.write('table\n' + ''.join(line + '\n' for line in goal_lines))
        return mock.Mock(**{'wait.return_value': returncode})
    return mock.patch.object(demo.subprocess, 'Popen', side_effect=popen)


def test_nova_boot_reports_its_goals(stack, tmp_path, capsys):
    args = nova_args(tmp_path, '--counts 1')
    goals = ['goal: N=8 marker  met     a', 'goal: N=8 0 bytes  MISSED  b']
    with fake_nova_boot(0, goals) as popen:
        assert demo.run_demo(stack, args) == 0
    assert popen.call_args[0][0][:4] == [stack.python, NOVA_BOOT,
                                         '--counts', '1']
    out = stack.path('data', 'demo', 'nova-boot')
    assert ('nova boot: ok; goals met: 1 of 2 (results.txt); results in '
            '%s' % out) in capsys.readouterr().out
    with open(args.json) as f:
        [result] = json.load(f)
    assert result['flow'] == 'nova-boot' and result['error'] is None
    assert result['goals_missed'] == ['N=8 0 bytes  MISSED  b']


def test_nova_boot_failure_fails_the_demo(stack, tmp_path, capsys):
    with fake_nova_boot(1, []):
        assert demo.run_demo(stack, nova_args(tmp_path)) == 1
    assert ('nova boot: FAILED: benchmarks/nova_boot.py exited with 1'
            in capsys.readouterr().out)


# -- demo --nova-nodes --------------------------------------------------------

NOVA_NODES = os.path.join(layout.CHECKOUT, 'benchmarks', 'nova_nodes.py')


def nova_nodes_args(tmp_path, nova_nodes_args='--rounds 1'):
    args = demo_args(tmp_path)
    args.bulk_boot = False
    args.nova_nodes, args.nova_nodes_args = True, nova_nodes_args
    return args


def test_nova_nodes_command(stack, tmp_path, root):
    command, out = demo.nova_nodes_command(stack, nova_nodes_args(tmp_path))
    assert out == stack.path('data', 'demo', 'nova-nodes')
    assert command == [stack.python, NOVA_NODES, '--rounds', '1', '--out',
                       out]
    with pytest.raises(svc.StackError, match='--nova-nodes-args'):
        demo.nova_nodes_command(stack, nova_nodes_args(tmp_path, "--x '1"))


def test_nova_nodes_needs_root(stack, tmp_path):
    with mock.patch.object(os, 'geteuid', return_value=1000):
        with pytest.raises(svc.StackError, match='needs root'):
            demo.nova_nodes_command(stack, nova_nodes_args(tmp_path))


def test_main_parses_the_nova_nodes_flags():
    args = parsed(['demo', '--nova-nodes', '--nova-nodes-args',
                   '--image-mib 64'])
    assert args.nova_nodes and args.nova_nodes_args == '--image-mib 64'
    args = parsed(['demo'])
    assert not args.nova_nodes
    assert args.nova_nodes_args == '--rounds 3 --image-mib 1024'


@pytest.mark.parametrize('returncode', [0, 1])
def test_nova_nodes_brings_up_and_down_its_nodes(
        stack, tmp_path, root, capsys, returncode):
    goals = ['goal: peer ready 2x sooner  met  a']
    with mock.patch('thunder_stack.nodes.Nodes') as nodes, \
            fake_nova_boot(returncode, goals) as popen:
        nodes.return_value.up.side_effect = lambda: popen.assert_not_called()
        assert demo.run_demo(stack, nova_nodes_args(tmp_path)) == returncode
    assert nodes.call_args_list == [
        mock.call(stack, demo.NOVA_NODES_COUNT, demo.NOVA_NODES_LINK_MBIT),
        mock.call(stack)]
    nodes.return_value.up.assert_called_once_with()
    nodes.return_value.down.assert_called_once_with()
    out = capsys.readouterr().out
    if returncode:
        assert ('nova nodes: FAILED: benchmarks/nova_nodes.py exited with 1'
                in out)
    else:
        assert 'nova nodes: ok; goals met: 1 of 1 (results.txt)' in out


def test_nova_nodes_keeps_nodes_that_were_up(stack, tmp_path, root):
    stack.state['nodes'] = {'count': 3, 'link_mbit': 40}
    with mock.patch('thunder_stack.nodes.Nodes') as nodes, \
            fake_nova_boot(0, []):
        assert demo.run_demo(stack, nova_nodes_args(tmp_path)) == 0
    nodes.assert_not_called()


def test_goal_lines_are_what_the_demo_counts(stack, tmp_path, root):
    goals = [demo.goal_line('ready >= 2x sooner', True, '6.3x'),
             demo.goal_line('origin bytes <= 1.2x', False, '1.3x')]
    with mock.patch('thunder_stack.nodes.Nodes'), \
            fake_nova_boot(0, goals):
        assert demo.run_demo(stack, nova_nodes_args(tmp_path)) == 0
    with open(str(tmp_path / 'demo.json')) as f:
        [result] = json.load(f)
    assert result['goals'] == 2
    assert result['goals_missed'] == [goals[1][len('goal: '):].strip()]
