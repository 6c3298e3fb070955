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

"""ThunderDriver: cloned volumes, clone_image and image copies."""

import logging
import os
import threading
from unittest import mock
import uuid

from cinder import exception
from oslo_utils import units
import pytest

from cinder_thunder_driver import driver
from cinder_thunder_driver import image_clones
from tests.unit.cinder_thunder_driver import fakes
from thunder_common import locations
from thunder_common import rbd_layout

VBAE = exception.VolumeBackendAPIException
GiB = units.Gi
RAW = fakes.RAW
NOT_CLONEABLE = fakes.NOT_CLONEABLE


def parent(ceph, volume):
    """(parent image name, snapshot) of a volume's RBD image."""
    state = ceph.find(volume.name)
    if state.parent is None:
        return None
    pool, image_id, snap_id = state.parent
    src = ceph.by_id(pool, image_id)
    return src.name, [s.name for s in src.snaps.values()
                      if s.id == snap_id][0]


def source(ceph, size=1, **kwargs):
    volume = fakes.Volume(size=size)
    return volume, ceph.add_image(volume.name, size=size * GiB, **kwargs)


def run_briefly(func, *args, timeout=5):
    """Run func in a thread; fail (instead of hanging) on a deadlock."""
    outcome = {}

    def target():
        try:
            outcome['result'] = func(*args)
        except BaseException as e:
            outcome['error'] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), '%s deadlocked' % func.__name__
    if 'error' in outcome:
        raise outcome['error']
    return outcome['result']


# -- create_cloned_volume -----------------------------------------------------

def test_create_cloned_volume(drv, fake_ceph):
    src, state = source(fake_ceph)
    dst = fakes.Volume(size=3)
    assert drv.create_cloned_volume(dst, src) is None
    snap = parent(fake_ceph, dst)[1]
    assert parent(fake_ceph, dst) == (src.name, snap)
    assert rbd_layout.is_internal_snapshot(snap)
    assert state.snaps[snap].protected
    assert fake_ceph.find(dst.name).size == 3 * GiB
    drv.flattener.flatten_later.assert_not_called()


def test_unchanged_source_reuses_its_clone_snapshot(drv, fake_ceph):
    src, state = source(fake_ceph)
    first, second = fakes.Volume(), fakes.Volume()
    drv.create_cloned_volume(first, src)
    drv.create_cloned_volume(second, src)
    assert parent(fake_ceph, first) == parent(fake_ceph, second)
    assert len(state.snaps) == 1


@pytest.mark.parametrize('change', ['written', 'resized', 'no_fast_diff',
                                    'diff_error'])
def test_changed_source_gets_a_new_snapshot(drv, fake_ceph, change):
    src, state = source(fake_ceph)
    first, second = fakes.Volume(), fakes.Volume()
    drv.create_cloned_volume(first, src)
    snap = parent(fake_ceph, first)[1]
    if change == 'written':
        state.diffs[snap] = [(4096, 512)]
    elif change == 'resized':
        state.size = 2 * GiB
    elif change == 'no_fast_diff':
        state.features &= ~fakes.RBD_FEATURE_FAST_DIFF
    else:
        fake_ceph.errors['diff_iterate'] = fakes.rbd.IOError('eio')
    drv.create_cloned_volume(second, src)
    assert parent(fake_ceph, second)[1] != snap
    assert len(state.snaps) == 2
    # The new snapshot is the newest: the one reused next time.
    newest = max(state.snaps.values(), key=lambda s: s.id)
    assert parent(fake_ceph, second)[1] == newest.name


def test_clone_of_a_sealed_image_volume_uses_its_snapshot(drv, fake_ceph):
    src, state = source(fake_ceph)
    fake_ceph.add_snap(state, 'thunder-clone-sealed')
    state.metadata[rbd_layout.META_SEALED_SNAP] = 'thunder-clone-sealed'
    dst = fakes.Volume()
    drv.create_cloned_volume(dst, src)
    assert parent(fake_ceph, dst) == (src.name, 'thunder-clone-sealed')
    assert list(state.snaps) == ['thunder-clone-sealed']


