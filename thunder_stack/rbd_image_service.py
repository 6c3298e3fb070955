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

"""The part of Glance's image service that Cinder's copy paths call.

Cinder's full-copy paths (``copy_image_to_volume`` through
``image_utils.fetch_to_raw``, ``copy_volume_to_image`` through
``upload_volume``) only call ``show``, ``download`` and ``update`` on the
image service. This one serves images straight from RBD images, as the
Glance API would from its RBD or thunder store minus the HTTP hop: the
full-copy benchmark baseline and the functional tests of those paths use it
where a whole Glance would add nothing but noise.
"""

import contextlib

from oslo_utils import units
import rados
import rbd

CHUNK = 4 * units.Mi


class ImageNotFound(KeyError):
    pass


class RbdImageService:
    """Images kept as RBD images in one pool, named by image id."""

    def __init__(self, conf_path, pool='images'):
        self.conf_path = conf_path
        self.pool = pool
        self._meta = {}
        # Cinder's image_utils.TemporaryImages keeps its state here.
        self.temp_images = None

    @contextlib.contextmanager
    def _ioctx(self):
        client = rados.Rados(conffile=self.conf_path)
        client.connect(timeout=30)
        try:
            with client.open_ioctx(self.pool) as ioctx:
                yield ioctx
        finally:
            client.shutdown()

    def register(self, image_id, rbd_name, size, disk_format='raw',
                 container_format='bare'):
        """Publish an existing RBD image of the pool as ``image_id``."""
        self._meta[image_id] = {
            'id': image_id, 'name': rbd_name, 'size': size,
            'disk_format': disk_format, 'container_format': container_format,
            'status': 'active', 'properties': {}}

    def show(self, context, image_id):
        try:
            return dict(self._meta[image_id])
        except KeyError:
            raise ImageNotFound(image_id)

    def download(self, context, image_id, data=None):
        """Write the image's bytes into the file object ``data``."""
        meta = self.show(context, image_id)
        with self._ioctx() as ioctx:
            with rbd.Image(ioctx, meta['name'], read_only=True) as image:
                for offset in range(0, meta['size'], CHUNK):
                    data.write(image.read(
                        offset, min(CHUNK, meta['size'] - offset)))

    def update(self, context, image_id, image_meta, data=None,
               purge_props=True, store_id=None, base_image_ref=None):
        """Store the bytes read from ``data`` as the image's content."""
        meta = self.show(context, image_id)
        with self._ioctx() as ioctx:
            rbd.RBD().create(ioctx, meta['name'], 0, old_format=False)
            size = 0
            with rbd.Image(ioctx, meta['name']) as image:
                while True:
                    chunk = data.read(CHUNK)
                    if not chunk:
                        break
                    image.resize(size + len(chunk))
                    image.write(chunk, size)
                    size += len(chunk)
        self._meta[image_id]['size'] = size
        return self.show(context, image_id)

    def delete(self, image_id):
        meta = self._meta.pop(image_id)
        with self._ioctx() as ioctx:
            rbd.RBD().remove(ioctx, meta['name'])
