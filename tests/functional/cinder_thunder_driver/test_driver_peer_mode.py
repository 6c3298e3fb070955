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

"""PeerDriver over a real thunder-cache and a real Ceph.

The driver runs in this process with Cinder's privsep helper (loop devices
are real); the daemon is a ``thunder-cache`` process with its volume files
mounted; the image-volume is an RBD image on the test cluster, named in
Glance-style location metadata as the thunder store records it.
"""

import hashlib
import os
import subprocess
import uuid

from cinder import exception
import pytest

from tests.functional.cinder_thunder_driver import peer_helpers
from tests.functional.cinder_thunder_driver.peer_helpers import CONNECTOR
from tests.functional.cinder_thunder_driver.peer_helpers import detach_all
from tests.functional.cinder_thunder_driver.peer_helpers import GiB
from tests.functional.cinder_thunder_driver.peer_helpers import loops_under
from tests.functional.cinder_thunder_driver.peer_helpers import MiB
from tests.functional.cinder_thunder_driver.peer_helpers import new_volume
from tests.functional.cinder_thunder_driver.peer_helpers import read_device
from tests.functional.cinder_thunder_driver.peer_helpers import write_device
from tests.functional.thunder_cache import cache_daemons
from tests.harness import standalone
from thunder_common import locations
from thunder_common import manifest as manifest_mod

CHUNK = MiB
SIZE = 20 * MiB + 4321

pytestmark = peer_helpers.needs_loops_and_fuse


@pytest.fixture(scope='module')
def image():
    data = bytearray(os.urandom(SIZE))
    data[3 * MiB:6 * MiB] = bytes(3 * MiB)  # a hole, as images have
    return bytes(data)


@pytest.fixture
def node(tmp_path, ceph):
    daemon = cache_daemons.VolumeDaemon(
        str(tmp_path), 'n', extra='[origin]\nrbd_ceph_conf = %s' % ceph)
    daemon.start()
    yield daemon
    detach_all(daemon.paths['mount'])
    daemon.stop()
    assert not os.path.ismount(daemon.paths['mount'])


@pytest.fixture
def image_location(ceph, image):
    """A Glance location of a thunder image whose volume is in RBD."""
    manifest = manifest_mod.Manifest.build([image], CHUNK)
    volume_id = str(uuid.uuid4())
    with cache_daemons.rbd_image_volume(
            ceph, 'volumes', 'volume-%s' % volume_id, image,
            manifest) as (fsid, pool, name, snap):
        metadata = manifest.metadata(manifest_mod.volume_offset(SIZE))
        metadata.update({locations.META_RBD_FSID: fsid,
                         locations.META_RBD_POOL: pool,
                         locations.META_RBD_IMAGE: name,
                         locations.META_RBD_SNAPSHOT: snap})
        url = locations.thunder_location(volume_id).url
        yield (url, [{'url': url, 'metadata': metadata}])


def _meta(image_id):
    return {'id': image_id, 'disk_format': 'raw',
            'container_format': 'bare'}


