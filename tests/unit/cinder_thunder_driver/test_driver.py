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

"""ThunderDriver: setup, stats, volumes, snapshots, connections, manage.

Clones and images are in test_driver_clones.py.
"""

import os
from unittest import mock
import uuid

from cinder.common import constants
from cinder import exception
from os_brick.initiator.connectors import rbd as brick_rbd
from oslo_utils import units
import pytest

from cinder_thunder_driver import clones
from cinder_thunder_driver import driver
from tests.unit.cinder_thunder_driver import fakes
from thunder_common import rbd_layout

VBAE = exception.VolumeBackendAPIException
GiB = units.Gi
SINGLE_WRITER = (fakes.RBD_FEATURE_EXCLUSIVE_LOCK |
                 fakes.RBD_FEATURE_OBJECT_MAP | fakes.RBD_FEATURE_FAST_DIFF |
                 fakes.RBD_FEATURE_JOURNALING)


@pytest.fixture
def qos():
    """Patch the QoS specs lookup; set .return_value to the specs."""
    with mock.patch.object(driver.qos_specs, 'get_qos_specs') as get:
        get.return_value = {'consumer': 'back-end', 'specs': {}}
        yield get


@pytest.fixture
def keyring(tmp_path):
    path = tmp_path / 'ceph.client.cinder.keyring'
    path.write_text('[client.cinder]\n\tkey = AQBsecret==\n')
    return str(path)


def setup_driver(make_driver, **overrides):
    drv = make_driver(**overrides)
    with mock.patch.object(driver.loopingcall,
                           'FixedIntervalLoopingCall') as looping:
        drv.do_setup(None)
    return drv, looping


# -- setup --------------------------------------------------------------------

def test_do_setup(make_driver, keyring):
    drv, looping = setup_driver(make_driver, thunder_rbd_keyring_conf=keyring,
                                thunder_flatten_workers=3,
                                thunder_deferred_purge_interval=120)
    assert drv._keyring_data.startswith('[client.cinder]')
    assert len(drv.flattener._workers) == 3
    looping.assert_called_once_with(drv._purge_deferred)
    looping.return_value.start.assert_called_once_with(interval=120,
                                                       initial_delay=120)


def test_do_setup_without_keyring(make_driver):
    drv, _looping = setup_driver(make_driver)
    assert drv._keyring_data is None


def test_do_setup_fails_on_missing_keyring(make_driver, tmp_path):
    drv = make_driver(thunder_rbd_keyring_conf=str(tmp_path / 'nope'))
    with pytest.raises(VBAE, match='thunder_rbd_keyring_conf'):
        drv.do_setup(None)
    assert drv.flattener is None


def test_do_setup_does_not_connect(make_driver, fake_ceph):
    setup_driver(make_driver)
    driver.cluster_mod.rados.Rados.assert_not_called()


def test_check_for_setup_error(drv, fake_ceph):
    with mock.patch.object(driver.LOG, 'info') as info:
        drv.check_for_setup_error()
    assert fakes.FSID in str(info.call_args)
    assert fake_ceph.connected == 1


def test_check_for_setup_error_wrong_pool(make_driver):
    drv = make_driver(thunder_rbd_pool='volumez')
    with pytest.raises(VBAE) as info:
        drv.check_for_setup_error()
    assert 'ceph osd pool create volumez' in str(info.value)
    assert 'thunder_rbd_pool' in str(info.value)


def test_check_for_setup_error_unreachable(drv, fake_ceph):
    fake_ceph.errors['connect'] = fakes.rados.TimedOut('timed out')
    with pytest.raises(VBAE, match='Could not reach the Ceph monitors'):
        drv.check_for_setup_error()


def test_stop_background_work(make_driver, fake_ceph):
    drv, looping = setup_driver(make_driver)
    drv.check_for_setup_error()
    workers = drv.flattener._workers
    drv.stop_background_work(timeout=5)
    looping.return_value.stop.assert_called_once_with()
    assert drv._purge_task is None
    for worker in workers:
        worker.join(5)
        assert not worker.is_alive()
    assert fake_ceph.connected == 0


