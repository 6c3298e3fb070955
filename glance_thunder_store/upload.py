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

"""One upload: an image streamed into a new image-volume, all or nothing.

The volume is sized for the image, in whole GiB (or 1 GiB, grown a GiB at
a time, when the size is unknown). The data is read in pieces of the write
chunk size and hashed on the way: md5 (Glance's checksum), the requested
multihash, the signature verifier and the per-chunk manifest. Reading,
writing and hashing overlap (:class:`_Pipeline`): a few pieces are written
at once while the next is read, and each digest runs in its own thread
(hashlib and librbd release the GIL), so an upload holds a few pieces in
memory and costs the slowest of the three rather than their sum. Pieces of
zeros are not written to a
volume that reads zeros where nothing was written (a new RBD image): the
image-volume of an image converted to raw, mostly zeros, stays thin. An
RBD image-volume is then sealed (its protected clone snapshot taken). The
manifest follows the data at a 1 MiB boundary; when the volume has no room
left for it, an RBD image grows past the size Cinder gave the volume (the
manifest costs no volume size nor quota), any other volume is extended by
Cinder. The volume's metadata then marks it as the image's, and the volume
is made read-only.

Whatever fails, the volume is disconnected and deleted before the error
leaves: exceptions of the caller's data stream and verifier propagate as
they are (Glance maps them itself), storage failures become glance_store
exceptions.
"""

import collections
from concurrent import futures
import dataclasses
import errno
import functools
import hashlib
import math

from glance_store.common import utils as store_utils
from glance_store import exceptions
from glance_store.i18n import _
from oslo_log import log as logging
from oslo_utils import units

from thunder_common import locations
from thunder_common import manifest as manifest_mod

LOG = logging.getLogger(__name__)

# Volume metadata keys Glance's and Cinder's conventions use.
META_IMAGE_ID = 'glance_image_id'
META_IMAGE_OWNER = 'image_owner'
META_IMAGE_SIZE = 'image_size'
# Volume metadata keys of this store.
META_STORE = 'thunder_store'
# Set to "rbd" when the image's own location is the rbd:// one.
META_LOCATION_SCHEME = 'thunder_location_scheme'
META_RBD_FSID = locations.META_RBD_FSID
META_RBD_POOL = locations.META_RBD_POOL
META_RBD_IMAGE = locations.META_RBD_IMAGE
META_RBD_SNAPSHOT = locations.META_RBD_SNAPSHOT

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def volume_name(image_id):
    return 'image-%s' % image_id


def gib_for(size_bytes):
    return max(1, int(math.ceil(float(size_bytes) / units.Gi)))


def is_storage_full(error):
    """True for the errors of a full Ceph pool, quota or disk."""
    if getattr(error, 'errno', None) in _FULL_ERRNOS:
        return True
    return type(error).__name__ in ('NoSpace', 'DiskQuotaExceeded')


