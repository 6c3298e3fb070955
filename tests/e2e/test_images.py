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

"""Images through Glance and volumes from them through Cinder, end to end.

Everything goes through the real services of the local stack and their
real clients; what lands in Ceph is checked with the ``rbd`` CLI.
"""

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from tests.e2e import conftest
from thunder_common import locations
from thunder_stack import clients

POOL = 'thunder'


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(4 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _parent(stack, pool, name):
    info = conftest.rbd_json(stack, 'info', '%s/%s' % (pool, name))
    return info.get('parent')


def _own_bytes(stack, pool, name):
    return clients.own_bytes(stack, pool, name)


def _image_meta(stack, pool, name, key):
    return conftest.rbd(stack, 'image-meta', 'get', '%s/%s' % (pool, name),
                        key).strip()


@pytest.mark.parametrize('store', ['thunder', 'rbd'])
def test_upload_download_round_trip(request, client, image_file, tmp_path,
                                    store):
    """The bytes downloaded are the bytes uploaded, and Glance agrees."""
    if store == 'thunder':
        request.getfixturevalue('thunder_store')
    path, digest = image_file
    image_id = client.upload(str(path), store)
    image = client.image(image_id)
    assert image['size'] == os.path.getsize(path)
    assert image['checksum'] == hashlib.md5(path.read_bytes()).hexdigest()
    props = dict(image.get('properties') or {}, **image)
    assert props['os_hash_value'] == hashlib.new(
        props['os_hash_algo'], path.read_bytes()).hexdigest()
    out = tmp_path / 'download.raw'
    client.run('glance', 'image-download', '--file', str(out), image_id)
    assert _sha256(out) == digest


def test_a_location_cannot_name_another_images_volume(stack, client,
                                                      thunder_uri_store,
                                                      multiple_locations,
                                                      image_file, tmp_path):
    """Glance refuses image A's location naming image B's volume.

    The store's location names its image; the store's size check, which
    Glance runs on every location it adds, refuses a location of image A
    naming B's volume, even from an admin. B still downloads whole.
    """
    path, digest = image_file
    image_a = client.upload(str(path), thunder_uri_store, name='e2e-a')
    image_b = client.upload(str(path), thunder_uri_store, name='e2e-b')
    [url_b] = [loc['url'] for loc in clients.image_locations(stack, image_b)
               if loc['url'].startswith('thunder://')]
    parsed = locations.parse(url_b)
    assert parsed.image_id == image_b
    forged = locations.thunder_location(parsed.volume_id, parsed.store,
                                        image_a).url
    out = client.run('glance', 'location-add', '--url', forged,
                     '--metadata', json.dumps({'store': thunder_uri_store}),
                     image_a, check=False)
    assert out.returncode != 0, out.stdout
    assert forged not in [loc['url'] for loc in
                          clients.image_locations(stack, image_a)]
    download = tmp_path / 'b.raw'
    client.run('glance', 'image-download', '--file', str(download), image_b)
    assert _sha256(download) == digest


def test_volume_from_image_is_a_cow_child(stack, client, thunder_store,
                                          image_file, tmp_path):
    """Volumes are clones of the image-volume's one sealed snapshot."""
    path, digest = image_file
    image_id = client.upload(str(path), thunder_store)
    volumes = [client.create_volume(image_id, 'thunder') for _ in range(2)]
    for vid in volumes:
        client.wait_volume(vid)
    parents = set()
    for vid in volumes:
        name = 'volume-%s' % vid
        parent = _parent(stack, POOL, name)
        assert parent, '%s is not a clone' % name
        parents.add((parent['pool'], parent['image'], parent['snapshot']))
        # Zero copy: the clone owns no data of its own.
        assert _own_bytes(stack, POOL, name) == 0
        sha, _ = conftest.rbd_sha256(
            stack, '%s/%s' % (POOL, name), os.path.getsize(path), tmp_path)
        assert sha == digest
    # Both share one parent: the image-volume's sealed snapshot.
    assert len(parents) == 1
    pool, image_volume, snapshot = parents.pop()
    assert pool == POOL
    assert _image_meta(stack, pool, image_volume,
                       'thunder.glance_image_id') == image_id
    assert _image_meta(stack, pool, image_volume,
                       'thunder.sealed_snapshot') == snapshot
    snaps = conftest.rbd_json(stack, 'snap', 'ls',
                              '%s/%s' % (pool, image_volume))
    assert [s['name'] for s in snaps] == [snapshot]


def test_volume_reads_zeros_past_the_image(stack, client, thunder_store,
                                           image_file, tmp_path):
    """Like a copied image, a clone holds only zeros past the image."""
    path, _ = image_file
    image_id = client.upload(str(path), thunder_store)
    vid = client.create_volume(image_id, 'thunder')
    client.wait_volume(vid)
    _, tail_zero = conftest.rbd_sha256(
        stack, '%s/volume-%s' % (POOL, vid), os.path.getsize(path),
        tmp_path)
    assert tail_zero


def test_delete_image_while_its_volumes_live(stack, client, thunder_store,
                                             image_file, tmp_path):
    """Deleting an image leaves its volumes whole; the data goes last."""
    path, digest = image_file
    image_id = client.upload(str(path), thunder_store)
    volumes = [client.create_volume(image_id, 'thunder') for _ in range(2)]
    for vid in volumes:
        client.wait_volume(vid)
    image_volume = _parent(stack, POOL, 'volume-%s' % volumes[0])['image']

    client.run('glance', 'image-delete', image_id)
    client.images.remove(image_id)
    shown = client.run('glance', 'image-show', image_id, check=False)
    assert shown.returncode != 0

    for vid in volumes:
        vol = client.wait_volume(vid, timeout=30)
        assert vol['status'] == 'available'
        sha, _ = conftest.rbd_sha256(stack, '%s/volume-%s' % (POOL, vid),
                                     os.path.getsize(path), tmp_path)
        assert sha == digest

    # Once the last volume is gone, so is the image-volume's data.
    client.cleanup()
    client.volumes = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if image_volume not in conftest.rbd(stack, 'ls', POOL).split():
            break
        time.sleep(2)
    else:
        pytest.fail('image-volume %s still in pool %s after its image and '
                    'volumes were deleted' % (image_volume, POOL))


def _census(stack, client):
    """What an upload may leak: Cinder volumes and RBD images."""
    return (sorted(client.all_volumes()),
            sorted(conftest.rbd(stack, 'ls', POOL).split()))


def _wait_census(stack, client, expected, timeout=120):
    deadline = time.monotonic() + timeout
    census = _census(stack, client)
    while census != expected and time.monotonic() < deadline:
        time.sleep(2)
        census = _census(stack, client)
    return census


def _image_by_name(client, name):
    out = client.run('openstack', 'image', 'list', '--name', name, '-f',
                     'json').stdout
    images = json.loads(out)
    return images[0]['ID'] if images else None


def test_client_killed_mid_upload_leaks_nothing(stack, client, thunder_store,
                                                tmp_path):
    """The client dies with part of the image sent: nothing stays."""
    before = _census(stack, client)
    name = 'e2e-killed-%d' % os.getpid()
    # The data comes through a pipe this test holds: the upload cannot end
    # before the client is killed, however fast the machine.
    proc = client.popen('glance', 'image-create', '--name', name,
                        '--disk-format', 'raw', '--container-format', 'bare',
                        '--store', thunder_store, stdin=subprocess.PIPE,
                        stdout=open(os.devnull, 'w'),
                        stderr=open(os.devnull, 'w'))
    block = os.urandom(1 << 20)
    try:
        for _ in range(48):
            proc.stdin.write(block)
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        image_id = None
        while time.monotonic() < deadline:
            image_id = image_id or _image_by_name(client, name)
            if image_id and client.image(image_id)['status'] == 'saving':
                break
            time.sleep(0.3)
        assert image_id, 'the upload did not start'
        client.images.append(image_id)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
    after = _wait_census(stack, client, before)
    assert after == before
    status = client.image(image_id)['status']
    assert status in ('queued', 'killed', 'deleted'), status


def test_upload_with_wrong_size_leaks_nothing(stack, client, thunder_store,
                                              image_file):
    """A size that does not match the data fails the upload cleanly."""
    path, digest = image_file
    before = _census(stack, client)
    image_id = client.api.create_image('e2e-wrong-size')
    client.images.append(image_id)
    real = os.path.getsize(path)
    with open(path, 'rb') as data:
        result = client.run('glance', 'image-upload', '--store',
                            thunder_store, '--size', str(real + (1 << 20)),
                            image_id, stdin=data, check=False)
    image = client.image(image_id)
    if result.returncode == 0 and image['status'] == 'active':
        # Glance took the data's real size: then it must be right.
        assert image['size'] == real
        client.run('glance', 'image-delete', image_id)
        client.images.remove(image_id)
    else:
        assert image['status'] in ('queued', 'killed'), image['status']
    assert _wait_census(stack, client, before) == before


def test_upload_over_volume_quota_leaks_nothing(stack, client,
                                                thunder_store, image_file):
    """Cinder refuses the image-volume: the upload fails, nothing stays."""
    path, _ = image_file
    project = client.run('openstack', 'project', 'show', 'service', '-f',
                         'value', '-c', 'id').stdout.strip()
    quota = json.loads(client.run('openstack', 'quota', 'show', '--volume',
                                  '-f', 'json', project).stdout)
    previous = {q['Resource']: q['Limit'] for q in quota} if isinstance(
        quota, list) else quota
    in_use = sum(1 for v in client.all_volumes().values()
                 if v.get('os-vol-tenant-attr:tenant_id') == project)
    before = _census(stack, client)
    client.run('cinder', 'quota-update', '--volumes', str(in_use), project)
    try:
        out = client.run('glance', 'image-create', '--name', 'e2e-quota',
                         '--disk-format', 'raw', '--container-format',
                         'bare', '--file', str(path), '--store',
                         thunder_store, check=False)
        image_id = _image_by_name(client, 'e2e-quota')
        if image_id:
            client.images.append(image_id)
        assert out.returncode != 0, 'upload over quota succeeded'
        assert _wait_census(stack, client, before) == before
    finally:
        client.run('cinder', 'quota-update', '--volumes',
                   str(previous.get('volumes', 10)), project)


def test_upstream_rbd_driver_clones_a_thunder_image(stack, client,
                                                    thunder_uri_store,
                                                    multiple_locations,
                                                    image_file, tmp_path):
    """With the aliases added, Cinder's own RBDDriver clones zero-copy too.

    A thunder:// image (``thunder_store_location_scheme = thunder``; the
    default, rbd, needs none: test_rbd_locations) gets its cinder:// and
    rbd:// aliases the way the
    store's documentation says (``glance location-add``); a volume of the
    ``rbd`` type (Cinder's RBDDriver, pool ``volumes``) is then an RBD clone
    of the image-volume's sealed snapshot, and survives the image.
    """
    path, digest = image_file
    image_id = client.upload(str(path), thunder_uri_store)
    added = clients.register_aliases(stack, image_id)
    assert [u.split(':')[0] for u in added] == ['cinder', 'rbd']
    urls = [loc['url'] for loc in clients.image_locations(stack, image_id)]
    assert set(added) <= set(urls)

    vid = client.create_volume(image_id, 'rbd')
    client.wait_volume(vid)
    name = 'volume-%s' % vid
    parent = _parent(stack, 'volumes', name)
    assert parent and parent['pool'] == POOL
    assert added[1].endswith('/%s/%s' % (parent['image'],
                                         parent['snapshot']))
    assert _own_bytes(stack, 'volumes', name) == 0

    client.run('glance', 'image-delete', image_id)
    client.images.remove(image_id)
    sha, _ = conftest.rbd_sha256(stack, 'volumes/%s' % name,
                                 os.path.getsize(path), tmp_path)
    assert sha == digest
