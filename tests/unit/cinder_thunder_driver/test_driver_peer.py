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

"""PeerDriver, the peer mode (cinder_thunder_driver.peer)."""

import logging
import os
from unittest import mock
import uuid

from cinder import exception
from oslo_utils import units
import pytest

from cinder_thunder_driver import driver
from cinder_thunder_driver import image_clones
from cinder_thunder_driver import loopdev
from cinder_thunder_driver import peer
from tests.unit.cinder_thunder_driver import fakes
from thunder_cache.control import client as control_client
from thunder_common import locations
from thunder_common import manifest as manifest_mod

VBAE = exception.VolumeBackendAPIException
GiB = units.Gi
MiB = units.Mi
HOST = 'node1'
NOT_CLONEABLE = fakes.NOT_CLONEABLE
RAW = fakes.RAW


class FakeDaemon(control_client.ControlClient):
    """The driver's ControlClient: records calls, answers from tables."""

    def __init__(self, mount_dir, events):
        self.calls = events
        self.answers = {
            'ping': {'node_id': HOST, 'url': 'http://192.0.2.1:7485',
                     'mount_dir': mount_dir},
            'stats': {'total_bytes': 100 * GiB, 'free_bytes': 40 * GiB + 1,
                      'provisioned_bytes': 7 * GiB, 'volumes': 3,
                      'images': 1},
            'register_image': {'image_size': 10 * MiB, 'chunk_size': MiB,
                               'chunks': 10, 'chunks_present': 0},
        }
        self.errors = {}

    def call(self, op, **args):
        self.calls.append((op, args))
        if op in self.errors:
            raise self.errors[op]
        answer = self.answers.get(op)
        return answer(**args) if callable(answer) else answer

    def ops(self):
        """The calls other than pings and loop device events."""
        return [(op, args) for op, args in self.calls
                if op != 'ping' and not op.startswith('loop.')]


@pytest.fixture
def events():
    """Daemon calls and loop device operations, in order."""
    return []


@pytest.fixture
def loop(events):
    """The loopdev entrypoints, replaced by mocks recording into events."""
    with mock.patch.multiple(peer.loopdev, devices_of=mock.DEFAULT,
                             attach=mock.DEFAULT, detach=mock.DEFAULT,
                             refresh_size=mock.DEFAULT) as mocks:
        mocks['devices_of'].return_value = []
        mocks['attach'].return_value = ('/dev/loop3', True)
        mocks['detach'].side_effect = lambda dev: events.append(
            ('loop.detach', dev))
        mocks['refresh_size'].side_effect = lambda *a: events.append(
            ('loop.refresh_size', a))
        yield mocks


@pytest.fixture
def make_peer(make_conf, mount_dir, events):
    def build(**overrides):
        drv = peer.PeerDriver(configuration=make_conf(**overrides))
        drv.daemon = FakeDaemon(mount_dir, events)
        return drv
    return build


@pytest.fixture
def drv(make_peer, loop):
    return make_peer()


def _volume(size=2, **kwargs):
    volume = fakes.Volume(size=size, **kwargs)
    volume.host = '%s@thunder_unit#thunder' % HOST
    return volume


def _calls(drv):
    return drv.daemon.ops()


def _error(kind, message='boom'):
    return control_client.ControlError(kind, message)


# -- construction -------------------------------------------------------------

def test_the_peer_driver_is_its_own_class(make_conf):
    drv = peer.PeerDriver(configuration=make_conf(
        thunder_cache_control_socket='/run/x.sock', thunder_cache_timeout=7))
    assert type(drv) is peer.PeerDriver
    assert not isinstance(drv, driver.ThunderDriver)
    assert isinstance(drv.daemon, control_client.ControlClient)
    assert (drv.daemon.path, drv.daemon.timeout) == ('/run/x.sock', 7)
    assert peer.PeerDriver.get_driver_options() == \
        driver.options.thunder_opts


def test_thunder_driver_refuses_the_peer_mode(make_conf):
    drv = driver.ThunderDriver(configuration=make_conf(thunder_mode='peer'))
    assert type(drv) is driver.ThunderDriver
    with pytest.raises(exception.VolumeDriverException,
                       match='cinder_thunder_driver.peer.PeerDriver'):
        drv.do_setup(None)


def test_mount_dir_asked_once(drv, mount_dir):
    assert drv.mount_dir == mount_dir
    assert drv.mount_dir == mount_dir
    assert [op for op, _ in drv.daemon.calls] == ['ping']