def test_stop_background_work_before_setup(drv, fake_ceph):
    drv.flattener = None
    drv.stop_background_work()  # nothing started, nothing to fail
    assert drv._purge_task is None
    driver.cluster_mod.rados.Rados.assert_not_called()


def test_purge_deferred_task(drv):
    with mock.patch.object(clones, 'purge_deferred',
                           return_value=2) as purge, \
            mock.patch.object(driver.LOG, 'info') as info:
        drv._purge_deferred()
    purge.assert_called_once_with(drv.cluster)
    assert 2 in info.call_args.args


def test_purge_deferred_task_survives_errors(drv):
    with mock.patch.object(clones, 'purge_deferred',
                           side_effect=VBAE(data='down')), \
            mock.patch.object(driver.LOG, 'exception') as log:
        drv._purge_deferred()  # a periodic task must not raise
    log.assert_called_once()


# -- stats --------------------------------------------------------------------

STATS_KEYS = {'total_capacity_gb', 'free_capacity_gb',
              'provisioned_capacity_gb', 'thin_provisioning_support',
              'multiattach', 'QoS_support', 'volume_backend_name',
              'vendor_name', 'driver_version', 'storage_protocol',
              'backend_state', 'reserved_percentage',
              'max_over_subscription_ratio', 'location_info'}


def test_get_volume_stats(drv, fake_ceph):
    fake_ceph.add_image('a', size=10 * GiB)
    fake_ceph.add_image('b', size=GiB + 1)
    stats = drv.get_volume_stats(refresh=True)
    assert STATS_KEYS <= set(stats)
    assert stats['total_capacity_gb'] == 1000.0
    assert stats['free_capacity_gb'] == 900.0
    assert stats['provisioned_capacity_gb'] == 12
    assert stats['total_volumes'] == 2
    assert stats['thin_provisioning_support'] is True
    assert stats['thick_provisioning_support'] is False
    assert stats['multiattach'] is True
    assert stats['QoS_support'] is True
    assert stats['volume_backend_name'] == 'thunder'
    assert stats['vendor_name'] == 'VMThunder'
    assert stats['driver_version'] == driver.ThunderDriver.VERSION
    assert stats['storage_protocol'] == constants.CEPH
    assert stats['backend_state'] == 'up'
    assert stats['location_info'] == '%s:volumes' % fakes.FSID
    assert stats['max_over_subscription_ratio'] == '20.0'


def test_get_volume_stats_honours_the_quota(drv, fake_ceph):
    fake_ceph.mon['osd pool get-quota'] = {'quota_max_bytes': 500 * GiB}
    stats = drv.get_volume_stats(refresh=True)
    assert stats['total_capacity_gb'] == 500.0
    assert stats['free_capacity_gb'] == 400.0
    # A quota already exceeded leaves nothing free, never less.
    fake_ceph.mon['osd pool get-quota'] = {'quota_max_bytes': 50 * GiB}
    assert drv.get_volume_stats(refresh=True)['free_capacity_gb'] == 0


def test_get_volume_stats_bytes_used_on_older_ceph(drv, fake_ceph):
    fake_ceph.mon['df'] = {'pools': [{'name': 'volumes', 'stats': {
        'bytes_used': 30 * GiB, 'max_avail': 70 * GiB}}]}
    stats = drv.get_volume_stats(refresh=True)
    assert stats['total_capacity_gb'] == 100.0


def test_get_volume_stats_is_cached(drv, fake_ceph):
    first = drv.get_volume_stats()
    calls = len(fake_ceph.mon_calls)
    assert drv.get_volume_stats() is first
    assert len(fake_ceph.mon_calls) == calls
    drv.get_volume_stats(refresh=True)
    assert len(fake_ceph.mon_calls) > calls


