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

"""The cinder:// and rbd:// locations of an image stored by the thunder store.

Glance records one location per upload: ``thunder://[STORE/]VOLUME_ID``,
with the manifest and, for RBD image-volumes, the Ceph facts of the sealed
snapshot in its metadata. From that location and its metadata this module
builds the two additional locations the upstream fast paths understand:

* ``cinder://[STORE/]VOLUME_ID``: Cinder clones the image-volume;
* ``rbd://FSID/POOL/IMAGE/SNAPSHOT``: Nova's RBD image backend and Cinder's
  RBD driver clone the sealed snapshot.

They are registered with Glance afterwards, as ``doc/source/store.rst``
describes (``json_patch()`` gives the request body). Command line, for
scripts::

    python -m glance_thunder_store.extra_locations URL METADATA_JSON

prints the JSON-patch operations that add them.
"""

import json
import sys

from glance_store.i18n import _

from glance_thunder_store import upload
from thunder_common import locations

_RBD_KEYS = (upload.META_RBD_FSID, upload.META_RBD_POOL,
             upload.META_RBD_IMAGE, upload.META_RBD_SNAPSHOT)


def extra_locations(url, metadata):
    """[{'url': ..., 'metadata': {...}}] for a thunder location.

    The rbd:// location is included only when the metadata carries the
    RBD facts (the image-volume is on Ceph and sealed).

    :raises thunder_common.locations.InvalidLocation: if ``url`` is not a
        thunder location or the RBD facts are malformed.
    """
    parsed = locations.parse(url)
    if (not isinstance(parsed, locations.VolumeLocation) or
            parsed.scheme != locations.THUNDER_SCHEME):
        raise locations.InvalidLocation(url, _('not a thunder:// location'))
    metadata = metadata or {}
    alias_meta = {}
    store = metadata.get('store') or parsed.store
    if store:
        alias_meta['store'] = store
    result = [{'url': locations.cinder_location(parsed.volume_id,
                                                parsed.store).url,
               'metadata': dict(alias_meta)}]
    if all(metadata.get(key) for key in _RBD_KEYS):
        rbd_url = locations.RbdLocation(
            *(metadata[key] for key in _RBD_KEYS)).url
        # Round-trip through the strict parser: the facts came from
        # metadata, so they are checked like any other location.
        rbd_url = locations.parse(rbd_url).url
        result.append({'url': rbd_url, 'metadata': dict(alias_meta)})
    return result


def json_patch(url, metadata):
    """JSON-patch operations adding the extra locations to the image."""
    return [{'op': 'add', 'path': '/locations/-', 'value': loc}
            for loc in extra_locations(url, metadata)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write('usage: python -m glance_thunder_store.'
                         'extra_locations URL METADATA_JSON\n')
        return 2
    try:
        ops = json_patch(argv[0], json.loads(argv[1]))
    except (ValueError, TypeError, AttributeError) as e:
        sys.stderr.write('%s\n' % e)
        return 1
    sys.stdout.write(json.dumps(ops, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
