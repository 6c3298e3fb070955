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

"""A qcow2 image through Glance's image import, and the old way, end to end.

The image is the guest image of :mod:`thunder_stack.guest` converted to
qcow2 here (``qemu-img convert``). Imported (``glance
image-create-via-import``, ``openstack image create --import``), Glance's
image_conversion plugin stores it in the thunder store as raw, and a volume
from it is a zero-copy clone holding the raw guest's bytes. Uploaded the
old way it stays qcow2: Cinder downloads and converts it for the volume,
and ThunderDriver says why in its log and in its volume stats.
"""

import hashlib
import json
import time

import pytest

from cinder_thunder_driver import image_clones
from tests.e2e import conftest
from thunder_stack import clients
from thunder_stack import guest as guest_mod
from thunder_stack import layout

POOL = layout.POOLS['thunder']
THUNDER_POOL = 'thunder-stack@%s#%s' % (layout.THUNDER_BACKEND,
                                        layout.THUNDER_BACKEND)
IMPORT_TIMEOUT = 300
STATS_TIMEOUT = 150     # Cinder reports volume stats every 60 s


@pytest.fixture(scope='module')
def guest(stack):
    """(raw guest image, the same as qcow2, md5 of the raw bytes)."""
    cache = stack.path('data', 'guest')
    raw = guest_mod.build(cache)
    qcow2 = guest_mod.build(cache, fmt='qcow2')
    md5 = hashlib.md5()
    with open(raw.path, 'rb') as f:
        for block in iter(lambda: f.read(4 << 20), b''):
            md5.update(block)
    return raw, qcow2, md5.hexdigest()


def _import_with_glance(client, path, store):
    # The data on stdin: with --file, glance refuses a stdin that is not
    # a terminal ("cannot use both --file and stdin"), as in any script.
    with open(path, 'rb') as data:
        out = client.run('glance', 'image-create-via-import', '--name',
                         'e2e-qcow2-import', '--disk-format', 'qcow2',
                         '--container-format', 'bare', '--stores', store,
                         stdin=data).stdout
    return clients.table_value(out, 'id')


def _import_with_openstack(client, path, store):
    # The default store (the thunder store in the stack): the openstack
    # client's --import has no store option.
    out = client.run('openstack', 'image', 'create', '--import',
                     '--disk-format', 'qcow2', '--container-format', 'bare',
                     '--file', path, '-f', 'json',
                     'e2e-qcow2-import').stdout
    return json.loads(out)['id']


def _volume_with_openstack(client, image_id):
    out = client.run('openstack', 'volume', 'create', '--image', image_id,
                     '--type', layout.THUNDER_BACKEND, '--size', '1',
                     '-f', 'json', 'e2e-volume').stdout
    volume_id = json.loads(out)['id']
    client.volumes.append(volume_id)
    return volume_id


def _volume_with_cinder(client, image_id):
    return client.create_volume(image_id, layout.THUNDER_BACKEND)


def _thunder_stats(client):
    pools = client.api.get('/scheduler-stats/get_pools?detail=True')
    [pool] = [p for p in pools['pools'] if p['name'] == THUNDER_POOL]
    return pool['capabilities']


def _declined_not_raw(client):
    reasons = _thunder_stats(client).get(image_clones.STAT_REASONS) or {}
    return reasons.get(image_clones.NOT_RAW, 0)


@pytest.mark.parametrize('upload, create_volume', [
    (_import_with_glance, _volume_with_openstack),
    (_import_with_openstack, _volume_with_cinder),
], ids=['glance-openstack', 'openstack-cinder'])
def test_qcow2_import_is_stored_raw_and_cloned(stack, client, thunder_store,
                                               guest, tmp_path, upload,
                                               create_volume):
    """Imported as qcow2, stored as raw, cloned in O(1) with its bytes."""
    raw, qcow2, raw_md5 = guest
    started = time.monotonic()
    image_id = upload(client, qcow2.path, thunder_store)
    client.images.append(image_id)
    image = client.api.wait_image_active(image_id, IMPORT_TIMEOUT, poll=1)
    print('import of %d bytes of qcow2 (%d raw): %.1f s'
          % (qcow2.file_size, raw.size, time.monotonic() - started))
    assert image['disk_format'] == 'raw'
    assert image['container_format'] == 'bare'
    assert image['size'] == raw.size
    assert image['checksum'] == raw_md5
    assert image['stores'] == thunder_store
    # Its own location is its sealed snapshot (the store's default).
    [own] = clients.image_locations(stack, image_id)
    assert own['url'].startswith('rbd://'), own
    image_volume = clients.image_volume_id(stack, image_id)

    volume_id = create_volume(client, image_id)
    client.wait_volume(volume_id)
    name = 'volume-%s' % volume_id
    parent = conftest.rbd_json(stack, 'info', '%s/%s' % (POOL, name))
    parent = parent.get('parent')
    assert parent, '%s is not a clone' % name
    assert parent['image'] == 'volume-%s' % image_volume
    assert clients.own_bytes(stack, POOL, name) == 0
    sha, tail_zero = conftest.rbd_sha256(stack, '%s/%s' % (POOL, name),
                                         raw.size, tmp_path)
    assert sha == raw.sha256
    assert tail_zero


def test_qcow2_uploaded_the_old_way_is_copied_and_said_so(stack, client,
                                                          thunder_store,
                                                          guest, tmp_path):
    """Cinder's generic path copies it; the driver logs and counts why."""
    raw, qcow2, _ = guest
    declined_before = _declined_not_raw(client)
    out = client.run('glance', 'image-create', '--name', 'e2e-qcow2-old',
                     '--disk-format', 'qcow2', '--container-format', 'bare',
                     '--file', qcow2.path, '--store', thunder_store).stdout
    image_id = clients.table_value(out, 'id')
    client.images.append(image_id)
    assert clients.table_value(out, 'disk_format') == 'qcow2'

    volume_id = client.create_volume(image_id, layout.THUNDER_BACKEND)
    client.wait_volume(volume_id)
    name = 'volume-%s' % volume_id
    info = conftest.rbd_json(stack, 'info', '%s/%s' % (POOL, name))
    assert not info.get('parent'), 'a qcow2 image was cloned'
    assert clients.own_bytes(stack, POOL, name) > 0
    sha, _ = conftest.rbd_sha256(stack, '%s/%s' % (POOL, name), raw.size,
                                 tmp_path)
    assert sha == raw.sha256

    with open(stack.path('log', 'cinder-volume.log')) as f:
        said = [line for line in f if volume_id in line and
                'is not a zero-copy clone' in line]
    assert len(said) == 1, said
    assert 'disk format is qcow2, not raw' in said[0]
    assert 'image-create-via-import' in said[0]

    deadline = time.monotonic() + STATS_TIMEOUT
    while _declined_not_raw(client) <= declined_before:
        assert time.monotonic() < deadline, (
            'the thunder pool\'s %s did not count the volume in %ss: %s'
            % (image_clones.STAT_REASONS, STATS_TIMEOUT,
               _thunder_stats(client)))
        time.sleep(5)
