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

"""Image-volumes through the Cinder API: create, wait, extend, attach, delete.

Every Cinder failure leaves here as a glance_store exception: over quota as
StorageFull, a missing volume as NotFound, a volume in use as InUseByStore,
a volume stuck in a transitional state as TimeoutError, anything else as
BackendException.

Volumes are attached with ``os-initialize_connection`` alone (no Cinder
attachment record): the volume stays ``available`` so that it can be
extended while an upload grows it, and nothing but the connection has to be
undone. The first connector offered is the privilege-free one; if the
backend is not RBD, the connection is redone with os-brick's full connector
properties and the volume is attached by os-brick.
"""

import contextlib
import time

from cinderclient import exceptions as cinder_exceptions
from glance_store import exceptions
from glance_store.i18n import _
from keystoneauth1 import exceptions as ks_exceptions
from oslo_log import log as logging
from oslo_utils import units

from glance_thunder_store import brick_volume
from glance_thunder_store import rbd_volume

LOG = logging.getLogger(__name__)

ERROR_STATES = ('error', 'error_extending', 'error_deleting',
                'error_restoring', 'error_managing')
MAX_POLL_INTERVAL = 5.0


def _describe(error):
    return getattr(error, 'message', None) or str(error)


@contextlib.contextmanager
def cinder_errors(action, volume_id=None):
    """Translate cinderclient exceptions raised inside the block."""
    what = action if volume_id is None else '%s volume %s' % (action,
                                                              volume_id)
    try:
        yield
    except cinder_exceptions.OverLimit as e:
        raise exceptions.StorageFull(
            message=_('Cinder refused to %(what)s: over quota '
                      '(%(reason)s)') % {'what': what, 'reason': _describe(e)})
    except cinder_exceptions.NotFound as e:
        raise exceptions.NotFound(
            message=_('Cinder could not %(what)s: not found (%(reason)s)') % {
                'what': what, 'reason': _describe(e)})
    except cinder_exceptions.Forbidden as e:
        raise exceptions.Forbidden(
            message=_('Cinder does not allow the store to %(what)s '
                      '(%(reason)s)') % {'what': what, 'reason': _describe(e)})
    except cinder_exceptions.ClientException as e:
        raise exceptions.BackendException(
            _('Cinder failed to %(what)s: %(reason)s') % {
                'what': what, 'reason': _describe(e)})
    except ks_exceptions.ClientException as e:
        # Keystone or the connection to Cinder failed.
        raise exceptions.BackendException(
            _('Could not reach Cinder to %(what)s: %(error)s') % {
                'what': what, 'error': e})