# -- setup and stats ----------------------------------------------------------

def test_check_for_setup_error(drv, mount_dir):
    with mock.patch.object(peer.os.path, 'ismount',
                           return_value=True) as ismount:
        drv.check_for_setup_error()
    ismount.assert_called_once_with(mount_dir)
    assert drv.mount_dir == mount_dir


@pytest.mark.parametrize('value', ['', None])
def test_check_for_setup_error_without_volume_files(drv, value):
    drv.daemon.answers['ping']['mount_dir'] = value
    with pytest.raises(VBAE, match=r'\[blockdev\] enabled'):
        drv.check_for_setup_error()


def test_check_for_setup_error_not_mounted(drv, mount_dir):
    # mount_dir exists but is a plain directory of tmp_path.
    with pytest.raises(VBAE, match='is not mounted'):
        drv.check_for_setup_error()
    drv.daemon.answers['ping']['mount_dir'] = mount_dir + '-missing'
    with pytest.raises(VBAE, match='is not mounted'):
        drv.check_for_setup_error()


# A daemon's error at each step: (the control call that fails, its error
# and message, what the VolumeBackendAPIException the driver raises must
# say, what the driver was doing).
DAEMON_ERRORS = {
    'check_for_setup_error_daemon_down': (
        'ping', 'Unavailable', 'no socket', 'no socket',
        lambda drv: drv.check_for_setup_error()),
    'create_volume_failure': (
        'create_volume', 'VolumeExists', 'taken', 'taken',
        lambda drv: drv.create_volume(_volume())),
    'revert_to_snapshot_refused': (
        'revert_volume', 'VolumeBusy',
        'volume volume-x is open 1 times (attached?)', 'open 1 times',
        lambda drv: drv.revert_to_snapshot(None, _volume(),
                                           fakes.Snapshot(_volume()))),
    'manage_existing_daemon_down': (
        'volume_info', 'ConnectionError', 'down', 'down',
        lambda drv: drv.manage_existing_get_size(_volume(),
                                                 {'source-name': 'a'})),
}


@pytest.mark.parametrize('case', DAEMON_ERRORS)
def test_daemon_error_is_raised_with_its_message(drv, case):
    call, kind, message, match, action = DAEMON_ERRORS[case]
    drv.daemon.errors[call] = _error(kind, message)
    with pytest.raises(VBAE, match=match):
        action(drv)


def test_stats(drv):
    stats = drv.get_volume_stats(refresh=True)
    assert stats['backend_state'] == 'up'
    assert stats['total_capacity_gb'] == 100.0
    assert stats['free_capacity_gb'] == 40.0
    assert stats['provisioned_capacity_gb'] == 7.0
    assert stats['total_volumes'] == 3
    assert stats['volume_backend_name'] == 'thunder'
    assert stats['storage_protocol'] == 'local'
    assert stats['thin_provisioning_support'] is True
    assert stats['online_extend_support'] is True
    assert stats['multiattach'] is False


def test_stats_cached_until_refresh(drv):
    drv.get_volume_stats(refresh=True)
    drv.daemon.answers['stats']['volumes'] = 4
    assert drv.get_volume_stats()['total_volumes'] == 3
    assert drv.get_volume_stats(refresh=True)['total_volumes'] == 4


@pytest.mark.parametrize('break_it', [
    lambda d: d.errors.update(stats=_error('Unavailable')),
    lambda d: d.answers.update(stats={'volumes': 1}),
    lambda d: d.answers.update(stats=None),
])
def test_stats_down(drv, break_it, caplog):
    break_it(drv.daemon)
    stats = drv.get_volume_stats(refresh=True)
    assert stats['backend_state'] == 'down'
    assert stats['total_capacity_gb'] == 'unknown'
    assert stats['free_capacity_gb'] == 'unknown'
    assert 'reporting the backend down' in caplog.text


# -- volumes and snapshots ----------------------------------------------------

def test_create_volume(drv):
    volume = _volume(size=3)
    assert drv.create_volume(volume) == {}
    assert _calls(drv) == [('create_volume', {
        'volume_id': volume.name, 'size': 3 * GiB, 'image_id': None,
        'source': None})]


@pytest.mark.parametrize('method, make_source', [
    ('create_cloned_volume', lambda: _volume(size=1)),
    ('create_volume_from_snapshot', lambda: fakes.Snapshot(_volume(size=1))),
])
def test_create_volume_from_source(drv, method, make_source):
    source = make_source()
    volume = _volume(size=5)
    getattr(drv, method)(volume, source)
    assert _calls(drv) == [('create_volume', {
        'volume_id': volume.name, 'size': 5 * GiB, 'image_id': None,
        'source': source.name})]


