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

"""Store.add(): the upload path and every way it can fail."""

import errno
import hashlib
import os
import uuid

from cinderclient import exceptions as cinder_exceptions
from glance_store import exceptions
from glance_store import multi_backend
from keystoneauth1 import exceptions as ks_exceptions
import pytest

from glance_thunder_store import upload
from glance_thunder_store import volumes as volumes_mod
from tests.store_helpers import Context
from tests.store_helpers import make_store
from tests.store_helpers import MemoryRbdVolume
from tests.store_helpers import MiB
from tests.store_helpers import Upload
from thunder_common import locations
from thunder_common import manifest


def _image(size):
    return os.urandom(size)


def _add(store, data, size=None, context=None, verifier=None,
         image_id=None, stream=None):
    image_id = image_id or str(uuid.uuid4())
    return store.add(image_id, stream or Upload(data),
                     len(data) if size is None else size, 'sha256',
                     context=context or Context(), verifier=verifier)


def _only_volume(cinder):
    assert cinder.count() == 1
    return next(iter(cinder.db.values()))


def test_add_known_size(store, cinder, memory):
    data = _image(2 * MiB + 5)
    image_id = str(uuid.uuid4())
    url, size, checksum, multihash, meta = _add(store, data,
                                                image_id=image_id)
    volume = _only_volume(cinder)
    assert url == 'thunder://%s?image_id=%s' % (volume.id, image_id)
    assert size == len(data)
    assert checksum == hashlib.md5(data).hexdigest()
    assert multihash == hashlib.sha256(data).hexdigest()
    image = memory.images['volume-%s' % volume.id]
    assert bytes(image.data[:len(data)]) == data
    # Sized for the data, the 1 MiB-aligned manifest and nothing more.
    assert volume.size == 1 and memory.gib == 4 * MiB
    assert volume.name == 'image-%s' % image_id
    assert volume.readonly
    assert volume.status == 'available'
    assert image.snapshots == ['thunder-clone-0123456789abcdef']
    assert volume.metadata['glance_image_id'] == image_id
    assert volume.metadata['image_owner'] == 'project-a'
    assert volume.metadata['image_size'] == str(len(data))
    assert 'store' not in meta


def test_the_sealed_snapshot_holds_the_image_and_no_manifest(store, cinder,
                                                             memory):
    # Clones are made from the sealed snapshot: past the image they must
    # read zeros, so the manifest is written after sealing.
    data = _image(2 * MiB + 100)
    _url, _size, _c, _m, meta = _add(store, data)
    image = memory.images['volume-%s' % _only_volume(cinder).id]
    offset, length, _digest = manifest.from_metadata(meta)
    assert image.sealed_data[:len(data)] == data
    assert not any(image.sealed_data[len(data):])
    assert any(image.data[offset:offset + length])


def test_manifest_is_stored_after_the_data_and_bound(store, cinder, memory):
    data = _image(2 * MiB + 100)
    _url, _size, _c, _m, meta = _add(store, data)
    volume = _only_volume(cinder)
    image = memory.images['volume-%s' % volume.id]
    offset, length, digest = manifest.from_metadata(meta)
    assert offset == 3 * MiB
    raw = bytes(image.data[offset:offset + length])
    parsed = manifest.load_verified(raw, digest)
    assert parsed.chunk_size == 64 * 1024
    assert parsed.image_size == len(data)
    for i in range(parsed.chunk_count):
        start, n = parsed.chunk_range(i)
        assert parsed.verify_chunk(i, data[start:start + n])
    assert meta == {k: volume.metadata[k] for k in meta}
    assert meta[manifest.META_CHUNK_SIZE] == str(64 * 1024)


def test_rbd_facts_in_location_metadata(store, cinder):
    _url, _s, _c, _m, meta = _add(store, _image(1000))
    volume = _only_volume(cinder)
    assert meta[upload.META_RBD_POOL] == 'volumes'
    assert meta[upload.META_RBD_IMAGE] == 'volume-%s' % volume.id
    assert meta[upload.META_RBD_SNAPSHOT] == 'thunder-clone-0123456789abcdef'
    assert locations.parse('rbd://%s/volumes/volume-%s/x' % (
        meta[upload.META_RBD_FSID], volume.id))


