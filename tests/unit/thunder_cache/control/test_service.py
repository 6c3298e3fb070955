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

"""Tests for thunder_cache.control.service: what the control socket answers."""

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
from unittest import mock
import uuid

import pytest

from tests import cache_helpers
from thunder_cache.cache import node as node_mod
from thunder_cache.control import client as control_client
from thunder_cache.control import server as control_server
from thunder_cache.control import service as service_mod
from thunder_cache import errors
from thunder_cache.peer import sources
from thunder_cache.volumes import volumes
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
        'cache_status', 'create_volume', 'delete_volume', 'ensure_chunks',
        'evict_image', 'list_volumes', 'ping', 'register_image',
        'rename_volume', 'resize_volume', 'revert_volume', 'stats',
        'volume_info']
    assert handlers['create_volume'] == service.create_volume
    assert handlers['stats'] == service.stats


# -- ensure_chunks (the native volume server's misses) -----------------------

def test_ensure_chunks_fetches_and_answers_the_map(service, registered,
                                                   node):
    answer = service.ensure_chunks(IMAGE_ID, 1, 2)
    assert answer == {'image_size': len(registered), 'chunk_size': CHUNK,
                      'usable': '0110', 'observed': False}
    assert node.cache(IMAGE_ID).has(1) and not node.cache(IMAGE_ID).has(0)
    assert service.ensure_chunks(IMAGE_ID, 3, 3)['usable'] == '0111'


def test_ensure_chunks_while_a_trace_is_recorded(service, registered, node):
    # Every chunk asked for reaches the observer, present or not.
    seen = []
    node.cache(IMAGE_ID).observer = seen.append
    service.ensure_chunks(IMAGE_ID, 1, 2)
    answer = service.ensure_chunks(IMAGE_ID, 0, 2)
    assert answer['observed'] and answer['usable'] == '1110'
    assert seen == [1, 2, 0, 1, 2]
    node.cache(IMAGE_ID).observer = None
    assert not service.ensure_chunks(IMAGE_ID, 3, 3)['observed']


@pytest.mark.parametrize('first,last', [
    (-1, 0), (0, 4), (2, 1), (True, 1), (0, '1'), (0.0, 1), (None, 1)])
def test_ensure_chunks_bad_range(service, registered, first, last):
    with pytest.raises(errors.BadRequest):
        service.ensure_chunks(IMAGE_ID, first, last)


def test_ensure_chunks_unknown_or_bad_image(service, registered):
    with pytest.raises(KeyError):
        service.ensure_chunks('img-unknown', 0, 0)
    with pytest.raises(errors.BadRequest):
        service.ensure_chunks('../etc', 0, 0)


def test_ensure_chunks_at_most_max_per_request(service, registered):
    with mock.patch.object(service_mod, 'MAX_ENSURE', 2):
        with pytest.raises(errors.BadRequest):
            service.ensure_chunks(IMAGE_ID, 0, 2)
        assert service.ensure_chunks(IMAGE_ID, 0, 1)['usable'] == '1100'


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
    # Nor is a cache directory left behind for it.
    assert os.listdir(service.node.cache_dir) == []
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
    with pytest.raises(errors.BadRequest):
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
    with pytest.raises(errors.BadRequest):
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
    with pytest.raises(errors.BadRequest):
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
        'read_only': False, 'written_bytes': 0, 'allocated_bytes': 0,
        'open_count': 0}
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

@contextlib.contextmanager
def _serving(service):
    """A client of ``service`` behind a real control socket."""
    with tempfile.TemporaryDirectory(prefix='svc-', dir='/tmp') as d:
        server = control_server.ControlServer(
            os.path.join(d, 'control.sock'), service.handlers(),
            expected=service_mod.EXPECTED_ERRORS)
        server.start()
        try:
            yield control_client.ControlClient(server.path, timeout=10)
        finally:
            server.stop()


@pytest.fixture
def client(service):
    with _serving(service) as c:
        yield c


def _error_kind(client, op, **args):
    with pytest.raises(control_client.ControlError) as info:
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
    # A malformed id is a bad request (it was ValueError).
    assert _error_kind(client, 'create_volume', volume_id='../x',
                       size=GiB) == 'BadRequest'
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


