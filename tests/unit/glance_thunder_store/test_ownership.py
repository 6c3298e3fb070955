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

"""A location reaches only the image-volume of its own image.

Image A's location pointing at image B's volume, at a plain volume, or at a
volume whose metadata does not name the image, is refused by get, get_size
and delete, with nothing attached, read or deleted; sizes and deletes also
need the project that stored the image (or an admin or a service).
"""

import os
import uuid

from glance_store import exceptions
from glance_store import location as gs_location
import pytest

from glance_thunder_store import extra_locations
from glance_thunder_store import location as location_mod
from glance_thunder_store import ownership
from tests.store_helpers import Context
from tests.store_helpers import MiB
from tests.store_helpers import Upload
from thunder_common import locations

OWNER = Context('project-b')
STRANGER = Context('project-a')
SOME_ID = '3d6f1a2b-8c4e-4f7a-9b1d-0e2c5a7f9b34'


def _location(store, url, image_id=None):
    return gs_location.Location('thunder', location_mod.StoreLocation,
                                store.conf, uri=url, image_id=image_id,
                                backend=store.backend_group)


class Image:
    """An image written through the store: its id, bytes and locations."""

    def __init__(self, store, cinder, memory, context):
        self.id = str(uuid.uuid4())
        self.data = os.urandom(MiB + 123)
        self.url, _size, _c, _m, self.meta = store.add(
            self.id, Upload(self.data), len(self.data), 'sha256',
            context=context)
        self.volume_id = locations.parse(self.url).volume_id
        self.extra = [e['url'] for e in
                      extra_locations.extra_locations(self.url, self.meta)]
        self._cinder = cinder
        self._rbd = memory.images['volume-%s' % self.volume_id]

    @property
    def volume(self):
        return self._cinder.db[self.volume_id]

    def intact(self):
        """The volume exists and still holds the image's bytes."""
        return (self.volume_id in self._cinder.db and
                bytes(self._rbd.data[:len(self.data)]) == self.data)


@pytest.fixture
def image_a(store, cinder, memory):
    return Image(store, cinder, memory, STRANGER)


@pytest.fixture
def image_b(store, cinder, memory):
    return Image(store, cinder, memory, OWNER)


def _refused_everywhere(store, cinder, loc, context, deletes=True):
    """get, get_size and delete all refuse loc; nothing is read."""
    start = len(cinder.calls)
    with pytest.raises(ownership.ImageVolumeRefused):
        store.get(loc, context=context)
    with pytest.raises(ownership.ImageVolumeRefused):
        store.get_size(loc, context=context)
    if deletes:
        with pytest.raises(ownership.ImageVolumeRefused):
            store.delete(loc, context=context)
    # Nothing attached (so nothing read) and nothing deleted.
    assert [c for c in cinder.calls[start:]
            if c[0] in ('initialize_connection', 'delete')] == []


# -- image A's location naming image B's volume --------------------------


def test_new_form_naming_another_image_is_refused(store, cinder, image_a,
                                                  image_b):
    url = locations.thunder_location(image_b.volume_id,
                                     image_id=image_a.id).url
    for context in (STRANGER, OWNER, Context('x', is_admin=True)):
        _refused_everywhere(store, cinder, _location(store, url), context)
    assert image_b.intact() and image_a.intact()


def test_location_image_id_is_checked_on_the_older_form(store, cinder,
                                                        image_a, image_b):
    # What a Glance that sets Location.image_id would hand the store.
    loc = _location(store, 'thunder://%s' % image_b.volume_id,
                    image_id=image_a.id)
    _refused_everywhere(store, cinder, loc, Context('x', is_admin=True))
    assert image_b.intact()


def test_location_image_id_must_agree_with_the_uri(store, cinder, image_a,
                                                   image_b):
    loc = _location(store, image_b.url, image_id=image_a.id)
    _refused_everywhere(store, cinder, loc, OWNER)
    assert image_b.intact()