def test_create_snapshot(drv):
    snapshot = fakes.Snapshot(_volume(size=4))
    drv.create_snapshot(snapshot)
    assert _calls(drv) == [('create_volume', {
        'volume_id': snapshot.name, 'size': 4 * GiB,
        'source': snapshot.volume_name, 'read_only': True})]


def test_delete_volume(drv, loop, mount_dir):
    volume = _volume()
    drv.delete_volume(volume)
    loop['devices_of'].assert_called_once_with(
        os.path.join(mount_dir, volume.name), mount_dir)
    loop['detach'].assert_not_called()
    assert _calls(drv) == [('delete_volume', {'volume_id': volume.name})]


def test_delete_detaches_leftover_devices_first(drv, loop, events):
    volume = _volume()
    loop['devices_of'].return_value = ['/dev/loop1', '/dev/loop7']
    drv.delete_volume(volume)
    assert [e for e in events if e[0] != 'ping'] == [
        ('loop.detach', '/dev/loop1'), ('loop.detach', '/dev/loop7'),
        ('delete_volume', {'volume_id': volume.name})]


def test_delete_missing_volume_is_fine(drv):
    drv.daemon.errors['delete_volume'] = _error('VolumeNotFound')
    drv.delete_volume(_volume())
    drv.delete_snapshot(fakes.Snapshot(_volume()))


def test_delete_busy_volume(drv):
    volume = _volume()
    drv.busy_wait = 0.3
    drv.daemon.errors['delete_volume'] = _error('VolumeBusy', 'open')
    with pytest.raises(exception.VolumeIsBusy) as info:
        drv.delete_volume(volume)
    assert volume.name in str(info.value)
    # Asked again while it stayed busy, then given up.
    assert len([op for op, _ in drv.daemon.calls
                if op == 'delete_volume']) >= 2


def test_delete_waits_for_a_volume_let_go(drv):
    """Busy just after a detach, deleted once the kernel lets go."""
    volume = _volume()
    drv.busy_wait = 5
    busy = [_error('VolumeBusy', 'open')]

    original = drv.daemon.call

    def call(op, **args):
        if op == 'delete_volume' and busy:
            drv.daemon.calls.append((op, args))
            raise busy.pop()
        return original(op, **args)

    drv.daemon.call = call
    drv.delete_volume(volume)
    assert [op for op, _ in drv.daemon.calls
            if op == 'delete_volume'] == ['delete_volume'] * 2


@pytest.mark.parametrize('kind', ['Unavailable', 'ValueError', 'BadRequest'])
def test_delete_other_failure(drv, kind):
    drv.daemon.errors['delete_volume'] = _error(kind)
    with pytest.raises(VBAE):
        drv.delete_volume(_volume())


def test_delete_snapshot(drv, loop, mount_dir):
    snapshot = fakes.Snapshot(_volume())
    drv.delete_snapshot(snapshot)
    loop['devices_of'].assert_called_once_with(
        os.path.join(mount_dir, snapshot.name), mount_dir)
    assert _calls(drv) == [('delete_volume', {'volume_id': snapshot.name})]


def test_extend_volume_refreshes_attached_devices(drv, loop, events,
                                                  mount_dir):
    volume = _volume(size=1)
    path = os.path.join(mount_dir, volume.name)
    loop['devices_of'].return_value = ['/dev/loop2']
    drv.extend_volume(volume, 6)
    assert [e for e in events if e[0] != 'ping'] == [
        ('resize_volume', {'volume_id': volume.name, 'size': 6 * GiB}),
        ('loop.refresh_size', ('/dev/loop2', path, mount_dir))]


def test_extend_volume_failure(drv, loop):
    drv.daemon.errors['resize_volume'] = _error('ValueError', 'shrink')
    with pytest.raises(VBAE, match='shrink'):
        drv.extend_volume(_volume(size=3), 2)
    loop['refresh_size'].assert_not_called()


# -- revert_to_snapshot ------------------------------------------------------

def test_revert_to_snapshot(drv, loop):
    volume = _volume(size=3)
    snapshot = fakes.Snapshot(_volume(size=2))
    drv.revert_to_snapshot(None, volume, snapshot)
    assert _calls(drv) == [('revert_volume', {
        'volume_id': volume.name, 'snapshot_id': snapshot.name})]
    # Atomic on the node: no temporary snapshot; attached devices are
    # never detached behind the VM's back.
    assert drv.snapshot_revert_use_temp_snapshot() is False
    loop['detach'].assert_not_called()


