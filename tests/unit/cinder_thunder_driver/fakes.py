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

"""An in-memory stand-in for the ``rados`` and ``rbd`` Python bindings.

Just enough of librados/librbd for the driver: pools, images, snapshots
with protection and clone children, the trash, image metadata and sparse
image data. The exception hierarchies mirror the real bindings' (names,
base classes, ``errno``), so the driver's ``except`` clauses are exercised
for real. ``FakeCeph.errors`` injects failures: a key ``op`` or
``(op, name)`` maps to the exception the next such calls raise.

The module objects are built per test by :func:`make_modules`; the
classes ``Rados``, ``Image`` and ``RBD`` in them are ``mock.Mock`` wrappers
so that tests can assert how they were called.
"""

import itertools
import json
import types
from unittest import mock
import uuid

from tests.harness import standalone

FSID = '6f0e8cf9-1b2d-4e55-9d0a-7c7f5a4e2b10'

# Feature bits, as in librbd.
RBD_FEATURE_LAYERING = 1
RBD_FEATURE_STRIPINGV2 = 2
RBD_FEATURE_EXCLUSIVE_LOCK = 4
RBD_FEATURE_OBJECT_MAP = 8
RBD_FEATURE_FAST_DIFF = 16
RBD_FEATURE_DEEP_FLATTEN = 32
RBD_FEATURE_JOURNALING = 64
DEFAULT_FEATURES = 61  # layering, exclusive-lock, object-map, fast-diff,
#                       deep-flatten: Ceph's rbd_default_features.
_FEATURE_NAMES = {'layering': 1, 'striping': 2, 'exclusive-lock': 4,
                  'object-map': 8, 'fast-diff': 16, 'deep-flatten': 32,
                  'journaling': 64}


# -- exceptions -----------------------------------------------------------

class RbdError(Exception):
    pass


class RbdOSError(RbdError):
    def __init__(self, message='', errno=None):
        super().__init__(message)
        self.errno = errno


def _rbd_exc(name, errno):
    def __init__(self, message='', errno=errno):
        RbdOSError.__init__(self, message, errno)
    return type(name, (RbdOSError,), {'__init__': __init__})


class RadosError(Exception):
    pass


class RadosOSError(RadosError):
    def __init__(self, message='', errno=None):
        super().__init__(message)
        self.errno = errno


def _rados_exc(name, errno):
    def __init__(self, message='', errno=errno):
        RadosOSError.__init__(self, message, errno)
    return type(name, (RadosOSError,), {'__init__': __init__})


def _rbd_namespace():
    ns = types.SimpleNamespace(Error=RbdError, OSError=RbdOSError)
    for name, errno in (('PermissionError', 1), ('ImageNotFound', 2),
                        ('IOError', 5), ('ImageExists', 17),
                        ('InvalidArgument', 22), ('ReadOnlyImage', 30),
                        ('ImageBusy', 16), ('ImageHasSnapshots', 39),
                        ('Timeout', 110)):
        setattr(ns, name, _rbd_exc(name, errno))
    for name, value in globals().items():
        if name.startswith('RBD_FEATURE_'):
            setattr(ns, name, value)
    return ns


def _rados_namespace():
    ns = types.SimpleNamespace(Error=RadosError, OSError=RadosOSError)
    for name, errno in (('PermissionError', 1), ('ObjectNotFound', 2),
                        ('InterruptedOrTimeoutError', 4),
                        ('PermissionDeniedError', 13),
                        ('TimedOut', 110)):
        setattr(ns, name, _rados_exc(name, errno))
    return ns


# Built once: every test sees the same classes, so `except` clauses in
# modules patched at different times still agree.
rbd = _rbd_namespace()
rados = _rados_namespace()


# -- state ------------------------------------------------------------------

class Snap:
    def __init__(self, snap_id, name, size):
        self.id = snap_id
        self.name = name
        self.size = size
        self.protected = False


class ImageState:
    """One RBD image of a pool (live or in the trash)."""

    def __init__(self, pool, image_id, name, size, features):
        self.pool = pool
        self.id = image_id
        self.name = name
        self.size = size
        self.features = features
        self.snaps = {}
        self.metadata = {}
        self.parent = None  # (pool name, image id, snap id)
        self.extents = {}  # offset -> bytes
        self.diffs = {}  # snapshot name -> [(offset, length)] written since
        self.watchers = []
        self.trashed = False
        self.flattened = False


