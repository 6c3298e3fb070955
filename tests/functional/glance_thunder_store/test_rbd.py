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

"""The thunder store's librbd path against a real Ceph.

Cinder is a fake (tests.fake_cinder) whose volumes are real RBD images
made, extended, connected and deleted by a real ThunderDriver; the store
reads and writes them through librbd from the driver's ``rbd`` connection
info, exactly as it would behind a real Cinder.
"""

import hashlib
import io
import json
import os
import subprocess
import time
import types
import uuid

from glance_store import exceptions
from glance_store import location as gs_location
from oslo_utils import units
import pytest

from cinder_thunder_driver.cluster import rbd
from glance_thunder_store import extra_locations
from glance_thunder_store import location as location_mod
from tests import fake_cinder
from tests.store_helpers import Context
from tests.store_helpers import make_store
from tests.store_helpers import Upload
from thunder_common import locations
from thunder_common import manifest
from thunder_common import rbd_layout

MiB = units.Mi


class DriverBackend(fake_cinder.NullBackend):
    """Volumes of the fake Cinder as RBD images of a ThunderDriver."""

    def __init__(self, driver):
        self.driver = driver

    @staticmethod
    def _volume(volume, size=None):
        return types.SimpleNamespace(
            id=volume.id, name='volume-%s' % volume.id,
            size=size or volume.size, multiattach=False, volume_type=None,
            encryption_key_id=None)

    def create_volume(self, volume):
        self.driver.create_volume(self._volume(volume))

    def extend_volume(self, volume, new_size):
        self.driver.extend_volume(self._volume(volume), new_size)

    def delete_volume(self, volume):
        self.driver.delete_volume(self._volume(volume))

    def initialize_connection(self, volume, connector):
        return self.driver.initialize_connection(self._volume(volume),
                                                 connector)


@pytest.fixture
def cinder(thunder):
    fake = fake_cinder.FakeCinder(DriverBackend(thunder))
    yield fake
    assert fake.connections() == 0, 'test left a connection open'
    for volume_id in list(fake.db):
        fake.volumes.delete(volume_id)


@pytest.fixture
def store(cinder):
    s = make_store(thunder_store_rbd_connect_timeout=10)
    s.clients.client = lambda context=None: cinder
    return s


@pytest.fixture
def small_gib(monkeypatch):
    """Scale "1 GiB" down to 8 MiB (driver and store alike)."""
    monkeypatch.setattr(units, 'Gi', 8 * MiB)
    return 8 * MiB


def _location(store, url, image_id=None):
    return gs_location.Location('thunder', location_mod.StoreLocation,
                                store.conf, uri=url, image_id=image_id)


def _add(store, data, size=None, stream=None, image_id=None, context=None):
    image_id = image_id or str(uuid.uuid4())
    url, written, checksum, multihash, meta = store.add(
        image_id, stream or io.BytesIO(data),
        len(data) if size is None else size, 'sha256',
        context=context or Context())
    return image_id, url, written, checksum, multihash, meta


def _download(store, url, offset=0, length=None, context=None):
    iterator, size = store.get(_location(store, url), offset=offset,
                               chunk_size=length,
                               context=context or Context())
    try:
        body = b''.join(iterator)
    finally:
        iterator.close()
    assert len(body) == size
    return body


def _rbd_names(driver):
    with driver.cluster.ioctx() as ioctx:
        return set(driver.cluster.rbd().list(ioctx))