def test_aliases_naming_another_image_are_refused(store, cinder, image_a,
                                                  image_b):
    for url in image_b.extra:
        loc = _location(store, url, image_id=image_a.id)
        _refused_everywhere(store, cinder, loc, OWNER, deletes=False)
        # Deleting an alias deletes nothing, whatever it names.
        store.delete(loc, context=OWNER)
    assert image_b.intact()


def test_image_id_is_compared_exactly(store, cinder, image_b):
    url = locations.thunder_location(image_b.volume_id,
                                     image_id=image_b.id.upper()).url
    _refused_everywhere(store, cinder, _location(store, url), OWNER)
    assert image_b.intact()


@pytest.mark.parametrize('image_id', [42, '', b'x', ['a']])
def test_odd_location_image_ids_are_refused(store, cinder, image_b,
                                            image_id):
    loc = _location(store, image_b.url, image_id=image_id)
    _refused_everywhere(store, cinder, loc, OWNER)
    assert image_b.intact()


# -- volumes that are not the image's ----------------------------------------


def _plain_volume(cinder, metadata=None):
    volume = cinder.volumes.create(1, name='data', metadata=metadata)
    return volume.id


@pytest.mark.parametrize('form', ['older', 'new', 'cinder'])
def test_a_plain_volume_is_refused(store, cinder, form):
    volume_id = _plain_volume(cinder, {'image_owner': 'project-b'})
    url = {'older': 'thunder://%s' % volume_id,
           'new': locations.thunder_location(volume_id,
                                             image_id=str(uuid.uuid4())).url,
           'cinder': 'cinder://%s' % volume_id}[form]
    for context in (OWNER, Context('x', is_admin=True)):
        _refused_everywhere(store, cinder, _location(store, url), context,
                            deletes=form != 'cinder')
    assert volume_id in cinder.db


def test_a_plain_volume_with_forged_rbd_facts_is_refused(store, cinder,
                                                         image_b):
    # The rbd:// alias resolves to the volume whose RBD facts match; the
    # volume must still be an image-volume.
    meta = {k: v for k, v in image_b.volume.metadata.items()
            if k.startswith('thunder_rbd_')}
    volume_id = _plain_volume(cinder)
    meta['thunder_rbd_image'] = 'volume-%s' % volume_id
    cinder.db[volume_id].metadata.update(meta)
    url = locations.RbdLocation(meta['thunder_rbd_fsid'],
                                meta['thunder_rbd_pool'],
                                meta['thunder_rbd_image'],
                                meta['thunder_rbd_snapshot']).url
    _refused_everywhere(store, cinder, _location(store, url), OWNER,
                        deletes=False)
    assert volume_id in cinder.db


def test_metadata_without_the_image_id_is_refused(store, cinder, image_b):
    del image_b.volume.metadata['glance_image_id']
    for url in (image_b.url, 'thunder://%s' % image_b.volume_id):
        _refused_everywhere(store, cinder, _location(store, url), OWNER)
    assert image_b.intact()


def test_metadata_naming_another_image_is_refused(store, cinder, image_b):
    image_b.volume.metadata['glance_image_id'] = str(uuid.uuid4())
    _refused_everywhere(store, cinder, _location(store, image_b.url), OWNER)
    assert image_b.intact()


def test_refusals_do_not_quote_the_volume_metadata(store, cinder, image_b):
    secret = str(uuid.uuid4())
    image_b.volume.metadata['glance_image_id'] = secret
    with pytest.raises(exceptions.NotFound) as caught:
        store.get(_location(store, image_b.url), context=OWNER)
    assert image_b.volume_id in str(caught.value)
    assert secret not in str(caught.value)


# -- who may size (add a location) and delete ----------------------------


