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

"""The peer mode: volumes on the node, over its image cache.

Configure a backend on every compute node with::

    [thunder-peer]
    volume_driver = cinder_thunder_driver.peer.PeerDriver
    volume_backend_name = thunder-peer

A volume is a file on the FUSE mount of the node's ``thunder-cache``
daemon: the volume's own copy-on-write layer over the node's read-only
cache of its image, which the daemon fills on demand from peer nodes and
the image-volume (the *origin*), verifying every chunk. The driver asks
the daemon, over its control socket, to register images and to create,
resize and delete layers; it attaches a volume as a loop device (through
Cinder's privsep) and hands Nova a ``local`` connection, with discard on
(a guest's TRIM frees the layer's blocks). Creating a volume from a
thunder image copies nothing: O(1) whatever the image's size. Reverting
to a snapshot swaps in a copy of the snapshot's layer atomically;
unmanaging leaves the layer on the node, and managing adopts a layer of
the node by its volume id.
"""

import os
import typing

from cinder import exception
from cinder.i18n import _
from cinder.image import image_utils
from cinder import interface
from cinder.volume import driver
from cinder.volume import volume_utils
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import units

from cinder_thunder_driver import base
from cinder_thunder_driver import image_clones
from cinder_thunder_driver import image_io
from cinder_thunder_driver import loopdev
from cinder_thunder_driver import options
from thunder_cache.control import client as control_client
from thunder_cache.control import protocol as control_protocol
from thunder_common import locations
from thunder_common import manifest as manifest_mod

LOG = logging.getLogger(__name__)


def image_descriptor(image_id, location, pool, volume_name_template):
    """What the daemon needs to cache an image, from one Glance location.

    ``location`` is ``{'url': ..., 'metadata': {...}}``. Returns None when
    the location is not a thunder image-volume with a manifest.
    """
    try:
        parsed = locations.parse(location.get('url') or '')
    except locations.InvalidLocation as e:
        LOG.debug('Skipping location: %s', e)
        return None
    meta = location.get('metadata') or {}
    try:
        offset, length, digest = manifest_mod.from_metadata(meta)
    except ValueError as e:
        LOG.debug('Location %(url)s has no usable manifest: %(err)s',
                  {'url': location.get('url'), 'err': e})
        return None
    if isinstance(parsed, locations.RbdLocation):
        # The store's rbd:// location: the sealed snapshot of an
        # image-volume, whose RBD image is named after the volume.
        rbd = parsed
        volume_id = locations.volume_id_from_name(parsed.image,
                                                  volume_name_template)
        if volume_id is None:
            return None
    else:
        volume_id = parsed.volume_id
        try:
            rbd = locations.rbd_from_metadata(meta)
        except locations.InvalidLocation as e:
            LOG.warning('Location %(url)s names a malformed RBD image: '
                        '%(err)s', {'url': location.get('url'), 'err': e})
            return None
    # The head of the image-volume, not its sealed snapshot: the store
    # writes the manifest after sealing (so that clones read zeros past
    # the image), and nothing writes the head after that.
    if rbd is not None:
        origin = {'type': 'rbd', 'pool': rbd.pool, 'image': rbd.image}
    else:
        origin = {'type': 'rbd', 'pool': pool,
                  'image': volume_name_template % volume_id}
    return {'image_id': image_id,
            'manifest_digest': digest,
            'manifest_offset': offset,
            'manifest_length': length,
            'origin_volume_id': volume_id,
            'origin': origin}


