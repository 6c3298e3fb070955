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

"""The thunder Glance store: every image is a Cinder image-volume.

Enable it with ``[glance_store] stores = thunder`` or, in a multi-store
Glance, ``enabled_backends = NAME:thunder`` with the options in ``[NAME]``.
Uploads go into a new volume of ``thunder_store_volume_type`` (see
:mod:`glance_thunder_store.upload`), downloads read it back through librbd
(or os-brick for other backends), and the image's location is
``thunder://[NAME/]VOLUME_ID?image_id=IMAGE_ID``. Deleting the image
deletes the volume; ThunderDriver keeps the RBD data while volumes cloned
from it exist. Every read, size and delete first checks that the volume
holds the image the location names, and a size or delete that the request
may act on it (:mod:`glance_thunder_store.ownership`).
"""

import hashlib

from glance_store import capabilities
import glance_store.driver
from glance_store import exceptions
from glance_store.i18n import _
from oslo_log import log as logging
from oslo_utils import units

from glance_thunder_store import cinder_client
from glance_thunder_store import location as location_mod
from glance_thunder_store import options
from glance_thunder_store import ownership
from glance_thunder_store import upload
from glance_thunder_store import volumes as volumes_mod
from thunder_common import locations
from thunder_common import manifest

LOG = logging.getLogger(__name__)


class VolumeReader:
    """Iterates over a byte range of an image-volume, attaching lazily.

    The volume is attached when iteration starts and detached when it ends,
    fails or the iterator is closed (Glance closes it when a client goes).
    """

    def __init__(self, volumes, volume, offset, length, chunk_size):
        self._volumes = volumes
        self._volume = volume
        self._offset = offset
        self._length = length
        self._chunk_size = chunk_size
        self._generator = None

    def __iter__(self):
        if self._generator is None:
            self._generator = self._chunks()
        return self._generator

    def __next__(self):
        return next(iter(self))

    def _chunks(self):
        if self._length <= 0:
            return
        with self._volumes.attach(self._volume, read_only=True) as attached:
            offset, end = self._offset, self._offset + self._length
            while offset < end:
                size = min(self._chunk_size, end - offset)
                data = attached.handle.read(offset, size)
                if len(data) != size:
                    raise exceptions.BackendException(
                        _('Short read from image-volume %(volume)s: %(got)d '
                          'of %(size)d bytes at %(offset)d') % {
                              'volume': self._volume.id, 'got': len(data),
                              'size': size, 'offset': offset})
                offset += size
                yield data

    def close(self):
        if self._generator is not None:
            self._generator.close()


