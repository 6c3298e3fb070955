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

"""Opening image-volumes: librbd from connection info, os-brick otherwise."""

import os
from unittest import mock

from glance_store import exceptions
import pytest

from glance_thunder_store import brick_volume
from glance_thunder_store import rbd_volume
from glance_thunder_store import volumes as volumes_mod
from tests import fake_cinder
from tests.store_helpers import make_store

KEYRING = """[client.admin]
\tkey = ADMINKEY==
[client.cinder]
\tkey = AQCINDERKEY==
\tcaps mon = "profile rbd"
"""

DATA = {'name': 'volumes/volume-1', 'hosts': ['10.0.0.1', '::1'],
        'ports': ['6789', '6790'], 'auth_enabled': True,
        'auth_username': 'cinder', 'keyring': KEYRING,
        'cluster_name': 'ceph'}


def test_key_from_keyring():
    assert rbd_volume.key_from_keyring(KEYRING, 'cinder') == 'AQCINDERKEY=='
    assert rbd_volume.key_from_keyring(KEYRING, 'admin') == 'ADMINKEY=='
    assert rbd_volume.key_from_keyring(KEYRING, 'nova') is None
    assert rbd_volume.key_from_keyring(None, 'cinder') is None
    assert rbd_volume.key_from_keyring('key = K', None) == 'K'


def test_parse_connection():
    pool, image, kwargs = rbd_volume.parse_connection(DATA)
    assert (pool, image) == ('volumes', 'volume-1')
    assert kwargs == {
        'rados_id': 'cinder', 'clustername': 'ceph',
        'conf': {'mon_host': '[v1:10.0.0.1:6789],[v1:[::1]:6790]',
                 'key': 'AQCINDERKEY=='}}


def test_parse_connection_without_auth():
    data = dict(DATA, auth_enabled=False, keyring=None, cluster_name=None)
    _pool, _image, kwargs = rbd_volume.parse_connection(data)
    assert kwargs['rados_id'] is None
    assert kwargs['clustername'] == 'ceph'
    assert 'key' not in kwargs['conf']


@pytest.mark.parametrize('change', [
    {'name': 'no-slash'}, {'name': 'a/b/c'}, {'name': '/img'},
    {'name': None}, {'hosts': []}, {'ports': ['1']}, {'hosts': None}])
def test_malformed_connection_info(change):
    with pytest.raises(exceptions.BackendException, match='Malformed'):
        rbd_volume.parse_connection(dict(DATA, **change))


class FakeRbdError(Exception):
    pass


class FakeImageNotFound(FakeRbdError):
    pass


@pytest.fixture
def bindings():
    rados = mock.Mock(name='rados')
    rbd = mock.Mock(name='rbd')
    rbd.ImageNotFound = FakeImageNotFound
    client = rados.Rados.return_value
    client.get_fsid.return_value = 'f5f1c5f1-0000-4000-8000-000000000001'
    image = rbd.Image.return_value
    image.size.return_value = 1 << 30
    image.write.side_effect = lambda data, offset: len(data)
    image.metadata_get.side_effect = KeyError
    image.snap_exists.return_value = False
    image.is_protected_snap.return_value = False
    with mock.patch.object(rbd_volume, 'rados', rados), \
            mock.patch.object(rbd_volume, 'rbd', rbd):
        yield rados, rbd


def test_rbd_volume_open_write_seal_close(bindings):
    rados, rbd = bindings
    vol = rbd_volume.RbdVolume(DATA, timeout=7)
    kwargs = rados.Rados.call_args.kwargs
    assert kwargs['conffile'] == os.devnull
    assert kwargs['conf']['rados_osd_op_timeout'] == '7'
    assert kwargs['conf']['client_mount_timeout'] == '7'
    ioctx = rados.Rados.return_value.open_ioctx.return_value
    rados.Rados.return_value.open_ioctx.assert_called_once_with('volumes')
    rbd.Image.assert_called_once_with(ioctx, 'volume-1', read_only=False)
    vol.write(10, b'abc')
    rbd.Image.return_value.write.assert_called_once_with(b'abc', 10)
    facts = vol.seal('image-1')
    assert facts.pool == 'volumes' and facts.image == 'volume-1'
    assert facts.snapshot.startswith('thunder-clone-')
    assert facts.fsid == 'f5f1c5f1-0000-4000-8000-000000000001'
    rbd.Image.return_value.protect_snap.assert_called_once_with(
        facts.snapshot)
    vol.refresh()
    assert rbd.Image.call_count == 2
    vol.close()
    vol.close()
    rados.Rados.return_value.shutdown.assert_called_once_with()
    ioctx.close.assert_called_once_with()


@pytest.mark.parametrize('dump, full', [
    ({'flags': 'sortbitwise', 'pools': [
        {'pool_name': 'volumes', 'flags_names': 'hashpspool,full_quota'}]},
     True),
    ({'flags': 'full,sortbitwise', 'pools': []}, True),
    ({'flags': '', 'pools': [
        {'pool_name': 'volumes', 'flags_names': 'hashpspool'},
        {'pool_name': 'other', 'flags_names': 'full_quota'}]}, False),
    (None, False),
])
def test_rbd_pool_full(bindings, dump, full):
    import json
    rados, _rbd = bindings
    client = rados.Rados.return_value
    if dump is None:
        client.mon_command.side_effect = FakeRbdError('no caps')
    else:
        client.mon_command.return_value = (0, json.dumps(dump).encode(), '')
    vol = rbd_volume.RbdVolume(DATA)
    assert vol.pool_full() is full
    vol.close()