def test_multi_store_location_names_the_backend(multi_store, cinder):
    image_id = str(uuid.uuid4())
    url, _s, _c, _m, meta = _add(multi_store, _image(10), image_id=image_id)
    # What glance_store checks before Glance records the location.
    multi_backend.check_location_metadata(meta)
    volume = _only_volume(cinder)
    assert url == 'thunder://fast/%s?image_id=%s' % (volume.id, image_id)
    assert meta['store'] == 'fast'
    assert volume.metadata['thunder_store'] == 'fast'
    assert all(isinstance(v, str) for v in meta.values())


def _zero_chunk_image():
    """Data, a whole write chunk of zeros, data, a short zero tail."""
    return _image(4 * MiB) + bytes(4 * MiB) + _image(MiB) + bytes(1000)


def _written_ranges(monkeypatch):
    writes = []
    monkeypatch.setattr(MemoryRbdVolume, 'write_hook',
                        lambda offset, data: writes.append(
                            (offset, len(data))))
    return writes


def test_zeros_are_not_written(store, cinder, memory, monkeypatch):
    """A new RBD image reads zeros: chunks of zeros are skipped."""
    writes = _written_ranges(monkeypatch)
    data = _zero_chunk_image()
    _url, size, checksum, _mh, meta = _add(store, data)
    assert size == len(data)
    assert checksum == hashlib.md5(data).hexdigest()
    offset, length, digest = manifest.from_metadata(meta)
    # Pieces are written concurrently: compare the set of ranges.
    assert sorted(writes) == [(0, 4 * MiB), (8 * MiB, MiB + 1000),
                              (offset, length)]
    volume = _only_volume(cinder)
    image = MemoryRbdVolume({'name': 'volumes/volume-%s' % volume.id,
                             'hosts': ['h'], 'ports': ['6789']})
    assert image.read(0, len(data)) == data
    parsed = manifest.load_verified(image.read(offset, length), digest)
    for i in range(parsed.chunk_count):
        start, n = parsed.chunk_range(i)
        assert parsed.verify_chunk(i, data[start:start + n])
    image.close()


def test_zeros_are_written_where_a_volume_may_hold_old_data(
        store, cinder, memory, monkeypatch):
    monkeypatch.setattr(MemoryRbdVolume, 'reads_zeros_unwritten', False)
    writes = _written_ranges(monkeypatch)
    data = _zero_chunk_image()
    _add(store, data)
    assert sorted(w for w in writes if w[0] < len(data)) == [
        (0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, MiB + 1000)]


def test_volume_type_is_used(cinder, memory):
    store = make_store(thunder_store_volume_type='thunder')
    store.clients.client = lambda context=None: cinder
    _add(store, _image(10))
    assert _only_volume(cinder).volume_type == 'thunder'


def test_data_is_read_in_write_chunks(store, cinder):
    stream = Upload(_image(9 * MiB))
    _add(store, b'', size=9 * MiB, stream=stream)
    assert set(stream.read_sizes) == {4 * MiB}


def test_unknown_size_grows_the_volume(store, cinder, memory):
    data = _image(9 * MiB + 1)
    url, size, checksum, _mh, meta = _add(store, data, size=0)
    volume = _only_volume(cinder)
    assert size == len(data)
    assert checksum == hashlib.md5(data).hexdigest()
    # "GiB" is 4 MiB here: 9 MiB of data, manifest at 10 MiB -> 3 units.
    assert volume.size == 3
    assert [c for c in cinder.calls if c[0] == 'extend'] == [
        ('extend', 2), ('extend', 3)]
    assert volume.metadata['image_size'] == str(len(data))
    image = memory.images['volume-%s' % volume.id]
    assert bytes(image.data[:len(data)]) == data
    offset, length, digest = manifest.from_metadata(meta)
    assert offset == 10 * MiB
    manifest.load_verified(bytes(image.data[offset:offset + length]),
                           digest)


