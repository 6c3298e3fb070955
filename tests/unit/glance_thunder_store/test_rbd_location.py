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

"""thunder_store_location_scheme = rbd: the sealed snapshot as location."""

import os
import uuid

from glance_store import exceptions
from glance_store import location as gs_location
import pytest

from cinder_thunder_driver import peer
from glance_thunder_store import extra_locations
from glance_thunder_store import location as location_mod
from glance_thunder_store import ownership
from glance_thunder_store import upload
from tests import store_helpers
from tests.store_helpers import Context
from tests.store_helpers import make_store
from tests.store_helpers import MemoryRbdVolume
from tests.store_helpers import MiB
from tests.store_helpers import Upload
from thunder_common import locations
from thunder_common import manifest

OWNER = Context()


@pytest.fixture
def rbd_store(cinder):
    # The option's default: no scheme given.
    store = make_store('fast', location_scheme=None,
                       thunder_store_manifest_chunk_size=64)
    store.clients.client = lambda context=None: cinder
    return store


def _location(store, url):
    return gs_location.Location('thunder', location_mod.StoreLocation,
                                store.conf, uri=url,
                                backend=store.backend_group)


def _add(store, data):
    image_id = str(uuid.uuid4())
    url, _size, _c, _m, meta = store.add(image_id, Upload(data), len(data),
                                         'sha256', context=OWNER)
    return image_id, url, meta


def _read(store, url):
    iterator, _size = store.get(_location(store, url), context=OWNER)
    try:
        return b''.join(iterator)
    finally:
        iterator.close()


def test_the_location_is_the_sealed_snapshot(rbd_store, cinder):
    data = os.urandom(2 * MiB + 3)
    _image_id, url, meta = _add(rbd_store, data)
    [volume] = cinder.db.values()
    parsed = locations.parse(url)
    assert parsed == locations.RbdLocation(
        store_helpers.FSID, 'volumes', 'volume-%s' % volume.id,
        'thunder-clone-0123456789abcdef')
    assert volume.metadata[upload.META_LOCATION_SCHEME] == 'rbd'
    # The same location metadata as a thunder:// location's.
    assert meta['store'] == 'fast'
    assert manifest.from_metadata(meta)[0] == 3 * MiB
    assert locations.rbd_from_metadata(meta) == parsed
    assert _read(rbd_store, url) == data
    assert rbd_store.get_size(_location(rbd_store, url),
                              context=OWNER) == len(data)


def test_deleting_the_image_deletes_its_volume_once(rbd_store, cinder):
    _image_id, url, _meta = _add(rbd_store, b'x' * 1000)
    rbd_store.delete(_location(rbd_store, url), context=OWNER)
    assert cinder.count() == 0
    deletes = len([c for c in cinder.calls if c[0] == 'delete'])
    # Gone: nothing tells an rbd:// location from an alias any more, and
    # nothing is deleted again.
    rbd_store.delete(_location(rbd_store, url), context=OWNER)
    assert len([c for c in cinder.calls if c[0] == 'delete']) == deletes


def test_rbd_is_the_default_scheme(rbd_store):
    assert rbd_store.store_conf.thunder_store_location_scheme == 'rbd'
    assert set(rbd_store.get_schemes()) == {'thunder', 'cinder', 'rbd'}


def test_another_images_rbd_location_deletes_nothing(rbd_store, cinder):
    """Image A's rbd:// location naming image B's image-volume.

    The URI cannot name its image; when glance_store says which image the
    location is (``Location.image_id``), a volume recording another image
    is refused, even to an admin, and stays.
    """
    image_b, url, _meta = _add(rbd_store, b'x' * 1000)
    [volume] = cinder.db.values()
    assert volume.metadata[upload.META_IMAGE_ID] == image_b
    forged = _location(rbd_store, url)
    forged.image_id = str(uuid.uuid4())
    for context in (OWNER, Context('x', is_admin=True)):
        with pytest.raises(ownership.ImageVolumeRefused):
            rbd_store.delete(forged, context=context)
        with pytest.raises(exceptions.NotFound):
            rbd_store.get_size(forged, context=context)
    assert cinder.count() == 1
    assert not [c for c in cinder.calls if c[0] == 'delete']


def test_only_the_owner_deletes_it(rbd_store, cinder):
    _image_id, url, _meta = _add(rbd_store, b'x' * 1000)
    with pytest.raises(exceptions.Forbidden):
        rbd_store.delete(_location(rbd_store, url),
                         context=Context('project-b'))
    assert cinder.count() == 1


def test_an_older_images_rbd_alias_still_deletes_nothing(cinder):
    """thunder:// images keep theirs, whatever the option says now."""
    old = make_store('fast', thunder_store_manifest_chunk_size=64)
    old.clients.client = lambda context=None: cinder
    _image_id, url, meta = _add(old, b'x' * 1000)
    [alias] = [e['url'] for e in extra_locations.extra_locations(url, meta)
               if e['url'].startswith('rbd://')]
    new = make_store('fast', thunder_store_manifest_chunk_size=64,
                     thunder_store_location_scheme='rbd')
    new.clients.client = lambda context=None: cinder
    new.delete(_location(new, alias), context=OWNER)
    assert cinder.count() == 1
    new.delete(_location(new, url), context=OWNER)
    assert cinder.count() == 0


def test_a_volume_that_is_not_sealed_keeps_a_thunder_location(
        rbd_store, cinder, monkeypatch):
    monkeypatch.setattr(MemoryRbdVolume, 'seal', lambda self, image: None)
    image_id, url, _meta = _add(rbd_store, b'x' * 1000)
    [volume] = cinder.db.values()
    assert url == locations.thunder_location(volume.id, 'fast',
                                             image_id).url
    assert upload.META_LOCATION_SCHEME not in volume.metadata


def test_schemes(cinder):
    store = make_store(thunder_store_alias_locations=False,
                       thunder_store_location_scheme='rbd')
    assert set(store.get_schemes()) == {'thunder', 'rbd'}
    store = make_store(thunder_store_alias_locations=False)
    assert set(store.get_schemes()) == {'thunder'}


def test_peer_mode_caches_from_the_rbd_location(rbd_store, cinder):
    image_id, url, meta = _add(rbd_store, os.urandom(MiB))
    [volume] = cinder.db.values()
    descriptor = peer.image_descriptor(
        image_id, {'url': url, 'metadata': meta}, 'other-pool', 'volume-%s')
    offset, length, digest = manifest.from_metadata(meta)
    assert descriptor == {
        'image_id': image_id, 'manifest_digest': digest,
        'manifest_offset': offset, 'manifest_length': length,
        'origin_volume_id': volume.id,
        'origin': {'type': 'rbd', 'pool': 'volumes',
                   'image': 'volume-%s' % volume.id}}
    # An RBD image not named after a volume is not an image-volume.
    assert peer.image_descriptor(
        image_id, {'url': url, 'metadata': meta}, 'volumes',
        'other-%s') is None
