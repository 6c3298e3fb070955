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

"""Tests for thunder_cache.service: what the control socket answers."""

import json
import logging
import os
import stat
import tempfile
import uuid

import pytest

from tests.unit import cache_helpers
from thunder_cache import control
from thunder_cache import node as node_mod
from thunder_cache import service as service_mod
from thunder_cache import sources
from thunder_cache import volumes
from thunder_common import manifest as manifest_mod

CHUNK = 64 * 1024
IMAGE_ID = 'img-1'
GiB = 1 << 30
MOUNT_DIR = '/run/thunder-cache/volumes'


def origins(entry, origin_volume_id=None):
    """The origin factory: file origins only."""
    return sources.FileOrigin(entry['path'])


def _descriptor(manifest, path, image_size):
    offset, length, digest = manifest_mod.from_metadata(
        manifest.metadata(manifest_mod.volume_offset(image_size)))
    return {'manifest_digest': digest, 'manifest_offset': offset,
            'manifest_length': length,
            'origin': {'type': 'file', 'path': path},
            'origin_volume_id': str(uuid.uuid4())}


@pytest.fixture
def image(tmp_path):
    """(bytes, descriptor) of an image-volume file with 4 chunks."""
    data = os.urandom(3 * CHUNK + 100)
    path = str(tmp_path / 'image-volume')
    manifest = cache_helpers.write_volume(path, data, CHUNK)
    return data, _descriptor(manifest, path, len(data))


def _node(tmp_path, name='cache'):
    return node_mod.Node('n1', 'http://127.0.0.1:7485',
                         str(tmp_path / name), client=cache_helpers.client())


@pytest.fixture
def node(tmp_path):
    n = _node(tmp_path)
    yield n
    n.close()


@pytest.fixture
def store(tmp_path, node):
    s = volumes.VolumeStore(str(tmp_path / 'layers'), node)
    yield s
    s.close()


@pytest.fixture
def descriptors_dir(tmp_path):
    return str(tmp_path / 'images.d')


@pytest.fixture
def service(node, store, descriptors_dir):
    return service_mod.VolumeService(node, store, MOUNT_DIR,
                                     descriptors_dir, origins)


@pytest.fixture
def registered(service, image):
    data, descriptor = image
    service.register_image(IMAGE_ID, **descriptor)
    return data


# -- ping, handlers ---------------------------------------------------------

def test_ping(service):
    assert service.ping() == {'node_id': 'n1',
                              'url': 'http://127.0.0.1:7485',
                              'mount_dir': MOUNT_DIR}


def test_handlers(service):
    handlers = service.handlers()
    assert sorted(handlers) == [
        'create_volume', 'delete_volume', 'ping', 'register_image',
        'resize_volume', 'stats', 'volume_info']
    assert handlers['create_volume'] == service.create_volume
    assert handlers['stats'] == service.stats


# -- register_image ---------------------------------------------------------

def test_register_image(service, image, descriptors_dir, node):
    data, descriptor = image
    assert service.register_image(IMAGE_ID, **descriptor) == {
        'image_size': len(data), 'chunk_size': CHUNK, 'chunks': 4,
        'chunks_present': 0}
    assert node.image_ids() == [IMAGE_ID]
    assert os.listdir(descriptors_dir) == [IMAGE_ID + '.json']
    assert stat.S_IMODE(os.stat(descriptors_dir).st_mode) == 0o700
    with open(os.path.join(descriptors_dir, IMAGE_ID + '.json')) as f:
        assert json.load(f) == dict(descriptor, image_id=IMAGE_ID)


def test_registered_image_known_after_restart(service, image,
                                              descriptors_dir, tmp_path):
    data, descriptor = image
    service.register_image(IMAGE_ID, **descriptor)
    restarted = _node(tmp_path, 'cache2')
    try:
        assert restarted.load_descriptors(descriptors_dir, origins) == 1
        spec = restarted._entry(IMAGE_ID).spec
        assert spec.origin_volume_id == descriptor['origin_volume_id']
        assert restarted.read_image(IMAGE_ID, 0, len(data)) == data
    finally:
        restarted.close()


def test_register_image_counts_present_chunks(service, image, node):
    data, descriptor = image
    service.register_image(IMAGE_ID, **descriptor)
    node.read_image(IMAGE_ID, 0, CHUNK + 1)  # chunks 0 and 1
    info = service.register_image(IMAGE_ID, **descriptor)
    assert info['chunks_present'] == 2


@pytest.mark.parametrize('image_id', ['../evil', 'a/b', '', '.hidden', 5,
                                      'x' * 65])
def test_register_bad_image_id(service, image, image_id, tmp_path):
    _data, descriptor = image
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(node_mod.DescriptorError):
        service.register_image(image_id, **descriptor)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize('change', [
    {'manifest_digest': 'not-a-digest'},
    {'manifest_offset': -1},
    {'manifest_offset': '4096'},
    {'manifest_offset': True},
    {'peers': 'http://192.0.2.1:7485'},
    {'peers': ['ftp://192.0.2.1']},
    {'origin': 'file:///x'},
    {'origin_volume_id': 'not-a-uuid'},
])
def test_register_bad_descriptor(service, image, node, change):
    _data, descriptor = image
    with pytest.raises(node_mod.DescriptorError):
        service.register_image(IMAGE_ID, **dict(descriptor, **change))
    assert node.image_ids() == []


