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

"""Which origins an image descriptor may name: only the daemon's own.

A descriptor comes from the control socket (its group, e.g. cinder) or
from ``descriptors_dir``; either way it names at most an image-volume the
daemon's own configuration ([origin]) already designates:

``{"type": "rbd"[, "pool": P][, "image": I][, "snapshot": S]}``
    An image-volume in one of ``rbd_pools`` (the first by default), whose
    RBD image is ``rbd_volume_name_template % origin_volume_id`` (given,
    ``image`` must be that name). It is read with the daemon's own Ceph
    configuration, cluster, user and keyring; a descriptor naming any of
    them (``ceph_conf``, ``keyring``, ``user``, ...) is refused, never
    ignored.
``{"type": "file", "path": P}``
    A file or block device under one of ``file_origin_dirs`` (none by
    default: file origins are refused). The path must be absolute and
    normalized; it is opened component by component from the allowed
    directory without following any symbolic link, and only a regular
    file or a block device is read (a FIFO or character device is never
    opened).

Refusals are :class:`~thunder_cache.cache.node.BadDescriptor` (``BadRequest``
on the control socket).
"""

import os
import re
import stat

from thunder_cache.cache import node as node_mod
from thunder_cache.peer import sources

# Keys naming a Ceph identity or configuration: the daemon's own only.
CEPH_IDENTITY_KEYS = frozenset((
    'ceph_conf', 'conf', 'conffile', 'keyring', 'key', 'keyfile', 'user',
    'rados_id', 'id', 'name', 'client', 'cluster', 'cluster_name',
    'secret', 'secret_uuid', 'mon_host', 'auth'))
RBD_KEYS = frozenset(('type', 'pool', 'image', 'snapshot'))
FILE_KEYS = frozenset(('type', 'path'))
# Longest file origin path accepted (PATH_MAX).
MAX_PATH = 4096
_RBD_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z')
_SAMPLE_VOLUME_ID = '00000000-0000-0000-0000-000000000000'
_O_CONFINED = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(message, *args):
    raise node_mod.BadDescriptor(message % args if args else message)


def check_template(template):
    """``template`` if it names an RBD image per volume id (one ``%s``)."""
    if (not isinstance(template, str) or template.count('%') != 1 or
            '%s' not in template or
            not _RBD_NAME.match(template % _SAMPLE_VOLUME_ID)):
        raise ValueError('[origin] rbd_volume_name_template must hold one '
                         '%%s and make RBD image names (A-Z a-z 0-9 _ . -), '
                         'not %r' % (template,))
    return template