def test_revert_rename_list_over_the_socket(client):
    client.call('create_volume', volume_id='volume-1', size=GiB)
    client.call('create_volume', volume_id='snapshot-1', size=GiB,
                source='volume-1', read_only=True)
    client.call('resize_volume', volume_id='volume-1', size=2 * GiB)
    assert client.call('revert_volume', volume_id='volume-1',
                       snapshot_id='snapshot-1')['size'] == 2 * GiB
    assert client.call('rename_volume', volume_id='volume-1',
                       new_id='volume-2')['id'] == 'volume-2'
    listed = client.call('list_volumes')
    assert [(v['id'], v['read_only']) for v in listed] == [
        ('snapshot-1', True), ('volume-2', False)]
    assert [v['id'] for v in client.call(
        'list_volumes', marker='snapshot-1', limit=1)] == ['volume-2']
    assert client.call('list_volumes', marker='volume-2') == []
    for bad in (0, service_mod.LIST_LIMIT + 1, True, '5'):
        assert _error_kind(client, 'list_volumes', limit=bad) == \
            'BadRequest'
    assert _error_kind(client, 'list_volumes', marker='a/b') == 'BadRequest'
    # A full page fits a control line, with the longest ids.
    for n in range(service_mod.LIST_LIMIT):
        client.call('create_volume', volume_id='%03d' % n + 'v' * 125,
                    size=GiB)
    assert len(client.call('list_volumes')) == service_mod.LIST_LIMIT
    assert _error_kind(client, 'rename_volume', volume_id='volume-2',
                       new_id='snapshot-1') == 'VolumeExists'
    assert _error_kind(client, 'revert_volume', volume_id='volume-2',
                       snapshot_id='../x') == 'BadRequest'
    assert _error_kind(client, 'rename_volume', volume_id='volume-9',
                       new_id='volume-3') == 'VolumeNotFound'


# -- arguments are checked at the socket --------------------------------------

HOSTILE_SIZES = [2 ** 63, 2 ** 63 - 1, 2 ** 64, 10 ** 40, -(2 ** 63),
                 service_mod.volumes_mod.MAX_SIZE + 1, {'n': 1}, [1],
                 '1', None, 1.0, True]
HOSTILE_IDS = [5, 5.5, True, None, ['volume-1'], {'id': 'volume-1'},
               'v' * 60000]


