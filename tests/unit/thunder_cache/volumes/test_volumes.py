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

"""Tests for thunder_cache.volumes.volumes: the node's volume store."""

import contextlib
import errno
import json
import os
import threading
from unittest import mock

import pytest

from thunder_cache.volumes import cow
from thunder_cache.volumes import nativevol
from thunder_cache.volumes import volumes

BS = cow.BLOCK_SIZE
IMAGE = 'img-1'


class Images:
    """In-memory images with the interface VolumeStore uses."""

    def __init__(self, **images):
        self.images = images
        self.reads = []
        self.broken = False

    def image_size(self, image_id):
        return len(self.images[image_id])

    def read_image(self, image_id, offset, length):
        if self.broken:
            raise IOError('chunk unavailable')
        self.reads.append((image_id, offset, length))
        data = self.images[image_id]
        assert offset + length <= len(data), 'read past the image end'
        return data[offset:offset + length]


@pytest.fixture
def images():
    return Images(**{IMAGE: os.urandom(10 * BS + 123)})


@pytest.fixture
def layers(tmp_path):
    return str(tmp_path / 'layers')


@pytest.fixture
def store(layers, images):
    store = volumes.VolumeStore(layers, images)
    yield store
    store.close()


def test_image_backed_volume_reads_the_image(store, images):
    image = images.images[IMAGE]
    info = store.create('vol-a', len(image), image_id=IMAGE)
    assert info == {'id': 'vol-a', 'size': len(image), 'image_id': IMAGE,
                    'read_only': False, 'written_bytes': 0,
                    'allocated_bytes': 0, 'open_count': 0}
    assert store.read('vol-a', 0, len(image)) == image
    assert store.read('vol-a', 5, 10) == image[5:15]
    assert store.read('vol-a', len(image), 10) == b''


def test_volume_larger_than_image_reads_zeros_past_it(store, images):
    image = images.images[IMAGE]
    store.create('vol-a', 1 << 30, image_id=IMAGE)
    data = store.read('vol-a', len(image) - 100, 1000)
    assert data == image[-100:] + bytes(900)
    assert store.read('vol-a', (1 << 30) - 10, 100) == bytes(10)
    # The image was never asked for bytes past its end.
    assert all(o + n <= len(image) for _, o, n in images.reads)
    # A partial write past the image's end copies up zeros.
    store.write('vol-a', len(image) + 10, b'abc')
    assert store.read('vol-a', len(image), 16) == (
        bytes(10) + b'abc' + bytes(3))


def test_blank_volume_reads_zeros(store, images):
    store.create('blank', 3 * BS + 7)
    assert store.read('blank', 0, 4 * BS) == bytes(3 * BS + 7)
    store.write('blank', BS + 1, b'x')
    assert store.read('blank', BS, 3) == b'\0x\0'
    assert images.reads == []


def test_writes_stay_in_the_volume(store, images):
    image = images.images[IMAGE]
    store.create('a', len(image), image_id=IMAGE)
    store.create('b', len(image), image_id=IMAGE)
    assert store.write('a', 100, b'hello') == 5
    assert store.read('a', 100, 5) == b'hello'
    assert store.read('b', 0, len(image)) == image
    assert images.images[IMAGE] == image
    assert store.info('a')['written_bytes'] == BS


def test_zero_reads_zeros_over_the_image_and_past_it(store, images):
    image = images.images[IMAGE]
    store.create('a', 20 * BS, image_id=IMAGE)
    store.write('a', 0, b'w' * 20 * BS)
    store.zero('a', BS, 18 * BS)
    assert store.read('a', 0, 20 * BS) == (
        b'w' * BS + bytes(18 * BS) + b'w' * BS)
    # Blocks wholly past the image (its last one is partial) read zeros
    # from the base again: their bits are cleared.
    assert store.info('a')['written_bytes'] == (10 + 1 + 1) * BS
    assert store.info('a')['allocated_bytes'] <= 2 * BS
    assert len(image) < 11 * BS


def test_zero_blank_volume_and_read_only(store):
    store.create('blank', 8 * BS)
    store.write('blank', 0, b'w' * 8 * BS)
    store.zero('blank', 0, 8 * BS)
    assert store.info('blank')['written_bytes'] == 0
    assert store.read('blank', 0, 8 * BS) == bytes(8 * BS)
    store.create('snap', 8 * BS, source='blank', read_only=True)
    with pytest.raises(volumes.VolumeReadOnly):
        store.zero('snap', 0, BS)
    with pytest.raises(volumes.VolumeNotFound):
        store.zero('nope', 0, BS)


