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

"""Servers through Nova, booted from thunder volumes (both modes).

Each test boots one tiny server with the real ``openstack`` CLI, from a
volume of the thunder type (shared mode: an RBD clone of the image-volume,
which qemu reads through librbd) or of the thunder-peer type (peer mode: a
layer over the node's thunder-cache, which qemu reads as a loop device),
waits until it is ACTIVE and until the guest's marker is in ``openstack
console log show``, checks the libvirt disk, then deletes the server
(``delete_on_termination``) and checks that nothing is left: no Cinder
volume, no RBD image or snapshot but the image-volume's, no loop device or
layer of a peer-mode volume, no libvirt domain. Bad input (an image larger
than the volume, a deleted image) fails clearly and leaves nothing either,
in both modes.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import time
from xml.etree import ElementTree

import pytest

from tests.e2e import conftest
from thunder_cache.control import client as control_client
from thunder_stack import clients
from thunder_stack import guest as guest_mod
from thunder_stack import layout
from thunder_stack import nova
from thunder_stack import services as svc

FLAVOR = 'tiny'
VOLUME_TYPE = layout.THUNDER_BACKEND
PEER_TYPE = layout.PEER_BACKEND
POOL = layout.POOLS['thunder']
ACTIVE_TIMEOUT = 300
MARKER_TIMEOUT = 300
DELETE_TIMEOUT = 180
BENCHMARKS = os.path.join(layout.CHECKOUT, 'benchmarks')


def guest_image(stack):
    """(path of a bootable raw image, the marker its console prints).

    The one place that knows which guest the tests boot: the guest image
    of :mod:`thunder_stack.guest` (root file system on the disk), built
    once into the stack's data directory.
    """
    image = guest_mod.build(stack.path('data', 'guest'))
    return image.path, image.marker


class Servers:
    """Servers and volumes through the CLIs; the evidence when one fails."""

    def __init__(self, stack, client):
        self.stack = stack
        self.client = client
        self.servers = []
        self.volumes = []

    def openstack(self, *args, check=True, timeout=300):
        return self.client.run('openstack', *args, check=check,
                               timeout=timeout)

    def json(self, *args):
        return json.loads(self.openstack(*(args + ('-f', 'json'))).stdout)

    def create(self, name, *args, check=True):
        """``openstack server create``; the server's id (or the result)."""
        started = time.monotonic()
        result = self.openstack('server', 'create', '--flavor', FLAVOR,
                                '--nic', 'none', '-f', 'json', *args, name,
                                check=check)
        if result.returncode:
            return result
        server = json.loads(result.stdout)
        self.servers.append(server['id'])
        return server['id'], started

    def show(self, server_id):
        result = self.openstack('server', 'show', '-f', 'json', server_id,
                                check=False)
        if result.returncode:
            if 'No Server found' in result.stderr:
                return None
            raise AssertionError('openstack server show %s failed: %s'
                                 % (server_id, result.stderr[-2000:]))
        return json.loads(result.stdout)

    def console(self, server_id, check=True):
        result = self.openstack('console', 'log', 'show', server_id,
                                check=check)
        return result.stdout + result.stderr

    def evidence(self, server_id):
        """What to read when a server did not do what it should."""
        server = self.show(server_id) or {}
        log = os.path.join(self.stack.root, 'log', 'nova-compute.log')
        return ('server %s: status %s, fault %s\n--- console log:\n%s\n'
                '--- %s (tail):\n%s' % (
                    server_id, server.get('status'), server.get('fault'),
                    self.console(server_id, check=False)[-3000:], log,
                    svc.tail(log, 40)))

    def wait_status(self, server_id, status, timeout=ACTIVE_TIMEOUT):
        deadline = time.monotonic() + timeout
        server = None
        while time.monotonic() < deadline:
            server = self.show(server_id)
            if server and server['status'] == status:
                return server
            if server and server['status'] == 'ERROR' and status != 'ERROR':
                break
            time.sleep(1)
        raise AssertionError('server %s is not %s (waited up to %ss)\n%s' % (
            server_id, status, timeout, self.evidence(server_id)))

    def wait_marker(self, server_id, marker, timeout=MARKER_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            console = self.console(server_id)
            if marker in console:
                return
            if guest_mod.failure_seen(console):
                break
            time.sleep(1)
        raise AssertionError('no %r on the console of server %s after %ss\n'
                             '%s' % (marker, server_id, timeout,
                                     self.evidence(server_id)))

    def delete(self, server_id, timeout=DELETE_TIMEOUT):
        self.openstack('server', 'delete', server_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.show(server_id) is None:
                self.servers.remove(server_id)
                return
            time.sleep(1)
        raise AssertionError('server %s still exists %ss after its delete\n'
                             '%s' % (server_id, timeout,
                                     self.evidence(server_id)))

    def cleanup(self):
        for server_id in list(self.servers):
            self.openstack('server', 'delete', '--wait', server_id,
                           check=False)
        for volume_id in self.volumes:
            self.openstack('volume', 'delete', '--force', volume_id,
                           check=False)


@pytest.fixture(scope='module')
def guest(stack, thunder_store):
    """The guest image in the thunder store: (image id, marker)."""
    path, marker = guest_image(stack)
    api = clients.Api(stack)
    client = conftest.Client(stack, api)
    image_id = client.upload(path, thunder_store, name='e2e-nova-guest')
    yield image_id, marker
    client.cleanup()


@pytest.fixture
def servers(stack, client):
    s = Servers(stack, client)
    yield s
    s.cleanup()


def _listdir(path):
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def resources(stack, client):
    """What a server may leave behind, keyed by kind."""
    images = set(conftest.rbd(stack, 'ls', POOL).split())
    snapshots = {name: {s['name'] for s in conftest.rbd_json(
        stack, 'snap', 'ls', '%s/%s' % (POOL, name))} for name in images}
    peer = stack.thunder_cache_paths
    return {'volumes': set(client.all_volumes()),
            'rbd': images,
            'trash': conftest.rbd(stack, 'trash', 'ls', POOL).split(),
            'snapshots': snapshots,
            # Peer mode: volume files, their layers, loop devices on them.
            'volume files': _listdir(peer['mount']),
            'layers': _listdir(peer['layers']),
            'loop devices': set(conftest.loop_devices(under=peer['mount'])),
            'domains': set(nova.domains())}


def assert_nothing_left(before, after, parent_image=None):
    """``after`` has nothing ``before`` had not; the parent may gain a snap.

    The image-volume's one sealed snapshot (made by the first clone of the
    image) is the only thing a server's volume may leave.
    """
    assert after['volumes'] == before['volumes'], \
        'Cinder volumes left: %s' % (after['volumes'] - before['volumes'])
    assert after['rbd'] == before['rbd'], \
        'RBD images left in %s: %s' % (POOL, after['rbd'] - before['rbd'])
    # Cinder's deferred deletions may drain the trash meanwhile; a server
    # must only not add to it.
    trashed = set(after['trash']) - set(before['trash'])
    assert not trashed, 'RBD images left in the trash: %s' % trashed
    for name, snaps in after['snapshots'].items():
        if name != parent_image:
            assert snaps == before['snapshots'].get(name, set()), \
                'snapshots left on %s/%s: %s' % (POOL, name, snaps)
    for kind in ('volume files', 'layers', 'loop devices', 'domains'):
        assert after[kind] == before[kind], \
            '%s left: %s' % (kind, after[kind] - before[kind])


def domain_disk(instance_name, accept):
    """The first ``<disk>`` of the domain for which ``accept(disk)``."""
    xml = subprocess.run(['virsh', '--connect', nova.LIBVIRT_URI, 'dumpxml',
                          instance_name], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    for disk in ElementTree.fromstring(xml).iter('disk'):
        if accept(disk):
            return disk
    raise AssertionError('no such disk in the domain %s:\n%s'
                         % (instance_name, xml))


def rbd_disk(instance_name):
    """(source name, [(host, port)]) of the domain's rbd disk."""
    source = domain_disk(instance_name, lambda d: d.find(
        'source') is not None and d.find('source').get('protocol') ==
        'rbd').find('source')
    return source.get('name'), [
        (h.get('name'), int(h.get('port'))) for h in source.findall('host')]


def check_shared_disk(stack, server, volume):
    """An RBD clone that qemu reads; returns its parent image's name."""
    volume_id = volume['id']
    # A copy-on-write clone of the image-volume's snapshot...
    parent = clients.parent_of(stack, POOL, 'volume-%s' % volume_id)
    assert parent and parent.startswith(POOL + '/volume-'), parent
    # ... that qemu reads from the local Ceph's monitor (its own port).
    source, hosts = rbd_disk(server['OS-EXT-SRV-ATTR:instance_name'])
    assert source == '%s/volume-%s' % (POOL, volume_id)
    assert hosts == [('127.0.0.1', stack.ports['ceph'])]
    return parent.split('/', 1)[1].split('@')[0]


def check_peer_disk(stack, server, volume):
    """A loop device over the volume's file in the thunder-cache mount."""
    name = 'volume-%s' % volume['id']
    daemon = control_client.ControlClient(stack.thunder_cache_paths['control'])
    info = daemon.call('volume_info', volume_id=name)
    # A layer over the node's cache of the image (nothing copied).
    assert info['image_id'] == volume['volume_image_metadata']['image_id'], \
        info
    disk = domain_disk(server['OS-EXT-SRV-ATTR:instance_name'],
                       lambda d: d.get('device') == 'disk')
    assert disk.get('type') == 'block', ElementTree.tostring(disk)
    # The connection says discard: a guest's TRIM reaches the loop device
    # (and frees the layer's blocks).
    assert disk.find('driver').get('discard') == 'unmap', \
        ElementTree.tostring(disk)
    device = disk.find('source').get('dev')
    assert re.match(r'^/dev/loop[0-9]+$', device), device
    path = os.path.join(stack.thunder_cache_paths['mount'], name)
    assert conftest.loop_devices(path=path) == [device]
    # Served by the native volume server, the default.
    conftest.assert_native(stack.thunder_cache_paths,
                           stack.service('thunder-cache').pid())
    return None


CHECK_DISK = {VOLUME_TYPE: check_shared_disk, PEER_TYPE: check_peer_disk}


def boot_and_delete(stack, client, servers, marker, name, *args,
                    before=None, volume_type=VOLUME_TYPE):
    """Boot, see the marker, check the disk, delete; nothing left.

    ``before``: the resources to compare with at the end (default: now).
    Prints (``pytest -s``) and returns the seconds from the request to
    ACTIVE and to the marker.
    """
    before = before or resources(stack, client)
    server_id, started = servers.create(name, *args)
    server = servers.wait_status(server_id, 'ACTIVE')
    active = time.monotonic() - started
    servers.wait_marker(server_id, marker)
    ready = time.monotonic() - started
    print('\n%s (%s): ACTIVE after %.1f s, marker after %.1f s'
          % (name, volume_type, active, ready))

    attached = server['volumes_attached']
    assert len(attached) == 1, attached
    volume_id = attached[0]['id']
    assert attached[0]['delete_on_termination'] is True
    volume = servers.json('volume', 'show', volume_id)
    assert volume['type'] == volume_type
    parent_image = CHECK_DISK[volume_type](stack, server, volume)

    servers.delete(server_id)
    client.wait_volumes_gone({volume_id}, DELETE_TIMEOUT)
    assert_nothing_left(before, resources(stack, client), parent_image)
    return active, ready


def image_mapping(image_id, volume_type):
    """``--block-device``: the image to a new 1 GB volume of the type."""
    return ('--block-device',
            'source_type=image,uuid=%s,destination_type=volume,'
            'volume_size=1,volume_type=%s,boot_index=0,'
            'delete_on_termination=true' % (image_id, volume_type))


BOTH_TYPES = pytest.mark.parametrize('volume_type', (VOLUME_TYPE,
                                                     PEER_TYPE))


def test_boot_from_volume_of_the_default_type(stack, client, servers, guest):
    """``--image --boot-from-volume``: Cinder's default type, thunder."""
    image_id, marker = guest
    boot_and_delete(stack, client, servers, marker, 'e2e-bfv',
                    '--image', image_id, '--boot-from-volume', '1',
                    '--delete-on-termination')


@BOTH_TYPES
def test_boot_from_image_mapping_with_the_type(stack, client, servers, guest,
                                               volume_type):
    """``--block-device`` image to volume, ``volume_type=`` each mode's.

    Peer mode: Cinder's connection is ``local``, a loop device over the
    volume's file, which Nova's libvirt driver gives qemu as a block disk.
    """
    image_id, marker = guest
    boot_and_delete(stack, client, servers, marker, 'e2e-bdm',
                    *image_mapping(image_id, volume_type),
                    volume_type=volume_type)


@BOTH_TYPES
def test_boot_from_existing_volume(stack, client, servers, guest,
                                   volume_type):
    """A volume made from the image first, then mapped as the boot disk."""
    image_id, marker = guest
    before = resources(stack, client)
    volume_id = client.create_volume(image_id, volume_type)
    client.wait_volume(volume_id)
    boot_and_delete(stack, client, servers, marker, 'e2e-volume',
                    '--block-device',
                    'source_type=volume,uuid=%s,destination_type=volume,'
                    'boot_index=0,delete_on_termination=true' % volume_id,
                    before=before, volume_type=volume_type)
    client.volumes.remove(volume_id)


@pytest.fixture(scope='module')
def big_image(stack, thunder_store, tmp_path_factory):
    """An image of 1 GiB + 1 MiB (more than a 1 GB volume) in the store."""
    big = tmp_path_factory.mktemp('big') / 'big.raw'
    with open(big, 'wb') as f:
        f.truncate((1 << 30) + (1 << 20))
    client = conftest.Client(stack, clients.Api(stack))
    image_id = client.upload(str(big), thunder_store, name='e2e-too-big')
    big.unlink()
    yield image_id
    client.cleanup()


@BOTH_TYPES
def test_image_larger_than_the_volume(stack, client, servers, big_image,
                                      volume_type):
    """The build fails with Cinder's reason; nothing is left."""
    before = resources(stack, client)
    server_id, _ = servers.create('e2e-too-big',
                                  *image_mapping(big_image, volume_type))
    server = servers.wait_status(server_id, 'ERROR')
    # Cinder refuses the volume; Nova aborts the build with its reason.
    fault = server['fault']['message']
    assert 'Size of specified image 2GB is larger than volume size 1GB' \
        in fault, fault
    servers.delete(server_id)
    assert_nothing_left(before, resources(stack, client))


@BOTH_TYPES
def test_deleted_image(stack, client, servers, volume_type):
    """Nova's API refuses at once: no server, no volume."""
    image_id = client.api.create_image('e2e-deleted')
    client.run('glance', 'image-delete', image_id)
    before = resources(stack, client)
    # A mapping, not --image: the CLI would look the image up itself.
    result = servers.create('e2e-deleted',
                            *image_mapping(image_id, volume_type),
                            check=False)
    assert result.returncode != 0
    assert ('400' in result.stderr and 'Block Device Mapping is Invalid: '
            'failed to get image %s' % image_id in result.stderr), \
        result.stderr
    listed = servers.json('server', 'list', '--name', 'e2e-deleted')
    assert listed == []
    assert_nothing_left(before, resources(stack, client))


def test_nova_boot_benchmark_short_run(stack, client, thunder_store,
                                       tmp_path):
    """``benchmarks/nova_boot.py --counts 1 --rounds 1``, as the demo runs it.

    Each flow boots one server as a copy-on-write clone that copied
    nothing; the results are written; the benchmark leaves no server,
    volume, image, Nova disk or libvirt domain behind.
    """
    sys.path.insert(0, BENCHMARKS)
    nova_boot = importlib.import_module('nova_boot')
    ephemeral_pool = layout.POOLS['nova']

    def left():
        return {'volumes': set(client.all_volumes()),
                'images': {i['ID'] for i in json.loads(client.run(
                    'openstack', 'image', 'list', '-f', 'json').stdout)},
                'disks': set(conftest.rbd(stack, 'ls',
                                          ephemeral_pool).split()),
                'domains': set(nova.domains())}

    before = left()
    out = tmp_path / 'results'
    result = subprocess.run(
        [stack.python, os.path.join(BENCHMARKS, 'nova_boot.py'), '--counts',
         '1', '--rounds', '1', '--out', str(out)], capture_output=True,
        text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout[-3000:] +
                                    result.stderr[-3000:])
    runs = nova_boot.read_runs(str(out / 'runs.csv'))
    assert sorted(r['flow'] for r in runs) == sorted(nova_boot.FLOWS)
    for run in runs:
        assert (run['ok'], run['clones'], run['copied_bytes'],
                run['error']) == (1, 1, 0, ''), run
        assert 0 < run['active_mean'] <= run['marker_mean'], run
    with open(out / 'results.txt') as f:
        text = f.read()
    assert 'N  flow' in text and 'ephemeral' in text
    assert left() == before