class FakeCeph:
    """The cluster: pools of images, monitor answers, injected errors."""

    def __init__(self, pools=('volumes', 'images')):
        self.fsid = FSID
        self.pools = {p: {} for p in pools}  # pool -> {image id: state}
        self.errors = {}
        self.conf = {'rbd_default_features': str(DEFAULT_FEATURES)}
        self.mon = {
            'df': {'pools': [{'name': p, 'stats': {
                'stored': 100 * 2 ** 30, 'max_avail': 900 * 2 ** 30}}
                for p in pools]},
            'osd pool get-quota': {'quota_max_bytes': 0},
            'mon dump': {'mons': [
                {'name': 'a', 'addr': '192.0.2.1:6789/0',
                 'public_addrs': {'addrvec': [
                     {'type': 'v2', 'addr': '192.0.2.1:3300'},
                     {'type': 'v1', 'addr': '192.0.2.1:6789'}]}}]},
        }
        self.mon_failures = {}  # prefix -> (ret, errmsg)
        self.mon_calls = []
        self.connected = 0
        self.open_images = []
        self.open_ioctxs = []
        self._snap_ids = itertools.count(1)

    # -- helpers for tests ------------------------------------------------

    def check(self, op, name=None):
        exc = self.errors.get((op, name), self.errors.get(op))
        if exc is not None:
            raise exc

    def add_image(self, name, size=2 ** 30, pool='volumes',
                  features=DEFAULT_FEATURES):
        if self.find(name, pool) is not None:
            raise rbd.ImageExists(name)
        # Unique across tests: image locks are process-wide.
        image_id = uuid.uuid4().hex[:12]
        state = ImageState(pool, image_id, name, size, features)
        self.pools[pool][image_id] = state
        return state

    def add_snap(self, state, name, protected=True):
        snap = Snap(next(self._snap_ids), name, state.size)
        snap.protected = protected
        state.snaps[name] = snap
        return snap

    def add_clone(self, parent, snap_name, name, pool='volumes'):
        state = self.add_image(name, parent.size, pool, parent.features)
        state.parent = (parent.pool, parent.id,
                        parent.snaps[snap_name].id)
        return state

    def find(self, name, pool='volumes'):
        """The live (not trashed) image called name, or None."""
        for state in self.pools[pool].values():
            if state.name == name and not state.trashed:
                return state
        return None

    def by_id(self, pool, image_id):
        return self.pools[pool].get(image_id)

    def names(self, pool='volumes'):
        return sorted(s.name for s in self.pools[pool].values()
                      if not s.trashed)

    def trash(self, pool='volumes'):
        return sorted(s.name for s in self.pools[pool].values()
                      if s.trashed)

    def children_of(self, state, snap_id):
        found = []
        for pool, images in self.pools.items():
            for child in images.values():
                if child.parent == (state.pool, state.id, snap_id):
                    found.append(child)
        return found

    def open_count(self):
        return sum(1 for i in self.open_images if not i.closed)


# -- rados ------------------------------------------------------------------

class FakeIoctx:
    def __init__(self, ceph, pool):
        self.ceph = ceph
        self.pool = pool
        self.closed = False

    def close(self):
        self.closed = True


class FakeRados:
    def __init__(self, ceph, rados_id=None, clustername=None, conffile=None,
                 conf=None):
        ceph.check('Rados')
        self.ceph = ceph
        self.rados_id = rados_id
        self.clustername = clustername
        self.conffile = conffile
        self.conf = conf
        self.state = 'configuring'

    def connect(self):
        self.ceph.check('connect')
        self.state = 'connected'
        self.ceph.connected += 1

    def shutdown(self):
        if self.state == 'connected':
            self.ceph.connected -= 1
        self.state = 'shutdown'

    def open_ioctx(self, pool):
        self.ceph.check('open_ioctx', pool)
        if pool not in self.ceph.pools:
            raise rados.ObjectNotFound('pool %s' % pool)
        ioctx = FakeIoctx(self.ceph, pool)
        self.ceph.open_ioctxs.append(ioctx)
        return ioctx

    def get_fsid(self):
        return self.ceph.fsid

    def conf_get(self, key):
        return self.ceph.conf[key]

    def mon_command(self, cmd, inbuf):
        args = json.loads(cmd)
        self.ceph.mon_calls.append(args)
        prefix = args['prefix']
        if prefix in self.ceph.mon_failures:
            ret, err = self.ceph.mon_failures[prefix]
            return ret, b'', err
        return 0, json.dumps(self.ceph.mon[prefix]).encode(), ''


# -- rbd --------------------------------------------------------------------

