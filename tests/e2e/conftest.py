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

"""Fixtures of the end-to-end tests: the local stack and its CLIs.

The session runs ``tools/thunder-stack up`` (installing and starting
everything the first time) and ``tools/thunder-stack down`` at the end,
unless ``THUNDER_STACK_KEEP`` is set. The stack lives where the tool keeps
it (``.stack/`` or ``$THUNDER_STACK_DIR``). Images and volumes go through
the real clients (``glance``, ``cinder``) of the stack's virtualenv, and
RBD data is read with the ``rbd`` CLI.
"""

import hashlib
import json
import os
import subprocess
import time

import pytest

from thunder_cache.volumes import nativevol
from thunder_common import loops
from thunder_common import procs
from thunder_stack import cache
from thunder_stack import clients
from thunder_stack import flows
from thunder_stack import glance
from thunder_stack import layout
from thunder_stack import stack as stack_mod

TOOL = os.path.join(layout.CHECKOUT, 'tools', 'thunder-stack')


@pytest.fixture(scope='session')
def stack():
    result = subprocess.run([TOOL, 'up'], capture_output=True, text=True,
                            timeout=3600)
    if result.returncode:
        pytest.fail('tools/thunder-stack up failed:\n%s%s'
                    % (result.stdout[-3000:], result.stderr[-5000:]))
    s = stack_mod.Stack()
    yield s
    if not os.environ.get('THUNDER_STACK_KEEP'):
        subprocess.run([TOOL, 'down'], timeout=600)


@pytest.fixture(scope='session')
def api(stack):
    return clients.Api(stack)


@pytest.fixture(scope='session')
def thunder_store(stack):
    """The thunder Glance store's name, or skip when it is not enabled."""
    if not stack.state.get('thunder_store'):
        pytest.skip('the thunder Glance store is not in this tree yet')
    return layout.THUNDER_STORE


@pytest.fixture(scope='session')
def thunder_uri_store(thunder_store):
    """The second thunder store: thunder:// locations, naming their image."""
    return layout.THUNDER_URI_STORE


@pytest.fixture
def multiple_locations(stack):
    """Glance's deprecated ``show_multiple_locations`` on, for one test.

    What the JSON-patch location calls (``glance location-add``) of the
    thunder:// aliases need; the stack keeps it off otherwise.
    """
    glance.show_multiple_locations(stack, True)
    try:
        yield
    finally:
        glance.show_multiple_locations(stack, False)


class Client:
    """The stack's CLIs, and cleanup of what a test created."""

    def __init__(self, stack, api):
        self.stack = stack
        self.api = api
        self.images = []
        self.volumes = []

    def run(self, *args, check=True, timeout=900, **kwargs):
        env = dict(os.environ)
        env.update(self.stack.openrc_env())
        env['PATH'] = (os.path.join(self.stack.venv, 'bin') + ':' +
                       env['PATH'])
        result = subprocess.run(list(args), capture_output=True, text=True,
                                env=env, timeout=timeout, **kwargs)
        if check and result.returncode:
            raise AssertionError('%s failed (%d):\n%s%s' % (
                ' '.join(args), result.returncode, result.stdout[-2000:],
                result.stderr[-3000:]))
        return result

    def popen(self, *args, **kwargs):
        env = dict(os.environ)
        env.update(self.stack.openrc_env())
        env['PATH'] = (os.path.join(self.stack.venv, 'bin') + ':' +
                       env['PATH'])
        return subprocess.Popen(list(args), env=env, **kwargs)

    def upload(self, path, store, name='e2e-image'):
        """``glance image-create --store``; returns the image's id."""
        out = self.run('glance', 'image-create', '--name', name,
                       '--disk-format', 'raw', '--container-format', 'bare',
                       '--file', path, '--store', store).stdout
        image_id = clients.table_value(out, 'id')
        self.images.append(image_id)
        assert clients.table_value(out, 'status') == 'active', out
        return image_id

    def image(self, image_id):
        out = self.run('openstack', 'image', 'show', '-f', 'json',
                       image_id).stdout
        return json.loads(out)

    def create_volume(self, image_id, volume_type, size=1, zone=None):
        zone_args = ('--availability-zone', zone) if zone else ()
        out = self.run('cinder', 'create', '--image-id', image_id,
                       '--volume-type', volume_type, '--name', 'e2e-volume',
                       *zone_args, str(size)).stdout
        volume_id = clients.table_value(out, 'id')
        self.volumes.append(volume_id)
        return volume_id

    def wait_volume(self, volume_id, timeout=300):
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            vol = self.api.volumes({volume_id}).get(volume_id)
            status = vol and vol['status']
            if status == 'available':
                return vol
            assert status != 'error', 'volume %s went to error' % volume_id
            time.sleep(0.5)
        raise AssertionError('volume %s is %s after %ss'
                             % (volume_id, status, timeout))

    def all_volumes(self):
        return {v['id']: v for v in self.api.get(
            '/volumes/detail?all_tenants=1')['volumes']}

    def wait_volumes_gone(self, ids, timeout):
        """Wait until none of ``ids`` is a volume; those still there."""
        deadline = time.monotonic() + timeout
        while True:
            left = set(ids) & set(self.all_volumes())
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(1)

    def cleanup(self):
        for vid in self.volumes:
            self.run('cinder', 'delete', vid, check=False)
        self.wait_volumes_gone(self.volumes, 120)
        for image_id in self.images:
            self.run('glance', 'image-delete', image_id, check=False)


