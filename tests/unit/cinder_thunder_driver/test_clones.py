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

"""The clone graph: depth, deferred deletion, release and the sweep."""

import threading
from unittest import mock

from cinder import exception
import pytest

from cinder_thunder_driver import clones
from tests.unit.cinder_thunder_driver import fakes
from thunder_common import rbd_layout

CLONE_SNAP = 'thunder-clone-0000000000000001'


def delete(cluster, name, **kwargs):
    with cluster.ioctx() as ioctx:
        clones.delete_image(cluster, ioctx, name, **kwargs)


def defer(state):
    """Put an image in the state delete_image leaves a deferred one in."""
    state.metadata[rbd_layout.META_DEFERRED] = '1'
    state.trashed = True
    return state


def chain(ceph, length, prefix='v'):
    """base <- v1 <- v2 ...: each cloned from a thunder-clone snapshot."""
    images = [ceph.add_image(prefix + '0')]
    for i in range(1, length + 1):
        ceph.add_snap(images[-1], CLONE_SNAP)
        images.append(ceph.add_clone(images[-1], CLONE_SNAP,
                                     '%s%d' % (prefix, i)))
    return images


def test_image_lock_serialises_one_image():
    order = []
    held = threading.Event()
    release = threading.Event()

    def holder():
        with clones.image_lock('img-a'):
            held.set()
            release.wait(5)
            order.append('holder done')

    def waiter():
        with clones.image_lock('img-a'):
            order.append('waiter in')

    t1 = threading.Thread(target=holder)
    t1.start()
    assert held.wait(5)
    t2 = threading.Thread(target=waiter)
    t2.start()
    # Another image's lock is independent.
    with clones.image_lock('img-b'):
        order.append('other image')
    t2.join(0.2)
    assert t2.is_alive()
    release.set()
    t1.join(5)
    t2.join(5)
    assert order == ['other image', 'holder done', 'waiter in']


# -- graph queries ------------------------------------------------------------

def test_parent_of(cluster, fake_ceph):
    base = fake_ceph.add_image('glance-img', pool='images')
    fake_ceph.add_snap(base, 'snap')
    fake_ceph.add_clone(base, 'snap', 'vol')
    with cluster.ioctx() as ioctx:
        with cluster.image(ioctx, 'vol') as image:
            assert clones.parent_of(image) == clones.Parent(
                'images', base.id, 'glance-img', 'snap')
    with cluster.ioctx('images') as ioctx:
        with cluster.image(ioctx, 'glance-img') as image:
            assert clones.parent_of(image) is None


def test_children(cluster, fake_ceph):
    base = fake_ceph.add_image('base')
    fake_ceph.add_snap(base, 'a')
    fake_ceph.add_snap(base, 'b')
    c1 = fake_ceph.add_clone(base, 'a', 'c1')
    defer(fake_ceph.add_clone(base, 'a', 'c2'))
    with cluster.ioctx() as ioctx, cluster.image(ioctx, 'base') as image:
        found = clones.children(image, 'a')
        assert sorted(c['image'] for c in found) == ['c1', 'c2']
        assert [c['trash'] for c in found if c['id'] == c1.id] == [False]
        assert clones.children(image, 'b') == []
        assert image.snapshot is None  # back at the head


def test_children_restores_head_on_error(cluster, fake_ceph):
    base = fake_ceph.add_image('base')
    fake_ceph.add_snap(base, 'a')
    with cluster.ioctx() as ioctx, cluster.image(ioctx, 'base') as image:
        with mock.patch.object(fakes.FakeImage, 'list_children2',
                               side_effect=fakes.rbd.IOError('eio')):
            with pytest.raises(fakes.rbd.IOError):
                clones.children(image, 'a')
        assert image.snapshot is None


@pytest.mark.parametrize('limit, expected', [(10, 3), (3, 3), (2, 2),
                                             (1, 1)])
def test_clone_depth(cluster, fake_ceph, limit, expected):
    chain(fake_ceph, 3)
    with cluster.ioctx() as ioctx:
        with cluster.image(ioctx, 'v3') as image:
            assert clones.clone_depth(cluster, image, limit) == expected
        with cluster.image(ioctx, 'v0') as image:
            assert clones.clone_depth(cluster, image, limit) == 0


def test_clone_depth_across_pools_and_trash(cluster, fake_ceph):
    glance = fake_ceph.add_image('img', pool='images')
    fake_ceph.add_snap(glance, 'snap')
    mid = defer(fake_ceph.add_clone(glance, 'snap', 'mid'))
    fake_ceph.add_snap(mid, CLONE_SNAP)
    fake_ceph.add_clone(mid, CLONE_SNAP, 'leaf')
    with cluster.ioctx() as ioctx, cluster.image(ioctx, 'leaf') as image:
        assert clones.clone_depth(cluster, image, 10) == 2