def test_create_files_and_meta(store, layers, images):
    store.create('vol-a', 1 << 20, image_id=IMAGE, read_only=True)
    directory = os.path.join(layers, 'vol-a')
    assert sorted(os.listdir(directory)) == ['bitmap', 'data',
                                             'volume.json']
    with open(os.path.join(directory, 'volume.json')) as f:
        meta = json.load(f)
    assert meta['id'] == 'vol-a'
    assert meta['size'] == 1 << 20
    assert meta['image_id'] == IMAGE
    assert meta['read_only'] is True
    assert meta['created_at'].endswith('Z')


def test_meta_is_written_last(store, layers):
    """volume.json is renamed into place after the layer exists."""
    renames = []
    real = os.rename

    def rename(src, dst):
        renames.append((os.path.basename(dst),
                        sorted(os.listdir(os.path.dirname(dst)))))
        return real(src, dst)

    with mock.patch('os.rename', rename):
        store.create('v', BS)
    assert renames[-1][0] == 'volume.json'
    assert {'bitmap', 'data'} <= set(renames[-1][1])


def test_create_exists(store):
    store.create('v', BS)
    with pytest.raises(volumes.VolumeExists):
        store.create('v', 2 * BS)


def test_create_unknown_image(store, layers):
    with pytest.raises(volumes.VolumeError):
        store.create('v', BS, image_id='nope')
    assert store.list() == []
    assert not os.path.exists(os.path.join(layers, 'v'))


def test_failed_create_removes_the_directory(store, layers):
    with mock.patch.object(volumes, '_write_meta',
                           side_effect=OSError('disk full')):
        with pytest.raises(OSError):
            store.create('v', BS)
    assert not os.path.exists(os.path.join(layers, 'v'))
    assert store.list() == []
    store.create('v', BS)
    assert store.list() == ['v']


@pytest.mark.parametrize('size', [0, -1, 1.0, None, True])
def test_create_bad_size(store, size):
    with pytest.raises(ValueError):
        store.create('v', size)


@pytest.mark.parametrize('bad', ['', '.', '..', '-a', '.a', '_a', 'a/b',
                                 'a b', 'a' * 129, '../x', 'é', None, 5,
                                 'a\n'])
def test_bad_volume_ids(store, bad):
    with pytest.raises(ValueError):
        volumes.check_volume_id(bad)
    with pytest.raises(ValueError):
        store.create(bad, BS)


@pytest.mark.parametrize('good', ['a', 'A.b-c_d', '0' * 128,
                                  'volume-0c6e7e0a-5f4b-4e8b-9e38'])
def test_good_volume_ids(good):
    assert volumes.check_volume_id(good) == good


def test_delete(store, layers):
    store.create('v', BS)
    store.delete('v')
    assert store.list() == []
    assert not os.path.exists(os.path.join(layers, 'v'))
    with pytest.raises(volumes.VolumeNotFound):
        store.delete('v')
    with pytest.raises(volumes.VolumeNotFound):
        store.read('v', 0, 1)
    with pytest.raises(volumes.VolumeNotFound):
        store.info('v')


def test_delete_busy_while_open(store):
    store.create('v', BS)
    store.open('v', writable=True)
    store.open('v', writable=False)
    assert store.info('v')['open_count'] == 2
    assert store.open_volumes() == {'v': 2}
    with pytest.raises(volumes.VolumeBusy):
        store.delete('v')
    store.release('v')
    with pytest.raises(volumes.VolumeBusy):
        store.delete('v')
    store.release('v')
    store.delete('v')
    assert store.list() == []


def test_open_missing_and_read_only(store):
    with pytest.raises(volumes.VolumeNotFound):
        store.open('nope', writable=False)
    store.create('ro', BS, read_only=True)
    with pytest.raises(volumes.VolumeReadOnly):
        store.open('ro', writable=True)
    assert issubclass(volumes.VolumeReadOnly, volumes.VolumeError)
    store.open('ro', writable=False)
    with pytest.raises(volumes.VolumeReadOnly):
        store.write('ro', 0, b'x')
    store.release('ro')
    assert store.info('ro')['open_count'] == 0


