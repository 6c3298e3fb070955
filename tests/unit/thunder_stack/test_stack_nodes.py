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

"""The pure parts of the emulated compute nodes (thunder_stack.nodes).

The e2e test (tests/e2e/test_nova_nodes.py) runs the real nodes.
"""

import os

import pytest

from thunder_stack import ini
from thunder_stack import layout
from thunder_stack import netlab
from thunder_stack import nodes
from thunder_stack import nova
from thunder_stack import stack as stack_mod


def _addrs(*pairs):
    return {'addrvec': [{'type': t, 'addr': a, 'nonce': 0}
                        for t, a in pairs]}


def test_ceph_ports_of_the_monitors_up_osds_and_manager():
    mons = {'mons': [{'public_addrs': _addrs(('v2', '127.0.0.1:3300'),
                                             ('v1', '127.0.0.1:16789'))}]}
    osds = {'osds': [
        {'up': 1, 'public_addrs': _addrs(('v2', '127.0.0.1:6802'),
                                         ('v1', '127.0.0.1:6803'))},
        {'up': 0, 'public_addrs': _addrs(('v1', '127.0.0.1:6900'))}]}
    mgr = {'active_addrs': _addrs(('v2', '127.0.0.1:6800'),
                                  ('v1', '10.0.0.1:6801'))}
    assert nodes.ceph_ports(mons, osds, mgr) == [3300, 6800, 6802, 6803,
                                                 16789]


def test_ceph_ports_without_a_manager():
    assert nodes.ceph_ports({'mons': []}, {'osds': []}, {}) == []


def test_relays():
    assert nodes.unix_relay('/r/amqp.sock', 16672) == [
        'socat', 'UNIX-LISTEN:/r/amqp.sock,fork,unlink-early,mode=600',
        'TCP:127.0.0.1:16672']
    assert nodes.tcp_relay('127.0.0.1', 16672, '/r/amqp.sock') == [
        'socat', 'TCP-LISTEN:16672,bind=127.0.0.1,fork,reuseaddr',
        'UNIX-CONNECT:/r/amqp.sock']
    assert nodes.tcp_relay('127.0.0.1', 6802, '10.214.0.1')[-1] == \
        'TCP:10.214.0.1:6802'


@pytest.fixture
def stack(tmp_path):
    s = stack_mod.Stack(root=str(tmp_path / 'stack'))
    s.state = {'password': 'secret', 'ports': dict(layout.DEFAULT_PORTS)}
    return s


def test_node_nova_conf_is_the_stacks_with_the_nodes_host(stack):
    base = nova.full_conf(stack)
    conf = nodes.node_nova_conf(base, 'node-2', '10.214.0.3', '/n2/nova')
    assert conf['DEFAULT']['host'] == 'node-2'
    assert conf['DEFAULT']['my_ip'] == '10.214.0.3'
    assert conf['DEFAULT']['state_path'] == '/n2/nova'
    assert conf['oslo_concurrency']['lock_path'] == '/n2/nova/locks'
    assert 'database' not in conf and 'api_database' not in conf
    assert conf['DEFAULT']['transport_url'] == stack.transport_url
    # The stack's own compute host is untouched.
    assert base['DEFAULT']['host'] == nova.HOST


def test_node_cinder_conf_has_the_peer_backend_only(stack, tmp_path):
    path = str(tmp_path / 'cinder.conf')
    ini.write(path, {
        'DEFAULT': {'host': 'thunder-stack', 'enabled_backends':
                    'thunder,thunder-peer,rbd', 'state_path': '/s'},
        'database': {'connection': 'mysql://x'},
        'thunder': {'volume_driver': 'x'}, 'rbd': {'volume_driver': 'y'},
        'thunder-peer': {'volume_driver': 'z'}})
    conf = nodes.node_cinder_conf(ini.load(path), 'node-1', '10.214.0.2',
                                  '/n1/cinder')
    assert conf.get('DEFAULT', 'host') == 'node-1'
    assert conf.get('DEFAULT', 'enabled_backends') == 'thunder-peer'
    assert conf.get('database', 'connection') == 'mysql://x'
    assert conf.get('oslo_concurrency', 'lock_path') == '/n1/cinder/locks'
    # The stack's backends are not the node's; devstack's function writes
    # the node's thunder-peer section.
    assert not {'thunder', 'rbd', 'thunder-peer'} & set(conf.sections())


def test_nodes_addresses_and_namespaces(stack):
    n = nodes.Nodes(stack, count=2)
    assert n.gateway[:2] == ('thn-o', '10.214.0.1')
    assert [(x.name, x.netns, x.address) for x in n.nodes] == [
        ('node-1', 'thn-n0', '10.214.0.2'),
        ('node-2', 'thn-n1', '10.214.0.3')]
    assert n.nodes[0].enter(['true'])[:3] == [
        'nsenter', '--net=/run/netns/thn-n0',
        '--mount=%s' % stack.path('nodes', 'ns', 'node-1')]