class FakeImage:
    def __init__(self, ioctx, name=None, snapshot=None, read_only=False,
                 image_id=None):
        ceph = ioctx.ceph
        self.ceph = ceph
        ceph.check('Image', name or image_id)
        if image_id is not None:
            state = ceph.by_id(ioctx.pool, image_id)
        else:
            state = ceph.find(name, ioctx.pool)
        if state is None:
            raise rbd.ImageNotFound('%s/%s' % (ioctx.pool, name or image_id))
        if snapshot is not None and snapshot not in state.snaps:
            raise rbd.ImageNotFound('%s@%s' % (name, snapshot))
        self.state = state
        self.read_only = read_only
        self.snapshot = snapshot
        self.closed = False
        ceph.open_images.append(self)

    # -- basics

    def _writable(self, op):
        self.ceph.check(op, self.state.name)
        if self.read_only or self.snapshot:
            raise rbd.ReadOnlyImage(op)

    def _snap(self, name):
        try:
            return self.state.snaps[name]
        except KeyError:
            raise rbd.ImageNotFound('snapshot %s' % name)

    def close(self):
        self.closed = True

    def id(self):
        return self.state.id

    def size(self):
        if self.snapshot:
            return self.state.snaps[self.snapshot].size
        return self.state.size

    def resize(self, size):
        self._writable('resize')
        self.state.size = size

    def features(self):
        return self.state.features

    def update_features(self, features, enabled):
        self._writable('update_features')
        if enabled:
            self.state.features |= features
        else:
            self.state.features &= ~features

    def flush(self):
        pass

    def watchers_list(self):
        return iter(self.state.watchers)

    # -- snapshots

    def list_snaps(self):
        return [{'id': s.id, 'name': s.name, 'size': s.size}
                for s in self.state.snaps.values()]

    def snap_exists(self, name):
        return name in self.state.snaps

    def create_snap(self, name):
        self._writable('create_snap')
        if name in self.state.snaps:
            raise rbd.ImageExists(name)
        self.ceph.add_snap(self.state, name, protected=False)
        self.state.diffs[name] = []

    def remove_snap(self, name):
        self._writable('remove_snap')
        if self._snap(name).protected:
            raise rbd.ImageBusy('snapshot %s is protected' % name)
        del self.state.snaps[name]

    def protect_snap(self, name):
        self._writable('protect_snap')
        self._snap(name).protected = True

    def unprotect_snap(self, name):
        self._writable('unprotect_snap')
        snap = self._snap(name)
        if self.ceph.children_of(self.state, snap.id):
            raise rbd.ImageBusy('snapshot %s has children' % name)
        snap.protected = False

    def is_protected_snap(self, name):
        return self._snap(name).protected

    def rename_snap(self, src, dest):
        self._writable('rename_snap')
        snap = self._snap(src)
        if dest in self.state.snaps:
            raise rbd.ImageExists(dest)
        snap.name = dest
        self.state.snaps[dest] = self.state.snaps.pop(src)

    def set_snap(self, name):
        if name is not None:
            self._snap(name)
        self.snapshot = name

    def rollback_to_snap(self, name):
        self._writable('rollback_to_snap')
        self.state.size = self._snap(name).size
        self.state.diffs[name] = []

    def list_children2(self):
        if self.snapshot is None:
            raise rbd.InvalidArgument('no snapshot set')
        snap = self._snap(self.snapshot)
        return iter([{'pool': c.pool, 'pool_namespace': '',
                      'image': c.name, 'id': c.id, 'trash': c.trashed}
                     for c in self.ceph.children_of(self.state, snap.id)])

    def diff_iterate(self, offset, length, from_snapshot, iterate_cb,
                     include_parent=True, whole_object=False):
        self.ceph.check('diff_iterate', self.state.name)
        for off, ln in self.state.diffs.get(from_snapshot, []):
            ret = iterate_cb(off, ln, True)
            if ret:
                raise rbd.PermissionError('diff_iterate callback', errno=1)

    # -- clones

    def _parent(self):
        if self.state.parent is None:
            raise rbd.ImageNotFound('no parent')
        pool, image_id, snap_id = self.state.parent
        parent = self.ceph.by_id(pool, image_id)
        snap = [s for s in parent.snaps.values() if s.id == snap_id][0]
        return parent, snap

    def get_parent_image_spec(self):
        parent, snap = self._parent()
        return {'pool_name': parent.pool, 'pool_namespace': '',
                'image_name': parent.name, 'image_id': parent.id,
                'snap_name': snap.name, 'snap_namespace_type': 0,
                'trash': parent.trashed}

    def parent_id(self):
        return self._parent()[0].id

    def flatten(self):
        self._writable('flatten')
        self._parent()
        self.state.parent = None
        self.state.flattened = True

    # -- metadata

    def metadata_get(self, key):
        try:
            return self.state.metadata[key]
        except KeyError:
            raise KeyError('no metadata %s for image %s'
                           % (key, self.state.name))

    def metadata_set(self, key, value):
        self._writable('metadata_set')
        self.state.metadata[key] = value

    # -- data

    def write(self, data, offset):
        self._writable('write')
        self.state.extents[offset] = bytes(data)
        return len(data)

    def write_zeroes(self, offset, length, zero_flags=0):
        self.write(bytes(length), offset)

    def read(self, offset, length):
        buf = bytearray(length)
        for off, data in self.state.extents.items():
            start = max(off, offset)
            end = min(off + len(data), offset + length)
            if start < end:
                buf[start - offset:end - offset] = data[start - off:end - off]
        return bytes(buf)


