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

"""Images located by their sealed snapshot: the fast paths, no admin step.

The stack's thunder store (``thunder_store_location_scheme = rbd``, the
default) gives each image its sealed snapshot as its one location.
Nothing is added to the image afterwards: Cinder's own RBD driver and
Nova's RBD image backend (``images_type = rbd``) clone it as they clone
images of glance_store's RBD store, and deleting the image deletes its
image-volume. Glance runs as devstack configures it with the plugin:
``show_image_direct_url`` on, the deprecated ``show_multiple_locations``
off.
"""

import json
import os

import pytest

from tests.e2e import conftest
from tests.e2e import test_nova
from thunder_common import locations
from thunder_stack import clients
from thunder_stack import ini
from thunder_stack import layout

STORE = layout.THUNDER_STORE
POOL = layout.POOLS['thunder']


@pytest.fixture
def rbd_store(stack, thunder_store):
    conf = stack.path('etc', 'glance', 'glance-api.conf')
    assert ini.iniget(conf, 'DEFAULT', 'show_image_direct_url') == 'True'
    assert ini.iniget(conf, 'DEFAULT', 'show_multiple_locations') in (
        None, 'False')
    return STORE


def _one_rbd_location(stack, client, image_id):
    """The image's one location, its sealed snapshot (and direct_url)."""
    [loc] = clients.image_locations(stack, image_id)
    parsed = locations.parse(loc['url'])
    assert isinstance(parsed, locations.RbdLocation), loc
    assert parsed.pool == POOL and parsed.image.startswith('volume-')
    assert loc['metadata']['store'] == STORE
    image = client.image(image_id)
    assert dict(image.get('properties') or {}, **image)['direct_url'] == \
        loc['url']
    return parsed


def _delete_image(client, image_id):
    """Delete the image; its image-volume must go with it."""
    [volume_id] = [v['id'] for v in client.all_volumes().values()
                   if v['name'] == 'image-%s' % image_id]
    client.run('glance', 'image-delete', image_id)
    client.images.remove(image_id)
    assert not client.wait_volumes_gone([volume_id], 120)


def test_cinder_rbd_driver_clones_with_no_location_added(
        stack, client, rbd_store, image_file, tmp_path):
    path, digest = image_file
    image_id = client.upload(str(path), rbd_store)
    parsed = _one_rbd_location(stack, client, image_id)

    volumes = {t: client.create_volume(image_id, t)
               for t in (layout.RBD_BACKEND, layout.THUNDER_BACKEND)}
    for volume_type, volume_id in volumes.items():
        client.wait_volume(volume_id)
        pool = (layout.POOLS['rbd'] if volume_type == 'rbd' else POOL)
        name = 'volume-%s' % volume_id
        parent = conftest.rbd_json(stack, 'info', '%s/%s' % (pool, name))
        assert parent.get('parent'), '%s volume is not a clone' % volume_type
        assert (parent['parent']['pool'], parent['parent']['image'],
                parent['parent']['snapshot']) == (
            parsed.pool, parsed.image, parsed.snapshot)
        assert clients.own_bytes(stack, pool, name) == 0
        sha, _ = conftest.rbd_sha256(stack, '%s/%s' % (pool, name),
                                     os.path.getsize(path), tmp_path)
        assert sha == digest

    # The image goes, and its image-volume with it.
    _delete_image(client, image_id)


def test_nova_rbd_backend_boots_with_no_location_added(stack, client,
                                                       rbd_store):
    path, marker = test_nova.guest_image(stack)
    image_id = client.upload(path, rbd_store, name='e2e-rbd-location')
    parsed = _one_rbd_location(stack, client, image_id)
    servers = test_nova.Servers(stack, client)
    try:
        server_id, _started = servers.create('e2e-rbd-location', '--image',
                                             image_id)
        servers.wait_status(server_id, 'ACTIVE')
        servers.wait_marker(server_id, marker)
        disk = '%s_disk' % server_id
        info = conftest.rbd_json(stack, 'info', '%s/%s' % (
            layout.POOLS['nova'], disk))
        assert (info['parent']['pool'], info['parent']['image'],
                info['parent']['snapshot']) == (
            parsed.pool, parsed.image, parsed.snapshot), json.dumps(info)
        servers.delete(server_id)
    finally:
        servers.cleanup()
    _delete_image(client, image_id)