def test_clone_of_a_missing_source(drv, fake_ceph):
    src = fakes.Volume()
    with pytest.raises(VBAE, match='Clone source volumes/%s does not exist'
                       % src.name):
        drv.create_cloned_volume(fakes.Volume(), src)


def test_clone_too_large(make_driver, fake_ceph):
    drv = make_driver(max_over_subscription_ratio='1.0')
    src, state = source(fake_ceph)
    dst = fakes.Volume(size=1001)
    with pytest.raises(VBAE, match='does not fit'):
        drv.create_cloned_volume(dst, src)
    assert fake_ceph.find(dst.name) is None
    assert state.snaps == {}


def _chain(ceph, depth):
    """A volume at the end of a clone chain of the given depth."""
    volume, state = source(ceph)
    for i in range(depth):
        ceph.add_snap(state, 'thunder-clone-%d' % i)
        volume = fakes.Volume()
        state = ceph.add_clone(state, 'thunder-clone-%d' % i, volume.name)
    return volume


@pytest.mark.parametrize('src_depth, flattened', [(0, False), (1, False),
                                                  (2, True), (5, True)])
def test_clone_depth_limit_triggers_flatten_later(make_driver, fake_ceph,
                                                  src_depth, flattened):
    drv = make_driver(thunder_max_clone_depth=2, thunder_rbd_pool='volumes')
    drv.flattener = mock.Mock()
    src = _chain(fake_ceph, src_depth)
    dst = fakes.Volume()
    drv.create_cloned_volume(dst, src)
    assert fake_ceph.find(dst.name).parent is not None  # usable at once
    if flattened:
        drv.flattener.flatten_later.assert_called_once_with('volumes',
                                                            dst.name)
    else:
        drv.flattener.flatten_later.assert_not_called()


@pytest.fixture
def qos_fails():
    with mock.patch.object(driver.qos_specs, 'get_qos_specs',
                           side_effect=exception.QoSSpecsNotFound(
                               specs_id='q')) as get:
        yield get


@pytest.mark.parametrize('failure', ['finish', 'resize'])
def test_failed_clone_is_removed_without_deadlock(drv, fake_ceph, qos_fails,
                                                  failure):
    src, state = source(fake_ceph)
    dst = fakes.Volume(size=2, volume_type={'qos_specs_id': 'q'})
    if failure == 'resize':
        fake_ceph.errors[('resize', dst.name)] = fakes.rbd.IOError('eio')
        error = fakes.rbd.IOError
    else:
        error = exception.QoSSpecsNotFound
    with pytest.raises(error):
        run_briefly(drv.create_cloned_volume, dst, src)
    assert fake_ceph.find(dst.name) is None
    assert fake_ceph.names() == [src.name]
    # The source's lock was released: cloning it again works.
    fake_ceph.errors.clear()
    qos_fails.side_effect = None
    qos_fails.return_value = {'consumer': 'front-end', 'specs': {}}
    run_briefly(drv.create_cloned_volume, dst, src)
    assert parent(fake_ceph, dst)[0] == src.name
    drv.flattener.flatten_later.assert_not_called()


def test_clone_that_cannot_be_created(drv, fake_ceph):
    src, state = source(fake_ceph)
    dst = fakes.Volume()
    fake_ceph.add_image(dst.name)  # a stray image with the same name
    with pytest.raises(fakes.rbd.ImageExists):
        run_briefly(drv.create_cloned_volume, dst, src)
    # The stray image is not the driver's to delete.
    assert fake_ceph.find(dst.name) is not None


# -- create_volume_from_snapshot ----------------------------------------------

def test_create_volume_from_snapshot(drv, fake_ceph):
    src, state = source(fake_ceph)
    snapshot = fakes.Snapshot(src)
    drv.create_snapshot(snapshot)
    dst = fakes.Volume(size=2)
    drv.create_volume_from_snapshot(dst, snapshot)
    assert parent(fake_ceph, dst) == (src.name, snapshot.name)
    assert fake_ceph.find(dst.name).size == 2 * GiB
    assert list(state.snaps) == [snapshot.name]