class FakeRBD:
    def __init__(self, ceph):
        self.ceph = ceph

    def create(self, ioctx, name, size, old_format=True, features=None,
               **kwargs):
        self.ceph.check('create', name)
        features = DEFAULT_FEATURES if features is None else features
        self.ceph.add_image(name, size, ioctx.pool, features)

    def clone(self, p_ioctx, p_name, p_snapname, c_ioctx, c_name,
              features=None, **kwargs):
        self.ceph.check('clone', c_name)
        parent = self.ceph.find(p_name, p_ioctx.pool)
        if parent is None or p_snapname not in parent.snaps:
            raise rbd.ImageNotFound('%s@%s' % (p_name, p_snapname))
        child = self.ceph.add_clone(parent, p_snapname, c_name, c_ioctx.pool)
        child.size = parent.snaps[p_snapname].size
        if features is not None:
            child.features = features

    def remove(self, ioctx, name):
        self.ceph.check('remove', name)
        state = self.ceph.find(name, ioctx.pool)
        if state is None:
            raise rbd.ImageNotFound(name)
        if state.snaps:
            raise rbd.ImageHasSnapshots(name)
        if state.watchers:
            raise rbd.ImageBusy(name)
        del self.ceph.pools[ioctx.pool][state.id]

    def rename(self, ioctx, src, dest):
        self.ceph.check('rename', src)
        state = self.ceph.find(src, ioctx.pool)
        if state is None:
            raise rbd.ImageNotFound(src)
        if self.ceph.find(dest, ioctx.pool) is not None:
            raise rbd.ImageExists(dest)
        state.name = dest

    def list(self, ioctx):
        return self.ceph.names(ioctx.pool)

    def trash_move(self, ioctx, name, delay=0):
        self.ceph.check('trash_move', name)
        state = self.ceph.find(name, ioctx.pool)
        if state is None:
            raise rbd.ImageNotFound(name)
        state.trashed = True

    def trash_list(self, ioctx):
        return iter([{'id': s.id, 'name': s.name, 'source': 'USER'}
                     for s in self.ceph.pools[ioctx.pool].values()
                     if s.trashed])

    def trash_remove(self, ioctx, image_id, force=False):
        self.ceph.check('trash_remove', image_id)
        state = self.ceph.by_id(ioctx.pool, image_id)
        if state is None or not state.trashed:
            raise rbd.ImageNotFound(image_id)
        if state.snaps:
            raise rbd.ImageHasSnapshots(image_id)
        del self.ceph.pools[ioctx.pool][image_id]

    def pool_stats_get(self, ioctx):
        images = [s for s in self.ceph.pools[ioctx.pool].values()
                  if not s.trashed]
        return {'image_count': len(images),
                'image_provisioned_bytes': sum(s.size for s in images),
                'image_max_provisioned_bytes': sum(s.size for s in images),
                'image_snap_count': 0, 'trash_count': 0,
                'trash_provisioned_bytes': 0,
                'trash_max_provisioned_bytes': 0, 'trash_snap_count': 0}

    def features_from_string(self, value):
        features = 0
        for name in value.split(','):
            features |= _FEATURE_NAMES[name.strip()]
        return features


def make_modules(ceph):
    """(rados module, rbd module) backed by ``ceph``."""
    rados_mod = types.SimpleNamespace(**vars(rados))
    rados_mod.Rados = mock.Mock(
        side_effect=lambda **kw: FakeRados(ceph, **kw))
    rbd_mod = types.SimpleNamespace(**vars(rbd))
    rbd_mod.Image = mock.Mock(
        side_effect=lambda *a, **kw: FakeImage(*a, **kw))
    rbd_mod.RBD = mock.Mock(side_effect=lambda: FakeRBD(ceph))
    return rados_mod, rbd_mod


# -- Cinder objects -----------------------------------------------------------

# The stand-ins the functional tests and benchmarks use.
Volume = standalone.Volume
Snapshot = standalone.Snapshot

# -- Glance images ------------------------------------------------------------

# The image metadata of a cloneable image, and of images the driver declines.
RAW = {'id': 'glance-image-1', 'disk_format': 'raw',
       'container_format': 'bare'}

NOT_CLONEABLE = [
    dict(RAW, disk_format='qcow2'),
    dict(RAW, disk_format=None),
    {'id': RAW['id'], 'container_format': 'bare'},
    dict(RAW, container_format='ova'),
    dict(RAW, container_format='compressed'),
]