def test_get_volume_stats_default_backend_name(make_driver):
    drv = make_driver(volume_backend_name=None)
    assert drv.get_volume_stats()['volume_backend_name'] == 'ThunderDriver'


@pytest.mark.parametrize('failure', ['df', 'osd pool get-quota'])
def test_get_volume_stats_backend_down(drv, fake_ceph, failure):
    fake_ceph.mon_failures[failure] = (-110, 'timed out')
    stats = drv.get_volume_stats(refresh=True)
    assert stats['backend_state'] == 'down'
    assert stats['total_capacity_gb'] == 'unknown'
    assert stats['free_capacity_gb'] == 'unknown'
    assert 'provisioned_capacity_gb' not in stats
    assert STATS_KEYS - {'provisioned_capacity_gb', 'location_info'} <= \
        set(stats)


def test_get_volume_stats_unreachable_cluster(drv, fake_ceph):
    fake_ceph.errors['connect'] = fakes.rados.TimedOut('timed out')
    assert drv.get_volume_stats(refresh=True)['backend_state'] == 'down'


@pytest.mark.parametrize('error', [fakes.rbd.PermissionError('denied'),
                                   fakes.rados.TimedOut('timed out')])
def test_get_volume_stats_binding_errors_report_down(drv, fake_ceph, error):
    with mock.patch.object(fakes.FakeRBD, 'pool_stats_get',
                           side_effect=error):
        stats = drv.get_volume_stats(refresh=True)
    assert stats['backend_state'] == 'down'


def test_get_volume_stats_pool_missing_from_df(drv, fake_ceph):
    fake_ceph.mon['df'] = {'pools': []}
    assert drv.get_volume_stats(refresh=True)['backend_state'] == 'down'


# -- volumes ------------------------------------------------------------------

def test_create_volume(drv, fake_ceph):
    volume = fakes.Volume(size=3)
    assert drv.create_volume(volume) == {}
    state = fake_ceph.find(volume.name)
    assert state.size == 3 * GiB
    assert state.features == fakes.DEFAULT_FEATURES
    assert state.metadata == {}


def test_create_volume_refuses_existing_image(drv, fake_ceph):
    volume = fakes.Volume()
    fake_ceph.add_image(volume.name, size=5 * GiB)
    with pytest.raises(VBAE, match='already exists'):
        drv.create_volume(volume)
    assert fake_ceph.find(volume.name).size == 5 * GiB


@pytest.mark.parametrize('ratio, size, fits', [
    ('1.0', 1000, True), ('1.0', 1001, False), ('1.5', 1500, True),
    ('1.5', 1501, False), ('20.0', 20000, True), ('20.0', 20001, False),
    # 'auto': the scheduler computes the ratio; the driver does not judge.
    ('auto', 10 ** 6, True),
])
def test_create_volume_capacity_check(make_driver, fake_ceph, ratio, size,
                                      fits):
    drv = make_driver(max_over_subscription_ratio=ratio)
    volume = fakes.Volume(size=size)
    if fits:
        drv.create_volume(volume)
        assert fake_ceph.find(volume.name) is not None
        return
    with pytest.raises(VBAE) as info:
        drv.create_volume(volume)
    message = str(info.value)
    assert 'does not fit in pool volumes' in message
    assert 'smaller volume or add capacity' in message
    assert fake_ceph.find(volume.name) is None


def test_create_volume_larger_than_free_space_is_thin(make_driver,
                                                      fake_ceph):
    """Thin provisioning: bigger than free, smaller than the pool: fine."""
    drv = make_driver(max_over_subscription_ratio='1.0')
    volume = fakes.Volume(size=950)  # 900 GiB free, 1000 GiB total
    drv.create_volume(volume)
    assert fake_ceph.find(volume.name).size == 950 * GiB