def test_create_volume_from_missing_snapshot(drv, fake_ceph):
    src, _state = source(fake_ceph)
    snapshot = fakes.Snapshot(src)
    with pytest.raises(exception.SnapshotNotFound):
        drv.create_volume_from_snapshot(fakes.Volume(), snapshot)


def test_create_volume_from_snapshot_of_missing_volume(drv, fake_ceph):
    snapshot = fakes.Snapshot(fakes.Volume())
    with pytest.raises(VBAE, match='does not exist'):
        drv.create_volume_from_snapshot(fakes.Volume(), snapshot)


# -- clone_image --------------------------------------------------------------

@pytest.fixture
def image_volume(fake_ceph):
    """A sealed image-volume of the thunder store for image RAW['id']."""
    volume_id = str(uuid.uuid4())
    state = fake_ceph.add_image('volume-%s' % volume_id)
    fake_ceph.add_snap(state, 'thunder-clone-sealed')
    state.metadata[rbd_layout.META_GLANCE_IMAGE_ID] = RAW['id']
    state.metadata[rbd_layout.META_SEALED_SNAP] = 'thunder-clone-sealed'
    return volume_id, state


def clone_image(drv, volume, urls, meta=RAW, direct_url=None):
    location = (direct_url, [{'url': u, 'metadata': {}} for u in urls])
    return drv.clone_image(None, volume, location, dict(meta), None)


@pytest.mark.parametrize('form', [
    lambda vid: locations.thunder_location(vid).url,
    lambda vid: locations.thunder_location(vid, 'store1').url,
    lambda vid: locations.cinder_location(vid).url,
    lambda vid: locations.cinder_location(vid, 'store1').url,
])
def test_clone_image_from_image_volume(drv, fake_ceph, image_volume, form):
    volume_id, state = image_volume
    volume = fakes.Volume(size=4)
    assert clone_image(drv, volume, [form(volume_id)]) == \
        ({'provider_location': None}, True)
    assert parent(fake_ceph, volume) == (state.name, 'thunder-clone-sealed')
    assert fake_ceph.find(volume.name).size == 4 * GiB
    assert list(state.snaps) == ['thunder-clone-sealed']


def test_clone_of_a_sealed_image_volume_drops_the_manifest_tail(drv,
                                                                fake_ceph):
    # The store sizes an image-volume for the image plus its manifest: a
    # 1 GiB image lives in a 2 GiB image-volume, and its 1 GiB volumes
    # must not inherit the extra GiB.
    state = fake_ceph.add_image('volume-%s' % uuid.uuid4(), size=2 * GiB)
    fake_ceph.add_snap(state, 'thunder-clone-sealed')
    state.metadata[rbd_layout.META_GLANCE_IMAGE_ID] = RAW['id']
    state.metadata[rbd_layout.META_SEALED_SNAP] = 'thunder-clone-sealed'
    volume = fakes.Volume(size=1)
    url = locations.thunder_location(state.name[len('volume-'):]).url
    assert clone_image(drv, volume, [url])[1] is True
    assert fake_ceph.find(volume.name).size == GiB


def test_clone_of_an_unsealed_snapshot_is_never_shrunk(drv, fake_ceph):
    glance = fake_ceph.add_image(RAW['id'], pool='images', size=2 * GiB)
    fake_ceph.add_snap(glance, 'snap')
    volume = fakes.Volume(size=1)
    url = locations.RbdLocation(fakes.FSID, 'images', RAW['id'], 'snap').url
    assert clone_image(drv, volume, [url])[1] is True
    assert fake_ceph.find(volume.name).size == 2 * GiB


def test_clone_image_from_direct_url(drv, fake_ceph, image_volume):
    volume_id, state = image_volume
    volume = fakes.Volume()
    url = locations.thunder_location(volume_id).url
    assert clone_image(drv, volume, [], direct_url=url)[1] is True
    assert parent(fake_ceph, volume)[0] == state.name