@pytest.mark.parametrize('announced', [True, False])
def test_manifest_costs_no_volume_size(store, cinder, memory, announced):
    """An image of whole "GiB": the RBD image grows past the volume."""
    data = _image(4 * MiB)
    _url, _s, _c, _m, meta = _add(store, data,
                                  size=None if announced else 0)
    volume = _only_volume(cinder)
    assert volume.size == 1
    assert not [c for c in cinder.calls if c[0] == 'extend']
    image = memory.images['volume-%s' % volume.id]
    offset, length, digest = manifest.from_metadata(meta)
    assert offset == 4 * MiB
    assert image.size == 5 * MiB
    manifest.load_verified(bytes(image.data[offset:offset + length]),
                           digest)
    # Clones see the volume's size: the sealed snapshot ends with the data.
    assert image.sealed_data == data


def _stored_manifest(memory, cinder, meta):
    image = memory.images['volume-%s' % _only_volume(cinder).id]
    offset, length, digest = manifest.from_metadata(meta)
    return manifest.load_verified(bytes(image.data[offset:offset + length]),
                                  digest)


def _chunks_verify(parsed, data):
    assert parsed.image_size == len(data)
    for i in range(parsed.chunk_count):
        start, n = parsed.chunk_range(i)
        assert parsed.verify_chunk(i, data[start:start + n]), i


def test_a_large_image_of_known_size_gets_larger_chunks(
        store, cinder, memory, monkeypatch, caplog):
    # 2 MiB + 5 bytes take 33 chunks of 64 KiB: over a limit of 16, the
    # manifest doubles its chunk size until 9 chunks of 256 KiB fit.
    caplog.set_level('INFO')
    monkeypatch.setattr(manifest, 'MAX_CHUNKS', 16)
    reads = []
    monkeypatch.setattr(MemoryRbdVolume, 'read', _counting(
        MemoryRbdVolume.read, reads))
    data = _image(2 * MiB + 5)
    _url, _s, _c, _m, meta = _add(store, data)
    parsed = _stored_manifest(memory, cinder, meta)
    assert parsed.chunk_size == 256 * 1024
    assert meta[manifest.META_CHUNK_SIZE] == str(256 * 1024)
    _chunks_verify(parsed, data)
    assert reads == []      # chosen up front: nothing read back
    assert 'uses 256 KiB chunks' in caplog.text


def _counting(read, calls):
    def counted(self, offset, length):
        calls.append((offset, length))
        return read(self, offset, length)
    return counted


def test_an_image_of_unknown_size_that_outgrows_the_manifest_is_read_back(
        store, cinder, memory, monkeypatch, caplog):
    monkeypatch.setattr(manifest, 'MAX_CHUNKS', 16)
    reads = []
    monkeypatch.setattr(MemoryRbdVolume, 'read', _counting(
        MemoryRbdVolume.read, reads))
    # A piece of zeros in the middle is not written, and reads back as
    # zeros: the manifest built from the volume still holds.
    data = _image(4 * MiB) + bytes(4 * MiB) + _image(MiB + 3)
    url, size, checksum, _mh, meta = _add(store, data, size=0)
    assert size == len(data)
    assert checksum == hashlib.md5(data).hexdigest()
    parsed = _stored_manifest(memory, cinder, meta)
    # 9 MiB + 3 in at most 16 chunks: 1 MiB chunks (10 of them).
    assert parsed.chunk_size == MiB
    assert parsed.chunk_count == 10
    _chunks_verify(parsed, data)
    assert sum(n for _o, n in reads) == len(data)
    assert 'outgrew a manifest of 16 chunks of 64 KiB' in caplog.text


def test_a_read_back_image_is_read_once_with_verify_after_write(
        cinder, memory, monkeypatch):
    # The read-back is checked against the upload's hash: verifying after
    # the write would read the whole image a second time for nothing.
    store = make_store(thunder_store_verify_after_write=True,
                       thunder_store_manifest_chunk_size=64)
    store.clients.client = lambda context=None: cinder
    monkeypatch.setattr(manifest, 'MAX_CHUNKS', 16)
    reads = []
    monkeypatch.setattr(MemoryRbdVolume, 'read', _counting(
        MemoryRbdVolume.read, reads))
    data = _image(2 * MiB + 5)
    _url, size, _c, _mh, meta = _add(store, data, size=0)
    assert size == len(data)
    _chunks_verify(_stored_manifest(memory, cinder, meta), data)
    assert sum(n for _o, n in reads) == len(data)


