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

"""The clone graph: depth, deletion with dependants, and cleanup.

Volumes are RBD clones of protected snapshots. Deleting a volume that
other volumes were cloned from must neither fail (upstream's ImageBusy) nor
copy data (a flatten storm), so a volume whose snapshots still have
children is *deferred*: tagged and moved to the RBD trash, where it keeps
serving its clones' reads. Whenever a clone goes away (deleted or
flattened) its parent is *released*: the parent's internal snapshot is
removed once childless, and a deferred parent with no dependants left is
removed for good, walking up the chain. A periodic sweep repeats the
release for anything an interrupted operation left behind.

Every change to one RBD image happens under an in-process lock named by
the image's id (stable across renames and the trash); Cinder's volume
manager already serialises operations on one volume across processes.
"""

import collections

from cinder import exception
from oslo_concurrency import lockutils
from oslo_log import log as logging

from cinder_thunder_driver.cluster import rbd
from thunder_common import rbd_layout

LOG = logging.getLogger(__name__)

# Where a clone's data comes from: the parent image (by id, since it may be
# in the trash) and the snapshot it was cloned from.
Parent = collections.namedtuple('Parent', 'pool image_id name snapshot')


def image_lock(image_id):
    """In-process lock serialising changes to one RBD image."""
    return lockutils.lock('thunder-rbd-image-%s' % image_id)


def parent_of(image):
    """The Parent of an open image, or None if it is not a clone."""
    try:
        spec = image.get_parent_image_spec()
        image_id = image.parent_id()
    except rbd.ImageNotFound:
        return None
    return Parent(spec['pool_name'], image_id, spec['image_name'],
                  spec['snap_name'])


def children(image, snapshot):
    """Images cloned from ``snapshot`` (trashed ones included)."""
    image.set_snap(snapshot)
    try:
        return list(image.list_children2())
    finally:
        image.set_snap(None)


def clone_depth(cluster, image, limit):
    """Length of the clone chain above an image, counted up to ``limit``."""
    depth = 0
    parent = parent_of(image)
    while parent is not None and depth < limit:
        depth += 1
        with cluster.ioctx(parent.pool) as ioctx:
            with cluster.image(ioctx, image_id=parent.image_id,
                               read_only=True) as parent_image:
                parent = parent_of(parent_image)
    return depth


def remove_snapshot(image, snapshot):
    if image.is_protected_snap(snapshot):
        image.unprotect_snap(snapshot)
    image.remove_snap(snapshot)


def delete_image(cluster, ioctx, name, release=True):
    """Delete an RBD image, deferring it while clones depend on it.

    A missing image counts as deleted. Raises ``VolumeIsBusy`` when the
    image has a snapshot VMThunder did not create (Cinder deletes a
    volume's snapshots before the volume; anything else is the operator's)
    or is still open by a client. With ``release=False`` the parent is
    left alone: for a caller that holds the parent's lock (the lock is not
    reentrant), at the cost of a childless internal snapshot that the
    parent's next clone or deletion takes care of.
    """
    try:
        with cluster.image(ioctx, name, read_only=True) as image:
            image_id = image.id()
    except rbd.ImageNotFound:
        LOG.info('RBD image %s no longer exists; nothing to delete.', name)
        return
    with image_lock(image_id):
        try:
            with cluster.image(ioctx, name) as image:
                deferred, parent = _drop_unused_snapshots(image, name)
                if deferred:
                    image.metadata_set(rbd_layout.META_DEFERRED, '1')
            if deferred:
                cluster.rbd().trash_move(ioctx, name, 0)
                LOG.info('RBD image %(name)s (id %(id)s) has clones; moved '
                         'to the trash until the last one is gone.',
                         {'name': name, 'id': image_id})
                return
            cluster.rbd().remove(ioctx, name)
        except rbd.ImageNotFound:
            LOG.info('RBD image %s was deleted concurrently.', name)
            return
        except rbd.ImageBusy:
            raise exception.VolumeIsBusy(volume_name=name)
    LOG.debug('Removed RBD image %s', name)
    if release:
        try:
            release_parent(cluster, parent)
        except Exception:
            # The image is gone, which is what the caller asked for. What
            # is left (an unused internal snapshot, a deferred parent) is
            # cleaned by the parent's next clone or deletion and by the
            # periodic purge of deferred images.
            LOG.warning('Deleted RBD image %(name)s but could not release '
                        'its parent %(parent)s yet; the periodic purge '
                        'will retry.', {'name': name, 'parent': parent},
                        exc_info=True)


