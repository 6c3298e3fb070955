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

"""Tests for ``tools/thunder-stack tempest``: tempest.conf and its image.

The CLIs are mocks here; ``tools/thunder-stack tempest`` runs the real
Tempest against the stack (doc/source/stack.rst has its results).
"""

import os
from unittest import mock

import pytest

from thunder_stack import ini
from thunder_stack import layout
from thunder_stack import stack as stack_mod
from thunder_stack import tempest

SHA = 'a' * 64


@pytest.fixture
def stack(tmp_path):
    s = stack_mod.Stack(root=str(tmp_path / 'stack'))
    s.state = {'password': 'secret', 'ports': dict(layout.DEFAULT_PORTS)}
    return s


@pytest.fixture
def conf(stack, tmp_path):
    workspace = str(tmp_path / 'workspace')
    tempest.write_config(stack, workspace, 'IMAGE', 'FLAVOR')
    path = os.path.join(workspace, 'etc', 'tempest.conf')
    return lambda section, option: ini.iniget(path, section, option)


def test_nova_and_neutron_are_available(conf):
    for service in ('nova', 'neutron', 'cinder', 'glance'):
        assert conf('service_available', service) == 'True', service
    assert conf('service_available', 'swift') == 'False'


def test_servers_boot_the_image_with_the_flavor(conf):
    for option in ('image_ref', 'image_ref_alt'):
        assert conf('compute', option) == 'IMAGE'
    for option in ('flavor_ref', 'flavor_ref_alt'):
        assert conf('compute', option) == 'FLAVOR'


def test_servers_boot_without_network_and_ssh(conf):
    assert conf('auth', 'create_isolated_networks') == 'False'
    assert conf('compute', 'fixed_network_name') == ''
    assert conf('validation', 'run_validation') == 'False'


@pytest.mark.parametrize('feature', ['live_migration', 'cold_migration',
                                     'resize', 'interface_attach',
                                     'volume_multiattach'])
def test_one_node_features_are_off(conf, feature):
    assert conf('compute-feature-enabled', feature) == 'False'


def test_attached_volumes_extend_but_not_encrypted_ones(conf):
    assert conf('volume-feature-enabled', 'extend_attached_volume') == 'True'
    assert conf('volume-feature-enabled',
                'extend_attached_encrypted_volume') == 'False'


def test_volumes_have_cinders_default_type_unless_told(conf, stack,
                                                       tmp_path):
    assert conf('volume', 'volume_type') == ''
    workspace = str(tmp_path / 'peer')
    tempest.write_config(stack, workspace, 'IMAGE', 'FLAVOR',
                         layout.PEER_BACKEND)
    path = os.path.join(workspace, 'etc', 'tempest.conf')
    assert ini.iniget(path, 'volume', 'volume_type') == 'thunder-peer'


class FakeCli:
    """``openstack image list|delete`` and ``glance image-create``."""

    def __init__(self, images):
        self.images = dict(images)      # id -> sha256
        self.calls = []

    def __call__(self, stack, *args):
        self.calls.append(args)
        if args[1:3] == ('image', 'list'):
            wanted = [a.split('=')[1] for a in args if '=' in a]
            return '\n'.join(i for i, sha in self.images.items()
                             if not wanted or sha in wanted) + '\n'
        if args[1:3] == ('image', 'delete'):
            del self.images[args[3]]
            return ''
        if args[:2] == ('glance', 'image-create'):
            prop = args[args.index('--property') + 1]
            self.images['new'] = prop.split('=')[1]
            return '| id | new |\n'
        raise AssertionError(args)


def _image(stack, cli):
    guest = mock.Mock(sha256=SHA, fmt='raw', path='/guest.raw')
    with mock.patch.object(tempest.guest_mod, 'build',
                           return_value=guest), \
            mock.patch.object(tempest.clients, 'cli', cli):
        return tempest._image(stack)


def test_image_of_this_build_is_reused(stack):
    cli = FakeCli({'old': 'b' * 64, 'cur': SHA})
    assert _image(stack, cli) == 'cur'
    assert not [c for c in cli.calls if c[0] == 'glance']
    assert set(cli.images) == {'old', 'cur'}


def test_images_of_other_builds_are_replaced(stack):
    cli = FakeCli({'old': 'b' * 64})
    assert _image(stack, cli) == 'new'
    assert cli.images == {'new': SHA}
    create = [c for c in cli.calls if c[0] == 'glance'][0]
    assert create[create.index('--file') + 1] == '/guest.raw'
    assert create[create.index('--disk-format') + 1] == 'raw'


def test_workspace_is_registered_in_the_stack_not_in_home(stack):
    """A workspace of a stack removed since, in ~/.tempest, is no clash."""
    args = mock.Mock(volume_type=None, regex='x', concurrency=2,
                     exclude=None)
    with mock.patch.object(tempest, '_venv', return_value='/venv'), \
            mock.patch.object(tempest, '_image', return_value='IMAGE'), \
            mock.patch.object(tempest, '_flavor', return_value='FLAVOR'), \
            mock.patch.object(tempest.svc, 'run') as run, \
            mock.patch.object(tempest.subprocess, 'run') as tempest_run:
        tempest_run.return_value.returncode = 0
        assert tempest.run_tempest(stack, args) == 0
    [init] = [c.args[0] for c in run.call_args_list if 'init' in c.args[0]]
    assert init == ['/venv/bin/tempest', 'init', '--workspace-path',
                    stack.path('tempest-workspaces.yaml'),
                    stack.path('tempest')]
