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

"""The connection to Ceph and the errors that name their fix."""

import threading
import time
from unittest import mock

from cinder import exception
import pytest

from cinder_thunder_driver import base
from cinder_thunder_driver import cluster as cluster_mod
from tests.unit.cinder_thunder_driver import fakes

VBAE = exception.VolumeBackendAPIException


# -- prerequisites ------------------------------------------------------------

@pytest.mark.parametrize('module', ['rados', 'rbd'])
def test_missing_bindings(cluster, module):
    with mock.patch.object(cluster_mod, module, None):
        with pytest.raises(VBAE, match='install python3-rados and '
                                       'python3-rbd'):
            cluster.check_prerequisites()


def test_missing_ceph_conf(make_conf, tmp_path):
    path = str(tmp_path / 'nope.conf')
    cluster = cluster_mod.Cluster(make_conf(thunder_rbd_ceph_conf=path))
    with pytest.raises(VBAE) as info:
        cluster.check_prerequisites()
    assert path in str(info.value)
    assert 'set thunder_rbd_ceph_conf' in str(info.value)


def test_missing_keyring(make_conf, tmp_path):
    path = str(tmp_path / 'ceph.client.cinder.keyring')
    cluster = cluster_mod.Cluster(make_conf(thunder_rbd_keyring_conf=path,
                                            thunder_rbd_user='cinder'))
    with pytest.raises(VBAE) as info:
        cluster.check_prerequisites()
    message = str(info.value)
    assert path in message and 'cinder' in message
    assert 'set thunder_rbd_keyring_conf' in message


def test_prerequisites_met(make_conf, tmp_path):
    keyring = tmp_path / 'keyring'
    keyring.write_text('[client.cinder]\nkey = x\n')
    cluster = cluster_mod.Cluster(make_conf(
        thunder_rbd_keyring_conf=str(keyring)))
    cluster.check_prerequisites()  # no exception


def test_failures_are_logged(make_conf):
    cluster = cluster_mod.Cluster(make_conf(
        thunder_rbd_ceph_conf='/nonexistent/ceph.conf'))
    with mock.patch.object(base.LOG, 'error') as log:
        with pytest.raises(VBAE, match='/nonexistent/ceph.conf does not '
                                       'exist: set thunder_rbd_ceph_conf'):
            cluster.check_prerequisites()
    log.assert_called_once_with(
        'Ceph configuration file /nonexistent/ceph.conf does not exist: '
        'set thunder_rbd_ceph_conf.')


# -- connecting ---------------------------------------------------------------

def test_client_connects_once_with_timeouts(make_conf, fake_ceph,
                                            ceph_conf):
    conf = make_conf(thunder_rbd_user='cinder',
                     thunder_rbd_cluster_name='prod',
                     thunder_rados_connect_timeout=7)
    cluster = cluster_mod.Cluster(conf)
    rados = cluster_mod.rados
    client = cluster.client()
    assert cluster.client() is client
    rados.Rados.assert_called_once_with(
        rados_id='cinder', clustername='prod', conffile=ceph_conf,
        conf={'rados_osd_op_timeout': '7', 'rados_mon_op_timeout': '7',
              'client_mount_timeout': '7'})
    assert client.state == 'connected'
    assert fake_ceph.connected == 1


def test_client_passes_the_keyring(make_conf, tmp_path):
    keyring = tmp_path / 'keyring'
    keyring.write_text('key')
    cluster = cluster_mod.Cluster(make_conf(
        thunder_rbd_keyring_conf=str(keyring)))
    assert cluster.client().conf['keyring'] == str(keyring)


def test_client_checks_prerequisites_first(make_conf, tmp_path):
    cluster = cluster_mod.Cluster(make_conf(
        thunder_rbd_ceph_conf=str(tmp_path / 'missing')))
    with pytest.raises(VBAE, match='thunder_rbd_ceph_conf'):
        cluster.client()
    cluster_mod.rados.Rados.assert_not_called()


