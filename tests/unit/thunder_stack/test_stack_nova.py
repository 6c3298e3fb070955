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

"""Tests for Nova, Placement, Neutron and libvirt in the local stack.

libvirt is a mock (``virsh``); what is checked is which domains the stack
removes, the configuration it writes and how ``down`` orders things. The
e2e tests (tests/e2e/test_nova.py) run the real services.
"""

import datetime
import os
import stat
from unittest import mock

import pytest

from thunder_stack import bootstrap
from thunder_stack import cache
from thunder_stack import ini
from thunder_stack import install
from thunder_stack import layout
from thunder_stack import nova
from thunder_stack import services as svc
from thunder_stack import stack as stack_mod


@pytest.fixture
def stack(tmp_path):
    s = stack_mod.Stack(root=str(tmp_path / 'stack'))
    s.state = {'password': 'secret', 'ports': dict(layout.DEFAULT_PORTS)}
    for project in ('nova', 'neutron'):
        paste = os.path.join(s.venv, 'etc', project, 'api-paste.ini')
        os.makedirs(os.path.dirname(paste))
        with open(paste, 'w') as f:
            f.write('[composite:%s]\n' % project)
    return s


@pytest.mark.parametrize('number', [1, 0xa0, 0xffffffff])
def test_instance_names_of_the_template_match(number):
    assert nova.INSTANCE_NAME.match(nova.INSTANCE_NAME_TEMPLATE % number)


@pytest.mark.parametrize('name', ['instance-1', 'instance-0000000g',
                                  'instance-000000001', 'vm-00000001',
                                  'my-instance-00000001', 'guest'])
def test_other_names_do_not(name):
    assert not nova.INSTANCE_NAME.match(name)


class FakeVirsh:
    """Domains that ``destroy`` and ``undefine`` really remove."""

    def __init__(self, names, stuck=()):
        self.names = list(names)
        self.stuck = set(stuck)
        self.calls = []

    def __call__(self, *args, check=True, timeout=60, sock=None):
        self.calls.append(args)
        if args[0] == 'list':
            return mock.Mock(stdout='\n'.join(self.names) + '\n\n')
        if args[0] == 'undefine' and args[-1] not in self.stuck:
            self.names.remove(args[-1])
        return mock.Mock(returncode=0, stdout='', stderr='')


@pytest.fixture
def libvirt_up():
    with mock.patch.object(nova, '_socket_reason', return_value=None):
        yield


def test_remove_domains_removes_only_the_stacks(stack, libvirt_up):
    virsh = FakeVirsh(['instance-00000001', 'instance-0000002a'])
    with mock.patch.object(nova, '_virsh', virsh):
        nova.remove_domains(stack)
    assert virsh.names == []
    assert ('destroy', 'instance-00000001') in virsh.calls
    assert ('undefine', '--nvram', 'instance-0000002a') in virsh.calls


def test_a_foreign_domain_is_left_and_named(stack, libvirt_up):
    virsh = FakeVirsh(['instance-00000001', 'someone-elses-vm'])
    with mock.patch.object(nova, '_virsh', virsh):
        with pytest.raises(svc.StackError, match='someone-elses-vm'):
            nova.remove_domains(stack)
    assert virsh.names == ['someone-elses-vm']
    assert not [c for c in virsh.calls if 'someone-elses-vm' in c]


def test_a_domain_that_stays_is_an_error(stack, libvirt_up):
    virsh = FakeVirsh(['instance-00000001'], stuck=['instance-00000001'])
    with mock.patch.object(nova, '_virsh', virsh):
        with pytest.raises(svc.StackError, match='could not be removed'):
            nova.remove_domains(stack)


def test_no_libvirt_no_domains():
    with mock.patch.object(nova, '_socket_reason', return_value='refused'), \
            mock.patch.object(nova, '_virsh') as virsh:
        assert nova.domains() == []
    virsh.assert_not_called()