def test_clone_image_from_rbd_location(drv, fake_ceph):
    glance = fake_ceph.add_image(RAW['id'], pool='images')
    fake_ceph.add_snap(glance, 'snap')
    volume = fakes.Volume(size=2)
    url = locations.RbdLocation(fakes.FSID, 'images', RAW['id'], 'snap').url
    assert clone_image(drv, volume, [url])[1] is True
    state = fake_ceph.find(volume.name)
    assert state.parent[:2] == ('images', glance.id)
    assert list(glance.snaps) == ['snap']


def test_clone_image_tries_locations_in_turn(drv, fake_ceph, image_volume):
    volume_id, state = image_volume
    volume = fakes.Volume()
    urls = ['http://example.com/image',
            'rbd://garbage',
            locations.RbdLocation(str(uuid.uuid4()), 'images', 'x',
                                  'snap').url,
            locations.thunder_location(str(uuid.uuid4())).url,
            locations.thunder_location(volume_id).url]
    assert clone_image(drv, volume, urls)[1] is True
    assert parent(fake_ceph, volume)[0] == state.name


def declined(drv):
    return drv.image_clones.stats()[image_clones.STAT_REASONS]


@pytest.mark.parametrize('meta', NOT_CLONEABLE)
def test_clone_image_not_raw_or_bare(drv, fake_ceph, image_volume, meta):
    volume = fakes.Volume()
    url = locations.thunder_location(image_volume[0]).url
    assert clone_image(drv, volume, [url], meta=meta) == ({}, False)
    driver.cluster_mod.rados.Rados.assert_not_called()
    reason = (image_clones.NOT_RAW if meta.get('disk_format') != 'raw'
              else image_clones.NOT_BARE)
    assert declined(drv) == {reason: 1}


def test_declined_and_cloned_images_in_the_stats(drv, fake_ceph,
                                                 image_volume, caplog):
    """One warning per declined volume; the counts in the volume stats."""
    caplog.set_level(logging.DEBUG)
    url = locations.thunder_location(image_volume[0]).url
    qcow2 = fakes.Volume()
    assert clone_image(drv, qcow2, [url],
                       meta=dict(RAW, disk_format='qcow2'))[1] is False
    assert clone_image(drv, fakes.Volume(), [url])[1] is True
    elsewhere = fakes.Volume()
    assert clone_image(drv, elsewhere, ['file:///x'])[1] is False
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert qcow2.id in warnings[0] and 'qcow2' in warnings[0]
    assert 'image-create-via-import' in warnings[0]
    assert elsewhere.id in warnings[1] and '1 locations' in warnings[1]
    stats = drv.get_volume_stats(refresh=True)
    assert stats[image_clones.STAT_CLONES] == 1
    assert stats[image_clones.STAT_DECLINED] == 2
    assert stats[image_clones.STAT_REASONS] == {
        image_clones.NOT_RAW: 1, image_clones.NO_LOCATION: 1}


def test_clone_image_container_format_unset(drv, fake_ceph, image_volume):
    volume = fakes.Volume()
    url = locations.thunder_location(image_volume[0]).url
    meta = dict(RAW, container_format=None)
    assert clone_image(drv, volume, [url], meta=meta)[1] is True


def test_clone_image_encrypted_volume(drv, fake_ceph, image_volume):
    volume = fakes.Volume(encryption_key_id=str(uuid.uuid4()))
    url = locations.thunder_location(image_volume[0]).url
    assert clone_image(drv, volume, [url]) == ({}, False)
    assert fake_ceph.find(volume.name) is None


@pytest.mark.parametrize('location', [None, (None, None), (None, []),
                                      ('', [{'url': ''}, {}])])
def test_clone_image_without_locations(drv, fake_ceph, location):
    volume = fakes.Volume()
    assert drv.clone_image(None, volume, location, dict(RAW), None) == \
        ({}, False)
    assert fake_ceph.names() == []
    assert declined(drv) == {image_clones.NO_LOCATION: 1}


@pytest.mark.parametrize('url', [
    'thunder://not-a-uuid', 'thunder://' + 'a' * 5000, 'rbd://x/y',
    'rbd://%s/p/i/s?x' % fakes.FSID, 'cinder://a/b/c', 'file:///etc/passwd',
    'rbd://%s/volumes/%%ff/s' % fakes.FSID,
])
def test_clone_image_malformed_locations(drv, fake_ceph, url):
    assert clone_image(drv, fakes.Volume(), [url]) == ({}, False)
    assert fake_ceph.names() == []