def test_rbd_short_write(bindings):
    _rados, rbd = bindings
    rbd.Image.return_value.write.side_effect = lambda data, offset: 1
    vol = rbd_volume.RbdVolume(DATA)
    with pytest.raises(exceptions.BackendException, match='Short write'):
        vol.write(0, b'abc')
    vol.close()


def test_rbd_missing_image(bindings):
    rados, rbd = bindings
    rbd.Image.side_effect = FakeImageNotFound('gone')
    with pytest.raises(exceptions.NotFound):
        rbd_volume.RbdVolume(DATA)
    rados.Rados.return_value.shutdown.assert_called_once_with()


def test_rbd_unreachable_cluster(bindings):
    rados, _rbd = bindings
    rados.Rados.return_value.connect.side_effect = FakeRbdError('timed out')
    with pytest.raises(exceptions.BackendException,
                       match=r'monitors \[v1:10.0.0.1'):
        rbd_volume.RbdVolume(DATA)
    rados.Rados.return_value.shutdown.assert_called_once_with()


def test_rbd_without_bindings():
    with mock.patch.object(rbd_volume, 'rbd', None):
        with pytest.raises(exceptions.BackendException, match='python3-rbd'):
            rbd_volume.RbdVolume(DATA)


# -- choosing the connector --------------------------------------------------


class IscsiBackend(fake_cinder.NullBackend):
    def __init__(self):
        self.connectors = []

    def initialize_connection(self, volume, connector):
        self.connectors.append(connector)
        if 'initiator' not in connector:
            raise fake_cinder.cinder_exceptions.BadRequest(
                400, 'connector needs an initiator')
        return {'driver_volume_type': 'iscsi', 'data': {'target': 'x'}}


def test_rbd_needs_no_privileged_connector(cinder, memory):
    volumes = volumes_mod.CinderVolumes(cinder, make_store().store_conf)
    volume = cinder.volumes.create(1, name='v')
    with mock.patch.object(brick_volume, 'full_connector') as full:
        with volumes.attach(volume) as attached:
            assert attached.handle.protocol == 'rbd'
    full.assert_not_called()
    connector = cinder.calls[-1][1]
    assert connector['do_local_attach'] is False
    assert cinder.connections() == 0


def test_other_protocols_go_through_os_brick(clock):
    backend = IscsiBackend()
    cinder = fake_cinder.FakeCinder(backend)
    conf = make_store().store_conf
    volumes = volumes_mod.CinderVolumes(cinder, conf)
    volume = cinder.volumes.create(1, name='v')
    handle = mock.Mock()
    with mock.patch.object(brick_volume, 'full_connector',
                           return_value={'initiator': 'iqn.1'}), \
            mock.patch.object(brick_volume, 'BrickVolume',
                              return_value=handle) as brick:
        with volumes.attach(volume, read_only=True) as attached:
            assert attached.handle is handle
    assert backend.connectors[-1] == {'initiator': 'iqn.1'}
    brick.assert_called_once_with(
        {'driver_volume_type': 'iscsi',
         'data': {'target': 'x', 'access_mode': 'rw'}}, conf,
        read_only=True)
    handle.close.assert_called_once_with()
    assert cinder.connections() == 0


def test_failed_open_disconnects(cinder, memory):
    volumes = volumes_mod.CinderVolumes(cinder, make_store().store_conf)
    volume = cinder.volumes.create(1, name='v')
    with mock.patch.object(volumes_mod.rbd_volume, 'RbdVolume',
                           side_effect=exceptions.BackendException('no')):
        with pytest.raises(exceptions.BackendException):
            volumes.attach(volume)
    assert cinder.connections() == 0


def test_brick_volume_reads_and_writes_the_device(tmp_path):
    device = tmp_path / 'sdx'
    device.write_bytes(b'\0' * 4096)
    connector = mock.Mock()
    connector.connect_volume.return_value = {'path': str(device)}
    conf = make_store().store_conf
    with mock.patch.object(brick_volume, 'connector') as brick, \
            mock.patch.object(brick_volume, 'priv_context') as priv, \
            mock.patch.object(brick_volume.processutils,
                              'execute') as execute:
        brick.InitiatorConnector.factory.return_value = connector
        info = {'driver_volume_type': 'iscsi', 'data': {'t': 1}}
        vol = brick_volume.BrickVolume(info, conf)
        vol.write(100, b'hello')
        vol.flush()
        assert vol.read(100, 5) == b'hello'
        assert vol.size() == 4096
        assert vol.seal('image') is None
        vol.refresh()
        vol.close()
    priv.init.assert_called_once_with(
        root_helper=['sudo', 'glance-rootwrap', '/etc/glance/rootwrap.conf'])
    brick.InitiatorConnector.factory.assert_called_once_with(
        'iscsi', 'sudo glance-rootwrap /etc/glance/rootwrap.conf',
        use_multipath=False, device_scan_attempts=3)
    connector.extend_volume.assert_called_once_with({'t': 1})
    connector.disconnect_volume.assert_called_once_with(
        {'t': 1}, {'path': str(device)}, force=True)
    owners = [c.args[1] for c in execute.call_args_list]
    assert owners[-1] == '0'
    assert device.read_bytes()[100:105] == b'hello'


def test_full_connector_uses_os_brick():
    conf = make_store(thunder_store_use_multipath=True).store_conf
    with mock.patch.object(brick_volume, 'connector') as brick:
        brick_volume.full_connector(conf)
    args = brick.get_connector_properties.call_args.args
    assert args[0] == 'sudo glance-rootwrap /etc/glance/rootwrap.conf'
    assert args[2] is True


def test_basic_connector():
    conf = make_store().store_conf
    props = brick_volume.basic_connector(conf)
    assert props['do_local_attach'] is False
    assert props['multipath'] is False
    assert props['host'] and props['ip']