def test_add_known_size_get_and_clone(store, cinder, thunder):
    data = os.urandom(5 * MiB + 4321)
    image_id, url, written, checksum, multihash, meta = _add(store, data)
    [volume] = cinder.db.values()
    assert url == 'thunder://%s?image_id=%s' % (volume.id, image_id)
    assert written == len(data)
    assert checksum == hashlib.md5(data).hexdigest()
    assert multihash == hashlib.sha256(data).hexdigest()
    assert volume.size == 1 and volume.readonly

    body = _download(store, url)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(
        data).hexdigest()
    for offset, length in ((0, 1), (MiB - 3, 7), (4 * MiB, MiB + 4321),
                           (5 * MiB + 4320, None), (123, 3 * MiB)):
        end = None if length is None else offset + length
        assert _download(store, url, offset, length) == data[offset:end]

    # Sealed: glance id and one protected snapshot in the RBD metadata.
    name = 'volume-%s' % volume.id
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, name, read_only=True) as image:
        assert rbd_layout.metadata(
            image, rbd_layout.META_GLANCE_IMAGE_ID) == image_id
        snap = rbd_layout.sealed_snapshot(image)
        assert image.is_protected_snap(snap)
        # The manifest follows the data at a 1 MiB boundary, bound by the
        # digest in the location metadata.
        offset, length, digest = manifest.from_metadata(meta)
        assert offset == 6 * MiB
        parsed = manifest.load_verified(image.read(offset, length), digest)
        assert parsed.chunk_size == manifest.DEFAULT_CHUNK_SIZE
        for i in range(parsed.chunk_count):
            start, n = parsed.chunk_range(i)
            assert parsed.verify_chunk(i, data[start:start + n])
    assert meta['thunder_rbd_snapshot'] == snap
    assert meta['thunder_rbd_fsid'] == thunder.cluster.fsid()

    # ThunderDriver clones it, through the thunder:// and the rbd://
    # location alike, and the clone holds the image's bytes.
    extra = extra_locations.extra_locations(url, meta)
    image_meta = {'id': image_id, 'disk_format': 'raw',
                  'container_format': 'bare'}
    for loc in [url, extra[1]['url']]:
        clone = types.SimpleNamespace(
            id=str(uuid.uuid4()), size=2, multiattach=False,
            volume_type=None, encryption_key_id=None)
        clone.name = 'volume-%s' % clone.id
        _update, cloned = thunder.clone_image(None, clone, (loc, []),
                                              image_meta, None)
        assert cloned
        with thunder.cluster.ioctx() as ioctx, \
                thunder.cluster.image(ioctx, clone.name,
                                      read_only=True) as image:
            assert image.parent_info()[1:] == (name, snap)
            assert image.read(0, len(data)) == data
            # Past the image, where the image-volume keeps its manifest,
            # the clone reads zeros, as a copy of the image would.
            assert image.read(len(data), 2 * MiB) == bytes(2 * MiB)
        thunder.delete_volume(clone)

    # The aliases read the same bytes.
    for loc in extra:
        assert _download(store, loc['url']) == data

    store.delete(_location(store, url), context=Context())
    assert cinder.count() == 0


def _rbd_image_of(thunder, volume_id, length):
    """(bytes, recorded Glance image id) of an image-volume, from Ceph."""
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, 'volume-%s' % volume_id,
                                  read_only=True) as image:
        return (image.read(0, length),
                rbd_layout.metadata(image, rbd_layout.META_GLANCE_IMAGE_ID))


def test_a_location_cannot_reach_another_images_volume(store, cinder,
                                                       thunder):
    """Image A's location naming image B's volume: refused, B intact.

    Both images are written through the store, by two projects. Through a
    location of A that names B's volume (with A's id in the URI, or as
    Glance's Location.image_id), and through B's own older-form location
    used by A's project, get, get_size and delete refuse with nothing read
    or deleted; B's volume, RBD image and bytes are untouched, and B's
    owner still reads and deletes it.
    """
    project_a, project_b = Context('project-a'), Context('project-b')
    data_a, data_b = os.urandom(MiB + 17), os.urandom(3 * MiB + 5)
    id_a, url_a, *_rest = _add(store, data_a, context=project_a)
    id_b, url_b, *_rest, meta_b = _add(store, data_b, context=project_b)
    volume_b = locations.parse(url_b).volume_id
    rbd_b = extra_locations.extra_locations(url_b, meta_b)[1]['url']
    pointing_at_b = [
        _location(store, locations.thunder_location(volume_b,
                                                    image_id=id_a).url),
        _location(store, 'thunder://%s' % volume_b, image_id=id_a),
        _location(store, 'cinder://%s' % volume_b, image_id=id_a),
        _location(store, rbd_b, image_id=id_a),
    ]
    for loc in pointing_at_b:
        for context in (project_a, project_b):
            with pytest.raises(exceptions.NotFound):
                store.get(loc, context=context)
            with pytest.raises(exceptions.NotFound):
                store.get_size(loc, context=context)
        if loc.store_location.is_alias:
            store.delete(loc, context=project_a)  # deletes nothing
        else:
            with pytest.raises(exceptions.NotFound):
                store.delete(loc, context=project_a)
    older_b = _location(store, 'thunder://%s' % volume_b)
    with pytest.raises(exceptions.NotFound):
        store.get_size(older_b, context=project_a)
    for loc in (older_b, _location(store, url_b)):
        with pytest.raises(exceptions.Forbidden):
            store.delete(loc, context=project_a)
    assert not [c for c in cinder.calls
                if c[0] == 'delete' and c[1] == volume_b]

    assert volume_b in cinder.db and cinder.connections() == 0
    assert _rbd_image_of(thunder, volume_b, len(data_b)) == (data_b, id_b)
    assert _download(store, url_b, context=project_a) == data_b
    assert _download(store, url_a, context=project_a) == data_a
    store.delete(_location(store, url_b), context=project_b)
    assert volume_b not in cinder.db
    store.delete(_location(store, url_a), context=project_a)
    assert cinder.count() == 0