# -- manage / unmanage -------------------------------------------------------

def _layer(name, size=GiB, read_only=False, open_count=0, image_id=None):
    return {'id': name, 'size': size, 'image_id': image_id,
            'read_only': read_only, 'written_bytes': 0,
            'allocated_bytes': 0, 'open_count': open_count}


def test_manage_existing(drv):
    drv.daemon.answers['volume_info'] = _layer('orphan', GiB + 1)
    volume = _volume(size=2)
    ref = {'source-name': 'orphan'}
    assert drv.manage_existing_get_size(volume, ref) == 2
    assert drv.manage_existing(volume, ref) == {}
    assert _calls(drv) == [
        ('volume_info', {'volume_id': 'orphan'}),
        ('volume_info', {'volume_id': 'orphan'}),
        ('rename_volume', {'volume_id': 'orphan', 'new_id': volume.name}),
        ('resize_volume', {'volume_id': volume.name, 'size': 2 * GiB})]


def test_manage_existing_whole_gib_is_not_resized(drv):
    drv.daemon.answers['volume_info'] = _layer('orphan', 3 * GiB)
    drv.manage_existing(_volume(size=3), {'source-name': 'orphan'})
    assert [op for op, _ in _calls(drv)] == ['volume_info', 'rename_volume']


@pytest.mark.parametrize('ref, answer, reason', [
    ({}, None, 'needs source-name'),
    ({'source-name': 7}, None, 'needs source-name'),
    ({'source-name': 'gone'}, _error('VolumeNotFound'), 'no volume gone'),
    ({'source-name': '../x'}, _error('BadRequest'), 'no volume ../x'),
    ({'source-name': 'snap'}, _layer('snap', read_only=True), 'a snapshot'),
    ({'source-name': 'busy'}, _layer('busy', open_count=1), 'in use'),
])
def test_manage_existing_invalid_reference(drv, ref, answer, reason):
    if isinstance(answer, control_client.ControlError):
        drv.daemon.errors['volume_info'] = answer
    else:
        drv.daemon.answers['volume_info'] = answer
    for call in (drv.manage_existing, drv.manage_existing_get_size):
        with pytest.raises(exception.ManageExistingInvalidReference,
                           match=reason):
            call(_volume(), ref)
    assert [op for op, _ in _calls(drv)
            if op != 'volume_info'] == []


def test_unmanage_keeps_the_layer(drv, loop):
    drv.unmanage(_volume())
    assert _calls(drv) == []
    loop['detach'].assert_not_called()


def test_manage_existing_snapshot(drv):
    snapshot = fakes.Snapshot(_volume())
    answers = {'orphan': _layer('orphan', GiB - 1, read_only=True,
                                image_id='img-1'),
               snapshot.volume_name: _layer(snapshot.volume_name,
                                            image_id='img-1')}
    drv.daemon.answers['volume_info'] = lambda volume_id: answers[volume_id]
    ref = {'source-name': 'orphan'}
    assert drv.manage_existing_snapshot_get_size(snapshot, ref) == 1
    assert drv.manage_existing_snapshot(snapshot, ref) == {}
    assert _calls(drv)[-1] == ('rename_volume', {'volume_id': 'orphan',
                                                 'new_id': snapshot.name})
    # A writable layer, or one of another image, is not its snapshot.
    answers['orphan'] = _layer('orphan', read_only=False)
    with pytest.raises(exception.ManageExistingInvalidReference,
                       match='not a snapshot'):
        drv.manage_existing_snapshot(snapshot, ref)
    answers['orphan'] = _layer('orphan', read_only=True, image_id='img-2')
    with pytest.raises(exception.ManageExistingInvalidReference,
                       match='reads image img-2'):
        drv.manage_existing_snapshot(snapshot, ref)
    assert [op for op, _ in _calls(drv)].count('rename_volume') == 1
    drv.unmanage_snapshot(snapshot)
    assert _calls(drv)[-1][0] == 'volume_info'