def test_register_unreadable_manifest(service, image):
    _data, descriptor = image
    descriptor['origin'] = {'type': 'file', 'path': '/nonexistent/volume'}
    with pytest.raises(node_mod.DescriptorError):
        service.register_image(IMAGE_ID, **descriptor)


def test_unverified_registration_is_not_kept(service, image,
                                             descriptors_dir):
    data, descriptor = image
    wrong = dict(descriptor, manifest_digest='b' * 64)
    with pytest.raises(node_mod.DescriptorError):
        service.register_image(IMAGE_ID, **wrong)
    assert not os.path.exists(os.path.join(descriptors_dir,
                                           IMAGE_ID + '.json'))
    assert service.register_image(IMAGE_ID, **descriptor)[
        'image_size'] == len(data)


# -- volumes ----------------------------------------------------------------

def test_create_blank_volume(service, store):
    info = service.create_volume('volume-1', GiB)
    assert info['size'] == GiB
    assert info['image_id'] is None
    assert info['read_only'] is False
    assert store.list() == ['volume-1']
    assert store.read('volume-1', 0, 16) == bytes(16)


def test_create_volume_from_image(service, store, registered):
    info = service.create_volume('volume-1', GiB, image_id=IMAGE_ID)
    assert info['image_id'] == IMAGE_ID
    assert store.read('volume-1', 0, len(registered)) == registered
    assert store.read('volume-1', len(registered), 8) == bytes(8)


def test_create_volume_unknown_image(service, store):
    with pytest.raises(KeyError):
        service.create_volume('volume-1', GiB, image_id='img-unknown')
    assert store.list() == []


def test_clone_and_read_only_snapshot(service, store, registered):
    service.create_volume('volume-1', GiB, image_id=IMAGE_ID)
    store.write('volume-1', 10, b'written')
    snap = service.create_volume('snapshot-1', GiB, source='volume-1',
                                 read_only=True)
    assert snap['read_only'] is True
    assert snap['image_id'] == IMAGE_ID
    clone = service.create_volume('volume-2', 2 * GiB, source='snapshot-1')
    assert clone['size'] == 2 * GiB
    assert store.read('volume-2', 0, 20) == (
        registered[:10] + b'written' + registered[17:20])
    with pytest.raises(volumes.VolumeReadOnly):
        store.open('snapshot-1', writable=True)


def test_create_existing_volume(service):
    service.create_volume('volume-1', GiB)
    with pytest.raises(volumes.VolumeExists):
        service.create_volume('volume-1', GiB)


def test_create_from_missing_source(service, store):
    with pytest.raises(volumes.VolumeNotFound):
        service.create_volume('volume-2', GiB, source='volume-1')
    assert store.list() == []


BAD_SIZES = [0, -1, -GiB, True, False, '1073741824', 1.5, None, [GiB]]
BAD_IDS = ['', '.', '..', '../volume-1', 'a/b', '-x', 'x' * 129,
           'vol\x00', 5, None, ['volume-1']]


@pytest.mark.parametrize('size', BAD_SIZES)
def test_create_bad_size(service, store, size):
    with pytest.raises(control.BadRequest):
        service.create_volume('volume-1', size)
    assert store.list() == []


@pytest.mark.parametrize('volume_id', BAD_IDS)
def test_create_bad_volume_id(service, store, volume_id, tmp_path):
    with pytest.raises(ValueError):
        service.create_volume(volume_id, GiB)
    assert store.list() == []
    assert os.listdir(tmp_path / 'layers') == []


@pytest.mark.parametrize('source', [s for s in BAD_IDS if s is not None])
def test_create_bad_source(service, store, source):
    with pytest.raises(ValueError):
        service.create_volume('volume-1', GiB, source=source)
    assert store.list() == []


@pytest.mark.parametrize('read_only', ['yes', 1, None])
def test_create_bad_read_only(service, store, read_only):
    with pytest.raises(control.BadRequest):
        service.create_volume('volume-1', GiB, read_only=read_only)
    assert store.list() == []


def test_resize_volume(service, store):
    service.create_volume('volume-1', GiB)
    info = service.resize_volume('volume-1', 3 * GiB)
    assert info['size'] == 3 * GiB
    assert store.info('volume-1')['size'] == 3 * GiB


@pytest.mark.parametrize('size', BAD_SIZES)
def test_resize_bad_size(service, store, size):
    service.create_volume('volume-1', GiB)
    with pytest.raises(control.BadRequest):
        service.resize_volume('volume-1', size)
    assert store.info('volume-1')['size'] == GiB