def test_reopen_keeps_volumes_and_writes(layers, images):
    image = images.images[IMAGE]
    store = volumes.VolumeStore(layers, images)
    store.create('a', 2 * len(image), image_id=IMAGE)
    store.create('blank', BS)
    store.write('a', 3, b'kept')
    store.close()
    store = volumes.VolumeStore(layers, images)
    try:
        assert store.list() == ['a', 'blank']
        assert store.read('a', 0, 10) == image[:3] + b'kept' + image[7:10]
        assert store.info('a')['size'] == 2 * len(image)
        assert store.info('a')['image_id'] == IMAGE
    finally:
        store.close()


def test_half_created_directory_ignored(layers, images, caplog):
    store = volumes.VolumeStore(layers, images)
    store.create('whole', BS)
    store.create('half', BS)
    store.close()
    os.unlink(os.path.join(layers, 'half', 'volume.json'))
    os.makedirs(os.path.join(layers, 'empty'))
    with open(os.path.join(layers, 'stray-file'), 'w'):
        pass
    store = volumes.VolumeStore(layers, images)
    try:
        assert store.list() == ['whole']
        assert 'half-created volume half' in caplog.text
        with pytest.raises(volumes.VolumeNotFound):
            store.read('half', 0, 1)
        # A new create of the id replaces the half volume.
        store.create('half', 2 * BS)
        assert store.info('half')['size'] == 2 * BS
    finally:
        store.close()


def test_damaged_volume_not_served_nor_clobbered(layers, images):
    store = volumes.VolumeStore(layers, images)
    store.create('v', BS)
    store.close()
    os.truncate(os.path.join(layers, 'v', 'bitmap'), 100)
    store = volumes.VolumeStore(layers, images)
    try:
        assert store.list() == []
        with pytest.raises(volumes.VolumeExists):
            store.create('v', BS)
        assert os.path.exists(os.path.join(layers, 'v', 'volume.json'))
    finally:
        store.close()


def test_resize(store, layers, images):
    image = images.images[IMAGE]
    store.create('v', len(image), image_id=IMAGE)
    store.write('v', 0, b'head')
    store.resize('v', 1 << 30)
    assert store.info('v')['size'] == 1 << 30
    assert store.read('v', (1 << 30) - 4, 8) == bytes(4)
    assert store.read('v', 0, 8) == b'head' + image[4:8]
    with open(os.path.join(layers, 'v', 'volume.json')) as f:
        assert json.load(f)['size'] == 1 << 30
    with pytest.raises(ValueError):
        store.resize('v', 1 << 20)
    assert store.info('v')['size'] == 1 << 30
    with pytest.raises(volumes.VolumeNotFound):
        store.resize('nope', 1 << 30)


def test_resize_interrupted_before_meta(layers, images):
    """The layer's size wins over a volume.json not yet rewritten."""
    store = volumes.VolumeStore(layers, images)
    store.create('v', BS)
    with mock.patch.object(volumes, '_write_meta',
                           side_effect=OSError('crash')):
        with pytest.raises(OSError):
            store.resize('v', 4 * BS)
    store.close()
    store = volumes.VolumeStore(layers, images)
    try:
        assert store.info('v')['size'] == 4 * BS
        with open(os.path.join(layers, 'v', 'volume.json')) as f:
            assert json.load(f)['size'] == 4 * BS
    finally:
        store.close()


def test_clone_from_source(store, images):
    image = images.images[IMAGE]
    store.create('src', len(image), image_id=IMAGE)
    store.write('src', BS, b'S' * BS)
    store.create('snap', len(image), source='src', read_only=True)
    store.create('clone', 2 * len(image), source='snap')
    info = store.info('clone')
    assert info['image_id'] == IMAGE
    assert info['size'] == 2 * len(image)
    assert info['written_bytes'] == BS
    expected = image[:BS] + b'S' * BS + image[2 * BS:]
    assert store.read('clone', 0, len(image)) == expected
    assert store.read('clone', len(image), 10) == bytes(10)
    # Independent of its source afterwards.
    store.write('src', 0, b'X' * BS)
    store.write('clone', 2 * BS, b'C')
    assert store.read('snap', 0, len(image)) == expected
    assert store.read('clone', 0, BS) == image[:BS]
    assert store.read('src', 2 * BS, 1) == image[2 * BS:2 * BS + 1]


