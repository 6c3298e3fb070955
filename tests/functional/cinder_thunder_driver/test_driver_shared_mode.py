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

"""ThunderDriver's shared mode against a real Ceph cluster.

Every test checks data byte for byte through librbd and, through the
``thunder`` fixture, that no RBD image or trash entry is left behind.
"""

import hashlib
import os
import threading
import uuid

from cinder import exception
from oslo_utils import units
import pytest

from cinder_thunder_driver import clones
from cinder_thunder_driver.cluster import rbd
from tests.harness.standalone import Snapshot
from tests.harness.standalone import Volume
from thunder_common import locations
from thunder_common import rbd_layout

RAW = {'disk_format': 'raw', 'container_format': 'bare'}


def pattern(size, seed):
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b'%s:%d' % (seed.encode(), counter)).digest()
        counter += 1
    return bytes(out[:size])


def read_all(drv, name, length=None):
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, name, read_only=True) as image:
            length = image.size() if length is None else length
            return image.read(0, length)


def write(drv, name, data, offset=0):
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, name) as image:
            image.write(data, offset)


def parent_spec(drv, name):
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, name, read_only=True) as image:
            return clones.parent_of(image)


def snapshots(drv, name):
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, name, read_only=True) as image:
            return sorted(s['name'] for s in image.list_snaps())


def own_extents(drv, name):
    """Extents written in the image itself, not inherited from a parent."""
    found = []
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, name, read_only=True) as image:
            image.diff_iterate(0, image.size(), None,
                               lambda off, ln, ex: found.append((off, ln)),
                               include_parent=False)
    return found


def make_image_volume(drv, data, size_gb=1):
    """What the thunder store does on upload: write, then seal."""
    volume = Volume(size=size_gb)
    drv.create_volume(volume)
    write(drv, volume.name, data)
    image_id = str(uuid.uuid4())
    with drv.cluster.ioctx() as ioctx:
        with drv.cluster.image(ioctx, volume.name) as image:
            snap = rbd_layout.seal_image_volume(image, image_id)
    meta = dict(RAW, id=image_id)
    url = locations.thunder_location(volume.id).url
    return volume, meta, url, snap


def clone_from_image(drv, meta, url, size=1):
    volume = Volume(size=size)
    update, cloned = drv.clone_image(None, volume, (url, [{'url': url}]),
                                     meta, None)
    assert cloned, 'clone_image declined %s' % url
    assert update == {'provider_location': None}
    return volume


def test_clone_image_is_a_zero_copy_child(thunder):
    data = pattern(3 * units.Mi + 123, 'image')
    image_volume, meta, url, snap = make_image_volume(thunder, data)
    clone = clone_from_image(thunder, meta, url, size=2)

    parent = parent_spec(thunder, clone.name)
    assert (parent.name, parent.snapshot) == (image_volume.name, snap)
    assert own_extents(thunder, clone.name) == []
    assert read_all(thunder, clone.name, len(data)) == data
    with thunder.cluster.ioctx() as ioctx:
        with thunder.cluster.image(ioctx, clone.name) as image:
            assert image.size() == 2 * units.Gi
            # Past the image's end the clone reads zeros.
            assert image.read(2 * units.Gi - units.Mi, units.Mi) == bytes(
                units.Mi)

    thunder.delete_volume(clone)
    thunder.delete_volume(image_volume)


def test_clone_of_a_larger_image_volume_has_the_volume_size(thunder):
    # The store's image-volume holds the image and, after it, its
    # manifest: the volume gets the image, not the tail.
    data = pattern(units.Mi, 'tail')
    image_volume, meta, url, _ = make_image_volume(thunder, data, size_gb=2)
    clone = clone_from_image(thunder, meta, url, size=1)
    with thunder.cluster.ioctx() as ioctx:
        with thunder.cluster.image(ioctx, clone.name) as image:
            assert image.size() == units.Gi
    assert read_all(thunder, clone.name, len(data)) == data
    thunder.delete_volume(clone)
    thunder.delete_volume(image_volume)