def test_get_manageable_volumes(drv):
    managed = _volume()
    orphan = 'volume-%s' % uuid.uuid4()
    layers = sorted([
        _layer(managed.name, open_count=1),
        _layer(orphan, 2 * GiB + 1, image_id='img-1'),
        _layer('snapshot-1', read_only=True),
        _layer('hand-made', open_count=2)], key=lambda v: v['id'])
    # Pages of two.
    drv.daemon.answers['list_volumes'] = lambda marker: [
        v for v in layers if marker is None or v['id'] > marker][:2]
    entries = drv.get_manageable_volumes([{'id': managed.id}], None, 10, 0,
                                         ['size'], ['desc'])
    by_name = {e['reference']['source-name']: e for e in entries}
    assert by_name[orphan] == {
        'reference': {'source-name': orphan}, 'size': 3, 'cinder_id': None,
        'extra_info': 'image img-1', 'safe_to_manage': True,
        'reason_not_safe': None}
    assert by_name[managed.name]['cinder_id'] == managed.id
    assert by_name[managed.name]['reason_not_safe'] == 'already managed'
    assert by_name['snapshot-1']['reason_not_safe'].startswith('a snapshot')
    assert by_name['hand-made']['reason_not_safe'].startswith('in use')
    assert [e['size'] for e in entries] == [3, 1, 1, 1]
    assert [args['marker'] for op, args in _calls(drv)
            if op == 'list_volumes'] == [None, layers[1]['id'],
                                         layers[3]['id']]


# -- clone_image -------------------------------------------------------------

RBD_META = {locations.META_RBD_FSID: fakes.FSID,
            locations.META_RBD_POOL: 'images',
            locations.META_RBD_IMAGE: 'img-1',
            locations.META_RBD_SNAPSHOT: 'snap'}


@pytest.fixture(scope='module')
def manifest_meta():
    """Location metadata naming the manifest of a 3 MiB image."""
    image = os.urandom(3 * MiB + 5)
    manifest = manifest_mod.Manifest.build([image])
    return manifest.metadata(manifest_mod.volume_offset(len(image)))


def _location(volume_id, metadata):
    return {'url': locations.thunder_location(volume_id).url,
            'metadata': dict(metadata)}


def _clone_image(drv, volume, location_list, meta=RAW):
    return drv.clone_image(None, volume, (None, location_list), dict(meta),
                           None)


def _expected_descriptor(volume_id, manifest_meta, origin):
    offset, length, digest = manifest_mod.from_metadata(manifest_meta)
    return {'image_id': RAW['id'], 'manifest_digest': digest,
            'manifest_offset': offset, 'manifest_length': length,
            'origin_volume_id': volume_id, 'origin': origin}


def test_clone_image(drv, manifest_meta):
    volume = _volume(size=1)
    volume_id = str(uuid.uuid4())
    assert _clone_image(drv, volume, [_location(volume_id, manifest_meta)]) \
        == ({'provider_location': None}, True)
    assert _calls(drv) == [
        ('register_image', _expected_descriptor(
            volume_id, manifest_meta,
            {'type': 'rbd', 'pool': 'volumes',
             'image': 'volume-%s' % volume_id})),
        ('create_volume', {'volume_id': volume.name, 'size': GiB,
                           'image_id': RAW['id'], 'source': None})]


def test_clone_image_origin_in_configured_pool(make_peer, loop,
                                               manifest_meta):
    drv = make_peer(thunder_rbd_pool='cinder-ssd')
    volume_id = str(uuid.uuid4())
    assert _clone_image(drv, _volume(), [
        _location(volume_id, manifest_meta)])[1] is True
    origin = _calls(drv)[0][1]['origin']
    assert origin == {'type': 'rbd', 'pool': 'cinder-ssd',
                      'image': 'volume-%s' % volume_id}


def test_clone_image_origin_from_rbd_metadata(drv, manifest_meta):
    """The image-volume's head: the manifest is written after the seal."""
    volume_id = str(uuid.uuid4())
    location = _location(volume_id, dict(manifest_meta, **RBD_META))
    assert _clone_image(drv, _volume(), [location])[1] is True
    assert _calls(drv)[0] == ('register_image', _expected_descriptor(
        volume_id, manifest_meta,
        {'type': 'rbd', 'pool': 'images', 'image': 'img-1'}))


def test_clone_image_from_cinder_location(drv, manifest_meta):
    volume_id = str(uuid.uuid4())
    location = {'url': locations.cinder_location(volume_id, 'store1').url,
                'metadata': manifest_meta}
    assert _clone_image(drv, _volume(), [location])[1] is True
    assert _calls(drv)[0][1]['origin_volume_id'] == volume_id


