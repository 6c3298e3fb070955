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

"""Peer mode on the local stack: real Cinder, Glance, thunder-cache, Ceph.

Volumes of the ``thunder-peer`` type live on the node as layers over
thunder-cache's cache of the image; they are attached the way Nova
attaches them: Cinder's attachment API gives the connection info, and
os-brick's ``local`` connector turns it into the device to read.
"""

import hashlib
import mmap
import os
import re
import time
import urllib.request

from cinderclient import client as cinder_client
from cinderclient import exceptions as cinder_exceptions
from keystoneauth1 import loading
from keystoneauth1 import session as ks_session
from os_brick.initiator import connector as brick_connector
import pytest

from tests.e2e import conftest
from tests.functional.cinder_thunder_driver import peer_helpers
from tests.harness import standalone
from thunder_cache.boot import trace
from thunder_cache.control import client as control_client
from thunder_cache.peer.advertise import records as peer_records
from thunder_common import manifest
from thunder_stack import clients

PEER_TYPE = 'thunder-peer'
MiB = 1024 * 1024


@pytest.fixture(scope='module')
def cinder(stack):
    loader = loading.get_plugin_loader('password')
    auth = loader.load_from_options(
        auth_url=stack.auth_url, username='admin', password=stack.password,
        project_name='admin', user_domain_id='default',
        project_domain_id='default')
    return cinder_client.Client('3.54', session=ks_session.Session(auth=auth),
                                endpoint_override='%s/v3' % stack.url(
                                    'cinder'))


@pytest.fixture(scope='module', autouse=True)
def privsep_helper():
    """os-brick's helper from this virtualenv (the tests run as root)."""
    standalone.use_local_privsep_helper()


@pytest.fixture(scope='module')
def daemon(stack):
    return control_client.ControlClient(stack.thunder_cache_paths['control'])


def _metrics(stack):
    url = 'http://127.0.0.1:%d/metrics' % stack.ports['thunder_cache']
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _image_counter(stack, name, image_id):
    pattern = re.compile(r'^thunder_cache_%s\{[^}]*image="%s"[^}]*\} '
                         r'([0-9.e+]+)$' % (name, image_id), re.M)
    match = pattern.search(_metrics(stack))
    return float(match.group(1)) if match else None


def _read_device(path, image_size):
    """sha256 of the first image_size bytes, and whether the rest is 0.

    Read with O_DIRECT: from the volume server, not the page cache.
    """
    digest = hashlib.sha256()
    tail_zero = True
    buf = mmap.mmap(-1, 4 * MiB)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        offset = 0
        while True:
            block = buf[:os.preadv(fd, [buf], offset)]
            if not block:
                break
            head = block[:max(0, image_size - offset)]
            digest.update(head)
            if block[len(head):].strip(b'\0'):
                tail_zero = False
            offset += len(block)
    finally:
        os.close(fd)
        buf.close()
    return digest.hexdigest(), tail_zero, offset


class Attached:
    """A volume attached on this host as Nova would: attachment + os-brick."""

    def __init__(self, cinder, volume_id):
        self.cinder = cinder
        self.volume_id = volume_id
        self.brick = brick_connector.InitiatorConnector.factory(
            'LOCAL', root_helper=None)
        props = _connector('thunder-stack')
        attachment = cinder.attachments.create(volume_id, props, mode='rw')
        # cinderclient gives a dict here.
        self.attachment_id = attachment['id']
        info = attachment['connection_info']
        assert info['driver_volume_type'] == 'local', info
        self.device = self.brick.connect_volume(info)['path']
        self.connection = info
        cinder.attachments.complete(self.attachment_id)

    def detach(self):
        self.brick.disconnect_volume(self.connection, None)
        self.cinder.attachments.delete(self.attachment_id)


def _connector(host):
    """os-brick's connector properties of this machine, as ``host``."""
    return brick_connector.get_connector_properties(
        None, '127.0.0.1', False, False, host=host)


