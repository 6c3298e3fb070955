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

"""Image-volumes that are not on RBD, attached to the Glance host by os-brick.

The device os-brick attaches (iSCSI, FC, NVMe-oF...) belongs to root; the
store takes ownership of it through rootwrap for as long as it is attached,
as glance_store's cinder driver does.
"""

import os
import platform
import shlex
import socket
import sys

from glance_store import exceptions
from glance_store.i18n import _
from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_utils import importutils

connector = importutils.try_import('os_brick.initiator.connector')
priv_context = importutils.try_import('oslo_privsep.priv_context')

LOG = logging.getLogger(__name__)


def root_helper(conf):
    return 'sudo glance-rootwrap %s' % conf.thunder_store_rootwrap_config


def _my_ip(host):
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (socket.gaierror, IndexError):
        return '127.0.0.1'


def basic_connector(conf):
    """A connector that needs no privileges: enough for ``rbd`` backends.

    ``do_local_attach: False`` asks for connection info to be used through
    librbd, not mapped by the kernel.
    """
    host = socket.gethostname()
    return {'host': host, 'ip': _my_ip(host),
            'platform': platform.machine(), 'os_type': sys.platform,
            'multipath': conf.thunder_store_use_multipath,
            'enforce_multipath': conf.thunder_store_enforce_multipath,
            'do_local_attach': False}


def full_connector(conf):
    """os-brick's connector properties (initiator names, NQNs...)."""
    if connector is None:
        raise exceptions.BackendException(
            _('os-brick is not installed: the thunder store cannot attach '
              'image-volumes that are not on Ceph RBD.'))
    host = socket.gethostname()
    return connector.get_connector_properties(
        root_helper(conf), _my_ip(host), conf.thunder_store_use_multipath,
        conf.thunder_store_enforce_multipath, host=host)


class BrickVolume:
    """A block device attached with os-brick, opened as a file."""

    # What a new volume holds depends on the backend (a thick LVM volume
    # may hold old data): the store writes every byte.
    reads_zeros_unwritten = False

    def __init__(self, connection_info, conf, read_only=False):
        if connector is None or priv_context is None:
            raise exceptions.BackendException(
                _('os-brick and oslo.privsep are needed to attach '
                  '%(protocol)s image-volumes.') % {
                      'protocol': connection_info.get('driver_volume_type')})
        self.protocol = connection_info['driver_volume_type']
        self._data = connection_info['data']
        self._helper = root_helper(conf)
        priv_context.init(root_helper=shlex.split(self._helper))
        self._connector = connector.InitiatorConnector.factory(
            self.protocol, self._helper,
            use_multipath=conf.thunder_store_use_multipath,
            device_scan_attempts=3)
        self._device = self._connector.connect_volume(self._data)
        self._file = None
        self._chowned = False
        try:
            self.path = self._device['path']
            self._chown(os.getuid())
            self._chowned = True
            self._file = open(self.path, 'rb' if read_only else 'r+b',
                              buffering=0)
        except Exception:
            self.close()
            raise

    def _chown(self, uid):
        processutils.execute('chown', str(uid), self.path, run_as_root=True,
                             root_helper=self._helper)

    def size(self):
        return os.lseek(self._file.fileno(), 0, os.SEEK_END)

    def refresh(self):
        self._connector.extend_volume(self._data)

    def read(self, offset, length):
        return os.pread(self._file.fileno(), length, offset)

    def write(self, offset, data):
        view = memoryview(data)
        while view:
            written = os.pwrite(self._file.fileno(), view, offset)
            view = view[written:]
            offset += written

    def flush(self):
        os.fsync(self._file.fileno())

    def grow(self, size):
        """A device is as large as Cinder made it: False (Cinder extends)."""
        return False

    def seal(self, glance_image_id):
        """Only RBD image-volumes are sealed; nothing to do here."""
        return None

    def pool_full(self):
        """A full backend fails writes with ENOSPC here: nothing to ask."""
        return False

    def close(self):
        """Close and detach; never raises."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                LOG.warning('Closing %s failed.', self.path, exc_info=True)
            self._file = None
        if self._chowned:
            self._chowned = False
            try:
                self._chown(0)
            except Exception:
                LOG.warning('Could not give %s back to root.', self.path,
                            exc_info=True)
        if self._device is not None:
            device, self._device = self._device, None
            try:
                self._connector.disconnect_volume(self._data, device,
                                                  force=True)
            except Exception:
                LOG.exception('Detaching %s failed.', device.get('path'))
