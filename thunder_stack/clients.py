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


"""The local stack seen from outside: its APIs and CLIs, with admin rights.

The OpenStack CLIs of the stack's virtualenv with its admin credentials
(:func:`cli`), just enough of Keystone, Cinder and Glance over HTTP to poll
cheaply (:class:`Api`), and ``rbd`` on the stack's Ceph. The demo, Tempest,
the emulated nodes, the benchmarks and the e2e tests use them.
"""

import json
import os
import re
import subprocess
import time
import urllib.request

from thunder_common import locations
from thunder_stack import services as svc

# Cinder's volume_name_template in the stack: a volume's RBD image name.
VOLUME_NAME = 'volume-%s'


def token(stack, user='admin', project='admin'):
    """A Keystone token of ``user`` in ``project``: (token, project id)."""
    body = {'auth': {
        'identity': {'methods': ['password'], 'password': {'user': {
            'name': user, 'domain': {'id': 'default'},
            'password': stack.password}}},
        'scope': {'project': {'name': project,
                              'domain': {'id': 'default'}}}}}
    req = urllib.request.Request(
        stack.auth_url + '/auth/tokens', data=json.dumps(body).encode(),
        headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return (resp.headers['X-Subject-Token'],
                json.load(resp)['token']['project']['id'])


class Api:
    """Just enough of Keystone, Cinder and Glance over HTTP."""

    def __init__(self, stack):
        self.stack = stack
        self.token, self.project = token(stack)
        self.cinder = '%s/v3/%s' % (stack.url('cinder'), self.project)

    def _call(self, url, body=None, method=None, microversion=None):
        headers = {'X-Auth-Token': self.token}
        if microversion:
            headers['OpenStack-API-Version'] = microversion
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers['Content-Type'] = 'application/json'
        req = urllib.request.Request(url, data=data, method=method,
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path):
        return self._call(self.cinder + path, microversion='volume 3.50')

    def create_volume(self, name, size_gib, image_id, volume_type):
        """``POST /volumes`` from an image; the new volume's id."""
        body = {'volume': {'name': name, 'size': size_gib,
                           'imageRef': image_id,
                           'volume_type': volume_type}}
        return self._call(self.cinder + '/volumes', body,
                          microversion='volume 3.50')['volume']['id']

    def delete_volume(self, volume_id):
        self._call(self.cinder + '/volumes/' + volume_id, method='DELETE',
                   microversion='volume 3.50')

    def image(self, image_id):
        """Glance's record of an image (``GET /v2/images/ID``)."""
        return self._call(self.stack.url('glance') + '/v2/images/' +
                          image_id)

    def wait_image_active(self, image_id, timeout=1800, poll=0.2):
        """Glance's record once the image is ``active`` (after an import).

        Raises :class:`StackError` when the import failed or the image
        left the states an upload or import passes through.
        """
        deadline = time.monotonic() + timeout
        while True:
            image = self.image(image_id)
            failed = image.get('os_glance_failed_import')
            if failed:
                raise svc.StackError('image %s: import failed in store(s) '
                                     '%s' % (image_id, failed))
            if image['status'] == 'active':
                return image
            if image['status'] not in ('queued', 'uploading', 'importing',
                                       'saving'):
                raise svc.StackError('image %s is %s' % (image_id,
                                                         image['status']))
            if time.monotonic() > deadline:
                raise svc.StackError('image %s is %s after %ss' % (
                    image_id, image['status'], timeout))
            time.sleep(poll)

    def create_image(self, name, **fields):
        """A queued image without data (the CLIs read stdin as data)."""
        body = dict(name=name, disk_format='raw', container_format='bare',
                    **fields)
        return self._call(self.stack.url('glance') + '/v2/images',
                          body)['id']

    def volumes(self, ids):
        found = {}
        for vol in self.get('/volumes/detail?all_tenants=1')['volumes']:
            if vol['id'] in ids:
                found[vol['id']] = vol
        return found


def cli(stack, *args, timeout=1800, stdin=None):
    """Run a client of the stack's venv as admin; its standard output.

    ``stdin``: an open file given as its standard input (the glance
    client's way to read image data in a script).
    """
    env = dict(os.environ)
    env.update(stack.openrc_env())
    env['PATH'] = os.path.join(stack.venv, 'bin') + ':' + env['PATH']
    result = subprocess.run(list(args), capture_output=True, text=True,
                            env=env, timeout=timeout, stdin=stdin)
    if result.returncode:
        raise svc.StackError('%s failed (%d): %s' % (
            ' '.join(args[:3]), result.returncode,
            (result.stderr or result.stdout)[-2000:]))
    return result.stdout


def table_value(output, key):
    """The value of ``key`` in a CLI's two-column table."""
    match = re.search(r'^\|\s*%s\s*\|\s*(\S+)' % re.escape(key), output,
                      re.MULTILINE)
    if not match:
        raise svc.StackError('no %s in:\n%s' % (key, output[-1000:]))
    return match.group(1)


def image_locations(stack, image_id):
    """The image's locations, as Cinder reads them.

    Glance's location API (``GET /v2/images/ID/locations``, Glance 2024.2)
    as the glance service user: it answers the service role whatever
    ``show_multiple_locations`` says (the stack keeps that off, as
    devstack does).
    """
    service_token, _project = token(stack, 'glance', 'service')
    req = urllib.request.Request(
        '%s/v2/images/%s/locations' % (stack.url('glance'), image_id),
        headers={'X-Auth-Token': service_token})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def location_volume_id(url):
    """The volume a thunder://, cinder:// or rbd:// URL names, or None.

    An rbd:// URL names a volume when its RBD image is a volume's (an
    image of glance_store's rbd store is named after the image: None).
    """
    try:
        parsed = locations.parse(url)
    except locations.InvalidLocation:
        return None
    if isinstance(parsed, locations.RbdLocation):
        return locations.volume_id_from_name(parsed.image, VOLUME_NAME)
    return parsed.volume_id


def image_volume_ids(locs):
    """The ids of the volumes an image's locations name."""
    return {location_volume_id(loc['url']) for loc in locs} - {None}


def image_volume_id(stack, image_id):
    """The id of the one image-volume holding an image."""
    ids = image_volume_ids(image_locations(stack, image_id))
    if len(ids) != 1:
        raise svc.StackError('image %s: volume locations %s'
                             % (image_id, sorted(ids)))
    return ids.pop()


def register_aliases(stack, image_id, locs=None):
    """Add the cinder:// and rbd:// aliases of a thunder:// image.

    As doc/source/store.rst describes: the store builds them from its
    thunder:// location (``glance_thunder_store.extra_locations``) and an
    admin adds them with the JSON-patch location call, here the real
    ``glance location-add``, one call per alias. An image located by its
    sealed snapshot (the store's default) needs none. ``locs``: the
    image's locations, if already read. Returns the URLs added.
    """
    added = []
    if locs is None:
        locs = image_locations(stack, image_id)
    for loc in locs:
        if not loc['url'].startswith('thunder://'):
            continue
        out = subprocess.run(
            [stack.python, '-m', 'glance_thunder_store.extra_locations',
             loc['url'], json.dumps(loc.get('metadata') or {})],
            capture_output=True, text=True, check=True,
            cwd=svc.CHECKOUT).stdout
        for op in json.loads(out):
            value = op['value']
            cli(stack, 'glance', 'location-add', '--url', value['url'],
                '--metadata', json.dumps(value.get('metadata') or {}),
                image_id)
            added.append(value['url'])
    return added


def rbd_json(stack, *args):
    out = subprocess.run(['rbd', '-c', stack.ceph_conf, '--format', 'json']
                         + list(args), capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out or 'null')


def own_bytes(stack, pool, name):
    """Bytes the RBD image itself holds (a fresh clone holds none)."""
    info = rbd_json(stack, 'du', '%s/%s' % (pool, name))
    return sum(i['used_size'] for i in info['images']
               if i['name'] == name and not i.get('snapshot'))


def parent_of(stack, pool, name):
    info = rbd_json(stack, 'info', '%s/%s' % (pool, name))
    parent = info.get('parent')
    if not parent:
        return None
    return '%s/%s@%s' % (parent['pool'], parent['image'], parent['snapshot'])
