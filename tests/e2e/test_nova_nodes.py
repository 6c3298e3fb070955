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

"""Peer mode through Nova on two emulated compute nodes.

``tools/thunder-stack nodes up --count 2`` adds ``node-1`` and ``node-2``
(each its own network and mount namespace, libvirtd, nova-compute,
cinder-volume with the thunder-peer backend and thunder-cache, in a zone
of its own; see thunder_stack/nodes.py). One server boots on each, through
the Nova API, from a thunder-peer volume of the same image made for it in
its node's zone. The second node's thunder-cache finds the first through
the image-volume's advertisement and fetches the boot's chunks from it
(verified against the manifest as always): the origin serves about one
boot's working set for both. Then the servers are deleted, ``nodes down``
removes the nodes, and nothing is left.
"""

import json
import os
import subprocess
import urllib.request

import pytest

from tests.e2e import conftest
from tests.e2e.test_nova import guest  # noqa: F401 (a fixture)
from tests.e2e.test_nova import Servers
from thunder_common import loops
from thunder_stack import clients
from thunder_stack import layout
from thunder_stack import netlab
from thunder_stack import nodes as nodes_mod
from thunder_stack import nova

COUNT = 2
LINK_MBIT = 200
#: Origin bytes of the two boots, as a multiple of the first one's.
ORIGIN_FACTOR = 1.2