def test_volume_from_image_attach_read_write(driver, node, image,
                                             image_location):
    image_id = str(uuid.uuid4())
    vol = new_volume()
    update, cloned = driver.clone_image(None, vol, image_location,
                                        _meta(image_id), None)
    assert cloned and update == {'provider_location': None}
    info = node.control.call('volume_info', volume_id=vol.name)
    assert info['written_bytes'] == 0 and info['size'] == GiB
    # Nothing of the image was read to make the volume.
    assert node.metric('thunder_cache_bytes_from_origin_total') == 0

    conn = driver.initialize_connection(vol, CONNECTOR)
    assert conn['driver_volume_type'] == 'local'
    device = conn['data']['device_path']
    try:
        dio = subprocess.run(['losetup', '-n', '-O', 'DIO', device],
                             capture_output=True, text=True).stdout.strip()
        assert dio == '1'
        assert hashlib.sha256(read_device(device, SIZE)).digest() == \
            hashlib.sha256(image).digest()
        assert read_device(device, MiB, SIZE) == bytes(MiB)
        # Asking again gives the same device, not a second one.
        again = driver.initialize_connection(vol, CONNECTOR)
        assert again['data']['device_path'] == device
        write_device(device, 5 * MiB, b'\x5a' * 8192)
        assert read_device(device, 8192, 5 * MiB) == b'\x5a' * 8192
    finally:
        driver.terminate_connection(vol, CONNECTOR)
    assert loops_under(node.paths['mount']) == []
    assert node.metric('thunder_cache_chunks_rejected_total') == 0
    assert node.metric('thunder_cache_chunks_from_origin_total') >= \
        SIZE // CHUNK

    # A second volume of the image does not see the first one's write.
    other = new_volume()
    driver.clone_image(None, other, image_location, _meta(image_id), None)
    device = driver.initialize_connection(other, CONNECTOR)['data'][
        'device_path']
    try:
        assert (read_device(device, 8192, 5 * MiB) ==
                image[5 * MiB:5 * MiB + 8192])
    finally:
        driver.terminate_connection(other, CONNECTOR)
    for v in (vol, other):
        driver.delete_volume(v)
    assert node.control.call('stats')['volumes'] == 0


def test_attach_elsewhere_is_refused(driver, node, image, image_location):
    vol = new_volume()
    driver.create_volume(vol)
    with pytest.raises(exception.VolumeBackendAPIException,
                       match='can only be attached there'):
        driver.initialize_connection(vol, {'host': 'another-node'})
    assert loops_under(node.paths['mount']) == []
    driver.delete_volume(vol)


def test_snapshot_clone_extend_delete(driver, node, image, image_location):
    image_id = str(uuid.uuid4())
    vol = new_volume()
    driver.clone_image(None, vol, image_location, _meta(image_id), None)
    device = driver.initialize_connection(vol, CONNECTOR)['data'][
        'device_path']
    try:
        write_device(device, 0, b'before-snapshot'.ljust(4096, b'.'))
        snap = standalone.Snapshot(vol)
        driver.create_snapshot(snap)
        write_device(device, 0, b'after-snapshot'.ljust(4096, b'.'))
        # Extend while attached: the device grows.
        driver.extend_volume(vol, 2)
        vol.size = 2
        fd = os.open(device, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == 2 * GiB
        finally:
            os.close(fd)
        assert read_device(device, MiB, 2 * GiB - MiB) == bytes(MiB)
    finally:
        driver.terminate_connection(vol, CONNECTOR)

    from_snap = new_volume(size=3)
    driver.create_volume_from_snapshot(from_snap, snap)
    clone = new_volume(size=2)
    driver.create_cloned_volume(clone, vol)
    for v, head in ((from_snap, b'before-snapshot'),
                    (clone, b'after-snapshot')):
        device = driver.initialize_connection(v, CONNECTOR)['data'][
            'device_path']
        try:
            data = read_device(device, SIZE)
            assert data.startswith(head)
            assert data[4096:] == image[4096:]
        finally:
            driver.terminate_connection(v, CONNECTOR)
    assert node.control.call('volume_info', volume_id=from_snap.name)[
        'size'] == 3 * GiB
    # The snapshot outlives its volume.
    driver.delete_volume(vol)
    late = new_volume()
    driver.create_volume_from_snapshot(late, snap)
    device = driver.initialize_connection(late, CONNECTOR)['data'][
        'device_path']
    try:
        assert read_device(device, 4096).startswith(b'before-snapshot')
    finally:
        driver.terminate_connection(late, CONNECTOR)
    driver.delete_snapshot(snap)
    driver.delete_snapshot(snap)  # already gone: fine
    for v in (from_snap, clone, late):
        driver.delete_volume(v)
    assert node.control.call('stats')['volumes'] == 0
    stats = driver.get_volume_stats(refresh=True)
    assert stats['backend_state'] == 'up'
    assert stats['storage_protocol'] == 'local'
    assert stats['free_capacity_gb'] > 0
