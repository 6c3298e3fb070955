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

"""What the control socket answers: the node's volume service.

The Cinder driver's peer mode (``cinder_thunder_driver.peer``) calls these
operations through :class:`thunder_cache.control.client.ControlClient`. Every
argument arrives from JSON and is checked here before use.
"""

import json
import logging
import os
import typing

from oslo_concurrency import lockutils

from thunder_cache.cache import node as node_mod
from thunder_cache.control import protocol as control_protocol
from thunder_cache import errors
from thunder_cache import fsutil
from thunder_cache.peer import protocol
from thunder_cache.volumes import volumes as volumes_mod

LOG = logging.getLogger(__name__)

# Volumes a list_volumes answer holds at most (each ~250 bytes of JSON; an
# answer is one line of at most control_protocol.MAX_LINE bytes).
LIST_LIMIT = 100
# Chunks one ensure_chunks request may name (the native server's limit).
MAX_ENSURE = 64
# Errors answered by their class name and message (no traceback logged).
EXPECTED_ERRORS = (volumes_mod.VolumeError, node_mod.DescriptorError,
                   node_mod.ImageBusy, KeyError)


def _size(value: typing.Any, limit: int) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or
            not 0 < value <= limit):
        raise errors.BadRequest('size must be a positive integer of at '
                                'most %d bytes' % limit)
    return value


def _volume_id(value: typing.Any, name: str = 'volume_id') -> str:
    if not isinstance(value, str):
        raise errors.BadRequest('%s must be a string' % name)
    try:
        return volumes_mod.check_volume_id(value)
    except ValueError:
        raise errors.BadRequest(
            'bad %s %r: 1 to 128 characters of A-Z a-z 0-9 _ . -, not '
            'starting with . _ or -' % (name, value[:140]))