def test_clone_image_container_format_unset(drv, manifest_meta):
    location = _location(str(uuid.uuid4()), manifest_meta)
    assert _clone_image(drv, _volume(), [location],
                        meta=dict(RAW, container_format=None))[1] is True


def test_clone_image_tries_locations_in_turn(drv, manifest_meta):
    volume_id = str(uuid.uuid4())
    rbd_url = locations.RbdLocation(fakes.FSID, 'images', 'x', 'snap').url
    location_list = [
        {'url': rbd_url, 'metadata': manifest_meta},
        {'url': 'file:///etc/passwd', 'metadata': manifest_meta},
        {'url': None},
        _location(str(uuid.uuid4()), {}),
        _location(volume_id, manifest_meta)]
    assert _clone_image(drv, _volume(), location_list)[1] is True
    registered = [args for op, args in _calls(drv) if op == 'register_image']
    assert [r['origin_volume_id'] for r in registered] == [volume_id]


MALFORMED_RBD = [
    dict(RBD_META, **{locations.META_RBD_FSID: 'not-a-uuid'}),
    dict(RBD_META, **{locations.META_RBD_POOL: 'a/b'}),
    dict(RBD_META, **{locations.META_RBD_IMAGE: 'img 1'}),
    dict(RBD_META, **{locations.META_RBD_SNAPSHOT: 'x@y'}),
]


def _bad_manifest(meta, key, value):
    return dict(meta, **{key: value})


@pytest.mark.parametrize('make_location', [
    # Only an RBD snapshot: no image-volume to cache from.
    lambda m: {'url': locations.RbdLocation(fakes.FSID, 'images', 'x',
                                            'snap').url, 'metadata': m},
    # A thunder image-volume without a manifest.
    lambda m: _location(str(uuid.uuid4()), {}),
    lambda m: {'url': locations.thunder_location(str(uuid.uuid4())).url},
    lambda m: _location(str(uuid.uuid4()), _bad_manifest(
        m, manifest_mod.META_DIGEST, 'x' * 64)),
    lambda m: _location(str(uuid.uuid4()), _bad_manifest(
        m, manifest_mod.META_OFFSET, '12345')),
    lambda m: _location(str(uuid.uuid4()), _bad_manifest(
        m, manifest_mod.META_LENGTH, '-1')),
    # Malformed RBD names in the metadata.
] + [lambda m, r=r: _location(str(uuid.uuid4()), dict(m, **r))
     for r in MALFORMED_RBD] + [
    lambda m: {'url': 'thunder://not-a-uuid', 'metadata': m},
    lambda m: {'url': 'http://example.com/image', 'metadata': m},
])
def test_clone_image_without_usable_location(drv, manifest_meta,
                                             make_location):
    assert _clone_image(drv, _volume(), [make_location(manifest_meta)]) == \
        ({}, False)
    assert drv.daemon.calls == []


@pytest.mark.parametrize('meta', NOT_CLONEABLE)
def test_clone_image_not_raw_or_bare(drv, manifest_meta, meta):
    location = _location(str(uuid.uuid4()), manifest_meta)
    assert _clone_image(drv, _volume(), [location], meta=meta) == \
        ({}, False)
    assert drv.daemon.calls == []
    assert drv.image_clones.stats()[image_clones.STAT_DECLINED] == 1


def test_clone_image_counts_in_the_stats(drv, manifest_meta):
    location = _location(str(uuid.uuid4()), manifest_meta)
    assert _clone_image(drv, _volume(), [location])[1] is True
    assert _clone_image(drv, _volume(), [location],
                        meta=dict(RAW, disk_format='qcow2'))[1] is False
    assert _clone_image(drv, _volume(), [])[1] is False
    stats = drv.get_volume_stats(refresh=True)
    assert stats[image_clones.STAT_CLONES] == 1
    assert stats[image_clones.STAT_REASONS] == {
        image_clones.NOT_RAW: 1, image_clones.NO_LOCATION: 1}


def test_clone_image_encrypted_volume(drv, manifest_meta):
    volume = _volume(encryption_key_id=str(uuid.uuid4()))
    location = _location(str(uuid.uuid4()), manifest_meta)
    assert _clone_image(drv, volume, [location]) == ({}, False)
    assert drv.daemon.calls == []


@pytest.mark.parametrize('image_location', [None, (None, None),
                                            (None, [])])
def test_clone_image_without_locations(drv, image_location):
    assert drv.clone_image(None, _volume(), image_location, dict(RAW),
                           None) == ({}, False)