def test_clone_from_cinder_and_rbd_locations(thunder, ceph):
    data = pattern(units.Mi, 'locations')
    image_volume, meta, url, snap = make_image_volume(thunder, data)
    fsid = thunder.cluster.fsid()
    urls = [locations.cinder_location(image_volume.id, 'store1').url,
            locations.RbdLocation(fsid, 'volumes', image_volume.name,
                                  snap).url]
    made = [clone_from_image(thunder, meta, u) for u in urls]
    for volume in made:
        assert parent_spec(thunder, volume.name).snapshot == snap
        assert read_all(thunder, volume.name, len(data)) == data
        thunder.delete_volume(volume)
    thunder.delete_volume(image_volume)


def test_writes_to_a_clone_leave_the_image_alone(thunder):
    data = pattern(2 * units.Mi, 'immutable')
    image_volume, meta, url, _snap = make_image_volume(thunder, data)
    first = clone_from_image(thunder, meta, url)
    second = clone_from_image(thunder, meta, url)

    write(thunder, first.name, b'\xff' * 8192, offset=4096)

    assert read_all(thunder, image_volume.name, len(data)) == data
    assert read_all(thunder, second.name, len(data)) == data
    changed = read_all(thunder, first.name, len(data))
    assert changed[4096:4096 + 8192] == b'\xff' * 8192
    assert changed[:4096] == data[:4096]
    for volume in (first, second, image_volume):
        thunder.delete_volume(volume)


def test_hundred_clones_share_one_snapshot(thunder):
    data = pattern(units.Mi, 'hundred')
    image_volume, meta, url, snap = make_image_volume(thunder, data)
    made = [clone_from_image(thunder, meta, url) for _ in range(100)]

    assert snapshots(thunder, image_volume.name) == [snap]
    for volume in made[::10]:
        assert parent_spec(thunder, volume.name).snapshot == snap
        assert read_all(thunder, volume.name, len(data)) == data
    for volume in made:
        thunder.delete_volume(volume)
    # The sealed snapshot outlives its clones: the image's rbd:// location
    # points at it.
    assert snapshots(thunder, image_volume.name) == [snap]
    thunder.delete_volume(image_volume)


def test_delete_image_volume_while_clones_exist(thunder):
    data = pattern(units.Mi, 'orphan')
    image_volume, meta, url, _snap = make_image_volume(thunder, data)
    first = clone_from_image(thunder, meta, url)
    second = clone_from_image(thunder, meta, url)

    thunder.delete_volume(image_volume)

    with thunder.cluster.ioctx() as ioctx:
        assert image_volume.name not in thunder.cluster.rbd().list(ioctx)
        trashed = [t['name'] for t in thunder.cluster.rbd().trash_list(ioctx)]
    assert trashed == [image_volume.name]
    assert read_all(thunder, first.name, len(data)) == data

    thunder.delete_volume(first)
    assert read_all(thunder, second.name, len(data)) == data
    thunder.delete_volume(second)
    with thunder.cluster.ioctx() as ioctx:
        assert list(thunder.cluster.rbd().trash_list(ioctx)) == []


def test_clone_image_declines_what_it_cannot_clone(thunder):
    data = pattern(4096, 'declined')
    image_volume, meta, url, _snap = make_image_volume(thunder, data)
    other_cluster = locations.RbdLocation(
        str(uuid.uuid4()), 'volumes', image_volume.name, 'snap').url
    cases = [
        (dict(meta, disk_format='qcow2'), url),
        (dict(meta, container_format='ova'), url),
        (dict(meta, id=str(uuid.uuid4())), url),  # volume of another image
        (meta, locations.thunder_location(str(uuid.uuid4())).url),
        (meta, other_cluster),
        (meta, 'rbd://not/a/valid/location/at/all'),
    ]
    for image_meta, location in cases:
        volume = Volume()
        result = thunder.clone_image(None, volume,
                                     (location, [{'url': location}]),
                                     image_meta, None)
        assert result == ({}, False), (image_meta, location)
        with thunder.cluster.ioctx() as ioctx:
            assert volume.name not in thunder.cluster.rbd().list(ioctx)
    thunder.delete_volume(image_volume)


def test_extend_keeps_data_and_reads_zeros_beyond(thunder):
    volume = Volume(size=1)
    thunder.create_volume(volume)
    data = pattern(units.Mi, 'extend')
    write(thunder, volume.name, data, offset=units.Gi - units.Mi)

    thunder.extend_volume(volume, 3)

    with thunder.cluster.ioctx() as ioctx:
        with thunder.cluster.image(ioctx, volume.name) as image:
            assert image.size() == 3 * units.Gi
            assert image.read(units.Gi - units.Mi, units.Mi) == data
            assert image.read(2 * units.Gi, units.Mi) == bytes(units.Mi)
    thunder.delete_volume(volume)