def test_create_volume_without_pool_statistics(drv, fake_ceph):
    fake_ceph.mon_failures['df'] = (-5, 'mgr down')
    volume = fakes.Volume(size=10 ** 6)
    with mock.patch.object(driver.LOG, 'warning') as warning:
        drv.create_volume(volume)
    assert fake_ceph.find(volume.name) is not None
    warning.assert_called_once()


@pytest.mark.parametrize('default, expected', [
    ('61', 33),  # layering + deep-flatten remain
    ('layering,exclusive-lock,object-map,fast-diff', 1),
    ('69', 1),  # layering + exclusive-lock + journaling
])
def test_create_multiattach_volume(drv, fake_ceph, default, expected):
    fake_ceph.conf['rbd_default_features'] = default
    volume = fakes.Volume(multiattach=True)
    drv.create_volume(volume)
    state = fake_ceph.find(volume.name)
    assert state.features == expected
    assert not state.features & SINGLE_WRITER


def test_create_volume_with_backend_qos(drv, fake_ceph, qos):
    qos.return_value = {'consumer': 'back-end', 'specs': {
        'total_iops_sec': 1000, 'read_bytes_sec_max': '2048',
        'unknown_key': 'x'}}
    volume = fakes.Volume(volume_type={'qos_specs_id': 'q1'})
    drv.create_volume(volume)
    assert qos.call_args.args[1] == 'q1'
    assert fake_ceph.find(volume.name).metadata == {
        'conf_rbd_qos_iops_limit': '1000',
        'conf_rbd_qos_read_bps_burst': '2048'}


@pytest.mark.parametrize('consumer, applied', [('back-end', True),
                                               ('both', True),
                                               ('front-end', False)])
def test_qos_consumer(drv, fake_ceph, qos, consumer, applied):
    qos.return_value = {'consumer': consumer,
                        'specs': {'write_iops_sec': 5}}
    volume = fakes.Volume(volume_type={'qos_specs_id': 'q1'})
    drv.create_volume(volume)
    metadata = fake_ceph.find(volume.name).metadata
    assert (metadata == {'conf_rbd_qos_write_iops_limit': '5'}) is applied


@pytest.mark.parametrize('volume_type', [None, {}, {'qos_specs_id': None}])
def test_no_qos(drv, fake_ceph, qos, volume_type):
    volume = fakes.Volume(volume_type=volume_type)
    drv.create_volume(volume)
    qos.assert_not_called()


def test_qos_keys_map_to_librbd_options():
    assert len(driver.QOS_KEYS) == 12
    for key, option in driver.QOS_KEYS.items():
        assert option.startswith('rbd_qos_')
        assert ('burst' in option) == key.endswith('_max')


def test_delete_volume(drv, fake_ceph):
    volume = fakes.Volume()
    fake_ceph.add_image(volume.name)
    drv.delete_volume(volume)
    assert fake_ceph.names() == []


def test_delete_missing_volume(drv, fake_ceph):
    fake_ceph.add_image('other')
    drv.delete_volume(fakes.Volume())  # already gone: success
    assert fake_ceph.names() == ['other']


def test_delete_volume_deleted_concurrently(drv, fake_ceph):
    volume = fakes.Volume()
    fake_ceph.add_image(volume.name)
    fake_ceph.errors[('remove', volume.name)] = fakes.rbd.ImageNotFound('x')
    with mock.patch.object(clones, 'release_parent') as release:
        drv.delete_volume(volume)  # someone else deleted it: success
    release.assert_not_called()


def test_delete_busy_volume(drv, fake_ceph):
    volume = fakes.Volume()
    fake_ceph.add_image(volume.name).watchers.append({'addr': 'client'})
    with pytest.raises(exception.VolumeIsBusy):
        drv.delete_volume(volume)
    assert fake_ceph.find(volume.name) is not None


def test_delete_volume_with_clones_is_deferred(drv, fake_ceph):
    volume = fakes.Volume()
    state = fake_ceph.add_image(volume.name)
    fake_ceph.add_snap(state, 'thunder-clone-1')
    fake_ceph.add_clone(state, 'thunder-clone-1', 'child')
    drv.delete_volume(volume)
    assert fake_ceph.names() == ['child']
    assert fake_ceph.trash() == [volume.name]