def test_delete_while_a_clone_exists(store, cinder, thunder):
    data = os.urandom(MiB)
    image_id, url, *_rest, meta = _add(store, data)
    clone = types.SimpleNamespace(id=str(uuid.uuid4()), size=1,
                                  multiattach=False, volume_type=None,
                                  encryption_key_id=None)
    clone.name = 'volume-%s' % clone.id
    _u, cloned = thunder.clone_image(
        None, clone, (url, []), {'id': image_id, 'disk_format': 'raw',
                                 'container_format': 'bare'}, None)
    assert cloned
    store.delete(_location(store, url), context=Context())
    assert cinder.count() == 0
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, clone.name, read_only=True) as img:
        assert img.read(0, len(data)) == data
    thunder.delete_volume(clone)


def test_add_unknown_size_grows_the_volume(store, cinder, thunder,
                                           small_gib):
    data = os.urandom(20 * MiB + 11)
    _id, url, written, checksum, _mh, meta = _add(store, data, size=0)
    [volume] = cinder.db.values()
    assert written == len(data)
    assert checksum == hashlib.md5(data).hexdigest()
    # 8 MiB "GiB": data to 20 MiB + 11, manifest at 21 MiB -> 3 units.
    assert volume.size == 3
    assert ('extend', 2) in cinder.calls and ('extend', 3) in cinder.calls
    assert _download(store, url) == data
    assert _download(store, url, 8 * MiB - 1, 2) == data[8 * MiB - 1:
                                                         8 * MiB + 1]
    assert volume.metadata['image_size'] == str(len(data))
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, 'volume-%s' % volume.id,
                                  read_only=True) as image:
        assert image.size() == 24 * MiB
        offset, length, digest = manifest.from_metadata(meta)
        manifest.load_verified(image.read(offset, length), digest)


def test_an_image_of_unknown_size_outgrowing_its_manifest_is_read_back(
        store, cinder, thunder, small_gib, monkeypatch):
    """Past the chunk limit, the manifest is built from the RBD image.

    With a limit of 64 chunks, 20 MiB and 5 bytes in the default 256 KiB
    chunks (81) do not fit: the store reads the image back through
    librbd, zeros it did not write included, for a manifest of 512 KiB
    chunks (41).
    """
    monkeypatch.setattr(manifest, 'MAX_CHUNKS', 64)
    data = os.urandom(8 * MiB) + bytes(8 * MiB) + os.urandom(4 * MiB + 5)
    _id, url, written, _c, _mh, meta = _add(store, data, size=0)
    [volume] = cinder.db.values()
    assert written == len(data)
    assert meta[manifest.META_CHUNK_SIZE] == str(512 * 1024)
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, 'volume-%s' % volume.id,
                                  read_only=True) as image:
        offset, length, digest = manifest.from_metadata(meta)
        parsed = manifest.load_verified(image.read(offset, length), digest)
    assert (parsed.chunk_size, parsed.chunk_count) == (512 * 1024, 41)
    for i in range(parsed.chunk_count):
        start, n = parsed.chunk_range(i)
        assert parsed.verify_chunk(i, data[start:start + n]), i
    assert _download(store, url) == data


def _clone_image(thunder, image_id, url, size):
    """A volume ThunderDriver cloned from the raw image at ``url``."""
    clone = types.SimpleNamespace(
        id=str(uuid.uuid4()), size=size, multiattach=False,
        volume_type=None, encryption_key_id=None)
    clone.name = 'volume-%s' % clone.id
    image_meta = {'id': image_id, 'disk_format': 'raw',
                  'container_format': 'bare'}
    assert thunder.clone_image(None, clone, (url, []), image_meta,
                               None)[1] is True
    return clone


