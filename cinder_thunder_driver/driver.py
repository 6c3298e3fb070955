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

"""ThunderDriver: volumes from images in O(1) on Ceph RBD.

Configure a backend with::

    [thunder]
    volume_driver = cinder_thunder_driver.driver.ThunderDriver
    volume_backend_name = thunder
    thunder_rbd_pool = volumes

The peer mode, volumes on the compute node over its image cache, is
another class: ``volume_driver = cinder_thunder_driver.peer.PeerDriver``
(:mod:`cinder_thunder_driver.peer`). This module is the shared mode.

Volumes are RBD images named after Cinder's ``volume_name_template``. A
volume made from a thunder image is an RBD clone of the one protected
snapshot of the image's sealed image-volume (see
``thunder_common.rbd_layout``): no bytes are copied, whatever the image's
size or the number of clones. How clones, deletion and flattening fit
together is described in ``cinder_thunder_driver.clones``.
"""

import os

from cinder.common import constants
from cinder import context as cinder_context
from cinder import exception
from cinder.i18n import _
from cinder.image import image_utils
from cinder import interface
from cinder.volume import driver
from cinder.volume import qos_specs
from cinder.volume import volume_utils
from oslo_config import cfg
from oslo_log import log as logging
from oslo_service import loopingcall
from oslo_utils import fileutils
from oslo_utils import units

from cinder_thunder_driver import base
from cinder_thunder_driver import clones
from cinder_thunder_driver import cluster as cluster_mod
from cinder_thunder_driver.cluster import rbd
from cinder_thunder_driver import flattener
from cinder_thunder_driver import image_clones
from cinder_thunder_driver import image_io
from cinder_thunder_driver import options
from thunder_common import locations
from thunder_common import rbd_layout

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

# Back-end QoS: Cinder QoS spec keys and the librbd settings that enforce
# them, stored as per-image configuration overrides ("conf_" metadata).
QOS_KEYS = {
    'total_iops_sec': 'rbd_qos_iops_limit',
    'read_iops_sec': 'rbd_qos_read_iops_limit',
    'write_iops_sec': 'rbd_qos_write_iops_limit',
    'total_bytes_sec': 'rbd_qos_bps_limit',
    'read_bytes_sec': 'rbd_qos_read_bps_limit',
    'write_bytes_sec': 'rbd_qos_write_bps_limit',
    'total_iops_sec_max': 'rbd_qos_iops_burst',
    'read_iops_sec_max': 'rbd_qos_read_iops_burst',
    'write_iops_sec_max': 'rbd_qos_write_iops_burst',
    'total_bytes_sec_max': 'rbd_qos_bps_burst',
    'read_bytes_sec_max': 'rbd_qos_read_bps_burst',
    'write_bytes_sec_max': 'rbd_qos_write_bps_burst',
}