def test_snapshot_clone_revert_and_retire(thunder):
    volume = Volume(size=1)
    thunder.create_volume(volume)
    before = pattern(units.Mi, 'before')
    after = pattern(units.Mi, 'after')
    write(thunder, volume.name, before)
    snapshot = Snapshot(volume)
    thunder.create_snapshot(snapshot)
    write(thunder, volume.name, after)

    from_snap = Volume(size=2)
    thunder.create_volume_from_snapshot(from_snap, snapshot)
    assert read_all(thunder, from_snap.name, units.Mi) == before

    thunder.extend_volume(volume, 2)
    volume.size = 2
    thunder.revert_to_snapshot(None, volume, snapshot)
    assert read_all(thunder, volume.name, units.Mi) == before
    with thunder.cluster.ioctx() as ioctx:
        with thunder.cluster.image(ioctx, volume.name) as image:
            assert image.size() == 2 * units.Gi

    # Deleting a snapshot that has a clone retires it instead of failing.
    thunder.delete_snapshot(snapshot)
    retired = rbd_layout.RETIRED_SNAP_PREFIX + snapshot.name
    assert snapshots(thunder, volume.name) == [retired]
    assert read_all(thunder, from_snap.name, units.Mi) == before
    thunder.delete_volume(from_snap)
    assert snapshots(thunder, volume.name) == []
    thunder.delete_snapshot(snapshot)  # already gone: still succeeds
    thunder.delete_volume(volume)


def test_cloned_volume_reuses_its_snapshot_until_the_source_changes(thunder):
    source = Volume(size=1)
    thunder.create_volume(source)
    first_data = pattern(units.Mi, 'first')
    write(thunder, source.name, first_data)

    a, b, c = Volume(), Volume(), Volume()
    thunder.create_cloned_volume(a, source)
    thunder.create_cloned_volume(b, source)
    assert len(snapshots(thunder, source.name)) == 1
    assert (parent_spec(thunder, a.name).snapshot ==
            parent_spec(thunder, b.name).snapshot)

    write(thunder, source.name, b'changed', offset=0)
    thunder.create_cloned_volume(c, source)
    assert len(snapshots(thunder, source.name)) == 2
    assert read_all(thunder, a.name, units.Mi) == first_data
    assert read_all(thunder, c.name, 7) == b'changed'

    for volume in (a, b, c):
        thunder.delete_volume(volume)
    assert snapshots(thunder, source.name) == []
    thunder.delete_volume(source)


def test_deep_clone_chain_is_flattened_in_the_background(make_driver):
    drv = make_driver(thunder_max_clone_depth=2)
    chain = [Volume()]
    drv.create_volume(chain[0])
    write(drv, chain[0].name, pattern(units.Mi, 'gen0'))
    for generation in range(1, 4):
        volume = Volume()
        drv.create_cloned_volume(volume, chain[-1])
        # Write so that the next clone needs a snapshot of its own.
        write(drv, volume.name, b'gen%d' % generation, offset=units.Mi)
        chain.append(volume)
    assert drv.flattener.wait_idle(timeout=120)

    # Depth 3 exceeded the limit: that clone was flattened, the others not.
    assert parent_spec(drv, chain[1].name) is not None
    assert parent_spec(drv, chain[2].name) is not None
    assert parent_spec(drv, chain[3].name) is None
    assert read_all(drv, chain[3].name, units.Mi) == pattern(units.Mi, 'gen0')
    assert read_all(drv, chain[3].name, units.Mi + 4)[units.Mi:] == b'gen3'
    # Its former parent snapshot went with the flatten.
    assert snapshots(drv, chain[2].name) == []
    for volume in reversed(chain):
        drv.delete_volume(volume)
    with drv.cluster.ioctx() as ioctx:
        names = set(drv.cluster.rbd().list(ioctx))
        assert not names & {v.name for v in chain}
        assert list(drv.cluster.rbd().trash_list(ioctx)) == []


