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

"""The Ceph harness itself, and the driver on a cephx cluster.

The session's cluster (conftest) runs with ``auth none``; this module starts
a second one with cephx, as production clusters run, and uses it through
the ``client.cinder`` user the harness creates.
"""

import os
import subprocess

from cinder import exception
from oslo_utils import units
import pytest

from tests.harness.standalone import Volume
from thunder_stack import ceph as local_ceph


@pytest.fixture(scope='module')
def cephx_cluster(tmp_path_factory):
    cluster = local_ceph.LocalCeph(str(tmp_path_factory.mktemp('cephx')),
                                   pools=('volumes',), auth='cephx')
    cluster.start()
    yield cluster
    cluster.stop()


def _pids(cluster):
    return {d: cluster._pid(d) for d in local_ceph.DAEMONS}


def test_start_is_idempotent_and_stop_ends_every_daemon(cephx_cluster):
    pids = _pids(cephx_cluster)
    assert None not in pids.values()
    fsid = cephx_cluster.fsid()
    cephx_cluster.start()
    assert _pids(cephx_cluster) == pids
    assert cephx_cluster.fsid() == fsid
    assert cephx_cluster.status()['running'] == list(local_ceph.DAEMONS)

    # Stop by PID, then start again: a memstore cluster comes back empty
    # but working, with a new identity.
    cephx_cluster.stop()
    for pid in pids.values():
        assert not os.path.exists('/proc/%d/cmdline' % pid) or \
            open('/proc/%d/stat' % pid).read().split(')')[1].split()[0] \
            == 'Z'
    assert cephx_cluster.running() == []
    cephx_cluster.stop()  # idempotent
    cephx_cluster.start()
    assert cephx_cluster.running() == list(local_ceph.DAEMONS)
    assert cephx_cluster.fsid() != fsid


def test_start_adds_the_pools_a_cluster_lacks(cephx_cluster):
    """A cluster made before a pool was wanted gets it (and the caps)."""
    wider = local_ceph.LocalCeph(cephx_cluster.workdir,
                                 pools=('volumes', 'vms'), auth='cephx')
    wider.start()
    assert wider.running() == list(local_ceph.DAEMONS)
    assert 'vms' in wider.ceph_json('osd', 'pool', 'ls')
    caps = wider.ceph_json('auth', 'get', 'client.%s' % wider.user)
    assert caps[0]['caps']['osd'] == (
        'profile rbd pool=volumes, profile rbd pool=vms')
    # And client.cinder may write there with its key.
    wider.rbd('create', '--size', '4M', 'vms/probe', '--id', wider.user,
              '--keyring', wider.user_keyring)
    wider.rbd('rm', 'vms/probe')


def test_cephx_cluster_refuses_clients_without_a_key(cephx_cluster,
                                                     tmp_path):
    conf = tmp_path / 'ceph.conf'
    with open(cephx_cluster.conf_path) as f:
        conf.write_text(f.read().replace(cephx_cluster.admin_keyring,
                                         str(tmp_path / 'none')))
    result = subprocess.run(['ceph', '-c', str(conf), '--connect-timeout',
                             '10', 'health'], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert 'error connecting to the cluster' in result.stderr
    assert 'HEALTH' not in result.stdout


def test_driver_uses_the_cinder_user_and_keyring(make_driver, cephx_cluster):
    from os_brick.initiator import connector as brick_connector
    drv = make_driver(thunder_rbd_ceph_conf=cephx_cluster.conf_path,
                      thunder_rbd_user='cinder',
                      thunder_rbd_keyring_conf=cephx_cluster.user_keyring)
    image = Volume()
    drv.create_volume(image)
    payload = os.urandom(units.Mi)
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, image.name) as rbd_image:
            rbd_image.write(payload, 0)
    clone = Volume()
    drv.create_cloned_volume(clone, image)

    info = drv.initialize_connection(clone, {})['data']
    assert info['auth_enabled'] is True
    assert info['auth_username'] == 'cinder'
    assert 'client.cinder' in info['keyring']
    # os-brick opens the clone with nothing but the connection info.
    brick = brick_connector.InitiatorConnector.factory(
        'RBD', None, do_local_attach=False)
    device = brick.connect_volume(info)
    try:
        assert device['path'].read(units.Mi) == payload
    finally:
        brick.disconnect_volume(info, device)
    assert drv.get_volume_stats(refresh=True)['backend_state'] == 'up'
    drv.delete_volume(image)
    drv.delete_volume(clone)
    drv.flattener.wait_idle(timeout=60)
    with drv.cluster.ioctx() as ioctx:
        assert list(drv.cluster.rbd().list(ioctx)) == []


def test_wrong_keyring_names_the_settings(make_driver, cephx_cluster):
    # The admin keyring holds no key for client.cinder.
    with pytest.raises(exception.VolumeBackendAPIException,
                       match='thunder_rbd_keyring_conf'):
        make_driver(thunder_rbd_ceph_conf=cephx_cluster.conf_path,
                    thunder_rbd_user='cinder',
                    thunder_rbd_keyring_conf=cephx_cluster.admin_keyring)