@interface.volumedriver
class ThunderDriver(base.ThunderBase, driver.CloneableImageVD,
                    driver.ManageableVD, driver.BaseVD):
    """VMThunder volumes on Ceph RBD: zero-copy clones of image-volumes."""

    SUPPORTS_ACTIVE_ACTIVE = True

    # Features a multiattach volume must not have: they assume a single
    # writer.
    SINGLE_WRITER_FEATURES = ('RBD_FEATURE_EXCLUSIVE_LOCK',
                              'RBD_FEATURE_OBJECT_MAP',
                              'RBD_FEATURE_FAST_DIFF',
                              'RBD_FEATURE_JOURNALING')

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(options.thunder_opts)
        self.cluster = cluster_mod.Cluster(self.configuration)
        self.flattener = None
        self._purge_task = None
        self._keyring_data = None
        self._stats = {}

    # -- setup --------------------------------------------------------

    def do_setup(self, context):
        """Read the keyring and start the background workers."""
        if self.configuration.thunder_mode == 'peer':
            raise exception.VolumeDriverException(message=_(
                'Backend %s sets thunder_mode = peer, but ThunderDriver is '
                'the shared mode: set volume_driver = '
                'cinder_thunder_driver.peer.PeerDriver for the peer mode.')
                % self.configuration.config_group)
        self.cluster.check_prerequisites()
        keyring = self.configuration.thunder_rbd_keyring_conf
        if keyring:
            with open(keyring) as f:
                self._keyring_data = f.read()
        self.flattener = flattener.Flattener(
            self.cluster, self.configuration.thunder_flatten_workers)
        self._purge_task = loopingcall.FixedIntervalLoopingCall(
            self._purge_deferred)
        interval = self.configuration.thunder_deferred_purge_interval
        self._purge_task.start(interval=interval, initial_delay=interval)

    def check_for_setup_error(self):
        """Connect to Ceph and open the pool; fail with what to fix."""
        with self.cluster.ioctx():
            pass
        LOG.info('ThunderDriver %(version)s ready: pool %(pool)s of Ceph '
                 'cluster %(fsid)s.',
                 {'version': self.VERSION,
                  'pool': self.configuration.thunder_rbd_pool,
                  'fsid': self.cluster.fsid()})

    def stop_background_work(self, timeout=None):
        """Stop the purge sweep and the flatten workers (tests, tools).

        Cinder has no driver shutdown hook; in cinder-volume both end with
        the process, and an interrupted flatten is simply redone later.
        """
        if self._purge_task is not None:
            self._purge_task.stop()
            self._purge_task = None
        if self.flattener is not None:
            self.flattener.wait_idle(timeout)
            self.flattener.stop()
        self.cluster.close()

    def _purge_deferred(self):
        try:
            removed = clones.purge_deferred(self.cluster)
        except Exception:
            LOG.exception('Sweep of deferred deletions in pool %s failed.',
                          self.configuration.thunder_rbd_pool)
            return
        if removed:
            LOG.info('Removed %d deferred RBD images.', removed)

    # -- stats --------------------------------------------------------

    def _update_volume_stats(self):
        conf = self.configuration
        stats = self._base_stats(constants.CEPH, multiattach=True, qos=True)
        try:
            free, total = self._pool_capacity()
            stats['free_capacity_gb'] = round(free / units.Gi, 2)
            stats['total_capacity_gb'] = round(total / units.Gi, 2)
            with self.cluster.ioctx() as ioctx:
                usage = self.cluster.rbd().pool_stats_get(ioctx)
            stats['provisioned_capacity_gb'] = base.gib(
                usage['image_provisioned_bytes'])
            stats['total_volumes'] = usage['image_count']
            stats['location_info'] = '%s:%s' % (self.cluster.fsid(),
                                                conf.thunder_rbd_pool)
            stats['backend_state'] = 'up'
        except (exception.VolumeBackendAPIException, rbd.Error,
                cluster_mod.rados.Error) as e:
            LOG.warning('Could not read the capacity of pool %(pool)s; '
                        'reporting the backend down: %(err)s',
                        {'pool': conf.thunder_rbd_pool, 'err': e})
        self._stats = stats

    def _pool_capacity(self):
        """(free, total) bytes of the pool, honouring its quota."""
        pool = self.configuration.thunder_rbd_pool
        df = self.cluster.mon_command('df')
        quota = self.cluster.mon_command('osd pool get-quota', pool=pool)
        matching = [p for p in df['pools'] if p['name'] == pool]
        if not matching:
            raise base.backend_error(_(
                'Pool %(pool)s is missing from "ceph df".') % {'pool': pool})
        stats = matching[0]['stats']
        used = stats.get('stored', stats.get('bytes_used', 0))
        free = stats['max_avail']
        if quota.get('quota_max_bytes'):
            total = quota['quota_max_bytes']
            free = max(min(total - used, free), 0)
        else:
            total = free + used
        return free, total

    def _check_fits(self, size_gb):
        """Refuse a volume that the pool could never hold."""
        try:
            free, total = self._pool_capacity()
        except exception.VolumeBackendAPIException:
            # No usage statistics (ceph-mgr down): leave it to the
            # scheduler rather than refuse every volume.
            LOG.warning('Pool statistics unavailable; not checking that a '
                        '%s GiB volume fits.', size_gb)
            return
        ratio = self.configuration.safe_get(
            'max_over_subscription_ratio') or 1.0
        try:
            ratio = float(ratio)
        except ValueError:
            # 'auto': the scheduler derives the ratio from usage; leave the
            # decision to it.
            return
        limit_gb = total / units.Gi * ratio
        if size_gb > limit_gb:
            msg = _('A %(size)s GiB volume does not fit in pool %(pool)s: '
                    'it holds %(total).1f GiB, %(limit).1f GiB with '
                    'max_over_subscription_ratio %(ratio)s. Ask for a '
                    'smaller volume or add capacity.') % {
                'size': size_gb, 'pool': self.configuration.thunder_rbd_pool,
                'total': total / units.Gi, 'limit': limit_gb, 'ratio': ratio}
            LOG.error(msg)
            raise exception.VolumeBackendAPIException(data=msg)

    # -- volumes ------------------------------------------------------

    def create_volume(self, volume):
        self._check_fits(volume.size)
        features = self._features_for(volume)
        with self.cluster.ioctx() as ioctx:
            try:
                self.cluster.rbd().create(ioctx, volume.name,
                                          volume.size * units.Gi,
                                          old_format=False,
                                          features=features)
            except rbd.ImageExists:
                msg = _('RBD image %s already exists: refusing to reuse '
                        'it.') % volume.name
                raise exception.VolumeBackendAPIException(data=msg)
            self._finish_volume(ioctx, volume)
        LOG.info('Created volume %(name)s (%(size)s GiB).',
                 {'name': volume.name, 'size': volume.size})
        return {}

    def delete_volume(self, volume):
        with self.cluster.ioctx() as ioctx:
            clones.delete_image(self.cluster, ioctx, volume.name)

    def extend_volume(self, volume, new_size):
        self._check_fits(new_size)
        with self.cluster.ioctx() as ioctx:
            self._resize(ioctx, volume.name, new_size)

    def _resize(self, ioctx, name, size_gb, shrink=False):
        """Grow the image to ``size_gb`` (or make it exactly that)."""
        with self.cluster.image(ioctx, name) as image:
            current = image.size()
            if current < size_gb * units.Gi or (
                    shrink and current > size_gb * units.Gi):
                image.resize(size_gb * units.Gi)

    def _features_for(self, volume):
        """RBD features for a new volume; None means the cluster default."""
        if not self._is_multiattach(volume):
            return None
        features = self._default_features()
        for name in self.SINGLE_WRITER_FEATURES:
            features &= ~getattr(rbd, name)
        return features

    def _default_features(self):
        value = self.cluster.client().conf_get('rbd_default_features')
        if value.isdigit():
            return int(value)
        return self.cluster.rbd().features_from_string(value)

    @staticmethod
    def _is_multiattach(volume):
        return bool(getattr(volume, 'multiattach', False))

    def _finish_volume(self, ioctx, volume):
        """Apply per-volume settings: multiattach features, back-end QoS."""
        specs = self._qos_specs(volume)
        multiattach = self._is_multiattach(volume)
        if not specs and not multiattach:
            return
        with self.cluster.image(ioctx, volume.name) as image:
            if multiattach:
                mask = 0
                for name in self.SINGLE_WRITER_FEATURES:
                    mask |= getattr(rbd, name)
                enabled = image.features() & mask
                if enabled:
                    image.update_features(enabled, False)
            for key, value in (specs or {}).items():
                if key in QOS_KEYS:
                    image.metadata_set('conf_' + QOS_KEYS[key], str(value))

    @staticmethod
    def _qos_specs(volume):
        """Back-end QoS specs of the volume's type, or None."""
        vtype = volume.volume_type
        specs_id = vtype.get('qos_specs_id') if vtype else None
        if not specs_id:
            return None
        specs = qos_specs.get_qos_specs(cinder_context.get_admin_context(),
                                        specs_id)
        if specs['consumer'] not in ('back-end', 'both'):
            return None
        return specs['specs']

    # -- clones -------------------------------------------------------

    def _clone(self, volume, parent_pool, parent_name, snapshot, depth,
               sealed=False):
        """Clone ``parent_pool/parent_name@snapshot`` into the new volume.

        The clone is usable at once; beyond the depth limit it is also
        queued for flattening in the background. A clone of a sealed
        image-volume gets exactly the volume's size: the image-volume ends
        with the image's manifest, which Cinder's size check (volume at
        least as large as the image) does not count and the volume must
        not keep.
        """
        with self.cluster.ioctx() as ioctx, \
                self.cluster.ioctx(parent_pool) as pioctx:
            self.cluster.rbd().clone(pioctx, parent_name, snapshot, ioctx,
                                     volume.name,
                                     features=self._features_for(volume))
            try:
                self._resize(ioctx, volume.name, volume.size, shrink=sealed)
                self._finish_volume(ioctx, volume)
            except Exception:
                LOG.exception('Could not finish clone %s; removing it.',
                              volume.name)
                # The caller holds the parent's lock: releasing the parent
                # here would deadlock on it.
                clones.delete_image(self.cluster, ioctx, volume.name,
                                    release=False)
                raise
        LOG.info('Created volume %(name)s as a clone of %(pool)s/%(src)s@'
                 '%(snap)s (clone depth %(depth)d).',
                 {'name': volume.name, 'pool': parent_pool,
                  'src': parent_name, 'snap': snapshot, 'depth': depth})
        if depth > self.configuration.thunder_max_clone_depth:
            self.flattener.flatten_later(self.configuration.thunder_rbd_pool,
                                         volume.name)

    def _snapshot_for_clone(self, image):
        """The snapshot to clone ``image`` from, taking one only if needed.

        A sealed image-volume always has its snapshot. A volume unchanged
        since its latest clone snapshot reuses it (needs the fast-diff
        feature to tell cheaply); otherwise a new one is taken.
        """
        sealed = rbd_layout.sealed_snapshot(image)
        if sealed:
            rbd_layout.create_protected_snapshot(image, sealed)
            return sealed
        latest = rbd_layout.latest_clone_snapshot(image)
        if latest and self._unchanged_since(image, latest):
            return latest
        name = rbd_layout.new_clone_snapshot_name()
        rbd_layout.create_protected_snapshot(image, name)
        return name

    @staticmethod
    def _unchanged_since(image, snapshot):
        if not image.features() & rbd.RBD_FEATURE_FAST_DIFF:
            return False
        snaps = {s['name']: s for s in image.list_snaps()}
        if snaps[snapshot]['size'] != image.size():
            return False
        changed = []

        def note(offset, length, exists):
            changed.append(offset)
            return -1  # one change is enough: stop iterating.

        try:
            image.diff_iterate(0, image.size(), snapshot, note,
                               whole_object=True)
        except rbd.Error:
            # Stopping the walk early surfaces as an error; so does a
            # failed walk, after which a fresh snapshot is the safe choice.
            return False
        return not changed

    def create_cloned_volume(self, volume, src_vref):
        """Clone a volume, without a new snapshot when one can be reused."""
        self._check_fits(volume.size)
        self._clone_from(volume, self.configuration.thunder_rbd_pool,
                         src_vref.name)

    def create_volume_from_snapshot(self, volume, snapshot):
        self._check_fits(volume.size)
        self._clone_from(volume, self.configuration.thunder_rbd_pool,
                         snapshot.volume_name, snapshot.name)

    def _clone_from(self, volume, pool, src_name, snapshot=None):
        """Clone ``pool/src_name`` (at ``snapshot``, or a reusable one).

        The source is locked while its snapshot is chosen and cloned, so a
        concurrent cleanup never removes the snapshot under the clone.
        """
        limit = self.configuration.thunder_max_clone_depth
        with self.cluster.ioctx(pool) as ioctx:
            try:
                with self.cluster.image(ioctx, src_name,
                                        read_only=True) as src:
                    src_id = src.id()
            except rbd.ImageNotFound:
                msg = _('Clone source %(pool)s/%(name)s does not exist.') % {
                    'pool': pool, 'name': src_name}
                raise exception.VolumeBackendAPIException(data=msg)
            with clones.image_lock(src_id):
                with self.cluster.image(ioctx, src_name) as src:
                    if snapshot is None:
                        snapshot = self._snapshot_for_clone(src)
                    elif not src.snap_exists(snapshot):
                        raise exception.SnapshotNotFound(
                            snapshot_id=snapshot)
                    depth = clones.clone_depth(self.cluster, src, limit) + 1
                    sealed = rbd_layout.sealed_snapshot(src) == snapshot
                self._clone(volume, pool, src_name, snapshot, depth,
                            sealed=sealed)

    # -- images -------------------------------------------------------

    def clone_image(self, context, volume, image_location, image_meta,
                    image_service):
        """Clone a raw thunder (or same-cluster rbd) image in O(1).

        Returns ``({}, False)`` to let Cinder fall back to a copy when the
        image is not raw, is encrypted, or none of its locations is on this
        cluster; the reason goes to the log and the volume stats
        (``cinder_thunder_driver.image_clones``).
        """
        declined = image_clones.not_cloneable(volume, image_meta)
        if declined:
            return self._decline_image(volume, image_meta, *declined)
        direct_url, location_list = image_location or (None, None)
        urls = [loc['url'] for loc in (location_list or []) if loc.get('url')]
        if direct_url and direct_url not in urls:
            urls.insert(0, direct_url)
        for url in urls:
            source = self._clone_source(url, image_meta)
            if source is None:
                continue
            self._check_fits(volume.size)
            self._clone_from(volume, *source)
            self.image_clones.cloned()
            return {'provider_location': None}, True
        return self._decline_image(
            volume, image_meta, image_clones.NO_LOCATION,
            'none of its %d locations is a thunder image-volume or an RBD '
            "image of this backend's Ceph cluster" % len(urls))

    def _clone_source(self, url, image_meta):
        """(pool, image, snapshot or None) to clone for a URL, or None."""
        try:
            location = locations.parse(url)
        except locations.InvalidLocation as e:
            LOG.debug('Skipping location: %s', e)
            return None
        if isinstance(location, locations.RbdLocation):
            if location.fsid != self.cluster.fsid():
                LOG.debug('%s is on another Ceph cluster.', url)
                return None
            return self._verified_rbd_source(location, image_meta.get('id'))
        name = CONF.volume_name_template % location.volume_id
        pool = self.configuration.thunder_rbd_pool
        try:
            with self.cluster.ioctx() as ioctx, \
                    self.cluster.image(ioctx, name, read_only=True) as img:
                owner = rbd_layout.metadata(img,
                                            rbd_layout.META_GLANCE_IMAGE_ID)
        except rbd.ImageNotFound:
            LOG.debug('Image-volume %s is not in this backend.', name)
            return None
        if owner != image_meta.get('id'):
            LOG.warning('Location %(url)s of image %(id)s names volume '
                        '%(name)s, which holds image %(owner)s: not cloning '
                        'it.', {'url': url, 'id': image_meta.get('id'),
                                'name': name, 'owner': owner})
            return None
        return pool, name, None

    def _verified_rbd_source(self, location, image_id):
        """An rbd:// location is usable if its snapshot holds the image.

        That is: a thunder image-volume sealed for this image, or else an
        RBD image named after it, as Glance's rbd store names its images.
        Anything else on the cluster (another image's volume, a tenant's
        volume) is refused: whoever can set image locations must not get
        another image's bytes cloned into a volume of theirs.
        """
        try:
            with self.cluster.ioctx(location.pool) as ioctx, \
                    self.cluster.image(ioctx, location.image,
                                       snapshot=location.snapshot,
                                       read_only=True) as img:
                owner = rbd_layout.metadata(img,
                                            rbd_layout.META_GLANCE_IMAGE_ID)
        except (rbd.Error, exception.VolumeBackendAPIException) as e:
            LOG.debug('Cannot open %(url)s: %(err)s',
                      {'url': location.url, 'err': e})
            return None
        if (owner or location.image) != image_id:
            LOG.warning('Location %(url)s of image %(id)s names an RBD image '
                        'that holds %(owner)s: not cloning it.',
                        {'url': location.url, 'id': image_id,
                         'owner': 'image %s' % owner if owner else
                         'no image of this name'})
            return None
        return location.pool, location.image, location.snapshot

    def copy_image_to_volume(self, context, volume, image_service, image_id,
                             disable_sparse=False):
        """Download an image (converted to raw) into the volume.

        The download and qemu-img run on a temporary file that belongs to
        cinder-volume, so neither needs root.
        """
        # temporary_file() creates the file in image_conversion_dir itself
        # (and fails if given a dir= too).
        with image_utils.temporary_file(prefix='thunder-') as tmp:
            image_utils.fetch_to_raw(context, image_service, image_id, tmp,
                                     self.configuration.volume_dd_blocksize,
                                     size=volume.size,
                                     run_as_root=False,
                                     disable_sparse=disable_sparse)
            with self.cluster.ioctx() as ioctx:
                with self.cluster.image(ioctx, volume.name) as image:
                    image_io.file_to_image(tmp, image,
                                           sparse=not disable_sparse)

    def copy_volume_to_image(self, context, volume, image_service,
                             image_meta):
        """Upload the volume's bytes to Glance (converted as asked)."""
        tmp_dir = volume_utils.image_conversion_dir()
        tmp = os.path.join(tmp_dir, 'thunder-%s-%s' % (
            volume.name, image_meta['id']))
        with fileutils.remove_path_on_error(tmp):
            with self.cluster.ioctx() as ioctx:
                with self.cluster.image(ioctx, volume.name,
                                        read_only=True) as image:
                    image_io.image_to_file(image, tmp)
            volume_utils.upload_volume(context, image_service, image_meta,
                                       tmp, volume, run_as_root=False)
        os.unlink(tmp)

    # -- snapshots ----------------------------------------------------

    def create_snapshot(self, snapshot):
        with self.cluster.ioctx() as ioctx:
            with self.cluster.image(ioctx, snapshot.volume_name) as image:
                rbd_layout.create_protected_snapshot(image, snapshot.name)

    def delete_snapshot(self, snapshot):
        """Delete a snapshot; one with clones is retired until they go."""
        with self.cluster.ioctx() as ioctx:
            try:
                with self.cluster.image(ioctx, snapshot.volume_name,
                                        read_only=True) as image:
                    image_id = image.id()
                with clones.image_lock(image_id), \
                        self.cluster.image(ioctx,
                                           snapshot.volume_name) as image:
                    if not image.snap_exists(snapshot.name):
                        LOG.info('Snapshot %s is already gone.',
                                 snapshot.name)
                        return
                    if clones.children(image, snapshot.name):
                        retired = (rbd_layout.RETIRED_SNAP_PREFIX +
                                   snapshot.name)
                        image.rename_snap(snapshot.name, retired)
                        LOG.info('Snapshot %(snap)s has clones: retired as '
                                 '%(retired)s until the last one is gone.',
                                 {'snap': snapshot.name, 'retired': retired})
                        return
                    clones.remove_snapshot(image, snapshot.name)
            except rbd.ImageNotFound:
                LOG.info('Volume %s of snapshot %s is gone.',
                         snapshot.volume_name, snapshot.name)

    def revert_to_snapshot(self, context, volume, snapshot):
        with self.cluster.ioctx() as ioctx:
            with self.cluster.image(ioctx, volume.name) as image:
                image.rollback_to_snap(snapshot.name)
            # Rolling back restores the snapshot's size; keep the volume's.
            self._resize(ioctx, volume.name, volume.size)

    def snapshot_revert_use_temp_snapshot(self):
        return False

    # -- connections --------------------------------------------------

    def initialize_connection(self, volume, connector):
        """``rbd`` connection info for os-brick and Nova (librbd access)."""
        hosts, ports = self.cluster.monitors()
        conf = self.configuration
        data = {
            'name': '%s/%s' % (conf.thunder_rbd_pool, volume.name),
            'hosts': hosts,
            'ports': ports,
            'cluster_name': conf.thunder_rbd_cluster_name,
            'auth_enabled': conf.thunder_rbd_user is not None,
            'auth_username': conf.thunder_rbd_user,
            'secret_type': 'ceph',
            'secret_uuid': conf.thunder_rbd_secret_uuid,
            'volume_id': volume.id,
            'discard': True,
        }
        if self._keyring_data:
            data['keyring'] = self._keyring_data
        return {'driver_volume_type': 'rbd', 'data': data}

    def terminate_connection(self, volume, connector, **kwargs):
        pass

    # -- manage / unmanage --------------------------------------------

    def manage_existing(self, volume, existing_ref):
        """Adopt an RBD image of the pool by renaming it to the volume."""
        name = self._existing_name(existing_ref)
        with self.cluster.ioctx() as ioctx:
            try:
                self.cluster.rbd().rename(ioctx, name, volume.name)
            except rbd.ImageNotFound:
                raise exception.ManageExistingInvalidReference(
                    existing_ref=existing_ref,
                    reason=_('no RBD image %s in the pool') % name)
            self._finish_volume(ioctx, volume)
        return {}

    def manage_existing_get_size(self, volume, existing_ref):
        name = self._existing_name(existing_ref)
        with self.cluster.ioctx() as ioctx:
            try:
                with self.cluster.image(ioctx, name, read_only=True) as image:
                    return base.gib(image.size())
            except rbd.ImageNotFound:
                raise exception.ManageExistingInvalidReference(
                    existing_ref=existing_ref,
                    reason=_('no RBD image %s in the pool') % name)

    @staticmethod
    def _existing_name(existing_ref):
        name = existing_ref.get('source-name')
        if not name or not isinstance(name, str):
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref,
                reason=_('a reference needs source-name: the RBD image '
                         'name'))
        return name

    def unmanage(self, volume):
        pass

    def get_manageable_volumes(self, cinder_volumes, marker, limit, offset,
                               sort_keys, sort_dirs):
        managed = {v['id'] for v in cinder_volumes}
        entries = []
        with self.cluster.ioctx() as ioctx:
            for name in self.cluster.rbd().list(ioctx):
                try:
                    with self.cluster.image(ioctx, name,
                                            read_only=True) as image:
                        entries.append(self._manageable_entry(
                            name, image, managed))
                except rbd.ImageNotFound:
                    continue
        return volume_utils.paginate_entries_list(
            entries, marker, limit, offset, sort_keys, sort_dirs)

    @staticmethod
    def _manageable_entry(name, image, managed):
        cinder_id = volume_utils.extract_id_from_volume_name(name)
        entry = {'reference': {'source-name': name},
                 'size': base.gib(image.size()),
                 'cinder_id': cinder_id if cinder_id in managed else None,
                 'extra_info': None,
                 'safe_to_manage': False,
                 'reason_not_safe': None}
        if cinder_id in managed:
            entry['reason_not_safe'] = 'already managed'
        elif rbd_layout.sealed_snapshot(image):
            entry['reason_not_safe'] = 'image-volume of the thunder store'
        elif list(image.watchers_list()):
            entry['reason_not_safe'] = 'volume in use'
        else:
            entry['safe_to_manage'] = True
        return entry