@pytest.mark.parametrize('announced', [True, False])
def test_manifest_costs_no_volume_size(store, cinder, thunder, small_gib,
                                       announced):
    """An image of exactly one "GiB" takes a volume of one GiB.

    The manifest lies past the volume's size, in the RBD image grown for
    it; clones, made from the sealed snapshot, have the volume's size and
    read the image and zeros.
    """
    data = os.urandom(8 * MiB)
    image_id, url, _w, _c, _mh, meta = _add(
        store, data, size=None if announced else 0)
    [volume] = cinder.db.values()
    assert volume.size == 1
    assert not [c for c in cinder.calls if c[0] == 'extend']
    name = 'volume-%s' % volume.id
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, name, read_only=True) as image:
        assert image.size() == 9 * MiB
        offset, length, digest = manifest.from_metadata(meta)
        assert offset == 8 * MiB
        manifest.load_verified(image.read(offset, length), digest)
        snap = rbd_layout.sealed_snapshot(image)
        image.set_snap(snap)
        assert image.size() == 8 * MiB
    assert _download(store, url) == data

    clone = _clone_image(thunder, image_id, url, size=2)
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, clone.name,
                                  read_only=True) as image:
        assert image.size() == 16 * MiB
        assert image.read(0, len(data)) == data
        assert image.read(len(data), 8 * MiB) == bytes(8 * MiB)
    thunder.delete_volume(clone)
    store.delete(_location(store, url), context=Context())
    assert cinder.count() == 0
    assert name not in _rbd_names(thunder)


def test_zeros_are_not_written(store, cinder, thunder):
    """A chunk of zeros is left unwritten: the RBD image stays thin."""
    data = os.urandom(4 * MiB) + bytes(8 * MiB) + os.urandom(MiB)
    image_id, url, _w, checksum, _mh, meta = _add(store, data)
    assert checksum == hashlib.md5(data).hexdigest()
    [volume] = cinder.db.values()
    extents = []
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, 'volume-%s' % volume.id,
                                  read_only=True) as image:
        image.diff_iterate(0, 13 * MiB, None,
                           lambda offset, length, exists: extents.append(
                               (offset, length)) if exists else None)
        offset, length, digest = manifest.from_metadata(meta)
        manifest.load_verified(image.read(offset, length), digest)
    allocated = sum(n for _o, n in extents)
    assert allocated == 5 * MiB, extents
    assert not [e for e in extents if 4 * MiB <= e[0] < 12 * MiB]
    assert _download(store, url) == data


def test_rbd_location_scheme(cinder, thunder):
    """The sealed snapshot as the image's one location, end to end."""
    store = make_store(thunder_store_rbd_connect_timeout=10,
                       thunder_store_location_scheme='rbd')
    store.clients.client = lambda context=None: cinder
    data = os.urandom(3 * MiB + 5)
    image_id, url, _w, _c, _mh, meta = _add(store, data)
    [volume] = cinder.db.values()
    name = 'volume-%s' % volume.id
    parsed = locations.parse(url)
    assert (parsed.fsid, parsed.pool, parsed.image) == (
        thunder.cluster.fsid(), thunder.configuration.thunder_rbd_pool, name)
    assert _download(store, url) == data

    # What Nova's RBD image backend and Cinder's RBD driver clone.
    clone = _clone_image(thunder, image_id, url, size=1)
    with thunder.cluster.ioctx() as ioctx, \
            thunder.cluster.image(ioctx, clone.name,
                                  read_only=True) as image:
        assert image.parent_info()[1:] == (name, parsed.snapshot)
        assert image.read(0, len(data)) == data
    thunder.delete_volume(clone)

    store.delete(_location(store, url), context=Context())
    assert cinder.count() == 0
    assert name not in _rbd_names(thunder)


def test_verify_after_write(cinder, thunder):
    store = make_store(thunder_store_verify_after_write=True)
    store.clients.client = lambda context=None: cinder
    data = os.urandom(3 * MiB + 1)
    _id, url, *_rest = _add(store, data)
    assert _download(store, url) == data


# -- faults leak no volume and no RBD image -----------------------------------


@pytest.fixture
def no_leaks(cinder, thunder):
    before = _rbd_names(thunder)
    yield
    assert cinder.count() == 0
    assert cinder.connections() == 0
    assert _rbd_names(thunder) == before


@pytest.mark.usefixtures('no_leaks')
def test_client_gone_mid_upload(store):
    stream = Upload(os.urandom(6 * MiB), error_after=5 * MiB)
    with pytest.raises(IOError, match='client disconnected'):
        _add(store, b'', size=6 * MiB, stream=stream)


@pytest.mark.usefixtures('no_leaks')
def test_client_gone_while_growing(store, small_gib):
    stream = Upload(os.urandom(30 * MiB), error_after=20 * MiB)
    with pytest.raises(IOError):
        _add(store, b'', size=0, stream=stream)