def test_nodes_remember_their_count(stack):
    stack.state['nodes'] = {'count': 3, 'link_mbit': 100}
    n = nodes.Nodes(stack)
    assert (n.count, n.link_mbit, len(n.nodes)) == (3, 100, 3)


def test_every_relay_service_has_its_own_pid_file(stack):
    n = nodes.Nodes(stack, count=2)
    relays = n.relays([3300, 6802])
    assert set(relays) == {'host', 'gateway', 'node-1', 'node-2'}
    assert len(relays['host']) == len(nodes.CONTROL_PORTS) + len(
        nodes.DATA_PORTS) + 2
    assert len(relays['gateway']) == len(nodes.DATA_PORTS) + 2
    # Glance, an origin of image data, crosses the node's link.
    glance = [s for s in relays['node-1'] if s.name == 'relay-glance'][0]
    assert glance.argv[-1] == 'TCP:10.214.0.1:%d' % stack.ports['glance']
    amqp = [s for s in relays['node-1'] if s.name == 'relay-amqp'][0]
    assert amqp.argv[-1] == 'UNIX-CONNECT:%s' % stack.path(
        'nodes', 'relay', 'amqp.sock')
    pid_files = [s.pid_file for group in relays.values() for s in group]
    assert len(pid_files) == len(set(pid_files))
    ceph = [s for s in relays['node-2'] if s.name == 'relay-ceph-6802'][0]
    assert ceph.argv[-2:] == [
        'TCP-LISTEN:6802,bind=127.0.0.1,fork,reuseaddr', 'TCP:10.214.0.1:6802']


def test_copy_dirs_keeps_modes_skips_domains_and_host_definitions(tmp_path):
    src = tmp_path / 'etc'
    (src / 'qemu' / 'networks').mkdir(parents=True)
    (src / 'qemu' / 'instance-00000001.xml').write_text('<domain/>')
    (src / 'qemu' / 'networks' / 'default.xml').write_text('<network/>')
    (src / 'qemu.conf').write_text('user = "x"\n')
    (src / 'domain-1-instance-00000001').mkdir()
    os.chmod(src / 'qemu', 0o751)
    dest = tmp_path / 'copy'
    nodes._copy_dirs(str(src), str(dest), files=True)
    assert (dest / 'qemu.conf').read_text() == 'user = "x"\n'
    assert (dest / 'qemu' / 'networks' / 'default.xml').exists()
    assert not (dest / 'qemu' / 'instance-00000001.xml').exists()
    assert not (dest / 'domain-1-instance-00000001').exists()
    assert os.stat(dest / 'qemu').st_mode & 0o777 == 0o751


def test_copy_dirs_depth_zero_is_the_directory_alone(tmp_path):
    (tmp_path / 'run' / 'qemu').mkdir(parents=True)
    nodes._copy_dirs(str(tmp_path / 'run'), str(tmp_path / 'copy'), depth=0)
    assert os.listdir(tmp_path / 'copy') == []


def test_libvirt_uri_names_the_nodes_socket():
    assert nova.libvirt_uri() == 'qemu:///system'
    assert nova.libvirt_uri('/n/libvirt-sock') == \
        'qemu:///system?socket=/n/libvirt-sock'


def test_testbed_subnet():
    bed = netlab.Testbed('x-', 2, subnet='10.99')
    assert [h[1] for h in bed.hosts] == [
        '10.99.0.1', '10.99.0.2', '10.99.0.3']
    assert bed.network == '10.99.0.0/16'


def test_image_counters_of_one_image(stack, monkeypatch):
    page = (b'# HELP thunder_cache_bytes_from_peers_total x\n'
            b'thunder_cache_bytes_from_peers_total{image="a"} 5\n'
            b'thunder_cache_bytes_from_peers_total{image="b"} 7\n'
            b'thunder_cache_bytes_from_origin_total{image="a",k="v"} 3.0\n'
            b'thunder_cache_images 2\n')

    class Client:
        def __init__(self, path, timeout):
            assert path.endswith('node-1/run/thunder-cache/local.sock')

        def _get(self, path):
            assert path == '/metrics'
            return page

        def close(self):
            pass

    from thunder_cache.control import client as control_client
    monkeypatch.setattr(control_client, 'LocalClient', Client)
    node = nodes.Nodes(stack, count=1).nodes[0]
    assert nodes.image_counters(node, 'a') == {'bytes_from_peers': 5.0,
                                               'bytes_from_origin': 3.0}