def test_down_removes_domains_after_nova_compute_before_libvirtd(stack):
    order = []
    stack.state['ports'] = dict(layout.DEFAULT_PORTS)

    def stop(service, timeout=30):
        order.append(service.name)

    with mock.patch.object(svc.Service, 'pid', return_value=1), \
            mock.patch.object(svc.Service, 'stop', stop), \
            mock.patch.object(cache, 'detach_loops'), \
            mock.patch.object(stack_mod.Stack, 'ceph'), \
            mock.patch.object(nova, 'remove_domains',
                              side_effect=lambda s: order.append(
                                  'remove_domains')):
        stack.down()
    assert order.index('nova-compute') < order.index('remove_domains') < \
        order.index('libvirtd') < order.index('virtlogd')


def test_nova_compute_has_no_database(stack):
    nova.write_config(stack)
    api = ini.load(stack.path('etc', 'nova', 'nova.conf'))
    compute = ini.load(stack.path('etc', 'nova', 'nova-compute.conf'))
    assert api.get('database', 'connection').endswith('/nova?charset=utf8')
    assert api.get('api_database', 'connection').endswith(
        '/nova_api?charset=utf8')
    for section in ('database', 'api_database', 'keystone_authtoken'):
        assert not compute.has_section(section)
    assert compute.get('libvirt', 'virt_type') == 'qemu'
    assert compute.get('DEFAULT', 'instance_name_template') == \
        nova.INSTANCE_NAME_TEMPLATE
    assert compute.get('DEFAULT', 'host') == nova.HOST
    for conf in (api, compute):
        assert conf.get('service_user', 'send_service_user_token') == 'True'
        assert conf.get('placement', 'username') == 'nova'
        # Servers and volumes in one zone (the nodes' peer-mode volumes).
        assert conf.get('cinder', 'cross_az_attach') == 'False'


def test_ephemeral_disks_in_the_stacks_ceph_pool(stack):
    nova.write_config(stack)
    compute = ini.load(stack.path('etc', 'nova', 'nova-compute.conf'))
    assert compute.get('libvirt', 'images_type') == 'rbd'
    assert compute.get('libvirt', 'images_rbd_pool') == nova.EPHEMERAL_POOL
    assert compute.get('libvirt', 'images_rbd_ceph_conf') == stack.ceph_conf
    # The stack's Ceph creates the pool with the others.
    assert nova.EPHEMERAL_POOL in stack.ceph().pools


def test_every_service_has_its_config_files(stack):
    nova.write_config(stack)
    for service in nova.services(stack):
        for i, arg in enumerate(service.argv):
            if arg in ('--config-file', '--config', '--ini'):
                assert os.path.exists(service.argv[i + 1]), service.name
        assert stack.root in ' '.join(service.argv), service.name


def test_cinder_calls_nova_as_the_nova_user(stack):
    section = nova.cinder_nova_section(stack)
    assert section['username'] == 'nova'
    assert section['auth_url'] == stack.auth_url
    assert section['region_name'] == 'RegionOne'


def test_kvm_device_given_to_group_kvm(tmp_path):
    device = tmp_path / 'kvm'
    device.touch(0o600)
    gid = os.getgid()
    with mock.patch.object(nova, 'KVM_DEVICE', str(device)), \
            mock.patch.object(nova.grp, 'getgrnam',
                              return_value=mock.Mock(gr_gid=gid)), \
            mock.patch.object(nova.os, 'chown') as chown:
        nova._kvm_device()
    chown.assert_called_once_with(str(device), -1, gid)
    assert stat.S_IMODE(os.stat(device).st_mode) == 0o660


def test_kvm_device_left_alone_when_right(tmp_path):
    device = tmp_path / 'kvm'
    device.touch(0o660)
    os.chmod(device, 0o660)
    with mock.patch.object(nova, 'KVM_DEVICE', str(device)), \
            mock.patch.object(nova.grp, 'getgrnam', return_value=mock.Mock(
                gr_gid=os.stat(device).st_gid)), \
            mock.patch.object(nova.os, 'chmod') as chmod:
        nova._kvm_device()
    chmod.assert_not_called()