def test_clone_image_larger_than_volume(drv, manifest_meta):
    drv.daemon.answers['register_image']['image_size'] = GiB + 1
    location = _location(str(uuid.uuid4()), manifest_meta)
    with pytest.raises(VBAE, match='does not fit'):
        _clone_image(drv, _volume(size=1), [location])
    assert [op for op, _ in _calls(drv)] == ['register_image']


def test_clone_image_exactly_the_volume_size(drv, manifest_meta):
    drv.daemon.answers['register_image']['image_size'] = GiB
    location = _location(str(uuid.uuid4()), manifest_meta)
    assert _clone_image(drv, _volume(size=1), [location])[1] is True


def test_clone_image_registration_fails(drv, manifest_meta):
    drv.daemon.errors['register_image'] = _error('DescriptorError',
                                                 'digest mismatch')
    location = _location(str(uuid.uuid4()), manifest_meta)
    with pytest.raises(VBAE, match='digest mismatch'):
        _clone_image(drv, _volume(), [location])
    assert [op for op, _ in _calls(drv)] == ['register_image']


def test_image_descriptor_none_for_rbd_location(manifest_meta):
    url = locations.RbdLocation(fakes.FSID, 'images', 'x', 's').url
    assert peer.image_descriptor('img', {'url': url,
                                         'metadata': manifest_meta},
                                 'volumes', 'volume-%s') is None


def test_image_descriptor_name_template(manifest_meta):
    volume_id = str(uuid.uuid4())
    descriptor = peer.image_descriptor(
        'img', _location(volume_id, manifest_meta), 'pool1', 'vol_%s_x')
    assert descriptor['origin'] == {'type': 'rbd', 'pool': 'pool1',
                                    'image': 'vol_%s_x' % volume_id}
    assert descriptor['image_id'] == 'img'


# -- connections --------------------------------------------------------------

def test_initialize_connection(drv, loop, mount_dir):
    volume = _volume()
    info = drv.initialize_connection(volume, {'host': HOST})
    assert info == {'driver_volume_type': 'local',
                    'data': {'device_path': '/dev/loop3',
                             'volume_id': volume.id, 'discard': True}}
    loop['attach'].assert_called_once_with(
        os.path.join(mount_dir, volume.name), mount_dir, direct_io=True)


@pytest.mark.parametrize('connector', [None, {}, {'host': None},
                                       {'initiator': 'iqn.x'}])
def test_initialize_connection_without_connector_host(drv, loop,
                                                      connector):
    info = drv.initialize_connection(_volume(), connector)
    assert info['data']['device_path'] == '/dev/loop3'


def test_initialize_connection_on_another_host(drv, loop):
    volume = _volume()
    with pytest.raises(VBAE, match='only be attached there'):
        drv.initialize_connection(volume, {'host': 'node2'})
    loop['attach'].assert_not_called()


def test_initialize_connection_without_direct_io(make_peer, loop, caplog):
    drv = make_peer(thunder_loop_direct_io=False)
    loop['attach'].return_value = ('/dev/loop5', False)
    caplog.set_level(logging.WARNING)
    assert drv.initialize_connection(_volume(), {})['data'][
        'device_path'] == '/dev/loop5'
    assert loop['attach'].call_args.kwargs == {'direct_io': False}
    assert 'page cache' not in caplog.text


def test_initialize_connection_direct_io_refused(drv, loop, caplog):
    loop['attach'].return_value = ('/dev/loop5', False)
    drv.initialize_connection(_volume(), {})
    assert 'page cache' in caplog.text


def test_initialize_connection_loop_failure(drv, loop):
    loop['attach'].side_effect = loopdev.LoopError('no free loop device')
    with pytest.raises(VBAE, match='no free loop device'):
        drv.initialize_connection(_volume(), {})


def test_terminate_connection_detaches_every_device(drv, loop, events,
                                                    mount_dir):
    volume = _volume()
    loop['devices_of'].return_value = ['/dev/loop1', '/dev/loop4']
    drv.terminate_connection(volume, {'host': HOST})
    loop['devices_of'].assert_called_once_with(
        os.path.join(mount_dir, volume.name), mount_dir)
    assert [e for e in events if e[0].startswith('loop.')] == [
        ('loop.detach', '/dev/loop1'), ('loop.detach', '/dev/loop4')]


def test_terminate_connection_nothing_attached(drv, loop):
    drv.terminate_connection(_volume(), None, force=True)
    loop['detach'].assert_not_called()