class CinderVolumes:
    """Volume operations for one request, with one cinderclient."""

    def __init__(self, client, conf):
        self.client = client
        self.conf = conf

    @staticmethod
    def _sleep(seconds):
        time.sleep(seconds)

    @staticmethod
    def _clock():
        return time.monotonic()

    # -- lifecycle -------------------------------------------------------

    def create(self, size_gb, name, metadata, volume_type=None):
        with cinder_errors('create a %d GiB volume' % size_gb):
            volume = self.client.volumes.create(
                size_gb, name=name, metadata=metadata,
                volume_type=volume_type)
        LOG.debug('Created volume %(id)s (%(size)d GiB) for %(name)s.',
                  {'id': volume.id, 'size': size_gb, 'name': name})
        return volume

    def get(self, volume_id):
        with cinder_errors('find', volume_id):
            return self.client.volumes.get(volume_id)

    def find_by_name(self, name):
        with cinder_errors('list volumes named %s' % name):
            return [v for v in self.client.volumes.list(
                search_opts={'name': name}) if v.name == name]

    def wait_for(self, volume, transitional, expected):
        """Wait while the volume is in ``transitional``; must end ``expected``.

        :raises TimeoutError: if it stays transitional too long.
        :raises BackendException: if it ends in another state.
        """
        timeout = self.conf.thunder_store_state_transition_timeout
        deadline = self._clock() + timeout
        interval = 0.2
        volume = self.get(volume.id)
        while volume.status in transitional:
            if self._clock() >= deadline:
                LOG.error('Volume %(id)s still %(status)s after %(t)d s.',
                          {'id': volume.id, 'status': volume.status,
                           't': timeout})
                raise exceptions.TimeoutError(timeout=timeout)
            self._sleep(interval)
            interval = min(interval * 2, MAX_POLL_INTERVAL)
            volume = self.get(volume.id)
        if volume.status != expected:
            raise exceptions.BackendException(
                _('Volume %(volume)s is %(status)s, expected %(expected)s') % {
                    'volume': volume.id, 'status': volume.status,
                    'expected': expected})
        return volume

    def wait_available(self, volume):
        return self.wait_for(volume, ('creating', 'downloading'),
                             'available')

    def extend(self, volume, size_gb):
        """Grow an available volume; StorageFull if Cinder cannot."""
        with cinder_errors('extend', volume.id):
            self.client.volumes.extend(volume, size_gb)
        try:
            volume = self.wait_for(volume, ('extending',), 'available')
        except exceptions.BackendException as e:
            raise exceptions.StorageFull(
                message=_('Could not extend volume %(volume)s to %(size_gb)d '
                          'GiB: %(error)s') % {
                              'volume': volume.id, 'size_gb': size_gb,
                              'error': e})
        if volume.size < size_gb:
            raise exceptions.StorageFull(
                message=_('Volume %(volume)s is %(size_gb_now)d GiB after '
                          'extending it to %(size_gb)d GiB') % {
                              'volume': volume.id, 'size_gb_now': volume.size,
                              'size_gb': size_gb})
        return volume

    def set_metadata(self, volume, metadata):
        with cinder_errors('set the metadata of', volume.id):
            self.client.volumes.set_metadata(volume, metadata)

    def set_read_only(self, volume):
        with cinder_errors('make read-only', volume.id):
            self.client.volumes.update_readonly_flag(volume, True)

    def delete(self, volume_id):
        """Delete a volume (the driver defers if clones depend on it)."""
        try:
            with cinder_errors('delete', volume_id):
                self.client.volumes.delete(volume_id)
        except exceptions.BackendException as e:
            volume = None
            try:
                volume = self.get(volume_id)
            except exceptions.GlanceStoreException:
                pass
            if volume is not None and (volume.status == 'in-use' or
                                       getattr(volume, 'attachments', None)):
                raise exceptions.InUseByStore(
                    message=_('Image-volume %(volume_id)s is attached: '
                              '%(error)s') % {
                                  'volume_id': volume_id, 'error': e})
            raise

    def delete_quietly(self, volume_id):
        """Delete a half-made volume; log instead of raising."""
        try:
            self.delete(volume_id)
            LOG.info('Deleted unfinished image-volume %s.', volume_id)
        except exceptions.NotFound:
            pass
        except Exception:
            LOG.exception('Could not delete unfinished image-volume %s; '
                          'delete it by hand.', volume_id)

    # -- data access -------------------------------------------------------

    def _connect(self, volume, connector):
        with cinder_errors('connect to', volume.id):
            return self.client.volumes.initialize_connection(volume,
                                                             connector)

    def _disconnect(self, volume, connector):
        try:
            with cinder_errors('disconnect from', volume.id):
                self.client.volumes.terminate_connection(volume, connector)
        except Exception:
            LOG.warning('Terminating the connection of volume %s failed.',
                        volume.id, exc_info=True)

    def attach(self, volume, read_only=False):
        """Open the volume's data; returns an Attachment (a context)."""
        connector = brick_volume.basic_connector(self.conf)
        try:
            info = self._connect(volume, connector)
        except exceptions.BackendException:
            info = None
        if info is None or info.get('driver_volume_type') != 'rbd':
            if info is not None:
                self._disconnect(volume, connector)
            connector = brick_volume.full_connector(self.conf)
            info = self._connect(volume, connector)
        try:
            if info.get('driver_volume_type') == 'rbd':
                handle = rbd_volume.RbdVolume(
                    info.get('data') or {}, read_only=read_only,
                    timeout=self.conf.thunder_store_rbd_connect_timeout)
            else:
                handle = brick_volume.BrickVolume(info, self.conf,
                                                  read_only=read_only)
        except BaseException:
            self._disconnect(volume, connector)
            raise
        return Attachment(self, volume, connector, handle)


class Attachment:
    """An open image-volume; closing it closes the data and disconnects."""

    def __init__(self, volumes, volume, connector, handle):
        self._volumes = volumes
        self.volume = volume
        self._connector = connector
        self.handle = handle

    @property
    def capacity(self):
        """Bytes the volume can hold, as Cinder sized it."""
        return self.volume.size * units.Gi

    def close(self):
        handle, self.handle = self.handle, None
        if handle is None:
            return
        try:
            handle.close()
        finally:
            self._volumes._disconnect(self.volume, self._connector)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