def test_verify_after_write_reads_an_image_hashed_on_the_way_once(
        cinder, memory, monkeypatch):
    store = make_store(thunder_store_verify_after_write=True,
                       thunder_store_manifest_chunk_size=64)
    store.clients.client = lambda context=None: cinder
    reads = []
    monkeypatch.setattr(MemoryRbdVolume, 'read', _counting(
        MemoryRbdVolume.read, reads))
    data = _image(MiB + 5)
    _add(store, data)
    assert sum(n for _o, n in reads) == len(data)


def test_a_read_back_that_differs_from_the_upload_fails_the_upload(
        store, cinder, memory, monkeypatch):
    monkeypatch.setattr(manifest, 'MAX_CHUNKS', 16)
    read = MemoryRbdVolume.read

    def corrupt(self, offset, length):
        data = bytearray(read(self, offset, length))
        if offset == 0:
            data[100] ^= 1
        return bytes(data)

    monkeypatch.setattr(MemoryRbdVolume, 'read', corrupt)
    with pytest.raises(exceptions.BackendException,
                       match='does not match what was uploaded'):
        _add(store, _image(2 * MiB + 5), size=0)
    assert cinder.count() == 0


def test_an_image_no_manifest_can_describe_is_refused(store, cinder, memory,
                                                      monkeypatch):
    monkeypatch.setattr(manifest, 'MAX_IMAGE_SIZE', MiB)
    with pytest.raises(exceptions.Invalid, match='no manifest describes'):
        _add(store, _image(MiB + 1))
    assert cinder.count() == 0


def test_a_volume_that_cannot_grow_is_extended_for_the_manifest(
        store, cinder, memory, monkeypatch):
    monkeypatch.setattr(MemoryRbdVolume, 'grow', lambda self, size: False)
    data = _image(4 * MiB)
    _url, _s, _c, _m, meta = _add(store, data)
    volume = _only_volume(cinder)
    assert volume.size == 2
    assert ('extend', 2) in cinder.calls
    image = memory.images['volume-%s' % volume.id]
    offset, length, digest = manifest.from_metadata(meta)
    manifest.load_verified(bytes(image.data[offset:offset + length]),
                           digest)


def test_empty_image(store, cinder, memory):
    url, size, checksum, _mh, meta = _add(store, b'', size=0)
    assert size == 0
    assert checksum == hashlib.md5(b'').hexdigest()
    assert manifest.from_metadata(meta)[:2] == (0, 32)


def test_verifier_sees_every_byte(store, cinder):
    class Verifier:
        def __init__(self):
            self.seen = bytearray()

        def update(self, data):
            self.seen += data

    data = _image(5 * MiB)
    verifier = Verifier()
    _add(store, data, verifier=verifier)
    assert bytes(verifier.seen) == data


def test_verify_after_write_passes_on_good_storage(cinder, memory):
    store = make_store(thunder_store_verify_after_write=True,
                       thunder_store_manifest_chunk_size=64)
    store.clients.client = lambda context=None: cinder
    _add(store, _image(MiB + 3))
    assert cinder.count() == 1


def test_unknown_hashing_algorithm(store, cinder):
    with pytest.raises(exceptions.UnknownHashingAlgo):
        store.add('id', Upload(b'x'), 1, 'nonsense', context=Context())
    assert cinder.count() == 0


# -- faults: each must leave no volume and no connection behind -------------


def _assert_nothing_left(cinder, memory, before=0):
    assert cinder.count() == before
    assert len(memory.images) == before
    assert cinder.connections() == 0


def test_client_gone_mid_upload(store, cinder, memory):
    error = IOError('client disconnected')
    stream = Upload(_image(10 * MiB), error_after=5 * MiB, error=error)
    with pytest.raises(IOError) as caught:
        _add(store, b'', size=10 * MiB, stream=stream)
    assert caught.value is error
    _assert_nothing_left(cinder, memory)


