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


"""The stack's command line (thunder_stack.cli) and the jobs split out of
the Stack: its layout and state, supervision's verdicts, the devstack
bridge's switch and the run-once steps.

Nothing is started here: services, Ceph and the CLIs are mocks.
"""

import os
import stat
from unittest import mock

import pytest

from thunder_stack import ceph as ceph_mod
from thunder_stack import cli
from thunder_stack import devstack
from thunder_stack import layout
from thunder_stack import services as svc
from thunder_stack import stack as stack_mod
from thunder_stack import supervise


@pytest.fixture
def stack_cls():
    with mock.patch.object(stack_mod, 'Stack') as cls:
        yield cls


# -- the command line ------------------------------------------------------

def test_parser_defaults():
    parser = cli.build_parser()
    demo = parser.parse_args(['demo'])
    assert (demo.volumes, demo.image_size_mib) == ([10], 1024)
    assert demo.rounds == 3
    assert parser.parse_args(['demo', '-n', '10,100']).volumes == [10, 100]
    assert demo.timeout == 900
    assert demo.flows == 'thunder,thunder-import,upstream,upstream-cinder'
    assert demo.bulk_boot_args == '--quick'
    assert demo.nova_nodes_args == '--rounds 3 --image-mib 1024'
    assert not (demo.keep or demo.bulk_boot or demo.nova or demo.nova_nodes)
    nodes = parser.parse_args(['nodes', 'up'])
    assert (nodes.action, nodes.count, nodes.link_mbit) == ('up', 2, None)
    tempest = parser.parse_args(['tempest', '--concurrency', '4'])
    assert (tempest.regex, tempest.concurrency) == (None, 4)


@pytest.mark.parametrize('argv', [[], ['start'], ['nodes'],
                                  ['nodes', 'sideways'],
                                  ['demo', '--volumes', 'many'],
                                  ['demo', '--volumes', '10,0'],
                                  ['demo', '--rounds', '0']])