def test_another_project_cannot_size_or_delete(store, cinder, image_b):
    for url in (image_b.url, 'thunder://%s' % image_b.volume_id):
        loc = _location(store, url)
        with pytest.raises(ownership.ImageVolumeRefused):
            store.get_size(loc, context=STRANGER)
        with pytest.raises(ownership.ImageVolumeDeleteForbidden) as caught:
            store.delete(loc, context=STRANGER)
        assert isinstance(caught.value, exceptions.Forbidden)
        assert 'another project' in str(caught.value)
    for url in image_b.extra:
        with pytest.raises(exceptions.NotFound):
            store.get_size(_location(store, url), context=STRANGER)
    assert image_b.intact()
    assert not [c for c in cinder.calls if c[0] == 'delete']


def test_another_project_still_reads_a_public_image(store, image_b):
    iterator, size = store.get(_location(store, image_b.url),
                               context=STRANGER)
    try:
        assert b''.join(iterator) == image_b.data
    finally:
        iterator.close()
    assert size == len(image_b.data)


@pytest.mark.parametrize('context', [
    Context('other', is_admin=True),
    Context('service-project', roles=['service']),
    Context('other', roles=['member'], service_roles=['service']),
], ids=['admin', 'service-role', 'service-token'])
def test_admins_and_services_may_size_and_delete(store, cinder, image_b,
                                                 context):
    loc = _location(store, image_b.url)
    assert store.get_size(loc, context=context) == len(image_b.data)
    store.delete(loc, context=context)
    assert image_b.volume_id not in cinder.db


@pytest.mark.parametrize('context', [
    None,
    Context(None),
    Context('project-a', roles='service'),
    Context('project-a', is_admin='yes'),
], ids=['no-context', 'no-project', 'roles-not-a-list', 'is-admin-not-bool'])
def test_requests_without_a_usable_identity_are_refused(store, cinder,
                                                        image_b, context):
    _size_and_delete_refused(store, image_b, context)


def _size_and_delete_refused(store, image, context):
    loc = _location(store, image.url)
    with pytest.raises(exceptions.NotFound):
        store.get_size(loc, context=context)
    with pytest.raises(exceptions.Forbidden):
        store.delete(loc, context=context)
    assert image.intact()
    return loc


def test_a_volume_without_image_owner_needs_an_admin(store, cinder,
                                                     image_b):
    del image_b.volume.metadata['image_owner']
    loc = _size_and_delete_refused(store, image_b, OWNER)
    store.delete(loc, context=Context('x', is_admin=True))
    assert image_b.volume_id not in cinder.db


def test_the_owner_uses_both_forms(store, cinder, image_b):
    for url in (image_b.url, 'thunder://%s' % image_b.volume_id):
        loc = _location(store, url, image_id=image_b.id)
        assert store.get_size(loc, context=OWNER) == len(image_b.data)
    store.delete(_location(store, 'thunder://%s' % image_b.volume_id),
                 context=OWNER)
    assert image_b.volume_id not in cinder.db


# -- what add() writes -----------------------------------------------------


def test_add_records_the_image_in_the_location(store, image_b):
    parsed = locations.parse(image_b.url)
    assert parsed.image_id == image_b.id
    assert image_b.volume.metadata['glance_image_id'] == image_b.id


@pytest.mark.parametrize('image_id', [
    'id', '', 'x' * 5000, SOME_ID.replace('-', ''),
    SOME_ID + '&image_id=' + SOME_ID, SOME_ID + '\n', '../' + SOME_ID,
    '{%s}' % SOME_ID, None, 42], ids=repr)
def test_add_refuses_an_image_id_it_cannot_record(store, cinder, image_id):
    with pytest.raises(exceptions.Invalid, match='not a dashed UUID'):
        store.add(image_id, Upload(b'x' * 100), 100, 'sha256',
                  context=OWNER)
    assert cinder.calls == [] and cinder.count() == 0


def test_a_hostile_location_image_id_is_quoted(store, image_b):
    loc = _location(store, image_b.url, image_id='x\nFAKE LOG LINE' * 20)
    with pytest.raises(exceptions.NotFound) as caught:
        store.get(loc, context=OWNER)
    assert '\n' not in str(caught.value)
    assert len(str(caught.value)) < 400