class Store(glance_store.driver.Store):
    """Images as Cinder image-volumes, cloned in O(1) by ThunderDriver."""

    _CAPABILITIES = (capabilities.BitMasks.READ_RANDOM |
                     capabilities.BitMasks.WRITE_ACCESS |
                     capabilities.BitMasks.DRIVER_REUSABLE)
    OPTIONS = options.thunder_store_opts
    EXAMPLE_URL = 'thunder://<VOLUME_ID>?image_id=<IMAGE_ID>'

    def __init__(self, conf, backend=None):
        super().__init__(conf, backend=backend)
        if self.backend_group:
            self.store_conf = glance_store.driver.BackendGroupConfiguration(
                self.OPTIONS, self.backend_group, conf=self.conf)
            self._url_prefix = 'thunder://%s/' % self.backend_group
        else:
            self.store_conf = self.conf.glance_store
            self._url_prefix = 'thunder://'
        self.clients = cinder_client.CinderClientFactory(
            self.store_conf, self.backend_group or 'thunder')

    # -- registration ------------------------------------------------------

    def get_schemes(self):
        if self.store_conf.thunder_store_alias_locations:
            return (locations.THUNDER_SCHEME, locations.CINDER_SCHEME,
                    locations.RBD_SCHEME)
        if self._rbd_locations:
            return (locations.THUNDER_SCHEME, locations.RBD_SCHEME)
        return (locations.THUNDER_SCHEME,)

    @property
    def _rbd_locations(self):
        return (self.store_conf.thunder_store_location_scheme ==
                locations.RBD_SCHEME)

    def get_store_location_class(self):
        return location_mod.StoreLocation

    def configure_add(self):
        conf = self.store_conf
        self.WRITE_CHUNKSIZE = conf.thunder_store_write_chunk_size * units.Mi
        self.READ_CHUNKSIZE = self.WRITE_CHUNKSIZE
        try:
            manifest.check_chunk_size(
                conf.thunder_store_manifest_chunk_size * 1024)
        except ValueError as e:
            raise exceptions.BadStoreConfiguration(
                store_name=self._name,
                reason=_('thunder_store_manifest_chunk_size: %(error)s')
                % {'error': e})
        volume_type = conf.thunder_store_volume_type
        if volume_type and self.clients.uses_service_user:
            try:
                self.clients.client().volume_types.find(name=volume_type)
            except Exception as e:
                LOG.warning('Cannot check volume type %(type)s of store '
                            '%(store)s: %(err)s',
                            {'type': volume_type, 'store': self._name,
                             'err': e})

    @property
    def _name(self):
        return self.backend_group or 'thunder'

    def _volumes(self, context):
        return volumes_mod.CinderVolumes(self.clients.client(context),
                                         self.store_conf)

    # -- add -----------------------------------------------------------------

    @glance_store.driver.back_compat_add
    @capabilities.check
    def add(self, image_id, image_file, image_size, hashing_algo,
            context=None, verifier=None):
        """Write an image into a new image-volume.

        :returns: (location URL, bytes written, md5 checksum, multihash,
            location metadata: manifest, RBD facts and the store name)
        :raises Duplicate: if the image already has an image-volume here.
        :raises StorageFull: if Cinder's quota or Ceph is full.
        :raises Invalid: if the data does not match image_size, or the
            image id is not a dashed UUID (the location must carry it).
        """
        if hashing_algo not in hashlib.algorithms_available:
            raise exceptions.UnknownHashingAlgo(algo=hashing_algo)
        if not locations.is_image_id(image_id):
            raise exceptions.Invalid(
                message=_('Image id %(image_id)r is not a dashed UUID: the '
                          'thunder store records it in the image\'s '
                          'location') % {'image_id': str(image_id)[:64]})
        owner = getattr(context, 'project_id', None)
        job = upload.ImageUpload(
            self._volumes(context), self.store_conf, image_id, image_file,
            image_size, hashing_algo, owner=owner, verifier=verifier,
            store_name=self.backend_group,
            location_scheme=self.store_conf.thunder_store_location_scheme)
        result = job.run()
        url = result.location(image_id, self.backend_group)
        metadata = result.location_metadata()
        if self.backend_group:
            metadata['store'] = self.backend_group
        return (url, result.size, result.checksum, result.multihash,
                metadata)

    # -- read ----------------------------------------------------------------

    def _checked_volume(self, location, volumes, action, context):
        """The image-volume a location names, once it holds that image.

        :raises NotFound: if the volume does not exist, or
            ``ownership.ImageVolumeRefused`` if it is not the image's.
        """
        volume = self._image_volume(location, volumes)
        ownership.check_holds_image(volume, location, action, context)
        return volume

    def _image_volume(self, location, volumes):
        """The image-volume a location (or alias location) names."""
        loc = location.store_location
        if loc.is_volume:
            return volumes.get(loc.volume_id)
        rbd = loc.parsed
        volume_id = locations.volume_id_from_name(
            rbd.image, self.store_conf.thunder_store_volume_name_template)
        try:
            volume = volumes.get(volume_id) if volume_id else None
        except exceptions.NotFound:
            volume = None
        meta = (getattr(volume, 'metadata', None) or {}) if volume else {}
        expected = {upload.META_RBD_FSID: rbd.fsid,
                    upload.META_RBD_POOL: rbd.pool,
                    upload.META_RBD_IMAGE: rbd.image,
                    upload.META_RBD_SNAPSHOT: rbd.snapshot}
        if any(meta.get(k) != v for k, v in expected.items()):
            raise exceptions.NotFound(
                message=_('%(url)s is not the sealed snapshot of an '
                          'image-volume of store %(store)s') % {
                              'url': rbd.url, 'store': self._name})
        return volume

    @staticmethod
    def _image_size(volume):
        try:
            return int((volume.metadata or {})[upload.META_IMAGE_SIZE])
        except (KeyError, TypeError, ValueError):
            return volume.size * units.Gi

    @capabilities.check
    def get(self, location, offset=0, chunk_size=None, context=None):
        """(iterator over the image's bytes, number of bytes it yields).

        :param offset: first byte to read.
        :param chunk_size: how many bytes to read from ``offset`` (Glance's
            partial download); None reads to the end of the image.
        :raises NotFound: if the image-volume does not exist or does not
            hold the image the location names; nothing is read then.
        """
        volumes = self._volumes(context)
        volume = self._checked_volume(location, volumes, 'read', context)
        size = self._image_size(volume)
        if offset < 0 or offset > size:
            raise exceptions.BackendException(
                _('Offset %(offset)d is outside image-volume %(volume)s of '
                  '%(size)d bytes') % {
                      'offset': offset, 'volume': volume.id, 'size': size})
        length = size - offset
        if chunk_size:
            length = min(length, chunk_size)
        reader = VolumeReader(volumes, volume, offset, length,
                              self.READ_CHUNKSIZE)
        return reader, length

    def get_size(self, location, context=None):
        """The image's size in bytes, from the image-volume's metadata.

        Glance asks for it to validate a location it adds, so the request
        must also be allowed to use the volume (see
        :mod:`glance_thunder_store.ownership`).

        :raises NotFound: if the image-volume does not exist, does not hold
            the image the location names, or belongs to another project.
        """
        try:
            volume = self._checked_volume(location, self._volumes(context),
                                          'validate', context)
            ownership.check_owner(volume, location, 'validate', context,
                                  ownership.ImageVolumeRefused)
            return self._image_size(volume)
        except exceptions.NotFound:
            raise
        except (exceptions.GlanceStoreException,
                exceptions.BackendException) as e:
            # Glance treats 0 as "no usable data at this location".
            LOG.error('Cannot read the size of %(loc)s: %(err)s',
                      {'loc': location.store_location.get_uri(), 'err': e})
            return 0

    # -- delete --------------------------------------------------------------

    @capabilities.check
    def delete(self, location, context=None):
        """Delete the image-volume of the image's own location.

        That is its thunder:// location, or its rbd:// one when the store
        gave it that (``thunder_store_location_scheme = rbd``: the volume
        records it). Safe while volumes cloned from the image exist:
        ThunderDriver keeps the RBD data until the last clone goes.
        Deleting a cinder:// or rbd:// alias deletes nothing.

        :raises NotFound: if the volume is already gone, or does not hold
            the image the location names (``ImageVolumeRefused``: Glance
            then drops the location and deletes nothing).
        :raises Forbidden: ``ImageVolumeDeleteForbidden`` if the request
            is not from the project that stored the image, an admin or a
            service.
        :raises InUseByStore: if the volume is attached.
        """
        loc = location.store_location
        volumes = self._volumes(context)
        if loc.is_alias and not self._is_own_rbd_location(location, volumes):
            LOG.info('Location %s is an alias of a thunder image-volume: '
                     'nothing to delete.', loc.get_uri())
            return
        volume = self._checked_volume(location, volumes, 'delete', context)
        ownership.check_owner(volume, location, 'delete', context,
                              ownership.ImageVolumeDeleteForbidden)
        volumes.delete(volume.id)
        LOG.info('Deleted image-volume %s.', volume.id)

    def _is_own_rbd_location(self, location, volumes):
        """Whether an rbd:// location is the one the store gave its image.

        The image-volume records it (``thunder_location_scheme``); any
        other rbd:// location of it is an alias.
        """
        if location.store_location.scheme != locations.RBD_SCHEME:
            return False
        try:
            volume = self._image_volume(location, volumes)
        except exceptions.NotFound:
            return False
        return ((volume.metadata or {}).get(upload.META_LOCATION_SCHEME) ==
                locations.RBD_SCHEME)

    # -- multi-store housekeeping -------------------------------------------

    def is_image_associated_with_store(self, context, volume_id):
        """Whether a legacy ``cinder://`` location belongs to this store.

        Glance asks when it meets a ``cinder://`` location without a known
        store. A plain image-volume of this store's volume type (one written
        by glance_store's cinder driver) is adopted. A thunder image-volume
        is not: its ``cinder://`` location is an alias that must keep its
        scheme for Cinder, next to the image's thunder:// location.
        """
        try:
            client = self.clients.client(context)
            volume = volumes_mod.CinderVolumes(
                client, self.store_conf).get(volume_id)
            if manifest.META_DIGEST in (volume.metadata or {}):
                return False
            wanted = self.store_conf.thunder_store_volume_type
            if not wanted:
                wanted = client.volume_types.default().name
            return volume.volume_type == wanted
        except Exception as e:
            LOG.debug('Volume %(id)s is not associated with store %(store)s: '
                      '%(err)s', {'id': volume_id, 'store': self._name,
                                  'err': e})
            return False