@interface.volumedriver
class PeerDriver(base.ThunderBase, driver.CloneableImageVD, driver.BaseVD):
    """VMThunder volumes on the compute node (the peer mode)."""

    # Seconds a delete waits for a volume that is still open.
    busy_wait = 5.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(options.thunder_opts)
        conf = self.configuration
        self.daemon = control_client.ControlClient(
            conf.thunder_cache_control_socket,
            timeout=conf.thunder_cache_timeout)
        self._mount_dir = None
        self._stats = {}

    # -- daemon -------------------------------------------------------

    def _call(self, op: str, **args: typing.Any) -> typing.Any:
        """``op``'s result (:mod:`thunder_cache.control.protocol`)."""
        try:
            return self.daemon.call(op, **args)
        except control_client.ControlError as e:
            raise base.backend_error(_(
                'thunder-cache %(op)s failed: %(err)s') % {'op': op, 'err': e})

    @property
    def mount_dir(self):
        if self._mount_dir is None:
            self._mount_dir = self._call('ping')['mount_dir']
        return self._mount_dir

    def _path(self, name):
        return os.path.join(self.mount_dir, name)

    def do_setup(self, context):
        pass

    def check_for_setup_error(self) -> None:
        """The daemon answers and serves volume files."""
        info: control_protocol.PingResult = self._call('ping')
        mount_dir = info.get('mount_dir')
        if not mount_dir:
            raise base.backend_error(_(
                'thunder-cache at %(sock)s serves no volume files: set '
                '[blockdev] enabled = true in its configuration.') % {
                    'sock': self.configuration.thunder_cache_control_socket})
        if not os.path.ismount(mount_dir):
            raise base.backend_error(_(
                '%(dir)s is not mounted: is thunder-cache running with its '
                'volume files?') % {'dir': mount_dir})
        self._mount_dir = mount_dir
        LOG.info('PeerDriver %(version)s: node %(node)s, '
                 'volumes in %(dir)s.',
                 {'version': self.VERSION, 'node': info.get('node_id'),
                  'dir': self._mount_dir})

    # -- stats --------------------------------------------------------

    def _update_volume_stats(self) -> None:
        stats = self._base_stats('local', multiattach=False, qos=False)
        try:
            info: control_protocol.StatsResult = self.daemon.call('stats')
            stats.update({
                'total_capacity_gb': round(info['total_bytes'] / units.Gi,
                                           2),
                'free_capacity_gb': round(info['free_bytes'] / units.Gi, 2),
                'provisioned_capacity_gb': round(
                    info['provisioned_bytes'] / units.Gi, 2),
                'total_volumes': info['volumes'],
                'backend_state': 'up'})
        except (control_client.ControlError, KeyError, TypeError) as e:
            LOG.warning('thunder-cache does not answer; reporting the '
                        'backend down: %s', e)
        self._stats = stats

    # -- volumes ------------------------------------------------------

    def _create(self, volume, image_id=None, source=None):
        self._call('create_volume', volume_id=volume.name,
                   size=volume.size * units.Gi, image_id=image_id,
                   source=source)
        LOG.info('Created peer-mode volume %(name)s (%(size)s GiB%(of)s).',
                 {'name': volume.name, 'size': volume.size,
                  'of': ', image %s' % image_id if image_id else
                  (', from %s' % source if source else '')})

    def create_volume(self, volume):
        self._create(volume)
        return {}

    def create_cloned_volume(self, volume, src_vref):
        self._create(volume, source=src_vref.name)

    def create_volume_from_snapshot(self, volume, snapshot):
        self._create(volume, source=snapshot.name)

    def _delete(self, name):
        for device in loopdev.devices_of(self._path(name), self.mount_dir):
            LOG.warning('Detaching %(dev)s, left over on %(name)s.',
                        {'dev': device, 'name': name})
            loopdev.detach(device)
        # The kernel lets go of a file a moment after its loop device is
        # detached: a volume just detached may look busy briefly.
        try:
            self.daemon.delete_volume(name, busy_wait=self.busy_wait,
                                      interval=0.2)
        except control_client.ControlError as e:
            if e.kind == 'VolumeNotFound':
                LOG.info('Peer-mode volume %s is already gone.', name)
                return
            if e.kind == 'VolumeBusy':
                raise exception.VolumeIsBusy(volume_name=name)
            raise base.backend_error(_(
                'thunder-cache delete_volume failed: %(err)s') % {'err': e})

    def delete_volume(self, volume):
        self._delete(volume.name)

    def extend_volume(self, volume, new_size):
        self._call('resize_volume', volume_id=volume.name,
                   size=new_size * units.Gi)
        path = self._path(volume.name)
        for device in loopdev.devices_of(path, self.mount_dir):
            loopdev.refresh_size(device, path, self.mount_dir)

    # -- snapshots ----------------------------------------------------

    def create_snapshot(self, snapshot):
        """A read-only copy of the volume's own layer (O(written))."""
        self._call('create_volume', volume_id=snapshot.name,
                   size=snapshot.volume_size * units.Gi,
                   source=snapshot.volume_name, read_only=True)

    def delete_snapshot(self, snapshot):
        self._delete(snapshot.name)

    def revert_to_snapshot(self, context, volume, snapshot):
        """The volume's layer replaced by a copy of the snapshot's.

        O(the snapshot's written blocks), atomic on the node (the old
        layer or the new one, never a mix), so Cinder needs no temporary
        snapshot. The volume keeps its size. An attached (open) volume is
        refused, nothing changed.
        """
        self._call('revert_volume', volume_id=volume.name,
                   snapshot_id=snapshot.name)
        LOG.info('Reverted peer-mode volume %(vol)s to %(snap)s.',
                 {'vol': volume.name, 'snap': snapshot.name})

    def snapshot_revert_use_temp_snapshot(self):
        return False

    # -- manage / unmanage --------------------------------------------

    def _existing(self, existing_ref: typing.Any,
                  snapshot: bool = False) -> control_protocol.VolumeInfo:
        """The daemon's info of the layer ``existing_ref`` names.

        :raises ManageExistingInvalidReference: if it names no layer on
            this node, or one that cannot be managed (as a snapshot, with
            ``snapshot``).
        """
        name = (existing_ref or {}).get('source-name')
        if not name or not isinstance(name, str):
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref,
                reason=_('a reference needs source-name: the id of a '
                         'volume on this node (thunder-cache)'))
        try:
            info: control_protocol.VolumeInfo = self.daemon.call(
                'volume_info', volume_id=name)
        except control_client.ControlError as e:
            if e.kind not in ('VolumeNotFound', 'BadRequest'):
                raise base.backend_error(_(
                    'thunder-cache volume_info failed: %(err)s') % {'err': e})
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref,
                reason=_('no volume %s on this node') % name)
        reason = self._not_manageable(info, snapshot)
        if reason:
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref, reason=reason)
        return info

    @staticmethod
    def _not_manageable(info: control_protocol.VolumeInfo,
                        snapshot: bool = False) -> typing.Optional[str]:
        if info['read_only'] and not snapshot:
            return _('a snapshot (read-only layer)')
        if snapshot and not info['read_only']:
            return _('a volume (writable layer), not a snapshot')
        if info['open_count']:
            return _('in use (its file is open, a loop device over it?)')
        return None

    def manage_existing_get_size(self, volume, existing_ref):
        return base.gib(self._existing(existing_ref)['size'])

    def manage_existing(self, volume, existing_ref):
        """Adopt a layer on this node: renamed to the volume's name.

        A layer whose size is not a whole number of GiB grows to the
        volume's size.
        """
        info = self._existing(existing_ref)
        self._call('rename_volume', volume_id=info['id'],
                   new_id=volume.name)
        if info['size'] < volume.size * units.Gi:
            self._call('resize_volume', volume_id=volume.name,
                       size=volume.size * units.Gi)
        LOG.info('Managed peer-mode volume %(old)s as %(name)s.',
                 {'old': info['id'], 'name': volume.name})
        return {}

    def unmanage(self, volume):
        """Cinder forgets the volume; its layer stays on the node.

        ``manage_existing`` with ``source-name`` = the volume's name
        adopts it again.
        """
        LOG.info('Unmanaged peer-mode volume %s: its layer stays on the '
                 'node.', volume.name)

    def manage_existing_snapshot_get_size(self, snapshot, existing_ref):
        return base.gib(self._existing(existing_ref, snapshot=True)['size'])

    def manage_existing_snapshot(self, snapshot, existing_ref):
        """Adopt a read-only layer of the volume's image as the snapshot."""
        info = self._existing(existing_ref, snapshot=True)
        volume = self._call('volume_info', volume_id=snapshot.volume_name)
        if info['image_id'] != volume['image_id']:
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref,
                reason=_('it reads image %(layer)s, volume %(vol)s reads '
                         '%(image)s') % {'layer': info['image_id'],
                                         'vol': snapshot.volume_name,
                                         'image': volume['image_id']})
        self._call('rename_volume', volume_id=info['id'],
                   new_id=snapshot.name)
        LOG.info('Managed peer-mode snapshot %(old)s as %(name)s.',
                 {'old': info['id'], 'name': snapshot.name})
        return {}

    def unmanage_snapshot(self, snapshot):
        """Cinder forgets the snapshot; its read-only layer stays."""
        LOG.info('Unmanaged peer-mode snapshot %s: its layer stays on the '
                 'node.', snapshot.name)

    def _layers(self) -> typing.Iterator[control_protocol.VolumeInfo]:
        """The info of every layer on the node, a page at a time."""
        marker = None
        while True:
            page: typing.List[control_protocol.VolumeInfo] = self._call(
                'list_volumes', marker=marker)
            yield from page
            if not page:
                return
            marker = page[-1]['id']

    def get_manageable_volumes(self, cinder_volumes, marker, limit, offset,
                               sort_keys, sort_dirs):
        managed = {v['id'] for v in cinder_volumes}
        entries = []
        for info in self._layers():
            cinder_id = volume_utils.extract_id_from_volume_name(info['id'])
            reason = (_('already managed') if cinder_id in managed else
                      self._not_manageable(info))
            entries.append({
                'reference': {'source-name': info['id']},
                'size': base.gib(info['size']),
                'cinder_id': cinder_id if cinder_id in managed else None,
                'extra_info': ('image %s' % info['image_id']
                               if info['image_id'] else None),
                'safe_to_manage': reason is None,
                'reason_not_safe': reason})
        return volume_utils.paginate_entries_list(
            entries, marker, limit, offset, sort_keys, sort_dirs)

    # -- images -------------------------------------------------------

    def clone_image(self, context, volume, image_location, image_meta,
                    image_service):
        """A layer over the node's cache of a thunder image: O(1).

        Returns ``({}, False)`` (Cinder then downloads the image) when the
        image is not raw, the volume is encrypted, or no location is a
        thunder image-volume with a manifest.
        """
        declined = image_clones.not_cloneable(volume, image_meta)
        if declined:
            return self._decline_image(volume, image_meta, *declined)
        _direct_url, location_list = image_location or (None, None)
        for location in location_list or []:
            descriptor = image_descriptor(
                image_meta['id'], location,
                self.configuration.thunder_rbd_pool,
                cfg.CONF.volume_name_template)
            if descriptor is None:
                continue
            info = self._call('register_image', **descriptor)
            if info['image_size'] > volume.size * units.Gi:
                raise base.backend_error(_(
                    'Image %(id)s (%(bytes)d bytes) does not fit in a '
                    '%(size)s GiB volume.') % {
                        'id': image_meta['id'],
                        'bytes': info['image_size'],
                        'size': volume.size})
            self._create(volume, image_id=image_meta['id'])
            self.image_clones.cloned()
            return {'provider_location': None}, True
        return self._decline_image(
            volume, image_meta, image_clones.NO_LOCATION,
            'none of its %d locations is a thunder image-volume with a '
            'manifest' % len(location_list or []))

    def copy_image_to_volume(self, context, volume, image_service, image_id,
                             disable_sparse=False):
        """Download an image (converted to raw) into the volume's layer."""
        with image_utils.temporary_file(prefix='thunder-') as tmp:
            image_utils.fetch_to_raw(context, image_service, image_id, tmp,
                                     self.configuration.volume_dd_blocksize,
                                     size=volume.size,
                                     run_as_root=False,
                                     disable_sparse=disable_sparse)
            path = self._path(volume.name)
            if os.path.getsize(tmp) > os.path.getsize(path):
                raise base.backend_error(_(
                    'Image %(id)s is larger than volume %(name)s.') % {
                        'id': image_id, 'name': volume.name})
            with VolumeFile(path) as target:
                image_io.file_to_image(tmp, target, sparse=True)

    def copy_volume_to_image(self, context, volume, image_service,
                             image_meta):
        """Upload the volume's bytes (as the VM sees them) to Glance."""
        volume_utils.upload_volume(context, image_service, image_meta,
                                   self._path(volume.name), volume,
                                   run_as_root=False)

    # -- connections --------------------------------------------------

    def _check_local(self, volume, connector):
        node = volume_utils.extract_host(volume.host, 'host')
        host = (connector or {}).get('host')
        if host and node and host != node:
            raise base.backend_error(_(
                'Volume %(id)s lives on %(node)s and can only be attached '
                'there, not on %(host)s (schedule the instance on the '
                "volume's node, e.g. with the same availability zone per "
                'node).') % {'id': volume.id, 'node': node, 'host': host})

    def initialize_connection(self, volume, connector):
        """``local`` connection info: a loop device over the volume file."""
        self._check_local(volume, connector)
        path = self._path(volume.name)
        try:
            device, dio = loopdev.attach(
                path, self.mount_dir,
                direct_io=self.configuration.thunder_loop_direct_io)
        except loopdev.LoopError as e:
            raise base.backend_error(_(
                'Cannot attach %(path)s: %(err)s') % {'path': path, 'err': e})
        if self.configuration.thunder_loop_direct_io and not dio:
            LOG.warning('%(dev)s reads %(path)s through the page cache: the '
                        'kernel refused direct I/O.',
                        {'dev': device, 'path': path})
        LOG.info('Volume %(name)s attached as %(dev)s.',
                 {'name': volume.name, 'dev': device})
        # discard: Nova sets discard='unmap' on the disk, so a guest's
        # TRIM reaches the loop device and frees the layer's blocks.
        return {'driver_volume_type': 'local',
                'data': {'device_path': device, 'volume_id': volume.id,
                         'discard': True}}

    def terminate_connection(self, volume, connector, **kwargs):
        path = self._path(volume.name)
        for device in loopdev.devices_of(path, self.mount_dir):
            loopdev.detach(device)
            LOG.info('Volume %(name)s detached from %(dev)s.',
                     {'name': volume.name, 'dev': device})


class VolumeFile:
    """A volume file with the writer interface of ``image_io``."""

    def __init__(self, path):
        self._fd = os.open(path, os.O_RDWR)

    def write(self, data, offset):
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    def write_zeroes(self, offset, length):
        self.write(bytes(length), offset)

    def flush(self):
        os.fsync(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self._fd)
