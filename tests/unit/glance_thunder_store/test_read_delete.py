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

"""Store.get(), get_size(), delete() and is_image_associated_with_store()."""

import hashlib
import os
import uuid

from cinderclient import exceptions as cinder_exceptions
from glance_store import exceptions
from glance_store import location as gs_location
import pytest

from glance_thunder_store import extra_locations
from glance_thunder_store import location as location_mod
from tests.store_helpers import Context
from tests.store_helpers import make_store
from tests.store_helpers import MiB
from tests.store_helpers import Upload


def _location(store, url):
    return gs_location.Location('thunder', location_mod.StoreLocation,
                                store.conf, uri=url,
                                backend=store.backend_group)


def _upload(store, data):
    url, _size, _c, _m, meta = store.add(str(uuid.uuid4()), Upload(data),
                                         len(data), 'sha256',
                                         context=Context())
    return url, meta


@pytest.fixture
def image(store):
    data = os.urandom(3 * MiB + 77)
    url, meta = _upload(store, data)
    return data, url, meta


def _read(iterator):
    try:
        return b''.join(iterator)
    finally:
        iterator.close()


def test_get_whole_image(store, cinder, image):
    data, url, _meta = image
    iterator, size = store.get(_location(store, url), context=Context())
    assert size == len(data)
    assert cinder.connections() == 0  # attached only while iterating
    body = _read(iterator)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(
        data).hexdigest()
    assert cinder.connections() == 0


def test_get_reads_in_read_chunks(store, image):
    data, url, _meta = image
    iterator, _size = store.get(_location(store, url), context=Context())
    sizes = [len(c) for c in iterator]
    assert sizes == [4 * MiB] * (len(data) // (4 * MiB)) + [
        len(data) % (4 * MiB)]


@pytest.mark.parametrize('offset, length', [
    (0, 1), (1, 10), (MiB - 1, 2), (3 * MiB, 77), (3 * MiB + 76, None),
    (100, None), (0, 5 * MiB), (3 * MiB + 77, None), (5, 4 * MiB + 3)])
def test_get_with_offset_and_length(store, image, offset, length):
    data, url, _meta = image
    iterator, size = store.get(_location(store, url), offset=offset,
                               chunk_size=length, context=Context())
    expected = data[offset:offset + length if length else None]
    assert size == len(expected)
    assert _read(iterator) == expected


def test_get_beyond_the_end(store, image):
    data, url, _meta = image
    with pytest.raises(exceptions.BackendException, match='outside'):
        store.get(_location(store, url), offset=len(data) + 1,
                  context=Context())


def test_closing_mid_download_detaches(store, cinder, image):
    _data, url, _meta = image
    iterator, _size = store.get(_location(store, url), context=Context())
    next(iter(iterator))
    assert cinder.connections() == 1
    iterator.close()
    assert cinder.connections() == 0


@pytest.mark.parametrize('method, url', [
    ('get', 'thunder://%s' % uuid.uuid4()),
    ('get_size', 'rbd://%s/volumes/not-a-volume/snap' % uuid.uuid4()),
    ('get_size', 'thunder://%s' % uuid.uuid4()),
], ids=['get_missing_volume', 'rbd_location_of_something_else',
        'get_size_of_a_missing_volume'])
def test_not_found(store, method, url):
    with pytest.raises(exceptions.NotFound):
        getattr(store, method)(_location(store, url), context=Context())


def test_get_through_the_aliases(store, image):
    data, url, meta = image
    for extra in extra_locations.extra_locations(url, meta):
        iterator, size = store.get(_location(store, extra['url']),
                                   context=Context())
        assert size == len(data)
        assert _read(iterator) == data
        assert store.get_size(_location(store, extra['url']),
                              context=Context()) == len(data)


def test_rbd_alias_must_match_the_volume(store, image):
    _data, url, meta = image
    rbd_url = extra_locations.extra_locations(url, meta)[1]['url']
    for wrong in (rbd_url.replace('/volumes/', '/images/'),
                  rbd_url[:-1] + '0',
                  rbd_url.replace(meta['thunder_rbd_fsid'],
                                  str(uuid.uuid4()))):
        with pytest.raises(exceptions.NotFound):
            store.get(_location(store, wrong), context=Context())
        with pytest.raises(exceptions.NotFound):
            store.get_size(_location(store, wrong), context=Context())


def test_get_size(store, image):
    data, url, _meta = image
    assert store.get_size(_location(store, url), context=Context()) == len(
        data)


def test_get_size_without_metadata_is_the_volume_size(store, cinder):
    # An image-volume without image_size (glance_store's cinder driver
    # records it only at the end of an upload).
    image_id = str(uuid.uuid4())
    volume = cinder.volumes.create(2, name='x', metadata={
        'glance_image_id': image_id, 'image_owner': 'project-a'})
    url = 'thunder://%s?image_id=%s' % (volume.id, image_id)
    assert store.get_size(_location(store, url),
                          context=Context()) == 2 * 4 * MiB


def test_get_size_on_cinder_errors_is_zero(store, cinder, image):
    _data, url, _meta = image
    cinder.faults['get'] = cinder_exceptions.ClientException(500, 'down')
    assert store.get_size(_location(store, url), context=Context()) == 0


def test_delete(store, cinder, image):
    _data, url, _meta = image
    store.delete(_location(store, url), context=Context())
    assert cinder.count() == 0


def test_delete_twice(store, cinder, image):
    _data, url, _meta = image
    store.delete(_location(store, url), context=Context())
    with pytest.raises(exceptions.NotFound):
        store.delete(_location(store, url), context=Context())


def test_delete_alias_keeps_the_volume(store, cinder, image):
    _data, url, meta = image
    for extra in extra_locations.extra_locations(url, meta):
        store.delete(_location(store, extra['url']), context=Context())
    assert cinder.count() == 1


def test_delete_in_use(store, cinder, image):
    _data, url, _meta = image
    volume = next(iter(cinder.db.values()))
    volume.status = 'in-use'
    with pytest.raises(exceptions.InUseByStore):
        store.delete(_location(store, url), context=Context())
    assert cinder.count() == 1


@pytest.mark.parametrize('fault, error', [
    (cinder_exceptions.ClientException(500, 'x'), exceptions.BackendException),
    (cinder_exceptions.Forbidden(403, 'policy'), exceptions.Forbidden),
], ids=['other_cinder_error', 'forbidden'])
def test_delete_cinder_fault(store, cinder, image, fault, error):
    _data, url, _meta = image
    cinder.faults['delete'] = fault
    with pytest.raises(error):
        store.delete(_location(store, url), context=Context())


def test_thunder_image_volume_is_not_adopted(store, cinder, image):
    volume_id = next(iter(cinder.db))
    assert not store.is_image_associated_with_store(Context(), volume_id)


def test_legacy_volume_of_the_default_type_is_adopted(store, cinder):
    volume = cinder.volumes.create(1, name='image-x', volume_type='default')
    assert store.is_image_associated_with_store(Context(), volume.id)


def test_legacy_volume_of_the_configured_type(cinder):
    store = make_store(thunder_store_volume_type='thunder')
    store.clients.client = lambda context=None: cinder
    right = cinder.volumes.create(1, name='a', volume_type='thunder')
    wrong = cinder.volumes.create(1, name='b', volume_type='default')
    assert store.is_image_associated_with_store(Context(), right.id)
    assert not store.is_image_associated_with_store(Context(), wrong.id)
    assert not store.is_image_associated_with_store(Context(),
                                                    str(uuid.uuid4()))