def _drop_unused_snapshots(image, name):
    """Remove childless internal snapshots; report if others have children.

    Returns (deferred, parent): whether some snapshot still has children,
    and the image's own parent.
    """
    snapshots = [s['name'] for s in image.list_snaps()]
    with_children = {s for s in snapshots if children(image, s)}
    foreign = [s for s in snapshots
               if s not in with_children
               and not rbd_layout.is_internal_snapshot(s)]
    if foreign:
        raise exception.VolumeIsBusy(
            volume_name='%s (snapshot %s is not managed by Cinder: remove '
                        'it first)' % (name, foreign[0]))
    for snap in snapshots:
        if snap not in with_children:
            remove_snapshot(image, snap)
    return bool(with_children), parent_of(image)


def release_parent(cluster, parent):
    """Clean up after a child of ``parent`` went away.

    Removes the parent's internal snapshot if it has no children left (a
    sealed image-volume keeps its snapshot while it lives), then removes a
    deferred parent that nothing depends on any more, and so on up.
    """
    while parent is not None:
        with cluster.ioctx(parent.pool) as ioctx:
            with image_lock(parent.image_id):
                if not _drop_parent_snapshot(cluster, ioctx, parent):
                    return
                removed, parent = _remove_deferred(cluster, ioctx,
                                                   parent.image_id)
            if not removed:
                return


def _drop_parent_snapshot(cluster, ioctx, parent):
    """Remove the snapshot a gone child came from, if nothing else uses it.

    Returns whether the parent is a deferred image (worth trying to remove).
    """
    try:
        with cluster.image(ioctx, image_id=parent.image_id) as image:
            deferred = rbd_layout.metadata(
                image, rbd_layout.META_DEFERRED) is not None
            snap = parent.snapshot
            keep = rbd_layout.sealed_snapshot(image)
            if (rbd_layout.is_internal_snapshot(snap) and
                    (deferred or snap != keep) and
                    image.snap_exists(snap) and
                    not children(image, snap)):
                LOG.debug('Removing snapshot %(img)s@%(snap)s: its last '
                          'clone is gone.', {'img': parent.name, 'snap': snap})
                remove_snapshot(image, snap)
            return deferred
    except rbd.ImageNotFound:
        return False


def _remove_deferred(cluster, ioctx, image_id):
    """Remove a deferred (trashed) image once no clone depends on it.

    The caller holds the image's lock. Returns (removed, parent of the
    removed image).
    """
    try:
        with cluster.image(ioctx, image_id=image_id) as image:
            if rbd_layout.metadata(image, rbd_layout.META_DEFERRED) is None:
                return False, None
            snapshots = [s['name'] for s in image.list_snaps()]
            if any(children(image, s) for s in snapshots):
                return False, None
            for snap in snapshots:
                remove_snapshot(image, snap)
            parent = parent_of(image)
        cluster.rbd().trash_remove(ioctx, image_id, True)
    except rbd.ImageNotFound:
        return False, None
    LOG.info('Removed deferred RBD image %s: no clone depends on it any '
             'more.', image_id)
    return True, parent


def purge_deferred(cluster):
    """Remove every deferred image of the pool that nothing depends on.

    Returns how many were removed. Errors on one image are logged and the
    sweep goes on.
    """
    removed = 0
    with cluster.ioctx() as ioctx:
        for entry in list(cluster.rbd().trash_list(ioctx)):
            try:
                with image_lock(entry['id']):
                    gone, parent = _remove_deferred(cluster, ioctx,
                                                    entry['id'])
                if gone:
                    removed += 1
                    release_parent(cluster, parent)
            except Exception:
                LOG.exception('Could not purge deferred RBD image %s',
                              entry.get('name'))
    return removed