def test_clone_checks(store, images):
    image = images.images[IMAGE]
    store.create('src', len(image), image_id=IMAGE)
    with pytest.raises(ValueError):
        store.create('small', len(image) - 1, source='src')
    with pytest.raises(ValueError):
        store.create('other', len(image), source='src', image_id='img-2')
    with pytest.raises(volumes.VolumeNotFound):
        store.create('orphan', len(image), source='missing')
    assert store.list() == ['src']


def test_image_errors_propagate_as_ioerror(store, images):
    store.create('v', BS, image_id=IMAGE)
    images.broken = True
    with pytest.raises(IOError):
        store.read('v', 0, 10)
    with pytest.raises(IOError):
        store.write('v', 0, b'partial')
    assert store.info('v')['written_bytes'] == 0
    # A whole-block write needs nothing from the image.
    store.write('v', 0, b'w' * BS)
    assert store.read('v', 0, BS) == b'w' * BS


def test_flush_makes_bits_durable(store, layers):
    store.create('v', BS)
    store.write('v', 0, b'x')
    with open(os.path.join(layers, 'v', 'bitmap'), 'rb') as f:
        f.seek(cow.BITS_OFFSET)
        assert f.read(1) == b'\0'
    store.flush('v')
    with open(os.path.join(layers, 'v', 'bitmap'), 'rb') as f:
        f.seek(cow.BITS_OFFSET)
        assert f.read(1) == b'\x01'


# -- limits -----------------------------------------------------------------

def test_max_size(layers, images):
    store = volumes.VolumeStore(layers, images, max_size=4 * BS)
    try:
        store.create('v', 4 * BS)
        with pytest.raises(volumes.VolumeTooLarge):
            store.create('w', 4 * BS + 1)
        with pytest.raises(volumes.VolumeTooLarge):
            store.resize('v', 5 * BS)
        assert store.info('v')['size'] == 4 * BS
        assert store.list() == ['v']
        assert os.listdir(layers) == ['v']
    finally:
        store.close()


@pytest.mark.parametrize('size', [2 ** 63, 2 ** 64 + 1, 10 ** 30])
def test_sizes_past_off_t_refused(store, layers, size):
    with pytest.raises((ValueError, volumes.VolumeError)):
        store.create('v', size)
    assert os.listdir(layers) == []


def test_filesystem_refusing_the_size_is_a_clean_error(store, layers):
    def efbig(fd, length):
        raise OSError(errno.EFBIG, 'File too large')

    with mock.patch('os.ftruncate', efbig):
        with pytest.raises(volumes.VolumeTooLarge, match='filesystem'):
            store.create('v', 1 << 44)
    assert os.listdir(layers) == []
    store.create('v', BS)
    with mock.patch('os.ftruncate', efbig):
        with pytest.raises(volumes.VolumeTooLarge, match='filesystem'):
            store.resize('v', 1 << 44)
    assert store.info('v')['size'] == BS


# -- races ------------------------------------------------------------------

class PausedRmtree:
    """shutil.rmtree, paused in the first thread that calls it."""

    def __init__(self):
        self.real = volumes.shutil.rmtree
        self.entered = threading.Event()
        self.go = threading.Event()
        self.paused = None

    def __call__(self, path, *args, **kwargs):
        if self.paused is None:
            self.paused = threading.current_thread()
        if self.paused is threading.current_thread():
            self.entered.set()
            self.go.wait(10)
        return self.real(path, *args, **kwargs)


def _in_thread(call, *args, **kwargs):
    result = {}

    def run():
        try:
            result['value'] = call(*args, **kwargs)
        except Exception as e:
            result['error'] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _complete(store, layers, volume_id):
    """The volume is served and all its files are there."""
    assert volume_id in store.list()
    assert sorted(os.listdir(os.path.join(layers, volume_id))) == [
        'bitmap', 'data', volumes.META_FILE]
    assert store.read(volume_id, 0, 8) is not None


