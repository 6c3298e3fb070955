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

"""How VMThunder lays out image-volumes, clone snapshots and metadata in RBD.

The Glance store writes an image into an image-volume and *seals* it: it
records the Glance image id in the RBD image's metadata and takes the one
protected snapshot that every volume of that image is cloned from.  The
Cinder driver reuses that snapshot for every clone, and takes snapshots of
its own (``thunder-clone-*``) only to clone ordinary volumes.  Both sides
import these names from here, so they always agree.

Every function takes an open ``rbd.Image`` (or a proxy of one) and does not
close it.
"""

from typing import Any, Optional
import uuid

# Snapshots the driver takes to clone from; removed when their last child
# goes, except on a sealed image-volume, whose snapshot lives as long as it.
CLONE_SNAP_PREFIX = 'thunder-clone-'
# A Cinder snapshot deleted while volumes cloned from it still exist is
# renamed with this prefix and removed with its last child.
RETIRED_SNAP_PREFIX = 'thunder-retired-'

# RBD image metadata keys.
META_GLANCE_IMAGE_ID = 'thunder.glance_image_id'
META_SEALED_SNAP = 'thunder.sealed_snapshot'
META_DEFERRED = 'thunder.deferred_delete'


def is_internal_snapshot(name: str) -> bool:
    """True for snapshots VMThunder created and may remove by itself."""
    return (name.startswith(CLONE_SNAP_PREFIX) or
            name.startswith(RETIRED_SNAP_PREFIX))


def new_clone_snapshot_name() -> str:
    return CLONE_SNAP_PREFIX + uuid.uuid4().hex[:16]


def metadata(image: Any, key: str) -> Optional[str]:
    """The value of an RBD image metadata key, or None."""
    try:
        return image.metadata_get(key)
    except KeyError:
        return None


def sealed_snapshot(image: Any) -> Optional[str]:
    """Name of the sealed image-volume's snapshot, or None if not sealed."""
    return metadata(image, META_SEALED_SNAP)


def latest_clone_snapshot(image: Any) -> Optional[str]:
    """The most recent ``thunder-clone-*`` snapshot of an image, or None."""
    latest = None
    for snap in image.list_snaps():
        if snap['name'].startswith(CLONE_SNAP_PREFIX):
            if latest is None or snap['id'] > latest['id']:
                latest = snap
    return latest['name'] if latest else None


def create_protected_snapshot(image: Any, name: str) -> None:
    """Create and protect a snapshot; an existing one is reused."""
    if not image.snap_exists(name):
        image.create_snap(name)
    if not image.is_protected_snap(name):
        image.protect_snap(name)


def seal_image_volume(image: Any, glance_image_id: str) -> str:
    """Mark an image-volume final and take its clone snapshot.

    Idempotent: a volume already sealed for the same image keeps its
    snapshot. Returns the snapshot's name.

    :raises ValueError: if the volume is sealed for another image.
    """
    sealed_for = metadata(image, META_GLANCE_IMAGE_ID)
    if sealed_for is not None and sealed_for != glance_image_id:
        raise ValueError('image-volume is already sealed for image %s'
                         % sealed_for)
    snap = sealed_snapshot(image) or new_clone_snapshot_name()
    create_protected_snapshot(image, snap)
    image.metadata_set(META_GLANCE_IMAGE_ID, glance_image_id)
    image.metadata_set(META_SEALED_SNAP, snap)
    return snap
