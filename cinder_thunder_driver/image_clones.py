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

"""Which images ThunderDriver clones in O(1), and what it says of others.

A volume from an image is a zero-copy clone only when the image is raw in
a bare container, the volume is not encrypted and one of the image's
locations is a thunder image-volume (or, in shared mode, an RBD image of
the same Ceph cluster). Otherwise the driver declines and Cinder's generic
path creates the volume: for an image that is not raw, a download and a
conversion to raw (qemu-img), a full copy per volume. The driver says so
once per volume in its log, with the reason and what to do, and counts its
clones and declines (by reason) in its volume stats, which operators read
with ``cinder get-pools --detail``.
"""

import collections
import threading

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

# Why the driver declined to clone a volume from an image.
NOT_RAW = 'disk_format'
NOT_BARE = 'container_format'
ENCRYPTED = 'encrypted'
NO_LOCATION = 'no_location'

ADVICE = {
    NOT_RAW: "Cinder downloads and converts it for every volume. Import "
             "the image with Glance's image import instead (glance "
             "image-create-via-import, openstack image create --import): "
             "its image_conversion plugin stores it as raw, which clones "
             "in O(1).",
    NOT_BARE: "Cinder downloads and unpacks it for every volume. Upload "
              "the disk alone, as a raw image in a bare container.",
    ENCRYPTED: "Cinder copies the image into it: an encrypted volume "
               "cannot share its image's data.",
    NO_LOCATION: "Cinder's generic path creates the volume (a download, "
                 "unless Cinder clones a cinder:// image-volume itself). "
                 "Store the image in the thunder Glance store, on the "
                 "Ceph cluster of this backend.",
}

STAT_CLONES = 'thunder_image_clones'
STAT_DECLINED = 'thunder_image_clones_declined'
STAT_REASONS = 'thunder_image_clones_declined_by_reason'


def not_cloneable(volume, image_meta):
    """(reason, detail) if no volume can be cloned from the image, or None.

    Only the image's formats and the volume are looked at here; whether a
    location is usable is the caller's to find out.
    """
    disk = image_meta.get('disk_format')
    if disk != 'raw':
        return NOT_RAW, 'its disk format is %s, not raw' % disk
    container = image_meta.get('container_format')
    if container not in ('bare', None):
        return NOT_BARE, 'its container format is %s, not bare' % container
    if volume.encryption_key_id:
        return ENCRYPTED, 'the volume is encrypted'
    return None


class ImageClones:
    """Volumes from images since the service started: cloned or declined."""

    def __init__(self):
        self._lock = threading.Lock()
        self._clones = 0
        self._declined = collections.Counter()

    def cloned(self):
        with self._lock:
            self._clones += 1

    def declined(self, volume, image_meta, reason, detail):
        """Log why a volume is not cloned from its image, and count it."""
        with self._lock:
            self._declined[reason] += 1
        LOG.warning('Volume %(volume)s is not a zero-copy clone of image '
                    '%(image)s: %(detail)s. %(advice)s',
                    {'volume': volume.id, 'image': image_meta.get('id'),
                     'detail': detail, 'advice': ADVICE[reason]})

    def stats(self):
        """The counters, as volume stats (capabilities) keys."""
        with self._lock:
            return {STAT_CLONES: self._clones,
                    STAT_DECLINED: sum(self._declined.values()),
                    STAT_REASONS: dict(self._declined)}