def test_delete_parent_before_children_in_any_order(thunder):
    source = Volume()
    thunder.create_volume(source)
    write(thunder, source.name, pattern(4096, 'root'))
    child = Volume()
    thunder.create_cloned_volume(child, source)
    write(thunder, child.name, b'child')
    grandchild = Volume()
    thunder.create_cloned_volume(grandchild, child)

    thunder.delete_volume(source)
    thunder.delete_volume(child)
    assert read_all(thunder, grandchild.name, 5) == b'child'
    thunder.delete_volume(grandchild)
    with thunder.cluster.ioctx() as ioctx:
        assert list(thunder.cluster.rbd().trash_list(ioctx)) == []


def test_concurrent_deletes_of_one_volume_and_of_a_family(thunder):
    source = Volume()
    thunder.create_volume(source)
    family = [Volume() for _ in range(4)]
    for volume in family:
        thunder.create_cloned_volume(volume, source)
    lone = Volume()
    thunder.create_volume(lone)

    errors = []

    def delete(volume):
        try:
            thunder.delete_volume(volume)
        except Exception as e:  # noqa: collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=delete, args=(v,))
               for v in [lone, lone, source] + family]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Whatever order the threads ran in, a sweep leaves nothing behind
    # (the fixture checks); deletes raced against each other never fail.


def test_manage_existing_image(thunder):
    name = 'legacy-%s' % uuid.uuid4().hex[:8]
    data = pattern(units.Mi, 'legacy')
    with thunder.cluster.ioctx() as ioctx:
        thunder.cluster.rbd().create(ioctx, name, units.Gi + 1)
        with thunder.cluster.image(ioctx, name) as image:
            image.write(data, 0)
    volume = Volume(size=2)
    ref = {'source-name': name}

    assert thunder.manage_existing_get_size(volume, ref) == 2
    listed = thunder.get_manageable_volumes([], None, 1000, 0, ['size'],
                                            ['asc'])
    entry = [e for e in listed if e['reference'] == ref][0]
    assert entry['safe_to_manage'] is True
    thunder.manage_existing(volume, ref)

    assert read_all(thunder, volume.name, units.Mi) == data
    with pytest.raises(exception.ManageExistingInvalidReference):
        thunder.manage_existing_get_size(volume, ref)
    thunder.delete_volume(volume)


def test_connection_info_opens_through_os_brick(thunder):
    from os_brick.initiator import connector as brick_connector
    volume = Volume()
    thunder.create_volume(volume)
    data = pattern(units.Mi, 'brick')
    write(thunder, volume.name, data)

    info = thunder.initialize_connection(volume, {})
    assert info['driver_volume_type'] == 'rbd'
    brick = brick_connector.InitiatorConnector.factory(
        'RBD', None, do_local_attach=False)
    device = brick.connect_volume(info['data'])
    try:
        handle = device['path']
        assert handle.read(units.Mi) == data
    finally:
        brick.disconnect_volume(info['data'], device)
    thunder.terminate_connection(volume, {})
    thunder.delete_volume(volume)


def test_stats_report_the_pool(thunder):
    stats = thunder.get_volume_stats(refresh=True)
    assert stats['backend_state'] == 'up'
    assert stats['storage_protocol'] == 'ceph'
    assert stats['total_capacity_gb'] > 0
    assert 0 < stats['free_capacity_gb'] <= stats['total_capacity_gb']
    assert stats['thin_provisioning_support'] is True
    assert stats['location_info'].startswith(thunder.cluster.fsid())


def test_volume_larger_than_the_pool_is_refused(thunder):
    stats = thunder.get_volume_stats(refresh=True)
    ratio = float(stats['max_over_subscription_ratio'])
    volume = Volume(size=int(stats['total_capacity_gb'] * ratio) + 10)
    with pytest.raises(exception.VolumeBackendAPIException,
                       match='does not fit in pool volumes'):
        thunder.create_volume(volume)
    with thunder.cluster.ioctx() as ioctx:
        assert volume.name not in thunder.cluster.rbd().list(ioctx)


def test_wrong_pool_names_the_setting(make_driver):
    with pytest.raises(exception.VolumeBackendAPIException,
                       match='thunder_rbd_pool'):
        make_driver(thunder_rbd_pool='no-such-pool')


