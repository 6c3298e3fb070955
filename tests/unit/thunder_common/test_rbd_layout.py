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

"""The RBD layout helpers shared by the Glance store and the driver."""

import re
from unittest import mock

import pytest

from thunder_common import rbd_layout


def mock_image(metadata=None, snaps=(), protected=()):
    """A mock rbd.Image with dict-backed metadata and snapshots."""
    metadata = dict(metadata or {})
    snaps = {name: {'id': i, 'name': name, 'size': 1}
             for i, name in snaps}
    protected = set(protected)
    image = mock.Mock(name='rbd.Image')

    def metadata_get(key):
        try:
            return metadata[key]
        except KeyError:
            raise KeyError('no metadata %s' % key)

    def create_snap(name):
        snaps[name] = {'id': max([s['id'] for s in snaps.values()] or [0])
                       + 1, 'name': name, 'size': 1}

    image.metadata_get.side_effect = metadata_get
    image.metadata_set.side_effect = metadata.__setitem__
    image.list_snaps.side_effect = lambda: list(snaps.values())
    image.snap_exists.side_effect = snaps.__contains__
    image.create_snap.side_effect = create_snap
    image.is_protected_snap.side_effect = protected.__contains__
    image.protect_snap.side_effect = protected.add
    image.metadata = metadata
    image.snaps = snaps
    image.protected = protected
    return image


@pytest.mark.parametrize('name, internal', [
    ('thunder-clone-0123456789abcdef', True),
    ('thunder-retired-snapshot-1', True),
    ('thunder-clone-', True),
    ('snapshot-0b7c3a1e', False),
    ('snap', False),
    ('xthunder-clone-1', False),
    ('Thunder-clone-1', False),
    ('', False),
])
def test_is_internal_snapshot(name, internal):
    assert rbd_layout.is_internal_snapshot(name) is internal


def test_new_clone_snapshot_name_is_unique_and_internal():
    names = {rbd_layout.new_clone_snapshot_name() for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert re.match(r'^thunder-clone-[0-9a-f]{16}$', name)
        assert rbd_layout.is_internal_snapshot(name)


def test_metadata_present_and_missing():
    image = mock_image({'k': 'v'})
    assert rbd_layout.metadata(image, 'k') == 'v'
    assert rbd_layout.metadata(image, 'other') is None
    image.metadata_get.assert_called_with('other')


def test_metadata_does_not_hide_other_errors():
    image = mock.Mock()
    image.metadata_get.side_effect = IOError('cluster down')
    with pytest.raises(IOError):
        rbd_layout.metadata(image, 'k')


def test_sealed_snapshot():
    assert rbd_layout.sealed_snapshot(mock_image()) is None
    image = mock_image({rbd_layout.META_SEALED_SNAP: 'thunder-clone-1'})
    assert rbd_layout.sealed_snapshot(image) == 'thunder-clone-1'


@pytest.mark.parametrize('snaps, latest', [
    ([], None),
    ([(1, 'snapshot-a'), (2, 'thunder-retired-x')], None),
    ([(1, 'thunder-clone-a')], 'thunder-clone-a'),
    ([(3, 'thunder-clone-c'), (1, 'thunder-clone-a'),
      (2, 'thunder-clone-b')], 'thunder-clone-c'),
    ([(5, 'thunder-clone-old'), (9, 'snapshot-newer'),
      (7, 'thunder-clone-new'), (8, 'thunder-retired-newer')],
     'thunder-clone-new'),
])
def test_latest_clone_snapshot(snaps, latest):
    assert rbd_layout.latest_clone_snapshot(mock_image(snaps=snaps)) == latest


def test_create_protected_snapshot_new():
    image = mock_image()
    rbd_layout.create_protected_snapshot(image, 's')
    image.create_snap.assert_called_once_with('s')
    image.protect_snap.assert_called_once_with('s')
    assert 's' in image.snaps and 's' in image.protected


def test_create_protected_snapshot_reuses_existing():
    image = mock_image(snaps=[(1, 's')], protected=['s'])
    rbd_layout.create_protected_snapshot(image, 's')
    image.create_snap.assert_not_called()
    image.protect_snap.assert_not_called()


def test_create_protected_snapshot_protects_unprotected():
    image = mock_image(snaps=[(1, 's')])
    rbd_layout.create_protected_snapshot(image, 's')
    image.create_snap.assert_not_called()
    image.protect_snap.assert_called_once_with('s')


def test_seal_image_volume_fresh():
    image = mock_image()
    snap = rbd_layout.seal_image_volume(image, 'glance-1')
    assert rbd_layout.is_internal_snapshot(snap)
    assert image.metadata == {rbd_layout.META_GLANCE_IMAGE_ID: 'glance-1',
                              rbd_layout.META_SEALED_SNAP: snap}
    assert snap in image.snaps and snap in image.protected


def test_seal_image_volume_is_idempotent():
    image = mock_image()
    first = rbd_layout.seal_image_volume(image, 'glance-1')
    second = rbd_layout.seal_image_volume(image, 'glance-1')
    assert first == second
    assert image.create_snap.call_count == 1
    assert list(image.snaps) == [first]


def test_seal_image_volume_recreates_a_lost_snapshot():
    image = mock_image({rbd_layout.META_GLANCE_IMAGE_ID: 'glance-1',
                        rbd_layout.META_SEALED_SNAP: 'thunder-clone-x'})
    assert rbd_layout.seal_image_volume(image, 'glance-1') == \
        'thunder-clone-x'
    image.create_snap.assert_called_once_with('thunder-clone-x')
    assert 'thunder-clone-x' in image.protected


def test_seal_image_volume_refuses_another_image():
    image = mock_image({rbd_layout.META_GLANCE_IMAGE_ID: 'glance-1',
                        rbd_layout.META_SEALED_SNAP: 'thunder-clone-x'})
    with pytest.raises(ValueError, match='glance-1'):
        rbd_layout.seal_image_volume(image, 'glance-2')
    image.create_snap.assert_not_called()
    image.metadata_set.assert_not_called()
    assert image.metadata[rbd_layout.META_GLANCE_IMAGE_ID] == 'glance-1'


def test_metadata_keys_and_prefixes_are_distinct():
    keys = {rbd_layout.META_GLANCE_IMAGE_ID, rbd_layout.META_SEALED_SNAP,
            rbd_layout.META_DEFERRED}
    assert len(keys) == 3
    assert all(k.startswith('thunder.') for k in keys)
    assert not rbd_layout.CLONE_SNAP_PREFIX.startswith(
        rbd_layout.RETIRED_SNAP_PREFIX)
    assert not rbd_layout.RETIRED_SNAP_PREFIX.startswith(
        rbd_layout.CLONE_SNAP_PREFIX)