def open_confined(root, parts):
    """A read-only descriptor of ``root/parts...``, following no link.

    ``root`` is a directory the operator allowed; every component under
    it is opened with ``O_NOFOLLOW``. The last one is looked at before it
    is opened: only a regular file or a block device is opened, and it
    must still be the same file once open.

    :raises OSError: if a component is missing, a link, or of another
        kind.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            step = os.open(name, _O_CONFINED | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
        before = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not (stat.S_ISREG(before.st_mode) or
                stat.S_ISBLK(before.st_mode)):
            raise OSError('not a regular file or a block device')
        target = os.open(parts[-1], _O_CONFINED | os.O_NONBLOCK |
                         os.O_NOCTTY, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        after = os.fstat(target)
        if ((after.st_dev, after.st_ino, stat.S_IFMT(after.st_mode)) !=
                (before.st_dev, before.st_ino,
                 stat.S_IFMT(before.st_mode))):
            raise OSError('replaced while it was opened')
        os.set_blocking(target, True)
    except BaseException:
        os.close(target)
        raise
    return target


class ConfinedFileOrigin(sources.FileOrigin):
    """A file origin under an allowed directory, opened link by link."""

    def __init__(self, root, parts):
        super().__init__(os.path.join(root, *parts))
        self.root = root
        self.parts = tuple(parts)

    def _open(self):
        return open_confined(self.root, self.parts)


class OriginPolicy:
    """Builds the origins a descriptor may name, from [origin] options.

    Called as ``policy(entry, origin_volume_id=None)`` with the
    descriptor's ``origin`` object; returns a
    :class:`~thunder_cache.peer.sources.Origin`.

    :param rbd_pools: the pools image-volumes may be read from; the first
        is the default.
    :param volume_name_template: RBD image name of a volume id.
    :param file_dirs: directories file origins may lie under.
    :param rbd_options: keyword arguments of
        :class:`~thunder_cache.peer.sources.RbdOrigin` (the daemon's Ceph
        configuration, cluster, user, keyring, timeout).
    """

    def __init__(self, rbd_pools=(), volume_name_template='volume-%s',
                 file_dirs=(), rbd_options=None):
        self.rbd_pools = tuple(rbd_pools)
        for pool in self.rbd_pools:
            if not isinstance(pool, str) or not pool or '\0' in pool:
                raise ValueError('[origin] rbd_pools holds an empty or '
                                 'malformed pool name')
        self.volume_name_template = check_template(volume_name_template)
        self.file_dirs = tuple(self._check_dir(d) for d in file_dirs)
        self.rbd_options = dict(rbd_options or {})

    @staticmethod
    def _check_dir(directory):
        if (not isinstance(directory, str) or not os.path.isabs(directory)
                or '\0' in directory):
            raise ValueError('[origin] file_origin_dirs must hold absolute '
                             'paths, not %r' % (directory,))
        return os.path.normpath(directory).rstrip('/') or '/'

    @classmethod
    def from_conf(cls, conf):
        origin = conf.origin
        return cls(origin.rbd_pools, origin.rbd_volume_name_template,
                   origin.file_origin_dirs,
                   {'ceph_conf': origin.rbd_ceph_conf,
                    'user': origin.rbd_user,
                    'keyring': origin.rbd_keyring,
                    'cluster_name': origin.rbd_cluster_name,
                    'timeout': origin.rbd_connect_timeout})

    def __call__(self, entry, origin_volume_id=None):
        if not isinstance(entry, dict):
            _refuse('origin must be an object or null')
        kind = entry.get('type')
        if kind == 'rbd':
            return self._rbd(entry, origin_volume_id)
        if kind == 'file':
            return self._file(entry)
        _refuse('unknown origin type %r (rbd or file)', str(kind)[:20])

    @staticmethod
    def _check_keys(entry, allowed, kind):
        extra = sorted(str(k)[:40] for k in set(entry) - allowed)
        identity = sorted(k for k in extra if k in CEPH_IDENTITY_KEYS)
        if identity:
            _refuse('an origin may not name %s: the daemon reads '
                    'image-volumes with its own [origin] Ceph '
                    'configuration and identity', ', '.join(identity))
        if extra:
            _refuse('unknown keys in a %s origin: %s (allowed: %s)', kind,
                    ', '.join(extra), ', '.join(sorted(allowed)))

    def _rbd(self, entry, origin_volume_id):
        self._check_keys(entry, RBD_KEYS, 'rbd')
        for key in ('pool', 'image', 'snapshot'):
            value = entry.get(key)
            if value is not None and not isinstance(value, str):
                _refuse('rbd origin %s must be a string', key)
        if not self.rbd_pools:
            _refuse('RBD origins are not allowed on this node ([origin] '
                    'rbd_pools is empty)')
        pool = entry.get('pool')
        if pool is None:
            pool = self.rbd_pools[0]
        if pool not in self.rbd_pools:
            _refuse('pool %r is not one of [origin] rbd_pools (%s)',
                    pool[:64], ', '.join(self.rbd_pools))
        if origin_volume_id is None:
            _refuse('an rbd origin needs origin_volume_id, the image-volume '
                    'whose RBD image is read')
        image = self.volume_name_template % origin_volume_id
        if entry.get('image') not in (None, image):
            _refuse('rbd origin image %r is not %r, the image-volume of '
                    'volume %s ([origin] rbd_volume_name_template)',
                    entry['image'][:140], image, origin_volume_id)
        snapshot = entry.get('snapshot')
        if snapshot is not None and not _RBD_NAME.match(snapshot):
            _refuse('rbd origin snapshot must be 1 to 128 characters of '
                    'A-Z a-z 0-9 _ . -')
        try:
            return sources.RbdOrigin(pool, image, snapshot,
                                     **self.rbd_options)
        except sources.OriginError as e:
            raise node_mod.DescriptorError(str(e))

    def _file(self, entry):
        self._check_keys(entry, FILE_KEYS, 'file')
        path = entry.get('path')
        if not isinstance(path, str) or not path:
            _refuse('file origin needs a path')
        if not self.file_dirs:
            _refuse('file origins are not allowed on this node ([origin] '
                    'file_origin_dirs is empty)')
        if len(path) > MAX_PATH or '\0' in path:
            _refuse('file origin path is longer than %d characters or '
                    'holds a NUL', MAX_PATH)
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            _refuse('file origin path %r must be absolute and normalized '
                    '(no "..", "." or "//")', path[:200])
        for root in self.file_dirs:
            prefix = root if root == '/' else root + '/'
            if path.startswith(prefix):
                parts = path[len(prefix):].split('/')
                if all(p not in ('', '.', '..') for p in parts):
                    return ConfinedFileOrigin(root, parts)
        _refuse('file origin %r is not under [origin] file_origin_dirs',
                path[:200])