def test_create_while_the_same_id_is_being_deleted(store, layers):
    """A create racing a delete of its id never gets half a volume."""
    store.create('v', 4 * BS)
    rmtree = PausedRmtree()
    with mock.patch.object(volumes.shutil, 'rmtree', rmtree):
        deleting, deleted = _in_thread(store.delete, 'v')
        assert rmtree.entered.wait(10)
        creating, created = _in_thread(store.create, 'v', 8 * BS)
        creating.join(0.5)
        rmtree.go.set()
        deleting.join(10)
        creating.join(10)
    assert 'error' not in deleted, deleted
    assert 'error' not in created, created
    _complete(store, layers, 'v')
    assert store.info('v')['size'] == 8 * BS
    store.close()
    reopened = volumes.VolumeStore(layers, store.images)
    try:
        assert reopened.list() == ['v']
    finally:
        reopened.close()


def test_delete_while_the_same_id_is_being_created(store, layers):
    """Answers: deleted (after the create) or not found; nothing half."""
    real = volumes.cow.CowLayer.create
    entered, go = threading.Event(), threading.Event()

    def slow_create(directory, size):
        entered.set()
        go.wait(10)
        return real(directory, size)

    with mock.patch.object(volumes.cow.CowLayer, 'create', slow_create):
        creating, created = _in_thread(store.create, 'v', 4 * BS)
        assert entered.wait(10)
        deleting, deleted = _in_thread(store.delete, 'v')
        deleting.join(0.5)
        go.set()
        creating.join(10)
        deleting.join(10)
    assert 'error' not in created, created
    error = deleted.get('error')
    assert error is None or isinstance(error, volumes.VolumeNotFound)
    if error is None:
        assert store.list() == [] and os.listdir(layers) == []
    else:
        _complete(store, layers, 'v')


@pytest.mark.parametrize('op', ['clone', 'resize'])
def test_requests_on_a_volume_being_deleted(store, layers, op):
    """They wait for the delete, then find no volume; nothing is left."""
    store.create('v', 4 * BS)
    store.write('v', 0, b's' * BS)
    call = {'clone': lambda: store.create('clone', 4 * BS, source='v'),
            'resize': lambda: store.resize('v', 8 * BS)}[op]
    rmtree = PausedRmtree()
    with mock.patch.object(volumes.shutil, 'rmtree', rmtree):
        deleting, deleted = _in_thread(store.delete, 'v')
        assert rmtree.entered.wait(10)
        racing, raced = _in_thread(call)
        racing.join(0.5)
        rmtree.go.set()
        deleting.join(10)
        racing.join(10)
    assert 'error' not in deleted, deleted
    assert isinstance(raced.get('error'), volumes.VolumeNotFound), raced
    assert store.list() == [] and os.listdir(layers) == []


def test_meta_rewrites_leave_no_temporary_file(store, layers):
    store.create('v', BS)
    for n in range(2, 6):
        store.resize('v', n * BS)
    assert sorted(os.listdir(os.path.join(layers, 'v'))) == [
        'bitmap', 'data', volumes.META_FILE]


# -- revert and rename (Cinder's revert_to_snapshot, manage) --------------

def _snapshotted(store):
    """A volume with a write before and after its snapshot, then grown."""
    store.create('vol', 16 * BS, image_id=IMAGE)
    store.write('vol', 0, b'before' * 100)
    store.create('snap', 16 * BS, source='vol', read_only=True)
    store.write('vol', 0, b'after!' * 100)
    store.write('vol', 5 * BS, b'x' * BS)
    store.resize('vol', 32 * BS)
    store.write('vol', 31 * BS, b'y' * BS)
    return store.read('snap', 0, 16 * BS)


def test_revert_reads_the_snapshot_and_keeps_the_size(store, layers,
                                                      images):
    expected = _snapshotted(store)
    meta_path = os.path.join(layers, 'vol', volumes.META_FILE)
    before = json.load(open(meta_path))
    info = store.revert('vol', 'snap')
    assert info['size'] == 32 * BS
    assert store.read('vol', 0, 16 * BS) == expected
    assert store.read('vol', 16 * BS, 16 * BS) == bytes(16 * BS)
    assert info['written_bytes'] == BS  # the snapshot's one block
    assert sorted(os.listdir(layers)) == ['snap', 'vol']
    # The volume stays writable and independent of the snapshot, and
    # the reverted layer is the one a new store loads.
    store.write('vol', 0, b'later')
    assert store.read('snap', 0, 6) == b'before'
    store.close()
    again = volumes.VolumeStore(layers, images)
    try:
        assert again.read('vol', 0, 5) == b'later'
        assert again.read('vol', BS, 15 * BS) == expected[BS:]
        assert json.load(open(meta_path)) == before
    finally:
        again.close()