def test_no_kvm_device_nothing_to_do(tmp_path):
    with mock.patch.object(nova, 'KVM_DEVICE', str(tmp_path / 'none')), \
            mock.patch.object(nova.os, 'chmod') as chmod:
        nova._kvm_device()
    chmod.assert_not_called()


def test_a_foreign_libvirtd_is_refused(stack):
    with mock.patch.object(nova, '_kvm_device'), \
            mock.patch.object(svc.Service, 'pid', return_value=None), \
            mock.patch.object(nova, '_socket_reason', return_value=None), \
            mock.patch.object(svc.Service, 'start') as start:
        with pytest.raises(svc.StackError, match='did not start it'):
            nova._libvirt(stack)
    start.assert_not_called()


def test_stack_installs_and_serves_nova(stack):
    for package in nova.APT_PACKAGES:
        assert package in install.APT_PACKAGES
    for package in nova.PIP_PACKAGES:
        assert package in install.PIP_PACKAGES
    names = [s.name for s in stack.services()]
    assert names[-len(nova.services(stack)):] == [
        s.name for s in nova.services(stack)]
    assert set(nova.PORTS) <= set(layout.DEFAULT_PORTS)


class FakeApi:
    """keystoneauth's Adapter over canned JSON, by path prefix."""

    def __init__(self, answers):
        self.answers = answers

    def get(self, path, raise_exc=True):
        for prefix, body in self.answers.items():
            if path.startswith(prefix):
                return mock.Mock(ok=body is not None,
                                 json=mock.Mock(return_value=body or {}))
        raise AssertionError('unexpected GET %s' % path)


def compute_status(services, hypervisors=(), inventories=None, since=None):
    answers = {
        '/os-services': {'services': services},
        '/os-hypervisors/detail': {'hypervisors': list(hypervisors)},
        '/resource_providers/': inventories,
    }
    with mock.patch.object(bootstrap, '_api',
                           return_value=FakeApi(answers)):
        return bootstrap._compute_status({}, nova.HOST, since)


SERVICE = {'state': 'up', 'status': 'enabled',
           'updated_at': '2026-12-02T20:13:05.000000'}
HYPERVISOR = {'id': 'rp-uuid', 'hypervisor_hostname': 'vm', 'state': 'up',
              'service': {'host': nova.HOST}}
INVENTORY = {'inventories': {'VCPU': {'total': 2},
                             'MEMORY_MB': {'total': 1024}}}


def test_compute_ready():
    assert compute_status([SERVICE], [HYPERVISOR], INVENTORY) == (
        True, 'vm: 2 vCPUs, 1024 MiB')


def test_compute_not_registered():
    ok, reason = compute_status([])
    assert not ok and 'no nova-compute service' in reason


def test_a_restarted_compute_is_not_ready_before_it_reports():
    started = datetime.datetime(2026, 12, 2, 20, 14)
    ok, reason = compute_status([SERVICE], [HYPERVISOR], INVENTORY,
                                since=started)
    assert not ok and 'has not reported since it started' in reason
    ok, reason = compute_status([dict(SERVICE, updated_at=None)],
                                [HYPERVISOR], INVENTORY, since=started)
    assert not ok and 'has not reported since it started' in reason
    assert compute_status([SERVICE], [HYPERVISOR], INVENTORY,
                          since=started - datetime.timedelta(minutes=5))[0]


def test_compute_not_mapped_or_without_inventory():
    ok, reason = compute_status([SERVICE], [])
    assert not ok and 'mapped to a cell' in reason
    ok, reason = compute_status([SERVICE], [HYPERVISOR], None)
    assert not ok and 'no VCPU inventory' in reason
