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

"""The driver's connection to its Ceph cluster.

One ``rados.Rados`` handle per driver, opened once and shared by every
operation (librados handles are thread-safe and reconnect by themselves);
pools and images are opened per operation. Every blocking librados/librbd
call goes through cinder's ``tpool_wrap`` so an eventlet-based
cinder-volume keeps serving while Ceph works.

Failures to reach the cluster become ``VolumeBackendAPIException`` with a
message naming the setting to fix.
"""

import contextlib
import json
import os
import threading

from cinder.i18n import _
from cinder import utils
from oslo_log import log as logging
from oslo_utils import importutils

from cinder_thunder_driver import base

rados = importutils.try_import('rados')
rbd = importutils.try_import('rbd')

LOG = logging.getLogger(__name__)


class Cluster:
    """A lazily opened, shared connection to one Ceph cluster."""

    def __init__(self, configuration):
        self._conf = configuration
        self._client = None
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------

    @property
    def pool(self):
        return self._conf.thunder_rbd_pool

    def check_prerequisites(self):
        """Fail early, with the fix, when the host cannot reach Ceph."""
        if rados is None or rbd is None:
            raise base.backend_error(_(
                'The Ceph Python bindings are not importable: install '
                'python3-rados and python3-rbd (they must match the Python '
                'cinder-volume runs on).'))
        conf_path = self._conf.thunder_rbd_ceph_conf
        if not os.path.isfile(conf_path):
            raise base.backend_error(_(
                'Ceph configuration file %(path)s does not exist: set '
                'thunder_rbd_ceph_conf.') % {'path': conf_path})
        keyring = self._conf.thunder_rbd_keyring_conf
        if keyring and not os.path.isfile(keyring):
            raise base.backend_error(_(
                'Keyring %(path)s of Ceph user %(user)s does not exist: set '
                'thunder_rbd_keyring_conf to the keyring of '
                'thunder_rbd_user.') % {
                    'path': keyring, 'user': self._conf.thunder_rbd_user})

    def client(self):
        """The connected ``rados.Rados`` handle, connecting if needed."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self):
        self.check_prerequisites()
        conf = self._conf
        timeout = str(conf.thunder_rados_connect_timeout)
        options = {'rados_osd_op_timeout': timeout,
                   'rados_mon_op_timeout': timeout,
                   'client_mount_timeout': timeout}
        if conf.thunder_rbd_keyring_conf:
            options['keyring'] = conf.thunder_rbd_keyring_conf
        LOG.debug('Connecting to Ceph cluster %(name)s as %(user)s '
                  '(conf %(conf)s)',
                  {'name': conf.thunder_rbd_cluster_name,
                   'user': conf.thunder_rbd_user or 'client.admin',
                   'conf': conf.thunder_rbd_ceph_conf})
        try:
            client = rados.Rados(rados_id=conf.thunder_rbd_user,
                                 clustername=conf.thunder_rbd_cluster_name,
                                 conffile=conf.thunder_rbd_ceph_conf,
                                 conf=options)
        except rados.Error as e:
            raise base.backend_error(_(
                'Cannot load Ceph configuration %(path)s: %(err)s') % {
                    'path': conf.thunder_rbd_ceph_conf, 'err': e})
        client = utils.tpool_wrap(client)
        try:
            client.connect()
        except rados.TimedOut:
            client.shutdown()
            raise base.backend_error(_(
                'Could not reach the Ceph monitors listed in %(path)s within '
                '%(timeout)s s: check mon_host and that the monitors are up '
                'and reachable from this host.') % {
                    'path': conf.thunder_rbd_ceph_conf, 'timeout': timeout})
        except (rados.PermissionDeniedError, rados.PermissionError,
                rados.ObjectNotFound) as e:
            client.shutdown()
            raise base.backend_error(_(
                'Ceph refused the connection as user %(user)s (%(err)s): '
                'check thunder_rbd_user and thunder_rbd_keyring_conf.') % {
                    'user': conf.thunder_rbd_user or 'admin', 'err': e})
        except rados.Error as e:
            client.shutdown()
            raise base.backend_error(_(
                'Cannot connect to Ceph cluster %(name)s: %(err)s') % {
                    'name': conf.thunder_rbd_cluster_name, 'err': e})
        return client

    def close(self):
        with self._lock:
            if self._client is not None:
                self._client.shutdown()
                self._client = None

    # -- pools and images ---------------------------------------------

    @contextlib.contextmanager
    def ioctx(self, pool=None):
        """An I/O context on ``pool`` (the configured pool by default)."""
        pool = pool or self.pool
        try:
            ioctx = self.client().open_ioctx(pool)
        except rados.ObjectNotFound:
            raise base.backend_error(_(
                'RBD pool %(pool)s does not exist in Ceph cluster %(name)s: '
                'create it (ceph osd pool create %(pool)s && rbd pool init '
                '%(pool)s) or set thunder_rbd_pool.') % {
                    'pool': pool, 'name': self._conf.thunder_rbd_cluster_name})
        try:
            yield ioctx
        finally:
            ioctx.close()

    @contextlib.contextmanager
    def image(self, ioctx, name=None, image_id=None, snapshot=None,
              read_only=False):
        """An open RBD image (by name or id), closed on exit."""
        image = utils.tpool_wrap(rbd.Image(ioctx, name, snapshot=snapshot,
                                           read_only=read_only,
                                           image_id=image_id))
        try:
            yield image
        finally:
            image.close()

    def rbd(self):
        """librbd's pool-level API (create, clone, remove, trash...)."""
        return utils.tpool_wrap(rbd.RBD())

    # -- cluster facts -------------------------------------------------

    def fsid(self):
        return self.client().get_fsid()

    def mon_command(self, prefix, **args):
        """Run a monitor command and return its decoded JSON answer."""
        args.update(prefix=prefix, format='json')
        ret, out, err = self.client().mon_command(json.dumps(args), b'')
        if ret:
            raise base.backend_error(_(
                'Ceph command %(cmd)s failed: %(err)s') % {
                    'cmd': prefix, 'err': err or ret})
        return json.loads(out)

    def monitors(self):
        """Monitor (hosts, ports) for the connection info."""
        monmap = self.mon_command('mon dump')
        hosts, ports = [], []
        for mon in monmap['mons']:
            addr = _v1_addr(mon)
            host, port = addr.rsplit(':', 1)
            hosts.append(host.strip('[]'))
            ports.append(port)
        return hosts, ports


def _v1_addr(mon):
    """host:port of a monitor's legacy (v1) address, which os-brick uses."""
    for addrvec in mon.get('public_addrs', {}).get('addrvec', []):
        if addrvec.get('type') == 'v1':
            return addrvec['addr']
    # "addr" is "host:port/nonce".
    return mon['addr'].split('/', 1)[0]