def test_resize_errors(service, store):
    service.create_volume('volume-1', 2 * GiB)
    with pytest.raises(ValueError):
        service.resize_volume('volume-1', GiB)  # no shrinking
    with pytest.raises(volumes.VolumeNotFound):
        service.resize_volume('volume-2', GiB)
    with pytest.raises(ValueError):
        service.resize_volume('../volume-1', 4 * GiB)
    assert store.info('volume-1')['size'] == 2 * GiB


def test_volume_info(service):
    service.create_volume('volume-1', GiB)
    assert service.volume_info('volume-1') == {
        'id': 'volume-1', 'size': GiB, 'image_id': None,
        'read_only': False, 'written_bytes': 0, 'open_count': 0}
    with pytest.raises(volumes.VolumeNotFound):
        service.volume_info('volume-2')
    with pytest.raises(ValueError):
        service.volume_info('a/../volume-1')


def test_delete_volume(service, store, tmp_path):
    service.create_volume('volume-1', GiB)
    assert service.delete_volume('volume-1') is None
    assert store.list() == []
    assert os.listdir(tmp_path / 'layers') == []
    with pytest.raises(volumes.VolumeNotFound):
        service.delete_volume('volume-1')


def test_delete_busy_volume(service, store):
    service.create_volume('volume-1', GiB)
    store.open('volume-1', writable=True)
    with pytest.raises(volumes.VolumeBusy):
        service.delete_volume('volume-1')
    store.release('volume-1')
    service.delete_volume('volume-1')
    assert store.list() == []


@pytest.mark.parametrize('volume_id', BAD_IDS)
def test_delete_bad_volume_id(service, store, volume_id):
    service.create_volume('volume-1', GiB)
    with pytest.raises(ValueError):
        service.delete_volume(volume_id)
    assert store.list() == ['volume-1']


# -- stats ------------------------------------------------------------------

def test_stats(service, registered):
    empty = service.stats()
    assert empty['provisioned_bytes'] == 0
    assert empty['volumes'] == 0
    assert empty['images'] == 1
    assert empty['total_bytes'] >= empty['free_bytes'] > 0
    service.create_volume('volume-1', GiB, image_id=IMAGE_ID)
    service.create_volume('volume-2', 3 * GiB)
    service.resize_volume('volume-2', 5 * GiB)
    stats = service.stats()
    assert stats['provisioned_bytes'] == 6 * GiB
    assert stats['volumes'] == 2
    service.delete_volume('volume-1')
    assert service.stats()['provisioned_bytes'] == 5 * GiB


# -- over the control socket -------------------------------------------------

@pytest.fixture
def client(service):
    with tempfile.TemporaryDirectory(prefix='svc-', dir='/tmp') as d:
        server = control.ControlServer(
            os.path.join(d, 'control.sock'), service.handlers(),
            expected=service_mod.EXPECTED_ERRORS)
        server.start()
        try:
            yield control.ControlClient(server.path, timeout=10)
        finally:
            server.stop()


def _error_kind(client, op, **args):
    with pytest.raises(control.ControlError) as info:
        client.call(op, **args)
    return info.value.kind


def test_over_the_socket(client, image, caplog):
    caplog.set_level(logging.DEBUG)
    data, descriptor = image
    assert client.call('ping')['mount_dir'] == MOUNT_DIR
    info = client.call('register_image', image_id=IMAGE_ID, **descriptor)
    assert info['image_size'] == len(data)
    created = client.call('create_volume', volume_id='volume-1', size=GiB,
                          image_id=IMAGE_ID)
    assert created['image_id'] == IMAGE_ID
    assert client.call('stats')['provisioned_bytes'] == GiB
    assert client.call('resize_volume', volume_id='volume-1',
                       size=2 * GiB)['size'] == 2 * GiB
    assert client.call('volume_info', volume_id='volume-1')['size'] == \
        2 * GiB
    assert client.call('delete_volume', volume_id='volume-1') is None
    # Errors the driver tells apart, all answers rather than faults.
    assert _error_kind(client, 'delete_volume',
                       volume_id='volume-1') == 'VolumeNotFound'
    client.call('create_volume', volume_id='volume-1', size=GiB)
    assert _error_kind(client, 'create_volume', volume_id='volume-1',
                       size=GiB) == 'VolumeExists'
    assert _error_kind(client, 'create_volume', volume_id='volume-2',
                       size=True) == 'BadRequest'
    assert _error_kind(client, 'create_volume', volume_id='volume-2',
                       size=GiB, bogus=1) == 'BadRequest'
    assert _error_kind(client, 'create_volume', volume_id='../x',
                       size=GiB) == 'ValueError'
    assert _error_kind(client, 'create_volume', volume_id='volume-2',
                       size=GiB, image_id='img-x') == 'KeyError'
    # A malformed descriptor is a bad request (it was DescriptorError).
    assert _error_kind(client, 'register_image', image_id='img-2',
                       **dict(descriptor,
                              manifest_digest='x')) == 'BadRequest'
    # An unverified one is not: the request was well formed.
    assert _error_kind(client, 'register_image', image_id='img-2',
                       **dict(descriptor, manifest_digest='b' * 64)) == \
        'DescriptorError'
    assert not [r for r in caplog.records if r.exc_info]
