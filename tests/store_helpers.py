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

"""Helpers for the store's tests: in-memory RBD, contexts, uploads.

:class:`MemoryRbdVolume` stands in for the store's ``RbdVolume``: it reads
and writes the images of a :class:`MemoryBackend` behind the fake Cinder
of :mod:`tests.fake_cinder`. The fixtures that put them in place are in
``tests/unit/glance_thunder_store/conftest.py``; the functional tests use
:func:`make_store`, :class:`Context` and :class:`Upload` with a real Ceph.
"""

import errno
import io
import threading

from oslo_config import cfg

from glance_thunder_store import rbd_volume
from glance_thunder_store import store as store_mod
from tests import fake_cinder

FSID = 'a7f64266-0894-4f1e-a635-d0aeaa0e4cc7'
MiB = 1024 * 1024


class MemoryImage:
    def __init__(self, size):
        self.size = size
        self.data = bytearray()
        self.snapshots = []
        self.metadata = {}
        self.open = 0


class MemoryBackend(fake_cinder.NullBackend):
    """RBD images in memory, one per volume; ``gib`` bytes per GiB."""

    def __init__(self, gib):
        self.gib = gib
        self.images = {}
        self.full_after = None  # bytes the pool holds before ENOSPC
        self.flagged_full = False  # what Ceph's OSD map would say

    def create_volume(self, volume):
        self.images['volume-%s' % volume.id] = MemoryImage(volume.size *
                                                           self.gib)

    def extend_volume(self, volume, new_size):
        self.images['volume-%s' % volume.id].size = new_size * self.gib

    def delete_volume(self, volume):
        self.images.pop('volume-%s' % volume.id, None)

    def used(self):
        return sum(len(i.data) for i in self.images.values())


class MemoryRbdVolume:
    """Stands in for rbd_volume.RbdVolume on a MemoryBackend."""

    protocol = 'rbd'
    reads_zeros_unwritten = True
    backend = None  # set by the fixture
    write_hook = None  # called as hook(offset, data) before each write
    _write_lock = threading.Lock()  # uploads write pieces concurrently

    def __init__(self, connection_data, read_only=False, timeout=30):
        self.pool, self.name, _kwargs = rbd_volume.parse_connection(
            connection_data)
        self.read_only = read_only
        self.image = self.backend.images[self.name]
        self.image.open += 1
        self.closed = False

    def size(self):
        return self.image.size

    def refresh(self):
        pass

    def read(self, offset, length):
        end = min(offset + length, self.image.size)
        data = bytes(self.image.data[offset:end])
        return data + b'\0' * (end - offset - len(data))

    def write(self, offset, data):
        with self._write_lock:
            self._write(offset, data)

    def _write(self, offset, data):
        assert not self.read_only
        if MemoryRbdVolume.write_hook is not None:
            MemoryRbdVolume.write_hook(offset, data)
        if offset + len(data) > self.image.size:
            raise OSError(errno.EINVAL, 'write beyond the end of the image')
        full = self.backend.full_after
        if full is not None and self.backend.used() + len(data) > full:
            raise OSError(errno.ENOSPC, 'pool full')
        if len(self.image.data) < offset + len(data):
            self.image.data.extend(
                b'\0' * (offset + len(data) - len(self.image.data)))
        self.image.data[offset:offset + len(data)] = data

    def flush(self):
        pass

    def pool_full(self):
        return self.backend.flagged_full

    def grow(self, size):
        self.image.size = max(self.image.size, size)
        return True

    def seal(self, glance_image_id):
        snap = 'thunder-clone-0123456789abcdef'
        self.image.snapshots.append(snap)
        self.image.sealed_data = bytes(self.image.data)
        self.image.metadata['thunder.glance_image_id'] = glance_image_id
        return rbd_volume.RbdFacts(FSID, self.pool, self.name, snap)

    def close(self):
        if not self.closed:
            self.closed = True
            self.image.open -= 1


class VirtualClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class Context:
    """The parts of Glance's RequestContext the store reads."""

    def __init__(self, project_id='project-a', service_catalog=None,
                 is_admin=False, roles=('member', 'reader'),
                 service_roles=()):
        self.project_id = project_id
        self.is_admin = is_admin
        self.roles = list(roles)
        self.service_roles = list(service_roles)
        self.user_id = 'user-a'
        self.auth_token = 'token-a'
        self.service_catalog = service_catalog or [
            {'type': 'volumev3', 'name': 'cinderv3',
             'endpoints': [{'publicURL': 'http://cinder.example/v3/p',
                            'region': 'RegionOne'}]}]

    def to_dict(self):
        return {'tenant': self.project_id, 'project_id': self.project_id,
                'user_id': self.user_id}


class Upload(io.RawIOBase):
    """An upload stream: bytes, then optionally an error (client gone)."""

    def __init__(self, data, error_after=None, error=None):
        self._data = io.BytesIO(data)
        self._error_after = error_after
        self._error = error or IOError('client disconnected')
        self.read_sizes = []

    def read(self, size=-1):
        self.read_sizes.append(size)
        if (self._error_after is not None and
                self._data.tell() >= self._error_after):
            raise self._error
        if self._error_after is not None:
            size = min(size, self._error_after - self._data.tell())
        return self._data.read(size)


def make_store(backend=None, location_scheme='thunder', **overrides):
    """A configured Store with its own ConfigOpts.

    Most tests check thunder:// locations, so that is their scheme;
    ``location_scheme=None`` keeps the option's default (``rbd``).
    """
    if location_scheme:
        overrides.setdefault('thunder_store_location_scheme',
                             location_scheme)
    conf = cfg.ConfigOpts()
    conf([])
    if backend:
        conf.register_opt(cfg.DictOpt('enabled_backends'))
        conf.set_override('enabled_backends', {backend: 'thunder'})
    store = store_mod.Store(conf, backend=backend)
    group = backend or 'glance_store'
    for name, value in overrides.items():
        conf.set_override(name, value, group)
    store.configure()
    return store
