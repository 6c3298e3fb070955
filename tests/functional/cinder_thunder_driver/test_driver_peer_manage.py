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

"""Peer mode's revert_to_snapshot, manage and unmanage on a real daemon.

The driver of ``test_driver_peer_mode`` (in this
process, loop devices through Cinder's privsep) over a real
``thunder-cache`` with its volume files mounted; blank volumes, so no
Ceph is needed.
"""

import os

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
from thunder_cache.control import client as control_client

BLOCK = 4096

pytestmark = peer_helpers.needs_loops_and_fuse


@pytest.fixture
def node(tmp_path):
    daemon = cache_daemons.VolumeDaemon(str(tmp_path), 'n')
    daemon.start()
    yield daemon
    detach_all(daemon.paths['mount'])
    daemon.stop()
    assert not os.path.ismount(daemon.paths['mount'])


def _attach(drv, volume):
    return drv.initialize_connection(volume, CONNECTOR)['data'][
        'device_path']


def _block(text):
    return text.ljust(BLOCK, b'.')


def _head(drv, volume):
    """The first block of a volume, read through its loop device."""
    device = _attach(drv, volume)
    try:
        return read_device(device, BLOCK)
    finally:
        drv.terminate_connection(volume, CONNECTOR)


def test_revert_to_snapshot(driver, node):
    vol = new_volume()
    driver.create_volume(vol)
    device = _attach(driver, vol)
    try:
        write_device(device, 0, _block(b'before'))
        snap = standalone.Snapshot(vol)
        driver.create_snapshot(snap)
        write_device(device, 0, _block(b'after'))
        write_device(device, 8 * MiB, _block(b'later'))
        # Attached: refused, nothing changed.
        with pytest.raises(exception.VolumeBackendAPIException,
                           match='VolumeBusy'):
            driver.revert_to_snapshot(None, vol, snap)
        assert read_device(device, BLOCK) == _block(b'after')
    finally:
        driver.terminate_connection(vol, CONNECTOR)
    driver.extend_volume(vol, 2)
    vol.size = 2
    assert driver.snapshot_revert_use_temp_snapshot() is False
    driver.revert_to_snapshot(None, vol, snap)
    info = node.control.call('volume_info', volume_id=vol.name)
    assert info['size'] == 2 * GiB and info['written_bytes'] == BLOCK
    device = _attach(driver, vol)
    try:
        assert read_device(device, BLOCK) == _block(b'before')
        assert read_device(device, BLOCK, 8 * MiB) == bytes(BLOCK)
        fd = os.open(device, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == 2 * GiB
        finally:
            os.close(fd)
        write_device(device, 0, _block(b'again'))
    finally:
        driver.terminate_connection(vol, CONNECTOR)
    # The snapshot is untouched and still usable.
    other = new_volume()
    driver.create_volume_from_snapshot(other, snap)
    assert _head(driver, other) == _block(b'before')
    for v in (vol, other):
        driver.delete_volume(v)
    driver.delete_snapshot(snap)
    assert node.control.call('stats')['volumes'] == 0
    assert os.listdir(node.paths['layers']) == []


def _entries(drv, managed=()):
    entries = drv.get_manageable_volumes(
        [{'id': v.id} for v in managed], None, 100, 0, ['reference'],
        ['asc'])
    return {e['reference']['source-name']: e for e in entries}


def test_unmanage_then_manage(driver, node):
    vol = new_volume()
    driver.create_volume(vol)
    snap = standalone.Snapshot(vol)
    device = _attach(driver, vol)
    try:
        write_device(device, 0, _block(b'mine'))
        driver.create_snapshot(snap)
        entries = _entries(driver, [vol])
        assert entries[vol.name]['reason_not_safe'] == 'already managed'
        assert entries[vol.name]['cinder_id'] == vol.id
        # Attached: not manageable.
        with pytest.raises(exception.ManageExistingInvalidReference,
                           match='in use'):
            driver.manage_existing_get_size(new_volume(),
                                            {'source-name': vol.name})
    finally:
        driver.terminate_connection(vol, CONNECTOR)
    driver.unmanage(vol)
    entries = _entries(driver)
    assert entries[vol.name]['safe_to_manage'] is True
    assert entries[vol.name]['size'] == 1
    assert entries[snap.name]['safe_to_manage'] is False
    for name, reason in ((snap.name, 'a snapshot'),
                         ('volume-missing', 'no volume')):
        with pytest.raises(exception.ManageExistingInvalidReference,
                           match=reason):
            driver.manage_existing(new_volume(), {'source-name': name})

    adopted = new_volume()
    ref = {'source-name': vol.name}
    adopted.size = driver.manage_existing_get_size(adopted, ref)
    assert adopted.size == 1
    assert driver.manage_existing(adopted, ref) == {}
    with pytest.raises(control_client.ControlError) as e:
        node.control.call('volume_info', volume_id=vol.name)
    assert e.value.kind == 'VolumeNotFound'
    # Kept across a restart of the daemon, under its new name.
    node.stop()
    node.start()
    assert _head(driver, adopted) == _block(b'mine')
    # The snapshot too, under the adopted volume.
    driver.unmanage_snapshot(snap)
    adopted_snap = standalone.Snapshot(adopted)
    ref = {'source-name': snap.name}
    assert driver.manage_existing_snapshot_get_size(adopted_snap, ref) == 1
    with pytest.raises(exception.ManageExistingInvalidReference,
                       match='not a snapshot'):
        driver.manage_existing_snapshot(adopted_snap,
                                        {'source-name': adopted.name})
    assert driver.manage_existing_snapshot(adopted_snap, ref) == {}
    from_snap = new_volume()
    driver.create_volume_from_snapshot(from_snap, adopted_snap)
    assert _head(driver, from_snap) == _block(b'mine')
    assert loops_under(node.paths['mount']) == []
    for v in (adopted, from_snap):
        driver.delete_volume(v)
    driver.delete_snapshot(adopted_snap)
    assert os.listdir(node.paths['layers']) == []