def test_caller_exceptions_propagate_unchanged(store, cinder, memory):
    class ImageSizeLimitExceeded(Exception):
        pass

    error = ImageSizeLimitExceeded()
    stream = Upload(_image(MiB), error_after=0, error=error)
    with pytest.raises(ImageSizeLimitExceeded):
        _add(store, b'', size=0, stream=stream)
    _assert_nothing_left(cinder, memory)


def test_verifier_failure(store, cinder, memory):
    class Verifier:
        def update(self, data):
            raise ValueError('bad signature data')

    with pytest.raises(ValueError, match='bad signature'):
        _add(store, _image(100), verifier=Verifier())
    _assert_nothing_left(cinder, memory)


def test_more_data_than_announced(store, cinder, memory):
    data = _image(2 * MiB)
    with pytest.raises(exceptions.Invalid, match='Size exceeds'):
        _add(store, b'', size=MiB, stream=Upload(data))
    _assert_nothing_left(cinder, memory)


def test_less_data_than_announced(store, cinder, memory):
    data = _image(MiB)
    with pytest.raises(exceptions.Invalid, match='Size mismatch'):
        _add(store, b'', size=2 * MiB, stream=Upload(data))
    _assert_nothing_left(cinder, memory)


# A fault of Cinder's at each step of an upload: (fault, what it raises,
# the expected error and its message, the image's size, the announced size).
CINDER_FAULTS = {
    'quota_exceeded_on_create': (
        'create', cinder_exceptions.OverLimit(
            413, 'VolumeSizeExceedsAvailableQuota'),
        exceptions.StorageFull, 'quota', 10, None),
    'quota_exceeded_on_extend': (
        'extend', cinder_exceptions.OverLimit(413, 'gigabytes'),
        exceptions.StorageFull, None, 5 * MiB, 0),
    'extend_fails_in_the_backend': (
        'extend_status', 'error_extending',
        exceptions.StorageFull, 'extend', 5 * MiB, 0),
    'volume_creation_ends_in_error': (
        'create_status', 'error',
        exceptions.BackendException, 'error', 10, None),
    'cinder_error_on_create': (
        'create', cinder_exceptions.ClientException(500, 'boom'),
        exceptions.BackendException, 'boom', 10, None),
    'cinder_unreachable': (
        'create', ks_exceptions.ConnectFailure('refused'),
        exceptions.BackendException, 'reach Cinder', 10, None),
    'cinder_error_on_metadata': (
        'set_metadata', cinder_exceptions.ClientException(500, 'db down'),
        exceptions.BackendException, 'db down', 10, None),
    'cinder_error_on_readonly': (
        'update_readonly_flag', cinder_exceptions.ClientException(500, 'nope'),
        exceptions.BackendException, 'nope', 10, None),
}


@pytest.mark.parametrize('case', CINDER_FAULTS)
def test_cinder_fault_leaves_nothing(store, cinder, memory, case):
    fault, value, error, match, length, size = CINDER_FAULTS[case]
    cinder.faults[fault] = value
    with pytest.raises(error, match=match):
        _add(store, _image(length), size=size)
    _assert_nothing_left(cinder, memory)


def test_volume_creation_times_out(store, cinder, memory, clock):
    cinder.faults['create_status'] = 'creating'
    with pytest.raises(exceptions.TimeoutError):
        _add(store, _image(10))
    assert clock.now >= 300
    # Cinder refuses to delete a volume that is still creating: the store
    # tried, and the volume is all that is left (no connection, no data).
    assert ('delete', next(iter(cinder.db))) in cinder.calls
    assert cinder.connections() == 0


def test_cinder_error_on_connect(store, cinder, memory, monkeypatch):
    def refuse(volume, connector):
        raise cinder_exceptions.ClientException(500, 'no export')

    monkeypatch.setattr(memory, 'initialize_connection', refuse)
    monkeypatch.setattr('glance_thunder_store.brick_volume.full_connector',
                        lambda conf: {'host': 'h', 'initiator': 'iqn.x'})
    with pytest.raises(exceptions.BackendException, match='no export'):
        _add(store, _image(10))
    _assert_nothing_left(cinder, memory)