def test_revert_refused_while_open(store, layers):
    _snapshotted(store)
    before = store.read('vol', 0, 32 * BS)
    store.open('vol', writable=True)
    with pytest.raises(volumes.VolumeBusy):
        store.revert('vol', 'snap')
    assert store.read('vol', 0, 32 * BS) == before
    assert sorted(os.listdir(layers)) == ['snap', 'vol']


def test_revert_to_a_foreign_snapshot(store, layers):
    _snapshotted(store)
    store.create('blank', 16 * BS)
    with pytest.raises(volumes.VolumeError, match='not a snapshot'):
        store.revert('vol', 'blank')
    store.create('big', 64 * BS, source='vol')
    with pytest.raises(volumes.VolumeError, match='not a snapshot'):
        store.revert('vol', 'big')
    with pytest.raises(volumes.VolumeNotFound):
        store.revert('vol', 'missing')
    assert sorted(os.listdir(layers)) == ['big', 'blank', 'snap', 'vol']


def test_failed_exchange_changes_nothing(store, layers):
    _snapshotted(store)
    before = store.read('vol', 0, 32 * BS)
    error = OSError(errno.EINVAL, 'no exchange here')
    with mock.patch('thunder_cache.fsutil.exchange', side_effect=error):
        with pytest.raises(OSError):
            store.revert('vol', 'snap')
    assert store.read('vol', 0, 32 * BS) == before
    assert sorted(os.listdir(layers)) == ['snap', 'vol']


def test_revert_leftover_removed_at_start(store, layers, images):
    _snapshotted(store)
    store.close()
    leftover = os.path.join(layers, volumes.STAGING_PREFIX + 'vol')
    os.makedirs(leftover)
    open(os.path.join(leftover, 'data'), 'w').close()
    again = volumes.VolumeStore(layers, images)
    try:
        assert again.list() == ['snap', 'vol']
        assert sorted(os.listdir(layers)) == ['snap', 'vol']
    finally:
        again.close()


def test_rename(store, layers, images):
    store.create('old', 8 * BS, image_id=IMAGE)
    store.write('old', 0, b'mine')
    info = store.rename('old', 'new')
    assert info['id'] == 'new' and store.list() == ['new']
    assert store.read('new', 0, 4) == b'mine'
    store.write('new', BS, b'more')
    with pytest.raises(volumes.VolumeNotFound):
        store.read('old', 0, 1)
    store.close()
    again = volumes.VolumeStore(layers, images)
    try:
        assert again.list() == ['new']
        assert again.read('new', BS, 4) == b'more'
        meta = json.load(open(os.path.join(layers, 'new',
                                           volumes.META_FILE)))
        assert meta['id'] == 'new' and 'previous_id' not in meta
    finally:
        again.close()


def test_rename_refusals(store, layers):
    store.create('a', BS)
    store.create('b', BS)
    with pytest.raises(volumes.VolumeExists):
        store.rename('a', 'b')
    store.open('a', writable=False)
    with pytest.raises(volumes.VolumeBusy):
        store.rename('a', 'c')
    with pytest.raises(volumes.VolumeNotFound):
        store.rename('missing', 'c')
    with pytest.raises(ValueError):
        store.rename('b', '../c')
    assert store.list() == ['a', 'b']
    assert sorted(os.listdir(layers)) == ['a', 'b']


def test_failed_rename_keeps_the_volume(store, layers):
    store.create('a', BS)
    store.write('a', 0, b'keep')
    real = os.rename

    def rename(src, dst):
        if os.path.isdir(src):
            raise OSError(errno.EIO, 'boom')
        return real(src, dst)

    with mock.patch.object(volumes.os, 'rename', rename):
        with pytest.raises(OSError):
            store.rename('a', 'c')
    assert store.list() == ['a'] and store.read('a', 0, 4) == b'keep'
    meta = json.load(open(os.path.join(layers, 'a', volumes.META_FILE)))
    assert meta['id'] == 'a' and 'previous_id' not in meta