class _CallerError(Exception):
    """Wraps an exception of the caller's stream or verifier."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class _Pipeline:
    """Pieces written and hashed in worker threads, in order.

    ``put`` hands a piece to every hasher (each sees the pieces in order:
    the previous piece's digests finish before this piece's start) and, if
    asked, to a writer; at most ``writes_in_flight`` writes are pending at
    once. A failed write or hash is raised by a later ``put`` or by
    ``drain``. ``close`` waits for whatever still runs: nothing touches the
    volume after it returns.
    """

    def __init__(self, hashers, writes_in_flight):
        self._hashers = hashers
        self._in_flight = writes_in_flight
        self._hash_pool = futures.ThreadPoolExecutor(
            len(hashers), thread_name_prefix='thunder-store-hash')
        self._write_pool = futures.ThreadPoolExecutor(
            writes_in_flight, thread_name_prefix='thunder-store-write')
        self._hashing = []
        self._writing = collections.deque()

    def put(self, data, write=None):
        """Hash ``data``; if ``write`` (a callable) is given, call it too."""
        self._wait_hashes()
        self._hashing = [self._hash_pool.submit(hasher, data)
                         for hasher in self._hashers]
        if write is not None:
            while len(self._writing) >= self._in_flight:
                self._writing.popleft().result()
            self._writing.append(self._write_pool.submit(write))

    def _wait_hashes(self):
        hashing, self._hashing = self._hashing, []
        for future in hashing:
            future.result()

    def drain(self):
        """Wait for every piece put so far; raise the first failure."""
        self._wait_hashes()
        while self._writing:
            self._writing.popleft().result()

    def close(self):
        """Wait for the workers to stop (after a failure: without raising)."""
        self._hash_pool.shutdown(wait=True, cancel_futures=True)
        self._write_pool.shutdown(wait=True, cancel_futures=True)
        self._hashing = []
        self._writing.clear()


@dataclasses.dataclass
class UploadResult:
    volume_id: str
    size: int
    checksum: str
    multihash: str
    manifest: manifest_mod.Manifest
    manifest_offset: int
    rbd: object = None
    location_scheme: str = locations.THUNDER_SCHEME

    def location(self, image_id, store=None):
        """The image's location: thunder:// or its sealed snapshot's."""
        if self.location_scheme == locations.RBD_SCHEME:
            return locations.RbdLocation(
                self.rbd.fsid, self.rbd.pool, self.rbd.image,
                self.rbd.snapshot).url
        return locations.thunder_location(self.volume_id, store,
                                          image_id).url

    def location_metadata(self):
        """Manifest and RBD facts, as Glance location metadata (strings)."""
        meta = self.manifest.metadata(self.manifest_offset)
        if self.rbd is not None:
            meta.update({META_RBD_FSID: self.rbd.fsid,
                         META_RBD_POOL: self.rbd.pool,
                         META_RBD_IMAGE: self.rbd.image,
                         META_RBD_SNAPSHOT: self.rbd.snapshot})
        return meta


class ImageUpload:
    """Write one image into a new image-volume (see the module doc)."""

    def __init__(self, volumes, conf, image_id, image_file, image_size,
                 hashing_algo, owner=None, verifier=None, store_name=None,
                 location_scheme=locations.THUNDER_SCHEME):
        self.volumes = volumes
        self.location_scheme = location_scheme
        self.conf = conf
        self.image_id = image_id
        self.image_file = image_file
        self.image_size = image_size or 0
        self.owner = owner
        self.verifier = verifier
        self.store_name = store_name
        self.write_chunk = conf.thunder_store_write_chunk_size * units.Mi
        self.writes_in_flight = conf.thunder_store_writes_in_flight
        self.manifest_chunk = self._chunk_size(
            conf.thunder_store_manifest_chunk_size * 1024)
        self.md5 = store_utils.get_hasher('md5', False)
        self.multihash = store_utils.get_hasher(hashing_algo, False)
        # None once an image of unknown size outgrew the manifest's chunk
        # count: the manifest is then built from the volume at the end.
        self.builder = manifest_mod.ManifestBuilder(self.manifest_chunk)
        self.written = 0
        self.skipped = 0
        self._zeros = bytes(self.write_chunk)
        self.volume = None
        self.attachment = None

    def _chunk_size(self, configured):
        """The manifest's chunk size: the configured one, unless too small.

        An image of more than ``MAX_CHUNKS`` chunks of the configured size
        gets the smallest power-of-two multiple that describes it.
        """
        try:
            chunk = manifest_mod.chunk_size_for(self.image_size, configured)
        except ValueError as e:
            raise exceptions.Invalid(message=_(
                'Image %(image_id)s cannot be stored: %(error)s') % {
                    'image_id': self.image_id, 'error': e})
        if chunk != configured:
            LOG.info('Image %(image)s of %(size)d bytes takes more than '
                     '%(max)d chunks of %(configured)d KiB: its manifest '
                     'uses %(chunk)d KiB chunks.',
                     {'image': self.image_id, 'size': self.image_size,
                      'max': manifest_mod.MAX_CHUNKS,
                      'configured': configured // 1024,
                      'chunk': chunk // 1024})
        return chunk

    # -- the whole upload ------------------------------------------------

    def run(self):
        self._refuse_duplicate()
        metadata = {META_IMAGE_ID: self.image_id}
        if self.owner:
            metadata[META_IMAGE_OWNER] = self.owner
        if self.store_name:
            metadata[META_STORE] = self.store_name
        self.volume = self.volumes.create(
            gib_for(self.image_size), volume_name(self.image_id), metadata,
            self.conf.thunder_store_volume_type)
        try:
            return self._write_and_finish()
        except _CallerError as e:
            self._abort('the upload stream failed: %s' % e.error)
            raise e.error
        except BaseException as e:
            full = (not isinstance(e, exceptions.GlanceStoreException) and
                    (is_storage_full(e) or self._pool_full()))
            self._abort(e)
            if isinstance(e, exceptions.GlanceStoreException):
                raise
            if full:
                raise exceptions.StorageFull(
                    message=_('Ceph or the volume ran out of space while '
                              'writing image %(image_id)s: %(error)s') % {
                                  'image_id': self.image_id, 'error': e})
            if isinstance(e, Exception):
                raise exceptions.BackendException(
                    _('Writing image %(image_id)s into volume %(volume)s '
                      'failed: %(error)s') % {
                          'image_id': self.image_id, 'volume': self.volume.id,
                          'error': e}) from e
            raise

    def _refuse_duplicate(self):
        for volume in self.volumes.find_by_name(volume_name(self.image_id)):
            meta = getattr(volume, 'metadata', None) or {}
            if (meta.get(META_IMAGE_ID) == self.image_id and
                    meta.get(META_STORE) == self.store_name):
                raise exceptions.Duplicate(
                    message=_('Image %(image_id)s already has image-volume '
                              '%(volume)s (status %(status)s); delete it '
                              'before uploading again') % {
                                  'image_id': self.image_id,
                                  'volume': volume.id,
                                  'status': volume.status})

    def _pool_full(self):
        handle = self.attachment.handle if self.attachment else None
        return bool(handle is not None and handle.pool_full())

    def _abort(self, reason):
        LOG.error('Upload of image %(image)s failed (%(reason)s); deleting '
                  'its volume %(volume)s.',
                  {'image': self.image_id, 'reason': reason,
                   'volume': self.volume.id})
        self._detach()
        self.volumes.delete_quietly(self.volume.id)

    def _detach(self):
        attachment, self.attachment = self.attachment, None
        if attachment is not None:
            try:
                attachment.close()
            except Exception:
                LOG.warning('Closing volume %s failed.', self.volume.id,
                            exc_info=True)

    def _write_and_finish(self):
        self.volume = self.volumes.wait_available(self.volume)
        self.attachment = self.volumes.attach(self.volume)
        self._copy_data()
        read_back = self.builder is None
        manifest = self._finish_manifest()
        offset = manifest_mod.volume_offset(self.written)
        raw = manifest.to_bytes()
        self._handle().flush()
        # A manifest read back from the volume was checked against the
        # upload's hash: the volume holds what was sent, read once.
        if self.conf.thunder_store_verify_after_write and not read_back:
            self._verify(manifest)
        # Seal before the manifest is written: the sealed snapshot every
        # clone is made from then holds the image and zeros after it, as a
        # copy of the image would. The manifest lives in the image-volume's
        # head, where the peer mode reads it.
        rbd_facts = self._handle().seal(self.image_id)
        self._room_for_manifest(offset + len(raw))
        self._handle().write(offset, raw)
        self._handle().flush()
        self._detach()
        scheme = (locations.RBD_SCHEME if rbd_facts is not None and
                  self.location_scheme == locations.RBD_SCHEME
                  else locations.THUNDER_SCHEME)
        result = UploadResult(self.volume.id, self.written,
                              self.md5.hexdigest(),
                              self.multihash.hexdigest(), manifest, offset,
                              rbd_facts, scheme)
        metadata = {META_IMAGE_ID: self.image_id,
                    META_IMAGE_SIZE: str(self.written)}
        if scheme == locations.RBD_SCHEME:
            metadata[META_LOCATION_SCHEME] = scheme
        if self.owner:
            metadata[META_IMAGE_OWNER] = self.owner
        metadata.update(result.location_metadata())
        self.volumes.set_metadata(self.volume, metadata)
        self.volumes.set_read_only(self.volume)
        LOG.info('Stored image %(image)s (%(size)d bytes, %(zeros)d of '
                 'them zeros not written; manifest %(digest)s) in volume '
                 '%(volume)s.',
                 {'image': self.image_id, 'size': self.written,
                  'zeros': self.skipped, 'digest': manifest.digest(),
                  'volume': self.volume.id})
        return result

    # -- data --------------------------------------------------------------

    def _handle(self):
        return self.attachment.handle

    def _read(self):
        try:
            return self.image_file.read(self.write_chunk)
        except Exception as e:
            raise _CallerError(e)

    def _update_verifier(self, data):
        try:
            self.verifier.update(data)
        except Exception as e:
            raise _CallerError(e)

    def _build_manifest(self, data):
        if self.builder is None:
            return
        try:
            self.builder.update(data)
        except manifest_mod.TooManyChunks:
            # Only an image of unknown size gets here (a known size chose
            # a chunk size that fits): hashing stops until the end.
            self.builder = None

    def _finish_manifest(self):
        """The manifest of what was written; built again if outgrown."""
        if self.builder is not None:
            return self.builder.finish()
        chunk = manifest_mod.chunk_size_for(self.written, self.manifest_chunk)
        LOG.warning('Image %(image)s (%(size)d bytes, size not given with '
                    'the upload) outgrew a manifest of %(max)d chunks of '
                    '%(configured)d KiB: reading it back from volume '
                    '%(volume)s for a manifest of %(chunk)d KiB chunks. '
                    'Uploads that give the image size avoid this second '
                    'read.',
                    {'image': self.image_id, 'size': self.written,
                     'max': manifest_mod.MAX_CHUNKS,
                     'configured': self.manifest_chunk // 1024,
                     'volume': self.volume.id, 'chunk': chunk // 1024})
        self.manifest_chunk = chunk
        builder = manifest_mod.ManifestBuilder(chunk)
        # The bytes read back must be those uploaded: the stream's hash
        # binds the manifest to them.
        readback = hashlib.new(self.multihash.name)
        for offset in range(0, self.written, self.write_chunk):
            data = self._handle().read(
                offset, min(self.write_chunk, self.written - offset))
            builder.update(data)
            readback.update(data)
        if readback.hexdigest() != self.multihash.hexdigest():
            raise exceptions.BackendException(
                _('Image %(image_id)s read back from volume %(volume)s for '
                  'its manifest does not match what was uploaded') % {
                      'image_id': self.image_id, 'volume': self.volume.id})
        return builder.finish()

    def _copy_data(self):
        hashers = [self.md5.update, self.multihash.update,
                   self._build_manifest]
        if self.verifier is not None:
            hashers.append(self._update_verifier)
        pipeline = _Pipeline(hashers, self.writes_in_flight)
        try:
            self._pipe_data(pipeline)
            pipeline.drain()
        finally:
            pipeline.close()
        if self.image_size and self.written != self.image_size:
            raise exceptions.Invalid(
                message=_('Size mismatch: expected %(image_size)d bytes, got '
                          '%(written)d') % {
                              'image_size': self.image_size,
                              'written': self.written})

    def _pipe_data(self, pipeline):
        while True:
            data = self._read()
            if not data:
                break
            end = self.written + len(data)
            if self.image_size and end > self.image_size:
                raise exceptions.Invalid(
                    message=_('Size exceeds: expected %(image_size)d bytes, '
                              'got at least %(end)d') % {
                                  'image_size': self.image_size, 'end': end})
            if end > self.attachment.capacity:
                pipeline.drain()
                self._ensure_capacity(end)
            write = None
            if self._handle().reads_zeros_unwritten and self._zero(data):
                self.skipped += len(data)
            else:
                write = functools.partial(self._handle().write, self.written,
                                          data)
            pipeline.put(data, write)
            self.written = end

    def _room_for_manifest(self, needed):
        """Make the image-volume hold ``needed`` bytes for the manifest.

        An RBD image grows past the volume's size (rounded up to 1 MiB):
        Cinder's size, the quota and the sealed snapshot stay the image's.
        A volume that cannot grow so is extended by Cinder.
        """
        if needed <= self.attachment.capacity:
            return
        if self._handle().grow(manifest_mod.volume_offset(needed)):
            LOG.debug('Manifest of image %(image)s past the %(gb)d GiB of '
                      'volume %(id)s.', {'image': self.image_id,
                                         'gb': self.volume.size,
                                         'id': self.volume.id})
            return
        self._ensure_capacity(needed)

    def _zero(self, data):
        zeros = (self._zeros if len(data) == len(self._zeros) else
                 bytes(len(data)))
        return data == zeros

    def _ensure_capacity(self, needed):
        """Extend the volume (1 GiB at a time) until it holds ``needed``."""
        if needed <= self.attachment.capacity:
            return
        if self.image_size and needed > manifest_mod.volume_bytes_needed(
                self.image_size, self.manifest_chunk):
            raise exceptions.Invalid(
                message=_('Data does not fit the announced size of '
                          '%(image_size)d bytes') % {
                              'image_size': self.image_size})
        new_gb = gib_for(needed)
        LOG.debug('Extending volume %(id)s to %(gb)d GiB for image '
                  '%(image)s of unknown size.',
                  {'id': self.volume.id, 'gb': new_gb,
                   'image': self.image_id})
        self._detach()
        self.volume = self.volumes.extend(self.volume, new_gb)
        self.attachment = self.volumes.attach(self.volume)
        if self._handle().size() < needed:
            raise exceptions.StorageFull(
                message=_('Volume %(volume)s holds %(held)d bytes after '
                          'extending it to %(new_gb)d GiB') % {
                              'volume': self.volume.id,
                              'held': self._handle().size(), 'new_gb': new_gb})

    def _verify(self, manifest):
        """Read the image back and check every chunk against the manifest."""
        for index in range(manifest.chunk_count):
            offset, length = manifest.chunk_range(index)
            data = self._handle().read(offset, length)
            if not manifest.verify_chunk(index, data):
                raise exceptions.BackendException(
                    _('Chunk %(index)d (bytes %(offset)d-%(last)d) of image '
                      '%(image_id)s read back from volume %(volume)s does not '
                      'match what was written') % {
                          'index': index, 'offset': offset,
                          'last': offset + length - 1,
                          'image_id': self.image_id, 'volume': self.volume.id})