def test_clone_image_foreign_cluster(drv, fake_ceph):
    glance = fake_ceph.add_image('img-1', pool='images')
    fake_ceph.add_snap(glance, 'snap')
    url = locations.RbdLocation(str(uuid.uuid4()), 'images', 'img-1',
                                'snap').url
    assert clone_image(drv, fakes.Volume(), [url]) == ({}, False)


@pytest.mark.parametrize('pool, image, snap', [
    ('images', RAW['id'], 'other-snap'),
    ('images', 'img-2', 'snap'),
    ('no-such-pool', RAW['id'], 'snap'),
])
def test_clone_image_unusable_rbd_location(drv, fake_ceph, pool, image,
                                           snap):
    glance = fake_ceph.add_image(RAW['id'], pool='images')
    fake_ceph.add_snap(glance, 'snap')
    url = locations.RbdLocation(fakes.FSID, pool, image, snap).url
    assert clone_image(drv, fakes.Volume(), [url]) == ({}, False)


@pytest.mark.parametrize('holder', ['another-image', None])
def test_rbd_location_of_another_image_is_not_cloned(drv, fake_ceph, holder):
    """An rbd:// location naming what is not this image's is refused.

    Another image's image-volume (sealed for it), or any other RBD image
    of the cluster whose name is not the image's (a tenant's volume).
    """
    victim = fake_ceph.add_image('volume-%s' % uuid.uuid4(), pool='images')
    if holder:
        victim.metadata[rbd_layout.META_GLANCE_IMAGE_ID] = holder
    fake_ceph.add_snap(victim, 'snap')
    volume = fakes.Volume()
    url = locations.RbdLocation(fakes.FSID, 'images', victim.name,
                                'snap').url
    with mock.patch.object(driver.LOG, 'warning') as warning:
        assert clone_image(drv, volume, [url]) == ({}, False)
    assert RAW['id'] in str(warning.call_args)
    assert fake_ceph.find(volume.name) is None


def test_rbd_location_of_this_images_volume_is_cloned(drv, fake_ceph):
    mine = fake_ceph.add_image('volume-%s' % uuid.uuid4(), pool='images')
    mine.metadata[rbd_layout.META_GLANCE_IMAGE_ID] = RAW['id']
    fake_ceph.add_snap(mine, 'snap')
    volume = fakes.Volume()
    url = locations.RbdLocation(fakes.FSID, 'images', mine.name, 'snap').url
    assert clone_image(drv, volume, [url])[1] is True
    assert fake_ceph.find(volume.name).parent[:2] == ('images', mine.id)


def test_clone_image_volume_sealed_for_another_image(drv, fake_ceph,
                                                     image_volume):
    volume = fakes.Volume()
    url = locations.thunder_location(image_volume[0]).url
    with mock.patch.object(driver.LOG, 'warning') as warning:
        result = clone_image(drv, volume, [url],
                             meta=dict(RAW, id='another-image'))
    assert result == ({}, False)
    assert 'another-image' in str(warning.call_args)
    assert fake_ceph.find(volume.name) is None


def test_clone_image_unsealed_volume(drv, fake_ceph):
    volume_id = str(uuid.uuid4())
    fake_ceph.add_image('volume-%s' % volume_id)
    url = locations.thunder_location(volume_id).url
    assert clone_image(drv, fakes.Volume(), [url]) == ({}, False)


def test_clone_image_too_large(make_driver, fake_ceph, image_volume):
    drv = make_driver(max_over_subscription_ratio='1.0')
    url = locations.thunder_location(image_volume[0]).url
    with pytest.raises(VBAE, match='does not fit'):
        clone_image(drv, fakes.Volume(size=5000), [url])


# -- image copies -------------------------------------------------------------

