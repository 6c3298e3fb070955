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

"""Read and write an image-volume through librbd, from its connection info.

Cinder's ``rbd`` connection info names the monitors, the pool/image, the
Ceph user and, when the backend hands it out, the user's keyring. That is
enough to open the RBD image with librados/librbd directly: no kernel
``rbd map``, no root, and no configuration file on the Glance host (the
keyring falls back to librados' default search path, e.g.
``/etc/ceph/ceph.client.USER.keyring``, when the connection info has none).
"""

import dataclasses
import json
import os
import re

from glance_store import exceptions
from glance_store.i18n import _
from oslo_log import log as logging
from oslo_utils import importutils

from thunder_common import rbd_layout

rados = importutils.try_import('rados')
rbd = importutils.try_import('rbd')

LOG = logging.getLogger(__name__)

_KEY_LINE = re.compile(r'^\s*key\s*=\s*(\S+)\s*$')
_SECTION = re.compile(r'^\s*\[(.+)\]\s*$')


@dataclasses.dataclass(frozen=True)
class RbdFacts:
    """Where a sealed image-volume lives in Ceph."""

    fsid: str
    pool: str
    image: str
    snapshot: str


def key_from_keyring(keyring, user):
    """The secret of ``client.<user>`` in a keyring's text, or None."""
    wanted = 'client.%s' % user if user else None
    section = None
    for line in (keyring or '').splitlines():
        match = _SECTION.match(line)
        if match:
            section = match.group(1).strip()
            continue
        match = _KEY_LINE.match(line)
        if match and (wanted is None or section == wanted):
            return match.group(1)
    return None


def _mon_host(hosts, ports):
    addrs = []
    for host, port in zip(hosts, ports):
        host = str(host).strip('[]')
        if ':' in host:
            host = '[%s]' % host
        addrs.append('[v1:%s:%s]' % (host, port))
    return ','.join(addrs)


def parse_connection(data):
    """(pool, image, rados kwargs) from ``rbd`` connection data.

    :raises BackendException: if the connection info is malformed.
    """
    try:
        pool, image = data['name'].split('/')
        hosts, ports = list(data['hosts']), list(data['ports'])
    except (KeyError, ValueError, TypeError, AttributeError):
        raise exceptions.BackendException(
            _('Malformed rbd connection info: expected name POOL/IMAGE, hosts '
              'and ports'))
    if not pool or not image or not hosts or len(hosts) != len(ports):
        raise exceptions.BackendException(
            _('Malformed rbd connection info: no pool, image or monitors'))
    user = data.get('auth_username') if data.get('auth_enabled') else None
    conf = {'mon_host': _mon_host(hosts, ports)}
    key = key_from_keyring(data.get('keyring'), user)
    if key:
        conf['key'] = key
    return pool, image, dict(rados_id=user,
                             clustername=data.get('cluster_name') or 'ceph',
                             conf=conf)


class RbdVolume:
    """An open RBD image of an image-volume: read, write, seal, close."""

    protocol = 'rbd'
    # A new RBD image reads zeros wherever nothing was written.
    reads_zeros_unwritten = True

    def __init__(self, connection_data, read_only=False, timeout=30):
        if rados is None or rbd is None:
            raise exceptions.BackendException(
                _('The Ceph Python bindings (python3-rados, python3-rbd) are '
                  'not importable: the thunder store cannot read or write RBD '
                  'image-volumes.'))
        self.pool, self.name, kwargs = parse_connection(connection_data)
        self.read_only = read_only
        timeout = str(timeout)
        for option in ('rados_osd_op_timeout', 'rados_mon_op_timeout',
                       'client_mount_timeout'):
            kwargs['conf'][option] = timeout
        # An empty configuration file: everything comes from the connection
        # info. (librados reads a file named '' and fails with ENOENT, and
        # None would read /etc/ceph/ceph.conf.)
        self._client = rados.Rados(conffile=os.devnull, **kwargs)
        self._ioctx = None
        self._image = None
        try:
            self._client.connect()
            self._ioctx = self._client.open_ioctx(self.pool)
            self._open_image()
        except Exception as e:
            self.close()
            if isinstance(e, rbd.ImageNotFound):
                raise exceptions.NotFound(
                    message=_('RBD image %(pool)s/%(name)s of the '
                              'image-volume does not exist') % {
                                  'pool': self.pool, 'name': self.name})
            if isinstance(e, exceptions.GlanceStoreException):
                raise
            raise exceptions.BackendException(
                _('Cannot open RBD image %(pool)s/%(name)s through monitors '
                  '%(monitors)s: %(error)s') % {
                      'pool': self.pool, 'name': self.name,
                      'monitors': kwargs['conf']['mon_host'], 'error': e})

    def _open_image(self):
        self._image = rbd.Image(self._ioctx, self.name,
                                read_only=self.read_only)

    def size(self):
        return self._image.size()

    def refresh(self):
        """Reopen the image, to see a size changed by Cinder."""
        self._image.close()
        self._image = None
        self._open_image()

    def read(self, offset, length):
        return self._image.read(offset, length)

    def write(self, offset, data):
        written = self._image.write(bytes(data), offset)
        if written != len(data):
            raise exceptions.BackendException(
                _('Short write to RBD image %(pool)s/%(name)s: %(written)d of '
                  '%(got)d bytes at %(offset)d') % {
                      'pool': self.pool, 'name': self.name, 'written': written,
                      'got': len(data), 'offset': offset})

    def flush(self):
        self._image.flush()

    def grow(self, size):
        """Make the RBD image at least ``size`` bytes; True (it can grow).

        The image may so grow past the size Cinder gave the volume: the
        store keeps the manifest there, where it costs no volume size.
        """
        if self._image.size() < size:
            self._image.resize(size)
        return True

    def seal(self, glance_image_id):
        """Seal the image-volume (see thunder_common.rbd_layout)."""
        snapshot = rbd_layout.seal_image_volume(self._image, glance_image_id)
        return RbdFacts(fsid=self._client.get_fsid(), pool=self.pool,
                        image=self.name, snapshot=snapshot)

    def pool_full(self):
        """True if Ceph flags the pool (or the cluster) full.

        A full pool does not fail writes at once: they wait, and fail when
        the operation timeout expires. This tells such a timeout from
        others. Never raises (False when the monitors cannot say).
        """
        try:
            ret, out, _err = self._client.mon_command(
                json.dumps({'prefix': 'osd dump', 'format': 'json'}), b'',
                timeout=10)
            if ret:
                return False
            dump = json.loads(out)
        except Exception:
            LOG.debug('Cannot read the OSD map to tell whether pool %s is '
                      'full.', self.pool, exc_info=True)
            return False
        full = {'full', 'full_quota', 'full_no_quota'}
        if full & set(dump.get('flags', '').split(',')):
            return True
        for pool in dump.get('pools', []):
            if pool.get('pool_name') == self.pool:
                names = pool.get('flags_names', '').split(',')
                return bool(full & set(names))
        return False

    def close(self):
        """Close everything; never raises."""
        for name, closer in (('image', '_image'), ('ioctx', '_ioctx')):
            handle = getattr(self, closer)
            setattr(self, closer, None)
            if handle is not None:
                try:
                    handle.close()
                except Exception:
                    LOG.warning('Closing the RBD %s of %s/%s failed.', name,
                                self.pool, self.name, exc_info=True)
        client, self._client = self._client, None
        if client is not None:
            client.shutdown()