def _wait_status(cinder, volume_id, status='available', timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vol = cinder.volumes.get(volume_id)
        if vol.status == status:
            return vol
        assert vol.status not in ('error', 'error_extending'), vol.status
        time.sleep(0.5)
    raise AssertionError('volume %s is %s, not %s' % (volume_id, vol.status,
                                                      status))


def test_peer_volume_from_image_reads_the_image(stack, client, cinder,
                                                daemon, thunder_store,
                                                image_file):
    """O(1) create, attach through os-brick, every byte is the image's."""
    path, digest = image_file
    size = os.path.getsize(path)
    image_id = client.upload(str(path), thunder_store, name='e2e-peer')
    vid = client.create_volume(image_id, PEER_TYPE)
    client.wait_volume(vid)
    name = 'volume-%s' % vid
    info = daemon.call('volume_info', volume_id=name)
    assert info['image_id'] == image_id
    assert info['size'] == 1024 * MiB
    # No image bytes were copied to make the volume.
    assert info['written_bytes'] == 0
    assert not _image_counter(stack, 'bytes_from_origin_total', image_id)

    attached = Attached(cinder, vid)
    try:
        assert re.match(r'^/dev/loop[0-9]+$', attached.device)
        # Served by the native volume server (the default), not the daemon.
        conftest.assert_native(stack.thunder_cache_paths,
                               stack.service('thunder-cache').pid())
        sha, tail_zero, total = _read_device(attached.device, size)
        assert sha == digest
        assert tail_zero
        assert total == 1024 * MiB
        # The guest's writes go to the volume's layer only.
        peer_helpers.write_device(attached.device, 8 * MiB, b'\xa5' * 4096)
        assert daemon.call('volume_info',
                           volume_id=name)['written_bytes'] == 4096
    finally:
        attached.detach()
    mount = stack.thunder_cache_paths['mount']
    assert conftest.loop_devices(path=os.path.join(mount, name)) == []
    # Bytes came from the origin (the image-volume in Ceph), verified.
    fetched = _image_counter(stack, 'bytes_from_origin_total', image_id)
    assert fetched >= size - MiB
    assert not _image_counter(stack, 'chunks_rejected_total', image_id)

    # A second volume of the image does not see the first one's write.
    other = client.create_volume(image_id, PEER_TYPE)
    client.wait_volume(other)
    attached = Attached(cinder, other)
    try:
        sha, _, _ = _read_device(attached.device, size)
        assert sha == digest
    finally:
        attached.detach()

    # The node advertises itself on the image-volume, with expiry.
    image_volume = clients.image_volume_id(stack, image_id)
    metadata = cinder.volumes.get(image_volume).metadata
    assert 'thunder_peer_thunder-stack' in metadata, metadata
    url, since, expires = peer_records.parse_peer_value(
        metadata['thunder_peer_thunder-stack'])
    assert url == 'http://127.0.0.1:%d' % stack.ports['thunder_cache']
    assert since <= time.time() < expires

    # The first boot's trace (here: the whole read) is attached to the
    # image-volume once the recording window (10 s here) is over.
    deadline = time.monotonic() + 60
    text = None
    while text is None:
        assert time.monotonic() < deadline, 'no boot trace published'
        time.sleep(2)
        text = trace.from_metadata(cinder.volumes.get(image_volume).metadata)
    chunk = manifest.DEFAULT_CHUNK_SIZE  # the store's, unset on the stack
    chunks = (size + chunk - 1) // chunk
    indexes = trace.decode(text, chunks)
    # Every chunk of the image, each once, in about the order read (the
    # loop device has several requests in flight, so neighbours may swap).
    assert sorted(indexes) == list(range(chunks))
    assert max(indexes[:8]) * chunk < 16 * MiB, indexes


def test_peer_snapshot_clone_extend_upload(stack, client, cinder, daemon,
                                           thunder_store, image_file,
                                           tmp_path):
    path, digest = image_file
    size = os.path.getsize(path)
    image_id = client.upload(str(path), thunder_store, name='e2e-peer-ops')
    vid = client.create_volume(image_id, PEER_TYPE)
    client.wait_volume(vid)

    attached = Attached(cinder, vid)
    try:
        fd = os.open(attached.device, os.O_WRONLY)
        try:
            os.pwrite(fd, b'snapshot-me'.ljust(4096, b'.'), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        attached.detach()

    snap = cinder.volume_snapshots.create(vid, name='e2e-peer-snap')
    deadline = time.monotonic() + 120
    while cinder.volume_snapshots.get(snap.id).status != 'available':
        assert time.monotonic() < deadline
        time.sleep(0.5)
    from_snap = cinder.volumes.create(2, snapshot_id=snap.id,
                                      volume_type=PEER_TYPE)
    client.volumes.append(from_snap.id)
    clone = cinder.volumes.create(1, source_volid=vid, volume_type=PEER_TYPE)
    client.volumes.append(clone.id)
    _wait_status(cinder, from_snap.id)
    _wait_status(cinder, clone.id)

    for volume_id in (from_snap.id, clone.id):
        attached = Attached(cinder, volume_id)
        try:
            with open(attached.device, 'rb') as f:
                head = f.read(4096)
                rest = f.read(size - 4096)
            assert head.startswith(b'snapshot-me')
            with open(path, 'rb') as f:
                f.seek(4096)
                assert rest == f.read(size - 4096)
        finally:
            attached.detach()
    assert daemon.call('volume_info', volume_id='volume-%s' % from_snap.id)[
        'size'] == 2048 * MiB

    # Extend, then the device shows the new size.
    cinder.volumes.extend(vid, 2)
    _wait_status(cinder, vid)
    attached = Attached(cinder, vid)
    try:
        fd = os.open(attached.device, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == 2048 * MiB
        finally:
            os.close(fd)
    finally:
        attached.detach()

    # Upload the volume to Glance: its bytes are the volume's.
    out = client.run('cinder', 'upload-to-image', '--disk-format', 'raw',
                     '--container-format', 'bare', vid,
                     'e2e-peer-upload').stdout
    uploaded = clients.table_value(out, 'image_id')
    client.images.append(uploaded)
    deadline = time.monotonic() + 600
    while client.image(uploaded)['status'] != 'active':
        assert time.monotonic() < deadline
        time.sleep(1)
    _wait_status(cinder, vid)
    target = tmp_path / 'uploaded.raw'
    client.run('glance', 'image-download', '--file', str(target), uploaded)
    with open(target, 'rb') as f:
        assert f.read(4096).startswith(b'snapshot-me')
        with open(path, 'rb') as g:
            g.seek(4096)
            assert f.read(size - 4096) == g.read(size - 4096)
        assert os.path.getsize(target) == 2048 * MiB

    cinder.volume_snapshots.delete(snap.id)
    deadline = time.monotonic() + 120
    while any(s.id == snap.id for s in cinder.volume_snapshots.list()):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    with pytest.raises(control_client.ControlError) as e:
        daemon.call('volume_info', volume_id='snapshot-%s' % snap.id)
    assert e.value.kind == 'VolumeNotFound'


def test_peer_volume_served_while_the_daemon_restarts(
        stack, client, cinder, daemon, thunder_store, image_file):
    """An attached volume lives through thunder-cache's stop and start.

    The native server keeps serving it while the daemon is down (as in an
    upgrade): no I/O error, the same bytes, writes kept.
    """
    path, digest = image_file
    size = os.path.getsize(path)
    image_id = client.upload(str(path), thunder_store, name='e2e-restart')
    vid = client.create_volume(image_id, PEER_TYPE)
    client.wait_volume(vid)
    service = stack.service('thunder-cache')
    attached = Attached(cinder, vid)
    try:
        server = conftest.assert_native(stack.thunder_cache_paths,
                                        service.pid())
        assert _read_device(attached.device, size)[0] == digest
        old = service.pid()
        service.stop()
        try:
            # The daemon is down: reads and writes go on.
            assert _read_device(attached.device, size)[0] == digest
            peer_helpers.write_device(attached.device, 4 * MiB,
                                      b'\x5a' * 4096)
        finally:
            stack.start('thunder-cache', timeout=60)
        assert service.pid() != old
        # The same server, re-verifying through the new daemon.
        assert conftest.assert_native(stack.thunder_cache_paths,
                                      service.pid()) == server
        with open(path, 'rb') as f:
            expected = bytearray(f.read())
        expected[4 * MiB:4 * MiB + 4096] = b'\x5a' * 4096
        sha, tail_zero, _ = _read_device(attached.device, size)
        assert sha == hashlib.sha256(expected).hexdigest()
        assert tail_zero
        assert daemon.call('volume_info', volume_id='volume-%s' % vid)[
            'written_bytes'] == 4096
    finally:
        attached.detach()
    # Deleted: its file and layer are gone from the server and the node.
    client.run('cinder', 'delete', vid)
    assert client.wait_volumes_gone({vid}, 120) == set()
    client.volumes.remove(vid)
    name = 'volume-%s' % vid
    for kind in ('mount', 'layers'):
        assert name not in os.listdir(stack.thunder_cache_paths[kind])


def test_peer_volume_refuses_another_node(stack, client, cinder,
                                          thunder_store, image_file):
    """Attaching on a node that does not hold the volume: a clear error.

    As Nova attaches (an attachment reserved first, then updated with the
    compute node's connector, deleted when that fails), with a connector
    that names another host. The driver refuses before it makes a loop
    device; Cinder's API answers 500 with the driver's reason.
    """
    path, _digest = image_file
    image_id = client.upload(str(path), thunder_store,
                             name='e2e-peer-elsewhere')
    vid = client.create_volume(image_id, PEER_TYPE)
    client.wait_volume(vid)
    attachment = cinder.attachments.create(vid, None, mode='rw')
    try:
        with pytest.raises(cinder_exceptions.ClientException) as e:
            cinder.attachments.update(attachment['id'],
                                      _connector('other-node'))
    finally:
        cinder.attachments.delete(attachment['id'])
    assert e.value.code == 500
    assert ('Volume %s lives on thunder-stack and can only be attached '
            'there, not on other-node' % vid) in e.value.message, \
        e.value.message
    assert cinder.attachments.list(search_opts={'volume_id': vid}) == []
    assert _wait_status(cinder, vid).attachments == []
    mount = stack.thunder_cache_paths['mount']
    assert conftest.loop_devices(
        path=os.path.join(mount, 'volume-%s' % vid)) == []