def test_extend_volume(drv, fake_ceph):
    volume = fakes.Volume(size=1)
    fake_ceph.add_image(volume.name, size=GiB)
    drv.extend_volume(volume, 5)
    assert fake_ceph.find(volume.name).size == 5 * GiB


def test_extend_volume_never_shrinks(drv, fake_ceph):
    volume = fakes.Volume(size=1)
    fake_ceph.add_image(volume.name, size=8 * GiB)
    drv.extend_volume(volume, 5)
    assert fake_ceph.find(volume.name).size == 8 * GiB


def test_extend_volume_too_large(make_driver, fake_ceph):
    drv = make_driver(max_over_subscription_ratio='1.0')
    volume = fakes.Volume(size=1)
    fake_ceph.add_image(volume.name, size=GiB)
    with pytest.raises(VBAE, match='does not fit'):
        drv.extend_volume(volume, 2000)
    assert fake_ceph.find(volume.name).size == GiB


def test_extend_missing_volume(drv):
    with pytest.raises(fakes.rbd.ImageNotFound):
        drv.extend_volume(fakes.Volume(), 2)


# -- snapshots ----------------------------------------------------------------

def test_create_snapshot(drv, fake_ceph):
    volume = fakes.Volume()
    state = fake_ceph.add_image(volume.name)
    snapshot = fakes.Snapshot(volume)
    drv.create_snapshot(snapshot)
    drv.create_snapshot(snapshot)  # a retry is harmless
    assert list(state.snaps) == [snapshot.name]
    assert state.snaps[snapshot.name].protected


def test_create_snapshot_of_missing_volume(drv):
    with pytest.raises(fakes.rbd.ImageNotFound):
        drv.create_snapshot(fakes.Snapshot(fakes.Volume()))


def test_delete_snapshot(drv, fake_ceph):
    volume = fakes.Volume()
    state = fake_ceph.add_image(volume.name)
    snapshot = fakes.Snapshot(volume)
    fake_ceph.add_snap(state, snapshot.name)
    drv.delete_snapshot(snapshot)
    assert state.snaps == {}


def test_delete_snapshot_with_clones_is_retired(drv, fake_ceph):
    volume = fakes.Volume()
    state = fake_ceph.add_image(volume.name)
    snapshot = fakes.Snapshot(volume)
    fake_ceph.add_snap(state, snapshot.name)
    child = fakes.Volume()
    fake_ceph.add_clone(state, snapshot.name, child.name)
    drv.delete_snapshot(snapshot)
    retired = rbd_layout.RETIRED_SNAP_PREFIX + snapshot.name
    assert list(state.snaps) == [retired]
    # The retired snapshot goes with its last clone.
    drv.delete_volume(child)
    assert state.snaps == {}
    assert fake_ceph.names() == [volume.name]


def test_delete_snapshot_already_gone(drv, fake_ceph):
    volume = fakes.Volume()
    state = fake_ceph.add_image(volume.name)
    fake_ceph.add_snap(state, 'snapshot-other')
    drv.delete_snapshot(fakes.Snapshot(volume))
    assert list(state.snaps) == ['snapshot-other']


def test_delete_snapshot_of_deleted_volume(drv, fake_ceph):
    with mock.patch.object(driver.LOG, 'info') as info:
        drv.delete_snapshot(fakes.Snapshot(fakes.Volume()))
    assert 'is gone' in info.call_args.args[0]


def test_revert_to_snapshot(drv, fake_ceph):
    volume = fakes.Volume(size=1)
    state = fake_ceph.add_image(volume.name, size=GiB)
    snapshot = fakes.Snapshot(volume)
    drv.create_snapshot(snapshot)
    # The volume grew after the snapshot; the revert keeps its size.
    volume.size = 3
    state.size = 3 * GiB
    with mock.patch.object(fakes.FakeImage, 'rollback_to_snap',
                           autospec=True,
                           side_effect=fakes.FakeImage.rollback_to_snap) \
            as rollback:
        drv.revert_to_snapshot(None, volume, snapshot)
    assert rollback.call_args.args[1] == snapshot.name
    assert state.size == 3 * GiB