@pytest.mark.usefixtures('no_leaks')
def test_size_mismatch(store):
    with pytest.raises(exceptions.Invalid):
        _add(store, os.urandom(2 * MiB), size=3 * MiB)
    with pytest.raises(exceptions.Invalid):
        _add(store, os.urandom(2 * MiB), size=MiB)


@pytest.mark.usefixtures('no_leaks')
def test_cinder_fails_after_the_data_is_written(store, cinder):
    from cinderclient import exceptions as cinder_exceptions
    cinder.faults['update_readonly_flag'] = (
        cinder_exceptions.ClientException(500, 'boom'))
    with pytest.raises(exceptions.BackendException, match='boom'):
        _add(store, os.urandom(MiB))


@pytest.mark.usefixtures('no_leaks')
def test_verifier_failure(store):
    class Verifier:
        def update(self, data):
            raise ValueError('signature')

    with pytest.raises(ValueError):
        store.add(str(uuid.uuid4()), io.BytesIO(b'x' * MiB), MiB, 'sha256',
                  context=Context(), verifier=Verifier())


def test_ceph_full(ceph, make_driver, small_gib):
    """A pool over its quota: StorageFull; nothing left once space is back.

    Ceph does not fail writes to a full pool: it holds them until the
    operation timeout, and holds deletes too. The store tells the timeout
    of a full pool from others, and the volume it could not delete goes
    once the pool has room again.
    """
    pool = 'thunder-full-%s' % uuid.uuid4().hex[:8]
    _ceph(ceph, 'osd', 'pool', 'create', pool, '8')
    _ceph(ceph, 'osd', 'pool', 'application', 'enable', pool, 'rbd')
    _ceph(ceph, 'osd', 'pool', 'set-quota', pool, 'max_bytes',
          str(8 * MiB))
    try:
        driver = make_driver(thunder_rbd_pool=pool,
                             thunder_rados_connect_timeout=5)
        cinder = fake_cinder.FakeCinder(DriverBackend(driver))
        store = make_store(thunder_store_rbd_connect_timeout=5)
        store.clients.client = lambda context=None: cinder
        # Quotas are enforced from the usage the OSDs report, a few
        # seconds late: the upload fills the pool, waits until Ceph flags
        # it full, and goes on writing.
        with pytest.raises(exceptions.StorageFull):
            _add(store, b'', size=0,
                 stream=FillingUpload(os.urandom(24 * MiB), 12 * MiB,
                                      lambda: _wait_for_full(ceph, pool)))
        assert cinder.connections() == 0
        _ceph(ceph, 'osd', 'pool', 'set-quota', pool, 'max_bytes', '0')
        for volume_id in list(cinder.db):
            cinder.volumes.delete(volume_id)
        assert not _rbd_names(driver)
    finally:
        _ceph(ceph, 'osd', 'pool', 'set-quota', pool, 'max_bytes', '0')


class FillingUpload(Upload):
    """An upload that calls ``pause`` once, after ``pause_at`` bytes."""

    def __init__(self, data, pause_at, pause):
        super().__init__(data)
        self._pause_at = pause_at
        self._pause = pause

    def read(self, size=-1):
        if self._pause and self._data.tell() >= self._pause_at:
            self._pause()
            self._pause = None
        return super().read(size)


def _wait_for_full(conf, pool, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dump = json.loads(_ceph(conf, 'osd', 'dump', '--format', 'json'))
        for entry in dump['pools']:
            if (entry['pool_name'] == pool and
                    'full' in entry.get('flags_names', '')):
                return
        time.sleep(1)
    pytest.fail('Ceph did not flag pool %s full within %d s'
                % (pool, timeout))


def _ceph(conf, *args):
    return subprocess.run(['ceph', '-c', conf, '--connect-timeout', '20'] +
                          list(args), check=True, capture_output=True,
                          timeout=60).stdout


def test_readonly_volume_reads_through_a_read_only_handle(store, cinder):
    data = os.urandom(MiB)
    _id, url, *_rest = _add(store, data)
    assert _download(store, url) == data
    [volume] = cinder.db.values()
    assert volume.readonly
    store.delete(_location(store, url), context=Context())


def test_rbd_image_is_opened_without_ceph_conf(store, cinder,
                                               monkeypatch):
    # No CEPH_CONF, no /etc/ceph: everything comes from connection info.
    monkeypatch.setenv('CEPH_CONF', '/nonexistent/ceph.conf')
    data = os.urandom(100)
    _id, url, *_rest = _add(store, data)
    assert _download(store, url) == data
    store.delete(_location(store, url), context=Context())
    assert rbd is not None