def test_concurrent_clients_share_one_connection(cluster, fake_ceph):
    rados = cluster_mod.rados
    make = rados.Rados.side_effect

    def slow(**kwargs):
        time.sleep(0.05)  # widen the window for a second connection
        return make(**kwargs)

    rados.Rados.side_effect = slow
    got = []
    threads = [threading.Thread(target=lambda: got.append(cluster.client()))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len({id(c) for c in got}) == 1
    assert cluster_mod.rados.Rados.call_count == 1
    assert fake_ceph.connected == 1


def test_unloadable_configuration(cluster, fake_ceph):
    fake_ceph.errors['Rados'] = fakes.rados.Error('bad conf line 3')
    with pytest.raises(VBAE) as info:
        cluster.client()
    assert 'Cannot load Ceph configuration' in str(info.value)
    assert 'bad conf line 3' in str(info.value)


def test_unreachable_monitors(make_conf, fake_ceph, ceph_conf):
    cluster = cluster_mod.Cluster(make_conf(thunder_rados_connect_timeout=3))
    fake_ceph.errors['connect'] = fakes.rados.TimedOut('timed out')
    with pytest.raises(VBAE) as info:
        cluster.client()
    message = str(info.value)
    assert 'Could not reach the Ceph monitors' in message
    assert ceph_conf in message and 'within 3 s' in message
    assert 'mon_host' in message
    # The half-open handle was shut down and nothing is cached: the next
    # call tries again and succeeds once the monitors are back.
    assert fake_ceph.connected == 0
    assert cluster._client is None
    del fake_ceph.errors['connect']
    assert cluster.client().state == 'connected'


@pytest.mark.parametrize('error', ['PermissionDeniedError',
                                   'PermissionError', 'ObjectNotFound'])
def test_refused_credentials(make_conf, fake_ceph, error):
    cluster = cluster_mod.Cluster(make_conf(thunder_rbd_user='cinder'))
    fake_ceph.errors['connect'] = getattr(fakes.rados, error)('denied')
    with pytest.raises(VBAE) as info:
        cluster.client()
    message = str(info.value)
    assert 'refused the connection as user cinder' in message
    assert 'thunder_rbd_user' in message
    assert 'thunder_rbd_keyring_conf' in message
    assert cluster._client is None


def test_refused_default_user(cluster, fake_ceph):
    fake_ceph.errors['connect'] = fakes.rados.PermissionDeniedError('no')
    with pytest.raises(VBAE, match='as user admin'):
        cluster.client()


def test_other_connection_errors(cluster, fake_ceph):
    fake_ceph.errors['connect'] = fakes.rados.OSError('network', errno=101)
    with pytest.raises(VBAE) as info:
        cluster.client()
    assert 'Cannot connect to Ceph cluster ceph' in str(info.value)
    assert cluster._client is None


def test_close(cluster, fake_ceph):
    cluster.close()  # never connected: nothing to do
    client = cluster.client()
    cluster.close()
    assert client.state == 'shutdown'
    assert fake_ceph.connected == 0
    assert cluster.client() is not client  # reconnects


def test_calls_go_through_tpool_wrap(cluster):
    with mock.patch.object(cluster_mod.utils, 'tpool_wrap',
                           side_effect=lambda obj: obj) as wrap:
        client = cluster.client()
        cluster.rbd()
    wrapped = [c.args[0] for c in wrap.call_args_list]
    assert client in wrapped
    assert any(isinstance(o, fakes.FakeRBD) for o in wrapped)


# -- pools and images ---------------------------------------------------------

def test_ioctx_default_and_explicit_pool(cluster, fake_ceph):
    with cluster.ioctx() as ioctx:
        assert ioctx.pool == 'volumes'
    assert ioctx.closed
    with cluster.ioctx('images') as ioctx:
        assert ioctx.pool == 'images'


def test_ioctx_closed_on_error(cluster, fake_ceph):
    with pytest.raises(RuntimeError):
        with cluster.ioctx():
            raise RuntimeError('boom')
    assert fake_ceph.open_ioctxs[-1].closed


def test_wrong_pool(make_conf):
    cluster = cluster_mod.Cluster(make_conf(thunder_rbd_pool='volumez',
                                            thunder_rbd_cluster_name='prod'))
    with pytest.raises(VBAE) as info:
        with cluster.ioctx():
            pass
    message = str(info.value)
    assert 'RBD pool volumez does not exist in Ceph cluster prod' in message
    assert 'ceph osd pool create volumez' in message
    assert 'rbd pool init volumez' in message
    assert 'thunder_rbd_pool' in message


def test_pool_property(make_conf):
    assert cluster_mod.Cluster(make_conf(thunder_rbd_pool='x')).pool == 'x'


def test_image_by_name_and_id(cluster, fake_ceph):
    state = fake_ceph.add_image('vol')
    fake_ceph.add_snap(state, 's')
    with cluster.ioctx() as ioctx:
        with cluster.image(ioctx, 'vol') as image:
            assert image.id() == state.id
            assert not image.read_only
        assert image.closed
        with cluster.image(ioctx, image_id=state.id, snapshot='s',
                           read_only=True) as image:
            assert image.state is state and image.read_only
            assert image.snapshot == 's'
    cluster_mod.rbd.Image.assert_called_with(
        ioctx, None, snapshot='s', read_only=True, image_id=state.id)


def test_image_closed_on_error(cluster, fake_ceph):
    fake_ceph.add_image('vol')
    with cluster.ioctx() as ioctx:
        with pytest.raises(KeyError):
            with cluster.image(ioctx, 'vol') as image:
                raise KeyError('x')
    assert image.closed


def test_missing_image(cluster):
    with cluster.ioctx() as ioctx:
        with pytest.raises(fakes.rbd.ImageNotFound):
            with cluster.image(ioctx, 'nope'):
                pass


# -- cluster facts ------------------------------------------------------------

def test_fsid(cluster):
    assert cluster.fsid() == fakes.FSID


def test_mon_command(cluster, fake_ceph):
    assert cluster.mon_command('osd pool get-quota', pool='p') == \
        {'quota_max_bytes': 0}
    assert fake_ceph.mon_calls[-1] == {'prefix': 'osd pool get-quota',
                                       'pool': 'p', 'format': 'json'}


def test_mon_command_failure(cluster, fake_ceph):
    fake_ceph.mon_failures['df'] = (-110, 'timed out')
    with pytest.raises(VBAE, match='Ceph command df failed: timed out'):
        cluster.mon_command('df')
    fake_ceph.mon_failures['df'] = (-1, '')
    with pytest.raises(VBAE, match='failed: -1'):
        cluster.mon_command('df')


def test_monitors(cluster, fake_ceph):
    fake_ceph.mon['mon dump'] = {'mons': [
        # v2 and v1: the v1 address is what os-brick and librbd-in-qemu use.
        {'addr': '192.0.2.1:6789/0', 'public_addrs': {'addrvec': [
            {'type': 'v2', 'addr': '192.0.2.1:3300', 'nonce': 0},
            {'type': 'v1', 'addr': '192.0.2.1:6789', 'nonce': 0}]}},
        # Only the legacy field.
        {'addr': '192.0.2.2:6790/123'},
        # IPv6.
        {'addr': '[2001:db8::3]:6789/0', 'public_addrs': {'addrvec': [
            {'type': 'v1', 'addr': '[2001:db8::3]:6789'}]}},
        # v2 only in the vector: fall back to addr.
        {'addr': '192.0.2.4:6789/0', 'public_addrs': {'addrvec': [
            {'type': 'v2', 'addr': '192.0.2.4:3300'}]}},
    ]}
    hosts, ports = cluster.monitors()
    assert hosts == ['192.0.2.1', '192.0.2.2', '2001:db8::3', '192.0.2.4']
    assert ports == ['6789', '6790', '6789', '6789']