def test_revert_to_missing_snapshot(drv, fake_ceph):
    volume = fakes.Volume()
    fake_ceph.add_image(volume.name)
    with pytest.raises(fakes.rbd.ImageNotFound):
        drv.revert_to_snapshot(None, volume, fakes.Snapshot(volume))


def test_snapshot_revert_needs_no_temp_snapshot(drv):
    assert drv.snapshot_revert_use_temp_snapshot() is False


# -- connections --------------------------------------------------------------

def test_initialize_connection(make_driver, keyring):
    secret = str(uuid.uuid4())
    drv, _looping = setup_driver(
        make_driver, thunder_rbd_user='cinder',
        thunder_rbd_keyring_conf=keyring,
        thunder_rbd_secret_uuid=secret, thunder_rbd_cluster_name='prod',
        thunder_rbd_pool='fast')
    volume = fakes.Volume()
    info = drv.initialize_connection(volume, {'host': 'compute-1'})
    assert info['driver_volume_type'] == 'rbd'
    data = info['data']
    assert data == {
        'name': 'fast/%s' % volume.name,
        'hosts': ['192.0.2.1'], 'ports': ['6789'],
        'cluster_name': 'prod',
        'auth_enabled': True, 'auth_username': 'cinder',
        'secret_type': 'ceph', 'secret_uuid': secret,
        'volume_id': volume.id, 'discard': True,
        'keyring': open(keyring).read(),
    }


def test_initialize_connection_without_cephx(drv):
    data = drv.initialize_connection(fakes.Volume(), {})['data']
    assert data['auth_enabled'] is False
    assert data['auth_username'] is None
    assert 'keyring' not in data


def test_connection_info_satisfies_os_brick(drv, fake_ceph):
    """os-brick's RBD connector builds its configuration from our info."""
    fake_ceph.mon['mon dump']['mons'].append({'addr': '[2001:db8::2]:6789/0'})
    volume = fakes.Volume()
    data = drv.initialize_connection(volume, {})['data']
    connector = brick_rbd.RBDConnector(None)
    conf_path = connector._create_ceph_conf(
        data['hosts'], data['ports'], data['cluster_name'],
        data['auth_username'], data.get('keyring'))
    try:
        with open(conf_path) as f:
            text = f.read()
    finally:
        os.unlink(conf_path)
    assert 'mon_host = 192.0.2.1:6789,[2001:db8::2]:6789' in text
    # What os-brick splits 'name' into.
    assert data['name'].split('/') == ['volumes', volume.name]


def test_connection_info_unreachable_cluster(drv, fake_ceph):
    fake_ceph.errors['connect'] = fakes.rados.TimedOut('timed out')
    with pytest.raises(VBAE):
        drv.initialize_connection(fakes.Volume(), {})


@pytest.mark.parametrize('call', [
    lambda d, v: d.terminate_connection(v, {'host': 'h'}),
    lambda d, v: d.terminate_connection(v, None, force=True),
    lambda d, v: d.create_export(None, v, {}),
    lambda d, v: d.ensure_export(None, v),
    lambda d, v: d.remove_export(None, v),
    lambda d, v: d.unmanage(v),
])
def test_noop_operations(drv, fake_ceph, call):
    """Nothing to export or tear down: librbd clients connect directly."""
    assert call(drv, fakes.Volume()) is None
    driver.cluster_mod.rados.Rados.assert_not_called()


# -- manage -------------------------------------------------------------------

@pytest.mark.parametrize('ref', [{}, {'source-name': ''},
                                 {'source-name': None},
                                 {'source-name': ['x']},
                                 {'source-id': 'abc'}])