@pytest.mark.parametrize('err', [errno.ENOSPC, errno.EDQUOT])
def test_ceph_full(store, cinder, memory, err):
    def full(offset, data):
        if offset >= 4 * MiB:
            raise OSError(err, os.strerror(err))

    MemoryRbdVolume.write_hook = staticmethod(full)
    with pytest.raises(exceptions.StorageFull):
        _add(store, _image(9 * MiB), size=0)
    _assert_nothing_left(cinder, memory)


class NoSpace(Exception):
    """What the rbd binding raises on a full pool (an errno, no OSError)."""

    errno = errno.ENOSPC


def _no_space(memory, offset, data):
    raise NoSpace('no space left')


def _stuck(memory, offset, data):
    # A full Ceph pool makes writes wait until the operation timeout.
    memory.flagged_full = True
    raise OSError(errno.ETIMEDOUT, 'RBD operation timeout')


def _broken(memory, offset, data):
    raise OSError(errno.EIO, 'osd down')


# A write to the image-volume failing: (how, the expected error, message).
CEPH_WRITE_FAULTS = {
    'full_from_the_rbd_binding': (_no_space, exceptions.StorageFull, None),
    'full_pool_times_writes_out': (_stuck, exceptions.StorageFull, None),
    'io_error': (_broken, exceptions.BackendException, 'osd down'),
}


@pytest.mark.parametrize('case', CEPH_WRITE_FAULTS)
def test_ceph_write_fault(store, cinder, memory, case):
    hook, error, match = CEPH_WRITE_FAULTS[case]
    MemoryRbdVolume.write_hook = staticmethod(
        lambda offset, data: hook(memory, offset, data))
    with pytest.raises(error, match=match):
        _add(store, _image(10))
    _assert_nothing_left(cinder, memory)


def test_readback_mismatch(cinder, memory):
    store = make_store(thunder_store_verify_after_write=True,
                       thunder_store_manifest_chunk_size=64)
    store.clients.client = lambda context=None: cinder

    def corrupt(offset, data):
        if offset == 0:
            data[:1] = b'\xff' if data[:1] != b'\xff' else b'\0'

    class Corrupting(MemoryRbdVolume):
        def write(self, offset, data):
            data = bytearray(data)
            corrupt(offset, data)
            super().write(offset, bytes(data))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(volumes_mod.rbd_volume, 'RbdVolume', Corrupting)
        with pytest.raises(exceptions.BackendException,
                           match='does not match'):
            _add(store, _image(MiB))
    _assert_nothing_left(cinder, memory)


def test_duplicate(store, cinder, memory):
    image_id = str(uuid.uuid4())
    _add(store, _image(10), image_id=image_id)
    with pytest.raises(exceptions.Duplicate):
        _add(store, _image(10), image_id=image_id)
    _assert_nothing_left(cinder, memory, before=1)


def test_same_image_in_two_backends_is_no_duplicate(cinder, memory):
    image_id = str(uuid.uuid4())
    for name in ('fast', 'slow'):
        s = make_store(name)
        s.clients.client = lambda context=None: cinder
        _add(s, _image(10), image_id=image_id)
    assert cinder.count() == 2


def test_interrupt_still_cleans_up(store, cinder, memory):
    class Stop(BaseException):
        pass

    stream = Upload(_image(MiB), error_after=0, error=Stop())
    with pytest.raises(Stop):
        _add(store, b'', size=MiB, stream=stream)
    _assert_nothing_left(cinder, memory)


def test_delete_failure_during_cleanup_keeps_the_real_error(store, cinder,
                                                            memory):
    cinder.faults['set_metadata'] = cinder_exceptions.ClientException(
        500, 'first')
    cinder.faults['delete'] = cinder_exceptions.ClientException(500, 'second')
    with pytest.raises(exceptions.BackendException, match='first'):
        _add(store, _image(10))
    assert cinder.connections() == 0