@pytest.mark.parametrize('protected', [True, False])
def test_remove_snapshot(cluster, fake_ceph, protected):
    state = fake_ceph.add_image('vol')
    fake_ceph.add_snap(state, 's', protected=protected)
    with cluster.ioctx() as ioctx, cluster.image(ioctx, 'vol') as image:
        with mock.patch.object(image, 'unprotect_snap',
                               wraps=image.unprotect_snap) as unprotect:
            clones.remove_snapshot(image, 's')
    assert unprotect.called is protected
    assert state.snaps == {}


# -- delete_image -------------------------------------------------------------

def test_delete_missing_image(cluster, fake_ceph):
    delete(cluster, 'nope')  # no exception
    assert fake_ceph.names() == []


def test_delete_plain_image(cluster, fake_ceph):
    fake_ceph.add_image('vol')
    fake_ceph.add_image('other')
    delete(cluster, 'vol')
    assert fake_ceph.names() == ['other']
    assert fake_ceph.trash() == []


def test_delete_removes_childless_internal_snapshots(cluster, fake_ceph):
    state = fake_ceph.add_image('vol')
    fake_ceph.add_snap(state, CLONE_SNAP)
    fake_ceph.add_snap(state, 'thunder-retired-snapshot-1', protected=False)
    delete(cluster, 'vol')
    assert fake_ceph.names() == []


def test_delete_refuses_foreign_snapshot(cluster, fake_ceph):
    state = fake_ceph.add_image('vol')
    fake_ceph.add_snap(state, CLONE_SNAP)
    fake_ceph.add_snap(state, 'backup-by-operator')
    with pytest.raises(exception.VolumeIsBusy) as info:
        delete(cluster, 'vol')
    assert 'backup-by-operator' in str(info.value)
    assert 'not managed by Cinder' in str(info.value)
    # Nothing was touched.
    assert fake_ceph.names() == ['vol']
    assert set(state.snaps) == {CLONE_SNAP, 'backup-by-operator'}


def test_delete_defers_an_image_with_clones(cluster, fake_ceph):
    base = fake_ceph.add_image('base')
    fake_ceph.add_snap(base, CLONE_SNAP)
    fake_ceph.add_snap(base, 'thunder-clone-unused')
    fake_ceph.add_clone(base, CLONE_SNAP, 'child')
    delete(cluster, 'base')
    assert fake_ceph.names() == ['child']
    assert fake_ceph.trash() == ['base']
    assert base.metadata[rbd_layout.META_DEFERRED] == '1'
    # The childless snapshot went, the one the clone reads through stays.
    assert list(base.snaps) == [CLONE_SNAP]


def test_delete_busy_image(cluster, fake_ceph):
    state = fake_ceph.add_image('vol')
    state.watchers.append({'addr': '192.0.2.9:0/1'})
    with pytest.raises(exception.VolumeIsBusy, match='vol'):
        delete(cluster, 'vol')
    assert fake_ceph.names() == ['vol']


def test_delete_concurrently_deleted_image(cluster, fake_ceph):
    fake_ceph.add_image('vol')
    fake_ceph.errors[('remove', 'vol')] = fakes.rbd.ImageNotFound('gone')
    with mock.patch.object(clones, 'release_parent') as release:
        delete(cluster, 'vol')  # counts as deleted
    release.assert_not_called()


def test_delete_image_gone_between_opens(cluster, fake_ceph):
    fake_ceph.add_image('vol')
    real = fakes.FakeImage
    opened = []

    def image(ioctx, name=None, **kwargs):
        if opened:  # the second open, under the lock
            raise fakes.rbd.ImageNotFound(name)
        opened.append(name)
        return real(ioctx, name, **kwargs)

    with mock.patch.object(clones.rbd, 'Image', side_effect=image):
        delete(cluster, 'vol')
    assert opened == ['vol']


def test_delete_releases_the_parent_snapshot(cluster, fake_ceph):
    base, child = chain(fake_ceph, 1)
    delete(cluster, child.name)
    assert fake_ceph.names() == ['v0']
    assert base.snaps == {}


def test_delete_keeps_a_shared_parent_snapshot(cluster, fake_ceph):
    base, child = chain(fake_ceph, 1)
    fake_ceph.add_clone(base, CLONE_SNAP, 'sibling')
    delete(cluster, child.name)
    assert list(base.snaps) == [CLONE_SNAP]


def test_delete_keeps_the_sealed_snapshot(cluster, fake_ceph):
    base, child = chain(fake_ceph, 1)
    base.metadata[rbd_layout.META_SEALED_SNAP] = CLONE_SNAP
    delete(cluster, child.name)
    assert list(base.snaps) == [CLONE_SNAP]
    assert base.snaps[CLONE_SNAP].protected


@pytest.mark.parametrize('snap', ['snapshot-of-cinder', 'snap'])
def test_delete_keeps_foreign_parent_snapshots(cluster, fake_ceph, snap):
    base = fake_ceph.add_image('base')
    fake_ceph.add_snap(base, snap)
    fake_ceph.add_clone(base, snap, 'child')
    delete(cluster, 'child')
    assert list(base.snaps) == [snap]


def test_delete_removes_a_retired_parent_snapshot(cluster, fake_ceph):
    base = fake_ceph.add_image('base')
    fake_ceph.add_snap(base, 'thunder-retired-snapshot-1')
    fake_ceph.add_clone(base, 'thunder-retired-snapshot-1', 'child')
    delete(cluster, 'child')
    assert base.snaps == {}