def test_exports_are_no_ops(drv):
    volume = _volume()
    assert drv.create_export(None, volume, {}) is None
    assert drv.ensure_export(None, volume) is None
    assert drv.remove_export(None, volume) is None
    assert drv.daemon.calls == []


# -- image copies -------------------------------------------------------------

CHUNK = 4 * MiB
MARK = b'\xa5'


def _volume_file(mount_dir, volume, length):
    """The volume's file, filled with MARK where it is not a hole."""
    path = os.path.join(mount_dir, volume.name)
    with open(path, 'wb') as f:
        f.write(MARK * length)
        f.truncate(volume.size * GiB)
    return path


def _fetch_writing(content, seen):
    def fetch(context, image_service, image_id, dest, blocksize, **kwargs):
        seen.update(dest=dest, kwargs=kwargs)
        with open(dest, 'wb') as f:
            f.write(content)
    return fetch


def test_copy_image_to_volume_writes_non_zero_chunks(
        drv, mount_dir, conversion_dir):
    volume = _volume(size=1)
    path = _volume_file(mount_dir, volume, 5 * CHUNK)
    chunks = [os.urandom(CHUNK), bytes(CHUNK),
              bytes(CHUNK - 1) + b'\x01', bytes(CHUNK), b'tail' + bytes(99)]
    content = b''.join(chunks)
    seen = {}
    with mock.patch.object(peer.image_utils, 'fetch_to_raw',
                           side_effect=_fetch_writing(content, seen)):
        drv.copy_image_to_volume('ctx', volume, 'image-service', 'img-id')
    assert seen['kwargs'] == {'size': 1, 'run_as_root': False,
                              'disable_sparse': False}
    assert os.path.dirname(seen['dest']) == str(conversion_dir)
    assert not os.path.exists(seen['dest'])
    with open(path, 'rb') as f:
        result = [f.read(CHUNK) for _ in range(5)]
    # Zero chunks were skipped: what the file held there is still there.
    assert result[0] == chunks[0]
    assert result[1] == MARK * CHUNK
    assert result[2] == chunks[2]
    assert result[3] == MARK * CHUNK
    assert result[4] == chunks[4] + MARK * (CHUNK - len(chunks[4]))
    assert os.path.getsize(path) == GiB


def test_copy_image_larger_than_volume(drv, mount_dir,
                                       conversion_dir):
    volume = _volume(size=1)
    path = os.path.join(mount_dir, volume.name)
    with open(path, 'wb') as f:
        f.truncate(2 * CHUNK)
    content = os.urandom(2 * CHUNK + 1)
    with mock.patch.object(peer.image_utils, 'fetch_to_raw',
                           side_effect=_fetch_writing(content, {})):
        with pytest.raises(VBAE, match='larger than volume'):
            drv.copy_image_to_volume(None, volume, None, 'img-id')
    with open(path, 'rb') as f:
        assert f.read() == bytes(2 * CHUNK)
    assert os.listdir(conversion_dir) == []


def test_copy_volume_to_image(drv, mount_dir):
    volume = _volume()
    meta = {'id': 'img-2', 'disk_format': 'raw'}
    with mock.patch.object(peer.volume_utils, 'upload_volume') as upload:
        drv.copy_volume_to_image('ctx', volume, 'image-service', meta)
    upload.assert_called_once_with(
        'ctx', 'image-service', meta, os.path.join(mount_dir, volume.name),
        volume, run_as_root=False)


def test_volume_file(tmp_path):
    path = str(tmp_path / 'file')
    with open(path, 'wb') as f:
        f.write(MARK * 100)
    with peer.VolumeFile(path) as target:
        target.write(b'abc', 10)
        target.write_zeroes(20, 5)
        target.write(b'end', 98)
        target.flush()
    with open(path, 'rb') as f:
        data = f.read()
    assert data == (MARK * 10 + b'abc' + MARK * 7 + bytes(5) + MARK * 73 +
                    b'end')


def test_volume_file_short_writes_resumed(tmp_path):
    path = str(tmp_path / 'file')
    open(path, 'wb').close()
    real = os.pwrite

    def short(fd, data, offset):
        return real(fd, bytes(data[:3]), offset)

    with peer.VolumeFile(path) as target, \
            mock.patch.object(peer.os, 'pwrite', side_effect=short) as pw:
        target.write(b'0123456789', 4)
    assert pw.call_count == 4
    with open(path, 'rb') as f:
        assert f.read() == bytes(4) + b'0123456789'