def test_copy_image_to_volume(drv, fake_ceph, conversion_dir):
    volume, state = source(fake_ceph, size=1)
    content = b'\x00' * 4096 + b'bootloader' + b'\x00' * 100
    seen = {}

    def fetch(context, image_service, image_id, dest, blocksize, **kwargs):
        seen.update(dest=dest, kwargs=kwargs, blocksize=blocksize)
        with open(dest, 'wb') as f:
            f.write(content)

    with mock.patch.object(driver.image_utils, 'fetch_to_raw',
                           side_effect=fetch):
        drv.copy_image_to_volume('ctx', volume, 'image-service', 'img-id')
    assert os.path.dirname(seen['dest']) == str(conversion_dir)
    assert os.path.basename(seen['dest']).startswith('thunder-')
    assert not os.path.exists(seen['dest'])  # cleaned up
    # The temporary file is cinder-volume's own: no root needed.
    assert seen['kwargs'] == {'size': 1, 'disable_sparse': False,
                              'run_as_root': False}
    assert seen['blocksize'] == drv.configuration.volume_dd_blocksize
    assert state.extents == {0: content}  # a single 4 MiB chunk, written


def test_copy_image_to_volume_dense(drv, fake_ceph, conversion_dir):
    volume, state = source(fake_ceph)

    def fetch(context, image_service, image_id, dest, blocksize, **kwargs):
        with open(dest, 'wb') as f:
            f.write(bytes(8 * units.Mi))

    with mock.patch.object(driver.image_utils, 'fetch_to_raw',
                           side_effect=fetch) as fetch_mock:
        drv.copy_image_to_volume(None, volume, None, 'img',
                                 disable_sparse=True)
    assert fetch_mock.call_args.kwargs['disable_sparse'] is True
    # Zeros were written, not skipped.
    assert sorted(state.extents) == [0, 4 * units.Mi]


def test_copy_image_to_volume_download_fails(drv, fake_ceph,
                                             conversion_dir):
    volume, state = source(fake_ceph)
    with mock.patch.object(driver.image_utils, 'fetch_to_raw',
                           side_effect=exception.ImageUnacceptable(
                               image_id='img', reason='bad')):
        with pytest.raises(exception.ImageUnacceptable):
            drv.copy_image_to_volume(None, volume, None, 'img')
    assert os.listdir(conversion_dir) == []
    assert state.extents == {}


def test_copy_volume_to_image(drv, fake_ceph, conversion_dir):
    volume, state = source(fake_ceph)
    state.size = 3 * units.Mi
    state.extents[units.Mi] = b'data'
    uploaded = {}

    def upload(context, image_service, image_meta, path, vol, **kwargs):
        uploaded.update(path=path, meta=image_meta, vol=vol, kwargs=kwargs)
        with open(path, 'rb') as f:
            uploaded['content'] = f.read()

    with mock.patch.object(driver.volume_utils, 'upload_volume',
                           side_effect=upload):
        drv.copy_volume_to_image('ctx', volume, 'svc', {'id': 'img-9'})
    assert uploaded['vol'] is volume and uploaded['meta'] == {'id': 'img-9'}
    assert uploaded['kwargs'] == {'run_as_root': False}
    assert uploaded['content'] == (bytes(units.Mi) + b'data' +
                                   bytes(2 * units.Mi - 4))
    assert os.path.dirname(uploaded['path']) == str(conversion_dir)
    assert 'img-9' in uploaded['path']
    assert not os.path.exists(uploaded['path'])


def test_copy_volume_to_image_upload_fails(drv, fake_ceph, conversion_dir):
    volume, state = source(fake_ceph)
    state.size = units.Mi
    with mock.patch.object(driver.volume_utils, 'upload_volume',
                           side_effect=exception.ImageCopyFailure(
                               reason='glance down')):
        with pytest.raises(exception.ImageCopyFailure):
            drv.copy_volume_to_image(None, volume, None, {'id': 'img-9'})
    assert os.listdir(conversion_dir) == []


def test_copy_volume_to_image_missing_volume(drv, conversion_dir):
    with mock.patch.object(driver.volume_utils, 'upload_volume') as upload:
        with pytest.raises(fakes.rbd.ImageNotFound):
            drv.copy_volume_to_image(None, fakes.Volume(), None,
                                     {'id': 'img-9'})
    upload.assert_not_called()