def test_rename_interrupted_before_the_directory_moved(store, layers,
                                                       images):
    store.create('a', BS)
    store.write('a', 0, b'keep')
    store.close()
    path = os.path.join(layers, 'a', volumes.META_FILE)
    meta = json.load(open(path))
    with open(path, 'w') as f:
        json.dump(dict(meta, id='c', previous_id='a'), f)
    again = volumes.VolumeStore(layers, images)
    try:
        assert again.list() == ['a'] and again.read('a', 0, 4) == b'keep'
    finally:
        again.close()


# -- with the native volume server --------------------------------------------

class FakeNative:
    """Records holds and forgets; ``opens`` is what the server reports."""

    def __init__(self):
        self.calls = []
        self.opens = 0
        self.fail = None

    @contextlib.contextmanager
    def hold(self, volume_id):
        if self.fail:
            raise self.fail
        self.calls.append(('hold', volume_id))
        yield self.opens
        self.calls.append(('release', volume_id))

    def forget(self, volume_id):
        if self.fail:
            raise self.fail
        self.calls.append(('forget', volume_id))


@pytest.fixture
def native_store(layers, images):
    native = FakeNative()
    s = volumes.VolumeStore(layers, images, native=native)
    yield s, native
    s.close()


def test_native_layer_reopened_while_held(native_store, layers):
    """The server's writes (here: a second layer object) are seen."""
    store, native = native_store
    store.create('v', 10 * BS, image_id=IMAGE)
    other = cow.CowLayer.open(os.path.join(layers, 'v'))
    other.write(0, b'x' * BS, lambda o, n: bytes(n))
    other.close()
    native.calls = []
    info = store.info('v')
    assert info['written_bytes'] == BS and info['open_count'] == 0
    assert native.calls == [('hold', 'v'), ('release', 'v')]


def test_native_resize_and_copy_hold_the_layer(native_store):
    store, native = native_store
    store.create('v', 10 * BS, image_id=IMAGE)
    store.resize('v', 20 * BS)
    assert native.calls[:2] == [('hold', 'v'), ('release', 'v')]
    native.calls = []
    store.create('c', 20 * BS, source='v')
    assert ('hold', 'v') in native.calls
    assert store.info('c')['size'] == 20 * BS


def test_native_delete_forgets_or_is_busy(native_store, layers):
    store, native = native_store
    store.create('v', 10 * BS, image_id=IMAGE)
    native.fail = nativevol.NativeError('EBUSY', 'volume v is open 1 times')
    with pytest.raises(volumes.VolumeBusy):
        store.delete('v')
    assert store.list() == ['v']
    native.fail = nativevol.NativeError('Unavailable', 'no server')
    with pytest.raises(volumes.VolumeError):
        store.delete('v')
    with pytest.raises(volumes.VolumeError):
        store.resize('v', 20 * BS)
    assert store.list() == ['v']
    native.fail = None
    store.delete('v')
    assert ('forget', 'v') in native.calls
    assert not os.path.exists(os.path.join(layers, 'v'))


def test_native_open_count_from_the_server(native_store):
    store, native = native_store
    store.create('v', 10 * BS, image_id=IMAGE)
    native.opens = 2
    assert store.info('v')['open_count'] == 2
    native.calls = []
    assert store.size('v') == 10 * BS and native.calls == []


def test_native_revert_and_rename_forget_or_are_busy(native_store, layers):
    """The server, which counts the opens, drops the volume first."""
    store, native = native_store
    store.create('v', 10 * BS, image_id=IMAGE)
    store.create('s', 10 * BS, source='v', read_only=True)
    native.fail = nativevol.NativeError('EBUSY', 'volume v is open 1 times')
    with pytest.raises(volumes.VolumeBusy):
        store.revert('v', 's')
    with pytest.raises(volumes.VolumeBusy):
        store.rename('v', 'w')
    assert store.list() == ['s', 'v']
    assert sorted(os.listdir(layers)) == ['s', 'v']
    native.fail, native.calls = None, []
    store.revert('v', 's')
    assert ('forget', 'v') in native.calls
    native.calls = []
    store.rename('v', 'w')
    assert ('forget', 'v') in native.calls
    assert store.list() == ['s', 'w']
    assert store.image_ids() == {'s': IMAGE, 'w': IMAGE}