@pytest.mark.parametrize('size', HOSTILE_SIZES)
def test_hostile_sizes_are_bad_requests(client, size, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    assert _error_kind(client, 'create_volume', volume_id='volume-1',
                       size=size) == 'BadRequest'
    client.call('create_volume', volume_id='volume-2', size=GiB)
    assert _error_kind(client, 'resize_volume', volume_id='volume-2',
                       size=size) == 'BadRequest'
    assert client.call('volume_info', volume_id='volume-2')['size'] == GiB
    assert os.listdir(tmp_path / 'layers') == ['volume-2']
    assert not [r for r in caplog.records if r.exc_info]


def test_size_limit_is_the_stores(tmp_path, node):
    store = volumes.VolumeStore(str(tmp_path / 'small'), node,
                                max_size=2 * GiB)
    try:
        service = service_mod.VolumeService(node, store, MOUNT_DIR,
                                            str(tmp_path / 'd'), origins)
        service.create_volume('volume-1', 2 * GiB)
        with pytest.raises(errors.BadRequest, match='at most 2147483648'):
            service.create_volume('volume-2', 2 * GiB + 1)
        with pytest.raises(errors.BadRequest):
            service.resize_volume('volume-1', 3 * GiB)
        assert store.list() == ['volume-1']
    finally:
        store.close()


@pytest.mark.parametrize('value', HOSTILE_IDS)
def test_hostile_ids_are_bad_requests(client, value, caplog):
    caplog.set_level(logging.DEBUG)
    client.call('create_volume', volume_id='volume-1', size=GiB)
    for op, args in [
            ('create_volume', {'volume_id': value, 'size': GiB}),
            ('create_volume', {'volume_id': 'volume-2', 'size': GiB,
                               'source': value}),
            ('create_volume', {'volume_id': 'volume-2', 'size': GiB,
                               'image_id': value}),
            ('delete_volume', {'volume_id': value}),
            ('resize_volume', {'volume_id': value, 'size': 2 * GiB}),
            ('volume_info', {'volume_id': value}),
            ('register_image', {'image_id': value})]:
        if value is None and op == 'create_volume' and \
                'volume_id' not in args or (value is None and 'source' in
                                            args) or (value is None and
                                                      'image_id' in args and
                                                      op == 'create_volume'):
            continue  # None is "no source" / "no image" there
        kind = _error_kind(client, op, **args)
        assert kind == 'BadRequest', (op, args, kind)
    assert client.call('volume_info', volume_id='volume-1')['size'] == GiB
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize('args', [
    {'read_only': 1}, {'read_only': 0}, {'read_only': 'true'},
    {'read_only': None}, {'read_only': [True]}, {'bogus': 1},
    {'size': GiB, 'extra': {'nested': [1, {'deep': True}]}}])
def test_hostile_create_arguments(client, args, caplog):
    caplog.set_level(logging.DEBUG)
    request = dict({'volume_id': 'volume-1', 'size': GiB}, **args)
    assert _error_kind(client, 'create_volume', **request) == 'BadRequest'
    assert _error_kind(client, 'volume_info',
                       volume_id='volume-1') == 'VolumeNotFound'
    assert not [r for r in caplog.records if r.exc_info]


# -- register_image: what a descriptor may name ------------------------------

@pytest.fixture
def policy(tmp_path):
    """The daemon's origin policy: image-volume files under tmp_path."""
    from thunder_cache.cache import origins as origins_mod
    return origins_mod.OriginPolicy(['volumes'], 'volume-%s',
                                    [str(tmp_path / 'allowed')])


@pytest.fixture
def guarded(node, store, descriptors_dir, policy):
    return service_mod.VolumeService(node, store, MOUNT_DIR,
                                     descriptors_dir, policy)


def _secret(tmp_path):
    path = tmp_path / 'peer-secret'
    path.write_bytes(b'the shared secret of every node!')
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize('where', ['outside', 'dotdot', 'symlink'])
def test_file_oracle_refused(guarded, node, tmp_path, where):
    """register_image cannot read a file byte by byte through the digest."""
    secret = _secret(tmp_path)
    allowed = tmp_path / 'allowed'
    allowed.mkdir()
    path = {'outside': str(secret),
            'dotdot': str(allowed) + '/../peer-secret',
            'symlink': str(allowed / 'link')}[where]
    os.symlink(str(secret), str(allowed / 'link'))
    one_byte = hashlib.sha256(secret.read_bytes()[:1]).hexdigest()
    with mock.patch('builtins.open', wraps=open) as opened, \
            mock.patch('os.open', wraps=os.open) as os_opened:
        for offset in (0, 1, 2):
            with pytest.raises(node_mod.DescriptorError) as info:
                guarded.register_image(IMAGE_ID, **{
                    'manifest_digest': one_byte, 'manifest_offset': offset,
                    'manifest_length': 1,
                    'origin': {'type': 'file', 'path': path}})
            assert one_byte not in str(info.value)
            assert isinstance(info.value, errors.BadRequest)
    names = [str(c.args[0]) for c in opened.call_args_list +
             os_opened.call_args_list]
    assert not [n for n in names if 'peer-secret' in n or n == 'link']
    assert node.image_ids() == []


def test_digest_oracle_closed_in_allowed_files(guarded, node, tmp_path):
    """Even in an allowed file: whole manifests at aligned offsets only.

    And a mismatch never says what was read.
    """
    allowed = tmp_path / 'allowed'
    allowed.mkdir()
    path = str(allowed / 'volume')
    data = os.urandom(2 * 1024 * 1024)
    with open(path, 'wb') as f:
        f.write(data)
    for offset, length in [(1, 32), (0, 1), (0, 33), (4096, 64)]:
        with pytest.raises(errors.BadRequest):
            guarded.register_image(IMAGE_ID, manifest_digest='a' * 64,
                                   manifest_offset=offset,
                                   manifest_length=length,
                                   origin={'type': 'file', 'path': path})
    with pytest.raises(node_mod.DescriptorError) as info:
        guarded.register_image(IMAGE_ID, manifest_digest='a' * 64,
                               manifest_offset=1024 * 1024,
                               manifest_length=64,
                               origin={'type': 'file', 'path': path})
    read = data[1024 * 1024:1024 * 1024 + 64]
    assert 'does not match' in str(info.value)
    assert hashlib.sha256(read).hexdigest() not in str(info.value)
    assert read.hex() not in str(info.value)
    assert node.image_ids() == []


@pytest.mark.parametrize('origin', [
    {'type': 'rbd', 'pool': 'volumes', 'ceph_conf': '/tmp/evil.conf'},
    {'type': 'rbd', 'pool': 'volumes', 'keyring': '/tmp/evil.keyring'},
    {'type': 'rbd', 'pool': 'volumes', 'user': 'admin'},
    {'type': 'rbd', 'pool': 'secrets'},
    {'type': 'rbd', 'image': 'not-the-image-volume'},
    {'type': 'file', 'path': '/etc/shadow'},
])
def test_register_refuses_origins_not_the_daemons(client_guarded, origin,
                                                  caplog):
    caplog.set_level(logging.DEBUG)
    assert _error_kind(client_guarded, 'register_image', image_id=IMAGE_ID,
                       manifest_digest='a' * 64, image_size=4096,
                       origin_volume_id=str(uuid.uuid4()),
                       origin=origin) == 'BadRequest'
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize('change', [
    {'bogus': 1}, {'manifest_length': 2 ** 40}, {'manifest_length': 1},
    {'manifest_offset': 12345}, {'image_size': 2 ** 62},
    {'image_size': 4096, 'manifest_offset': 0}, {'peers': [5]},
    {'peers': [{'url': 'x'}]}, {'origin_volume_id': 5},
    {'manifest_digest': ['a' * 64]}, {'origin': ['file']},
    {'origin': {'type': 'file', 'path': {'p': 1}}}])
def test_register_hostile_descriptors(client_guarded, change, caplog):
    caplog.set_level(logging.DEBUG)
    descriptor = dict({'manifest_digest': 'a' * 64, 'image_size': 4096},
                      **change)
    assert _error_kind(client_guarded, 'register_image', image_id=IMAGE_ID,
                       **descriptor) == 'BadRequest'
    assert not [r for r in caplog.records if r.exc_info]


@pytest.fixture
def client_guarded(guarded):
    with _serving(guarded) as c:
        yield c


def test_persisted_descriptors_go_through_the_same_checks(
        tmp_path, descriptors_dir, policy, caplog):
    os.makedirs(descriptors_dir)
    secret = _secret(tmp_path)
    for name, body in [
            ('img-file', {'manifest_digest': 'a' * 64, 'image_size': 4096,
                          'origin': {'type': 'file', 'path': str(secret)}}),
            ('img-conf', {'manifest_digest': 'a' * 64, 'image_size': 4096,
                          'origin_volume_id': str(uuid.uuid4()),
                          'origin': {'type': 'rbd',
                                     'ceph_conf': '/tmp/evil.conf'}}),
            ('img-key', {'manifest_digest': 'a' * 64, 'image_size': 4096,
                         'extra': 1})]:
        with open(os.path.join(descriptors_dir, name + '.json'), 'w') as f:
            json.dump(body, f)
    restarted = _node(tmp_path, 'cache3')
    try:
        assert restarted.load_descriptors(descriptors_dir, policy) == 0
        assert restarted.image_ids() == []
    finally:
        restarted.close()


# -- races -------------------------------------------------------------------

def test_concurrent_registrations_of_one_image(service, image, node,
                                               descriptors_dir):
    """Registrations writing the descriptor at once all succeed."""
    data, descriptor = image
    barrier = threading.Barrier(2)
    real_fsync = os.fsync

    def fsync(fd):
        target = os.readlink('/proc/self/fd/%d' % fd)
        if target.startswith(descriptors_dir):
            try:
                barrier.wait(1)  # two descriptor writes meet here
            except threading.BrokenBarrierError:
                pass
        return real_fsync(fd)

    results, errors = [], []

    def register():
        try:
            results.append(service.register_image(IMAGE_ID, **descriptor))
        except Exception as e:
            errors.append(e)

    with mock.patch('os.fsync', fsync):
        threads = [threading.Thread(target=register) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert [r['image_size'] for r in results] == [len(data)] * 4
    assert os.listdir(descriptors_dir) == [IMAGE_ID + '.json']


# -- the image caches -------------------------------------------------------

def _with_evictor(service):
    from thunder_cache.cache import eviction
    conf = mock.Mock(max_size=0, max_size_percent=0, low_water_percent=90,
                     check_interval=10.0)
    service.evictor = eviction.Evictor(service.node, conf,
                                       in_use=service.image_in_use,
                                       descriptors_dir=service.descriptors_dir)
    return service.evictor


def test_evict_image_refused_while_a_volume_reads_it(service, registered):
    _with_evictor(service)
    service.create_volume('vol-1', GiB, image_id=IMAGE_ID)
    assert service.image_in_use(IMAGE_ID) == '1 volumes read it (vol-1)'
    with pytest.raises(node_mod.ImageBusy, match='vol-1'):
        service.evict_image(IMAGE_ID)
    # The volume still reads its image.
    assert service.store.read('vol-1', 0, 100) == registered[:100]
    service.delete_volume('vol-1')
    result = service.evict_image(IMAGE_ID)
    assert result['image_id'] == IMAGE_ID and result['freed_bytes'] > 0
    assert not os.path.exists(os.path.join(service.node.cache_dir, IMAGE_ID))
    with pytest.raises(KeyError, match='not cached here'):
        service.evict_image(IMAGE_ID)


def test_evict_image_checks_its_arguments(service):
    with pytest.raises(errors.BadRequest):
        service.evict_image('../etc')
    with pytest.raises(errors.BadRequest, match='does not evict'):
        service.evict_image(IMAGE_ID)


def test_cache_status(service, registered):
    service.create_volume('vol-1', GiB, image_id=IMAGE_ID)
    status = service.cache_status()['images'][IMAGE_ID]
    assert status['open'] is True and status['busy'] is None
    assert status['volumes'] == ['vol-1'] and status['gone'] is None
    assert status['last_used'] > 0 and status['trace'] is None
    service.trace_state = {IMAGE_ID: 'recording'}.get
    assert service.cache_status()['images'][IMAGE_ID]['trace'] == 'recording'
    json.dumps(status)  # it goes over the socket