def test_delete_last_clone_removes_deferred_ancestors(cluster, fake_ceph):
    root, a, b, leaf = chain(fake_ceph, 3)
    defer(a)
    defer(b)
    root.metadata[rbd_layout.META_SEALED_SNAP] = CLONE_SNAP
    delete(cluster, leaf.name)
    # b and then a had nothing depending on them any more; the sealed root
    # lives on with its snapshot.
    assert fake_ceph.names() == ['v0'] and fake_ceph.trash() == []
    assert list(root.snaps) == [CLONE_SNAP]


def test_delete_stops_at_a_deferred_parent_with_other_clones(cluster,
                                                             fake_ceph):
    root, a, leaf = chain(fake_ceph, 2)
    defer(a)
    fake_ceph.add_clone(a, CLONE_SNAP, 'other-leaf')
    delete(cluster, leaf.name)
    assert fake_ceph.trash() == ['v1']
    assert list(root.snaps) == [CLONE_SNAP]


def test_delete_without_release_leaves_the_parent(cluster, fake_ceph):
    base, child = chain(fake_ceph, 1)
    delete(cluster, child.name, release=False)
    assert fake_ceph.names() == ['v0']
    assert list(base.snaps) == [CLONE_SNAP]


# -- release_parent and the sweep ---------------------------------------------

def test_release_nothing(cluster, fake_ceph):
    clones.release_parent(cluster, None)
    assert fake_ceph.open_ioctxs == []


def test_release_vanished_parent(cluster, fake_ceph):
    with mock.patch.object(clones, '_remove_deferred') as remove:
        clones.release_parent(cluster, clones.Parent(
            'volumes', 'no-such-id', 'gone', CLONE_SNAP))
    remove.assert_not_called()


def test_release_parent_snapshot_already_gone(cluster, fake_ceph):
    base = fake_ceph.add_image('base')
    clones.release_parent(cluster, clones.Parent('volumes', base.id, 'base',
                                                 CLONE_SNAP))
    assert fake_ceph.names() == ['base']


def test_remove_deferred_ignores_live_images(cluster, fake_ceph):
    base = fake_ceph.add_image('base')
    with cluster.ioctx() as ioctx:
        assert clones._remove_deferred(cluster, ioctx, base.id) == \
            (False, None)
    assert fake_ceph.names() == ['base']


def test_remove_deferred_of_a_vanished_image(cluster, fake_ceph):
    with cluster.ioctx() as ioctx:
        assert clones._remove_deferred(cluster, ioctx, 'no-such-id') == \
            (False, None)


def test_purge_deferred_races_another_purge(cluster, fake_ceph):
    gone = defer(fake_ceph.add_image('gone'))
    fake_ceph.errors[('trash_remove', gone.id)] = \
        fakes.rbd.ImageNotFound('removed by another cinder-volume')
    with mock.patch.object(clones.LOG, 'exception') as log:
        assert clones.purge_deferred(cluster) == 0
    log.assert_not_called()


def test_purge_deferred(cluster, fake_ceph):
    parent, orphan = chain(fake_ceph, 1, prefix='p')
    defer(orphan)  # deferred, nothing depends on it: goes
    fake_ceph.add_snap(orphan, 'thunder-retired-x')
    busy, _child = chain(fake_ceph, 1, prefix='b')
    defer(busy)  # deferred but still has a clone: stays
    user = fake_ceph.add_image('user-trashed')
    user.trashed = True  # trashed by someone else, not tagged: stays
    assert clones.purge_deferred(cluster) == 1
    assert sorted(fake_ceph.trash()) == ['b0', 'user-trashed']
    # The removed image's parent was released.
    assert parent.snaps == {}


def test_purge_deferred_goes_on_after_an_error(cluster, fake_ceph):
    bad = defer(fake_ceph.add_image('bad'))
    defer(fake_ceph.add_image('good'))
    fake_ceph.errors[('trash_remove', bad.id)] = fakes.rbd.ImageBusy('open')
    with mock.patch.object(clones.LOG, 'exception') as log:
        assert clones.purge_deferred(cluster) == 1
    assert fake_ceph.trash() == ['bad']
    log.assert_called_once()
    assert 'bad' in log.call_args.args


def test_purge_deferred_of_an_empty_trash(cluster, fake_ceph):
    fake_ceph.add_image('live')
    assert clones.purge_deferred(cluster) == 0
    assert fake_ceph.names() == ['live']


def test_delete_succeeds_when_releasing_the_parent_fails(cluster, fake_ceph):
    base, child = chain(fake_ceph, 1)
    with mock.patch.object(clones, 'release_parent',
                           side_effect=fakes.rbd.Timeout('slow')) as release:
        delete(cluster, child.name)
    release.assert_called_once()
    # The child is gone; the unused snapshot waits for the next clean-up.
    assert fake_ceph.names() == ['v0']
    assert list(base.snaps) == [CLONE_SNAP]