def test_manage_existing_needs_source_name(drv, fake_ceph, ref):
    for call in (drv.manage_existing, drv.manage_existing_get_size):
        with pytest.raises(exception.ManageExistingInvalidReference) as info:
            call(fakes.Volume(), ref)
        assert 'source-name' in str(info.value)


def test_manage_existing_not_found(drv, fake_ceph):
    for call in (drv.manage_existing, drv.manage_existing_get_size):
        with pytest.raises(exception.ManageExistingInvalidReference) as info:
            call(fakes.Volume(), {'source-name': 'legacy-disk'})
        assert 'no RBD image legacy-disk in the pool' in str(info.value)


def test_manage_existing(drv, fake_ceph, qos):
    fake_ceph.add_image('legacy-disk', size=3 * GiB + 1)
    qos.return_value = {'consumer': 'back-end',
                        'specs': {'total_bytes_sec': 10}}
    volume = fakes.Volume(multiattach=True,
                          volume_type={'qos_specs_id': 'q'})
    ref = {'source-name': 'legacy-disk'}
    assert drv.manage_existing_get_size(volume, ref) == 4
    assert drv.manage_existing(volume, ref) == {}
    assert fake_ceph.names() == [volume.name]
    state = fake_ceph.find(volume.name)
    assert not state.features & SINGLE_WRITER  # multiattach-safe now
    assert state.features & fakes.RBD_FEATURE_LAYERING
    assert state.metadata == {'conf_rbd_qos_bps_limit': '10'}


def test_get_manageable_volumes(drv, fake_ceph):
    managed_id = str(uuid.uuid4())
    free_id = str(uuid.uuid4())
    fake_ceph.add_image('volume-%s' % managed_id, size=GiB)
    fake_ceph.add_image('volume-%s' % free_id, size=2 * GiB)
    sealed = fake_ceph.add_image('image-volume', size=3 * GiB)
    sealed.metadata[rbd_layout.META_SEALED_SNAP] = 'thunder-clone-1'
    fake_ceph.add_image('attached', size=GiB // 2).watchers.append({})
    fake_ceph.add_image('legacy', size=5 * GiB)
    entries = drv.get_manageable_volumes([{'id': managed_id}], None, 10, 0,
                                         ['size'], ['asc'])
    by_name = {e['reference']['source-name']: e for e in entries}
    assert [e['size'] for e in entries] == [1, 1, 2, 3, 5]
    assert by_name['volume-%s' % managed_id]['cinder_id'] == managed_id
    assert by_name['volume-%s' % managed_id]['reason_not_safe'] == \
        'already managed'
    assert by_name['volume-%s' % free_id]['cinder_id'] is None
    assert by_name['image-volume']['reason_not_safe'] == \
        'image-volume of the thunder store'
    assert by_name['attached']['reason_not_safe'] == 'volume in use'
    safe = sorted(n for n, e in by_name.items() if e['safe_to_manage'])
    assert safe == sorted(['legacy', 'volume-%s' % free_id])
    for entry in by_name.values():
        assert entry['safe_to_manage'] is (entry['reason_not_safe'] is None)
        assert entry['extra_info'] is None


def test_get_manageable_volumes_pagination(drv, fake_ceph):
    for name in 'abcde':
        fake_ceph.add_image(name)
    entries = drv.get_manageable_volumes([], {'source-name': 'b'}, 2, 1,
                                         ['reference'], ['asc'])
    assert [e['reference']['source-name'] for e in entries] == ['d', 'e']


def test_get_manageable_volumes_skips_vanishing_images(drv, fake_ceph):
    fake_ceph.add_image('a')
    fake_ceph.add_image('b')
    fake_ceph.errors[('Image', 'a')] = fakes.rbd.ImageNotFound('a')
    entries = drv.get_manageable_volumes([], None, 10, 0, ['size'], ['asc'])
    assert [e['reference']['source-name'] for e in entries] == ['b']