def _index(value: typing.Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.BadRequest('%s must be a non-negative integer' % name)
    return value


def _image_id(value: typing.Any) -> str:
    if not isinstance(value, str):
        raise errors.BadRequest('image_id must be a string')
    if not protocol.IMAGE_ID.match(value):
        raise errors.BadRequest('bad image id %r' % value[:80])
    return value


class VolumeService:
    """Image registration and volume layers, for the control socket.

    :param node: the :class:`~thunder_cache.cache.node.Node`.
    :param store: the :class:`~thunder_cache.volumes.volumes.VolumeStore`.
    :param mount_dir: where the volume files are mounted.
    :param descriptors_dir: where registered images are kept, so that a
        restarted daemon knows them again.
    :param origin_factory: builds origins from descriptor entries (see
        :class:`thunder_cache.cache.origins.OriginPolicy`).
    """

    def __init__(self, node: node_mod.Node, store: volumes_mod.VolumeStore,
                 mount_dir: typing.Optional[str], descriptors_dir: str,
                 origin_factory: typing.Callable[..., typing.Any]) -> None:
        self.node = node
        self.store = store
        self.mount_dir = mount_dir
        self.descriptors_dir = descriptors_dir
        self.origin_factory = origin_factory
        # One registration of an image at a time.
        self._image_locks = lockutils.Semaphores()
        #: the daemon's :class:`~thunder_cache.cache.eviction.Evictor`, if any.
        self.evictor: typing.Any = None
        #: callable(image_id) -> the image's boot-trace state, or None.
        self.trace_state: typing.Optional[
            typing.Callable[[str], typing.Any]] = None

    def handlers(self) -> typing.Dict[str, typing.Callable[..., typing.Any]]:
        """{op: handler} for :class:`~.server.ControlServer`."""
        return {'ping': self.ping,
                'stats': self.stats,
                'register_image': self.register_image,
                'create_volume': self.create_volume,
                'delete_volume': self.delete_volume,
                'resize_volume': self.resize_volume,
                'revert_volume': self.revert_volume,
                'rename_volume': self.rename_volume,
                'list_volumes': self.list_volumes,
                'volume_info': self.volume_info,
                'evict_image': self.evict_image,
                'cache_status': self.cache_status,
                'ensure_chunks': self.ensure_chunks}

    def ping(self) -> control_protocol.PingResult:
        return {'node_id': self.node.node_id, 'url': self.node.url,
                'mount_dir': self.mount_dir}

    def stats(self) -> control_protocol.StatsResult:
        """Capacity of the layers' filesystem and what volumes claim."""
        st = os.statvfs(self.store.layers_dir)
        ids = self.store.list()
        provisioned = 0
        for volume_id in ids:
            try:
                provisioned += self.store.size(volume_id)
            except volumes_mod.VolumeNotFound:
                continue
        return {'total_bytes': st.f_blocks * st.f_frsize,
                'free_bytes': st.f_bavail * st.f_frsize,
                'provisioned_bytes': provisioned,
                'volumes': len(ids),
                'images': len(self.node.image_ids())}

    def register_image(self, image_id: str, **descriptor: typing.Any
                       ) -> control_protocol.RegisterResult:
        """Register an image (persisted) and open its cache.

        Returns the image's size and how much of it this node holds. The
        manifest is read (and checked against the digest) here, so a
        volume is only created over an image this node can serve.
        Registrations of one image are serialized; each one succeeds or
        fails on its own.
        """
        if not isinstance(image_id, str):
            raise node_mod.BadDescriptor('image_id must be a string')
        spec = node_mod.spec_from_dict(image_id, descriptor,
                                       self.origin_factory)
        with lockutils.lock(image_id, semaphores=self._image_locks,
                            do_log=False):
            return self._register(spec, descriptor)

    def _register(self, spec: node_mod.ImageSpec,
                  descriptor: typing.Dict[str, typing.Any]
                  ) -> control_protocol.RegisterResult:
        image_id = spec.image_id
        known = image_id in self.node.image_ids()
        try:
            self.node.register(spec)
        except BaseException:
            if spec.origin is not None:
                spec.origin.close()
            raise
        try:
            cache = self.node.cache(image_id)
        except node_mod.sources.ManifestError as e:
            # Not verified: neither kept nor left registered, so a later
            # registration with the right digest is not refused.
            if not known:
                self.node.unregister(image_id)
            raise node_mod.DescriptorError(str(e))
        self._keep_descriptor(image_id, descriptor)
        return {'image_size': cache.manifest.image_size,
                'chunk_size': cache.manifest.chunk_size,
                'chunks': cache.manifest.chunk_count,
                'chunks_present': cache.present_count()}

    def _keep_descriptor(self, image_id: str,
                         descriptor: typing.Dict[str, typing.Any]) -> None:
        os.makedirs(self.descriptors_dir, mode=0o700, exist_ok=True)
        fsutil.write_atomic(
            os.path.join(self.descriptors_dir, image_id + '.json'),
            json.dumps(dict(descriptor, image_id=image_id),
                       sort_keys=True).encode('utf-8'))

    def create_volume(self, volume_id: str, size: int,
                      image_id: typing.Optional[str] = None,
                      source: typing.Optional[str] = None,
                      read_only: bool = False) -> control_protocol.VolumeInfo:
        _volume_id(volume_id)
        size = _size(size, self.store.max_size)
        if image_id is not None:
            self.node.cache(_image_id(image_id))  # known, manifest verified
        if source is not None:
            _volume_id(source, 'source')
        if not isinstance(read_only, bool):
            raise errors.BadRequest('read_only must be a boolean')
        info = self.store.create(volume_id, size, image_id=image_id,
                                 source=source, read_only=read_only)
        LOG.info('Created volume %s (%d bytes%s)', volume_id, size,
                 ', image %s' % image_id if image_id else '')
        return info

    def delete_volume(self, volume_id: str) -> None:
        self.store.delete(_volume_id(volume_id))
        LOG.info('Deleted volume %s', volume_id)

    def resize_volume(self, volume_id: str,
                      size: int) -> control_protocol.VolumeInfo:
        self.store.resize(_volume_id(volume_id),
                          _size(size, self.store.max_size))
        return self.store.info(volume_id)

    def revert_volume(self, volume_id: str,
                      snapshot_id: str) -> control_protocol.VolumeInfo:
        return self.store.revert(_volume_id(volume_id),
                                 _volume_id(snapshot_id, 'snapshot_id'))

    def rename_volume(self, volume_id: str,
                      new_id: str) -> control_protocol.VolumeInfo:
        return self.store.rename(_volume_id(volume_id),
                                 _volume_id(new_id, 'new_id'))

    def list_volumes(self, marker: typing.Optional[str] = None,
                     limit: int = LIST_LIMIT
                     ) -> typing.List[control_protocol.VolumeInfo]:
        """A page of volumes' info: ids after ``marker``, in order.

        At most ``limit`` of them: an answer must fit a control line.
        """
        if marker is not None:
            _volume_id(marker, 'marker')
        if (not isinstance(limit, int) or isinstance(limit, bool) or
                not 0 < limit <= LIST_LIMIT):
            raise errors.BadRequest('limit must be an integer from 1 to '
                                    '%d' % LIST_LIMIT)
        volumes: typing.List[control_protocol.VolumeInfo] = []
        for volume_id in self.store.list():
            if marker is not None and volume_id <= marker:
                continue
            try:
                volumes.append(self.store.info(volume_id))
            except volumes_mod.VolumeNotFound:
                continue
            if len(volumes) == limit:
                break
        return volumes

    def volume_info(self, volume_id: str) -> control_protocol.VolumeInfo:
        return self.store.info(_volume_id(volume_id))

    # -- the image caches -------------------------------------------------

    def volumes_of(self, image_id: str) -> typing.List[str]:
        """Ids of the volumes (and snapshots) reading ``image_id``."""
        return sorted(volume_id for volume_id, image in
                      self.store.image_ids().items() if image == image_id)

    def image_in_use(self, image_id: str) -> typing.Optional[str]:
        """Why the image's cache must stay (its volumes), or None."""
        used_by = self.volumes_of(image_id)
        if not used_by:
            return None
        return '%d volumes read it (%s)' % (len(used_by),
                                            ', '.join(used_by[:5]))

    def evict_image(self, image_id: str) -> control_protocol.EvictResult:
        """Evict an image's cache if nothing uses it (``ImageBusy``)."""
        _image_id(image_id)
        if self.evictor is None:
            raise errors.BadRequest('this daemon does not evict')
        if image_id not in self.node.cache_dirs(self.evictor.exclude):
            raise KeyError('image %s is not cached here' % image_id)
        freed = self.evictor.evict(image_id, 'asked over the control '
                                   'socket')
        return {'image_id': image_id, 'freed_bytes': freed}

    def cache_status(self) -> control_protocol.CacheStatus:
        """What the daemon knows of each image beyond its files."""
        images: typing.Dict[str, control_protocol.ImageStatus] = {}
        for image_id, entry in self.node.entries().items():
            cache = entry.cache
            if cache is not None:
                peers = cache.upstream.peers + cache.upstream.later_peers
            else:
                peers = entry.spec.peers
            images[image_id] = {
                'open': cache is not None,
                'busy': cache.busy() if cache is not None else None,
                'gone': entry.gone,
                'peers': [p for p in peers if p != self.node.url],
                'last_used': cache.last_used if cache is not None else None,
                'trace': (self.trace_state(image_id)
                          if self.trace_state is not None else None),
                'volumes': self.volumes_of(image_id)}
        return {'images': images}

    def ensure_chunks(self, image_id: str, first: int,
                      last: int) -> control_protocol.EnsureResult:
        """Make chunks [first, last] of an image present; say which are.

        The native volume server's reads of missing chunks. The answer
        says which chunks of the image it may now read from the cache's
        data file (``usable``: one '0' or '1' per chunk). While the daemon
        records the image's reads (``observed``: a boot trace), the server
        reads only the chunks it asked for and asks for each other one
        the first time it reads it, so that every read reaches the trace.
        """
        cache = self.node.cache(_image_id(image_id))
        first, last = _index(first, 'first'), _index(last, 'last')
        if not first <= last < cache.manifest.chunk_count:
            raise errors.BadRequest(
                'chunks %d-%d are not within the image\'s %d chunks'
                % (first, last, cache.manifest.chunk_count))
        if last - first >= MAX_ENSURE:
            raise errors.BadRequest('at most %d chunks per request'
                                    % MAX_ENSURE)
        for index in range(first, last + 1):
            cache.ensure(index)
        return {'image_size': cache.manifest.image_size,
                'chunk_size': cache.manifest.chunk_size,
                'usable': cache.usable_map(),
                'observed': cache.observer is not None}