@pytest.fixture
def client(stack, api):
    c = Client(stack, api)
    yield c
    c.cleanup()


def rbd(stack, *args, **kwargs):
    return subprocess.run(['rbd', '-c', stack.ceph_conf] + list(args),
                          capture_output=True, text=True, check=True,
                          timeout=600, **kwargs).stdout


def rbd_json(stack, *args):
    return json.loads(rbd(stack, '--format', 'json', *args) or 'null')


def loop_devices(path=None, under=None):
    """Loop devices over the file ``path`` or the files ``under`` a dir."""
    out = subprocess.run(loops.LIST_COMMAND, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return loops.backed_by(out, path=path, under=under)


def assert_native(paths, daemon_pid):
    """The volume files of ``paths`` are served by thunder-volume-server.

    Not by the daemon (PID ``daemon_pid``) itself, as with ``volume_server
    = python``: fails if the stack silently runs the Python server.
    Returns the server's PID.
    """
    pid, why = cache.served_by_native(paths)
    assert pid, 'the volume files in %s are not served by ' \
        'thunder-volume-server: %s' % (paths['mount'], why)
    assert '/dev/fuse' not in procs.open_files(daemon_pid), \
        'thunder-cache (PID %d) serves a FUSE filesystem' % daemon_pid
    return pid


def native_pids(paths):
    """The PIDs of the native server of ``paths``: its holder's, its own."""
    server = nativevol.NativeServer(paths['native'])
    return [server.holder_pid(), server.ping()]


def rbd_sha256(stack, spec, length, tmp_path):
    """sha256 of the first ``length`` bytes of an RBD image (or snapshot)."""
    out = tmp_path / ('export-%s' % spec.replace('/', '_').replace('@', '_'))
    rbd(stack, 'export', '--no-progress', spec, str(out))
    digest = hashlib.sha256()
    with open(out, 'rb') as f:
        remaining = length
        while remaining:
            block = f.read(min(remaining, 4 << 20))
            assert block, 'RBD image %s shorter than %d bytes' % (spec,
                                                                  length)
            digest.update(block)
            remaining -= len(block)
        tail_zero = all(not chunk.strip(b'\0')
                        for chunk in iter(lambda: f.read(4 << 20), b''))
    out.unlink()
    return digest.hexdigest(), tail_zero


@pytest.fixture(scope='session')
def image_file(tmp_path_factory):
    """A 48 MiB raw image with data and holes, and its sha256."""
    path = tmp_path_factory.mktemp('images') / 'e2e.raw'
    flows.make_image(str(path), 48, seed=7)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, digest