def test_unreachable_monitors_time_out_with_a_clear_error(make_driver,
                                                          tmp_path):
    conf = tmp_path / 'ceph.conf'
    # Nothing listens on port 9 (discard) of the loopback address.
    conf.write_text('[global]\nmon host = 127.0.0.1:9\n'
                    'auth client required = none\n')
    with pytest.raises(exception.VolumeBackendAPIException,
                       match='Could not reach the Ceph monitors'):
        make_driver(thunder_rbd_ceph_conf=str(conf),
                    thunder_rados_connect_timeout=2)


def test_missing_keyring_names_the_setting(make_driver, tmp_path):
    with pytest.raises(exception.VolumeBackendAPIException,
                       match='thunder_rbd_keyring_conf'):
        make_driver(thunder_rbd_user='cinder',
                    thunder_rbd_keyring_conf=str(tmp_path / 'missing'))


def test_copy_volume_to_file_and_back(thunder, tmp_path):
    from cinder_thunder_driver import image_io
    volume = Volume()
    thunder.create_volume(volume)
    data = pattern(5 * units.Mi + 7, 'io')
    write(thunder, volume.name, data, offset=units.Mi)
    path = str(tmp_path / 'export.raw')
    with thunder.cluster.ioctx() as ioctx:
        with thunder.cluster.image(ioctx, volume.name) as image:
            image_io.image_to_file(image, path)
    assert os.path.getsize(path) == units.Gi
    # The hole before the data and the tail stay sparse.
    assert os.stat(path).st_blocks * 512 < 16 * units.Mi

    copy = Volume()
    thunder.create_volume(copy)
    with thunder.cluster.ioctx() as ioctx:
        with thunder.cluster.image(ioctx, copy.name) as image:
            image_io.file_to_image(path, image)
    assert (read_all(thunder, copy.name, 7 * units.Mi) ==
            bytes(units.Mi) + data + bytes(units.Mi - 7))
    thunder.delete_volume(volume)
    thunder.delete_volume(copy)


def test_rbd_error_types_are_the_real_ones():
    # The driver catches these by name; make sure the bindings have them.
    for name in ('ImageNotFound', 'ImageExists', 'ImageBusy', 'Error'):
        assert issubclass(getattr(rbd, name), Exception)


class _VolumeType:
    extra_specs = {}


def test_copy_image_to_volume_and_back_through_cinder(thunder, ceph):
    """The full-copy fallbacks, through Cinder's own image_utils."""
    from cinder import context as cinder_context
    from thunder_stack import rbd_image_service

    ctx = cinder_context.get_admin_context()
    images = rbd_image_service.RbdImageService(ceph, pool='volumes')
    source = Volume(size=1)
    thunder.create_volume(source)
    data = pattern(3 * units.Mi + 5, 'fallback')
    write(thunder, source.name, data)
    images.register('img-in', source.name, units.Gi)

    volume = Volume(size=1)
    thunder.create_volume(volume)
    thunder.copy_image_to_volume(ctx, volume, images, 'img-in')
    assert read_all(thunder, volume.name, len(data)) == data

    volume.volume_type = _VolumeType()
    volume.glance_metadata = {}
    out_name = 'upload-%s' % uuid.uuid4()
    images.register('img-out', out_name, 0)
    thunder.copy_volume_to_image(ctx, volume, images,
                                 images.show(ctx, 'img-out'))
    assert images.show(ctx, 'img-out')['size'] == units.Gi
    assert read_all(thunder, out_name, len(data)) == data
    images.delete('img-out')
    thunder.delete_volume(volume)
    thunder.delete_volume(source)


def test_copy_image_to_volume_refuses_an_image_larger_than_the_volume(
        thunder, ceph):
    from cinder import context as cinder_context
    from thunder_stack import rbd_image_service

    images = rbd_image_service.RbdImageService(ceph, pool='volumes')
    source = Volume(size=2)
    thunder.create_volume(source)
    images.register('img-big', source.name, 2 * units.Gi)
    volume = Volume(size=1)
    thunder.create_volume(volume)
    with pytest.raises(exception.ImageUnacceptable):
        thunder.copy_image_to_volume(cinder_context.get_admin_context(),
                                     volume, images, 'img-big')
    thunder.delete_volume(volume)
    thunder.delete_volume(source)