def _tool(*args, timeout=900):
    result = subprocess.run([conftest.TOOL] + list(args), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, '%s failed:\n%s%s' % (
        ' '.join(args), result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


@pytest.fixture(scope='module')
def nodes(stack):
    _tool('nodes', 'up', '--count', str(COUNT), '--link-mbit',
          str(LINK_MBIT))
    stack.state = stack.load_state()
    n = nodes_mod.Nodes(stack)
    yield n
    if stack.state.get('nodes'):
        _tool('nodes', 'down')
        stack.state = stack.load_state()


@pytest.fixture
def servers(stack, client):
    s = Servers(stack, client)
    yield s
    s.cleanup()


def _placement(stack, path):
    token = clients.Api(stack).token
    request = urllib.request.Request(stack.url('placement') + path, headers={
        'X-Auth-Token': token, 'OpenStack-API-Version': 'placement 1.0'})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def boot_on(servers, node, image_id, marker):
    """A server in ``node``'s zone from a new thunder-peer volume."""
    server_id, _ = servers.create(
        'e2e-%s' % node.name, '--availability-zone', node.name,
        '--block-device',
        'source_type=image,uuid=%s,destination_type=volume,volume_size=1,'
        'volume_type=%s,boot_index=0,delete_on_termination=true'
        % (image_id, layout.PEER_BACKEND))
    server = servers.wait_status(server_id, 'ACTIVE')
    servers.wait_marker(server_id, marker)
    assert server['OS-EXT-SRV-ATTR:host'] == node.name
    volume = servers.json('volume', 'show',
                          server['volumes_attached'][0]['id'])
    assert volume['os-vol-host-attr:host'].startswith(
        '%s@%s' % (node.name, layout.PEER_BACKEND)), volume
    assert volume['availability_zone'] == node.name
    # The node's volume files: its own native volume server.
    conftest.assert_native(node.cache_paths,
                           node.service('thunder-cache').pid())
    return server_id, server['OS-EXT-SRV-ATTR:instance_name']


def test_one_server_per_node_second_from_the_first(stack, client, nodes,
                                                   servers, guest):  # noqa
    image_id, marker = guest
    first, second = nodes.nodes[:2]
    volumes_before = set(client.all_volumes())

    id_1, domain_1 = boot_on(servers, first, image_id, marker)
    assert domain_1 in nova.domains(first.libvirt_socket)
    assert domain_1 not in nova.domains()      # not the stack's libvirt
    one = nodes_mod.image_counters(first, image_id)
    assert one['bytes_from_origin'] > 0, one
    id_2, domain_2 = boot_on(servers, second, image_id, marker)
    assert domain_2 in nova.domains(second.libvirt_socket)
    two = nodes_mod.image_counters(second, image_id)
    one = nodes_mod.image_counters(first, image_id)
    print('node-1: %s\nnode-2: %s' % (one, two))
    # node-2 found node-1 through the advertisement: its chunks came from
    # there, verified; the origin served about one boot's working set.
    assert two['bytes_from_peers'] > 0, two
    assert one['bytes_served_to_peers'] >= two['bytes_from_peers'], one
    assert two.get('chunks_rejected', 0) == 0, two
    origin = one['bytes_from_origin'] + two.get('bytes_from_origin', 0)
    assert origin <= ORIGIN_FACTOR * one['bytes_from_origin'] + (1 << 20), \
        (one, two)

    for server_id in (id_1, id_2):
        servers.delete(server_id)
    client.wait_volumes_gone(set(client.all_volumes()) - volumes_before, 180)
    assert set(client.all_volumes()) == volumes_before
    for node in (first, second):
        assert nova.domains(node.libvirt_socket) == []
        out = subprocess.run(list(loops.LIST_COMMAND), capture_output=True,
                             text=True).stdout
        assert loops.backed_by(out, under=node.cache_paths['mount']) == []


def test_server_follows_its_volume_to_its_node(stack, client, nodes,
                                               servers, guest):  # noqa
    """A server from an existing peer-mode volume, no zone asked for.

    With ``[cinder] cross_az_attach = False`` on the API, Nova schedules
    the server into the zone of its volume: the volume's node.
    """
    image_id, marker = guest
    node = nodes.nodes[-1]
    volume_id = client.create_volume(image_id, layout.PEER_BACKEND,
                                     zone=node.name)
    volume = client.wait_volume(volume_id)
    assert volume['os-vol-host-attr:host'].startswith(node.name + '@')
    server_id, _ = servers.create(
        'e2e-follows', '--block-device',
        'source_type=volume,uuid=%s,destination_type=volume,boot_index=0,'
        'delete_on_termination=true' % volume_id)
    server = servers.wait_status(server_id, 'ACTIVE')
    servers.wait_marker(server_id, marker)
    assert server['OS-EXT-SRV-ATTR:host'] == node.name
    assert server['OS-EXT-AZ:availability_zone'] == node.name
    servers.delete(server_id)
    assert client.wait_volumes_gone({volume_id}, 180) == set()
    client.volumes.remove(volume_id)


def test_nodes_down_leaves_nothing(stack, client, nodes):
    pids = [s.pid() for n in nodes.nodes for s in n.services()]
    assert all(pids), 'a node process is not running: %s' % pids
    relays = [s.pid() for group in nodes.relays(
        stack.state['nodes']['ceph_ports']).values() for s in group]
    assert all(relays), 'a relay is not running: %s' % relays
    pids += relays
    # The native volume servers outlive their daemons: down stops them.
    for n in nodes.nodes:
        pids += conftest.native_pids(n.cache_paths)
    _tool('nodes', 'down')
    stack.state = stack.load_state()
    assert 'nodes' not in stack.state
    assert netlab.leftover_namespaces(nodes_mod.PREFIX) == []
    for pid in pids:
        assert not os.path.exists('/proc/%d' % pid) or \
            open('/proc/%d/stat' % pid).read().split()[2] == 'Z', pid
    with open('/proc/self/mounts') as f:
        mounts = f.read()
    assert stack.path('nodes') not in mounts
    hosts = {n.name for n in nodes.nodes}
    listed = client.run('openstack', 'compute', 'service', 'list', '-f',
                        'value', '-c', 'Host').stdout.split()
    assert not hosts & set(listed), listed
    providers = {p['name'] for p in _placement(stack, '/resource_providers')[
        'resource_providers']}
    # The stack's own provider (named after the machine) stays.
    assert providers and not hosts & providers, providers
    aggregates = client.run('openstack', 'aggregate', 'list', '-f',
                            'value', '-c', 'Name').stdout.split()
    assert not hosts & set(aggregates), aggregates
    assert not [s for s in stack.volume_services()
                if s['host'].split('@')[0] in hosts]
    # The stack's own compute host is still there and up.
    assert nova.HOST in listed