def test_parser_refuses(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert 'usage: tools/thunder-stack' in capsys.readouterr().err


def test_help_names_the_stack_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv('THUNDER_STACK_DIR', str(tmp_path / 'elsewhere'))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(['--help'])
    # argparse wraps the description, long paths too.
    out = ''.join(capsys.readouterr().out.split())
    assert str(tmp_path / 'elsewhere') in out


@pytest.mark.parametrize('rows, code', [
    ([{'name': 'mysql', 'pid': 1, 'port': 2, 'state': 'ok'}], 0),
    ([{'name': 'mysql', 'pid': 1, 'port': 2, 'state': 'ok'},
      {'name': 'ceph', 'pid': None, 'port': 3, 'state': 'stopped'}], 3),
    ([], 3),
])
def test_status_exit_code(stack_cls, rows, code, capsys):
    stack_cls.return_value.status.return_value = rows
    assert cli.main(['status']) == code
    out = capsys.readouterr().out
    if rows:
        assert out.startswith('SERVICE')
        assert 'mysql' in out
    else:
        assert 'no stack in' in out


@pytest.mark.parametrize('error', [svc.StackError('boom'),
                                   svc.ServiceError('boom'),
                                   ceph_mod.CephError('boom')])
def test_errors_are_one_line_and_status_1(stack_cls, error, capsys):
    stack_cls.return_value.up.side_effect = error
    assert cli.main(['up']) == 1
    assert capsys.readouterr().err == 'thunder-stack: error: boom\n'


def test_up_then_status_printed(stack_cls, capsys):
    stack_cls.return_value.status.return_value = [
        {'name': 'keystone', 'pid': 7, 'port': 16500, 'state': 'ok'}]
    assert cli.main(['up']) == 0
    stack_cls.return_value.up.assert_called_once_with()
    assert 'keystone' in capsys.readouterr().out


def test_down(stack_cls):
    assert cli.main(['down']) == 0
    stack_cls.return_value.down.assert_called_once_with()


def test_tempest_brings_the_stack_up_first(stack_cls):
    stack = stack_cls.return_value
    stack.is_up.return_value = False
    with mock.patch('thunder_stack.tempest.run_tempest',
                    return_value=0) as run:
        assert cli.main(['tempest']) == 0
    stack.up.assert_called_once_with()
    args = run.call_args[0][1]
    assert args.regex == cli.tempest_mod.DEFAULT_REGEX


def test_nodes_down(stack_cls):
    with mock.patch('thunder_stack.nodes.Nodes') as nodes:
        assert cli.main(['nodes', 'down']) == 0
    nodes.assert_called_once_with(stack_cls.return_value)
    nodes.return_value.down.assert_called_once_with()


# -- layout and state ------------------------------------------------------

def test_stack_dir(monkeypatch, tmp_path):
    monkeypatch.delenv('THUNDER_STACK_DIR', raising=False)
    assert layout.stack_dir() == os.path.join(layout.CHECKOUT, '.stack')
    monkeypatch.setenv('THUNDER_STACK_DIR', str(tmp_path))
    assert layout.stack_dir() == str(tmp_path)


def test_state_chosen_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv('THUNDER_STACK_PORT_KEYSTONE', '17500')
    first = layout.Layout(str(tmp_path))
    with mock.patch.object(svc, 'free_port', side_effect=lambda p=None: p):
        first.init_state()
    assert first.ports['keystone'] == 17500
    assert first.ports['mysql'] == layout.DEFAULT_PORTS['mysql']
    assert first.password.startswith('thunder-')
    again = layout.Layout(str(tmp_path))
    assert again.state == first.state
    with mock.patch.object(svc, 'free_port') as free_port:
        again.init_state()
    free_port.assert_not_called()
    assert again.auth_url == 'http://127.0.0.1:17500/v3'


def test_ports_taken_twice_are_moved(tmp_path, monkeypatch):
    for name in layout.DEFAULT_PORTS:
        monkeypatch.delenv('THUNDER_STACK_PORT_%s' % name.upper(),
                           raising=False)
    free = iter(range(20000, 20100))
    with mock.patch.object(svc, 'free_port',
                           side_effect=lambda p=None: 16000 if p else
                           next(free)):
        lay = layout.Layout(str(tmp_path))
        lay.init_state()
    ports = list(lay.ports.values())
    assert len(set(ports)) == len(ports)


def test_openrc_is_private(tmp_path):
    lay = layout.Layout(str(tmp_path))
    lay.state = {'password': 'pw', 'ports': dict(layout.DEFAULT_PORTS)}
    lay.write_openrc()
    path = lay.path('openrc')
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        text = f.read()
    assert 'export OS_PASSWORD=pw\n' in text
    assert 'export CEPH_CONF=%s\n' % lay.ceph_conf in text


def test_read_file(tmp_path):
    assert layout.read_file(str(tmp_path / 'none')) is None
    (tmp_path / 'f').write_text('x')
    assert layout.read_file(str(tmp_path / 'f')) == 'x'


# -- supervision, the devstack switch, run-once steps -----------------------

@pytest.mark.parametrize('states, up', [
    (['ok', 'ok'], True), (['ok', 'stopped'], False), ([], False)])
def test_is_up(states, up):
    assert supervise.is_up([{'state': s} for s in states]) is up


def test_restart_if_config_changed(tmp_path):
    stack = stack_mod.Stack(str(tmp_path))
    conf = tmp_path / 'a.conf'
    conf.write_text('one')
    service = mock.Mock()
    service.pid.return_value = 42
    with mock.patch.object(supervise, 'service', return_value=service):
        stack.restart_if_config_changed('x', [str(conf)])   # first: noted
        assert service.stop.call_count == 1
        stack.restart_if_config_changed('x', [str(conf)])   # unchanged
        assert service.stop.call_count == 1
        conf.write_text('two')
        stack.restart_if_config_changed('x', [str(conf)])
        assert service.stop.call_count == 2
    assert layout.Layout(str(tmp_path)).state['config:x']


def test_thunder_store_switch(monkeypatch):
    monkeypatch.setenv('THUNDER_STACK_THUNDER_STORE', '0')
    assert devstack.thunder_store_available() is False
    monkeypatch.setenv('THUNDER_STACK_THUNDER_STORE', '1')
    assert devstack.thunder_store_available() is True


def test_once_runs_then_marks(tmp_path):
    marker = str(tmp_path / 'done')
    with mock.patch.object(svc, 'run') as run:
        svc.once(marker, 'doing it', ['true'])
        svc.once(marker, 'doing it', ['true'])
    run.assert_called_once_with(['true'])
    assert os.path.exists(marker)


def test_bootstrap_runs_from_the_checkout(tmp_path):
    stack = stack_mod.Stack(str(tmp_path))
    stack.state = {'password': 'pw', 'ports': dict(layout.DEFAULT_PORTS)}
    os.makedirs(stack.path('etc'))
    with mock.patch.object(svc, 'run') as run:
        run.return_value.stdout = '[]'
        assert stack.bootstrap('services') == '[]'
    argv = run.call_args[0][0]
    assert argv[:3] == [stack.python, '-m', 'thunder_stack.bootstrap']
    # thunder_stack is not installed in the virtualenv: the checkout is.
    assert run.call_args[1]['env'] == {'PYTHONPATH': layout.CHECKOUT}
