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

"""Locations of the thunder store, parsed strictly by thunder_common.

``thunder://[STORE/]VOLUME_ID?image_id=IMAGE_ID`` is the store's own
location (``thunder://[STORE/]VOLUME_ID`` for images stored before the
image id was added). With ``thunder_store_alias_locations`` the store also
serves the ``cinder://`` and ``rbd://`` forms of its image-volumes (see
``doc/source/store.rst``). Anything else, including malformed, hostile or
truncated URIs, raises BadStoreUri with the reason.
"""

from glance_store import exceptions
import glance_store.location
from oslo_log import log as logging

from thunder_common import locations

LOG = logging.getLogger(__name__)


class StoreLocation(glance_store.location.StoreLocation):
    """A parsed thunder, cinder or rbd location."""

    parsed = None

    def process_specs(self):
        self.parsed = locations.thunder_location(
            self.specs['volume_id'], self.specs.get('store'),
            self.specs.get('image_id'))

    @property
    def scheme(self):
        return self.parsed.scheme if self.is_volume else locations.RBD_SCHEME

    @property
    def is_volume(self):
        """True for thunder:// and cinder:// (they name a volume id)."""
        return isinstance(self.parsed, locations.VolumeLocation)

    @property
    def is_alias(self):
        """True for the cinder:// and rbd:// forms of an image-volume."""
        return not (self.is_volume and
                    self.parsed.scheme == locations.THUNDER_SCHEME)

    @property
    def volume_id(self):
        return self.parsed.volume_id if self.is_volume else None

    @property
    def image_id(self):
        """The image a thunder:// location names (None in older ones)."""
        return self.parsed.image_id if self.is_volume else None

    def get_uri(self):
        return self.parsed.url

    def parse_uri(self, uri):
        try:
            self.parsed = locations.parse(uri)
        except locations.InvalidLocation as e:
            LOG.info('Refusing location: %s', e)
            raise exceptions.BadStoreUri(message=str(e))
