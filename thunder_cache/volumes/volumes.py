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

"""The peer mode's volumes of one node.

A volume is a :class:`~thunder_cache.volumes.cow.CowLayer` over the node's
cache of an image (or over zeros, for a blank volume), in its own directory::

    <layers_dir>/<volume id>/data
    <layers_dir>/<volume id>/bitmap
    <layers_dir>/<volume id>/volume.json

``volume.json`` (``{"id", "size", "image_id", "read_only",
"created_at"}``) is written last, atomically, so a directory without a
valid one is a volume whose creation never finished: it is logged and
ignored at start, never served, and replaced by the next create of the
same id. Past the image's end (a volume larger than its image) and where
a blank volume never wrote, a volume reads zeros.

:class:`VolumeStore` is what the FUSE filesystem (:mod:`.fusefs`) and the
daemon's control requests use.
"""

import contextlib
import datetime
import errno
import json
import logging
import os
import re
import shutil
import threading

from oslo_concurrency import lockutils

from thunder_cache import fsutil
from thunder_cache.volumes import cow
from thunder_cache.volumes import nativevol

LOG = logging.getLogger(__name__)

META_FILE = 'volume.json'
# A revert builds the new layer here, beside the volume (not a volume id).
STAGING_PREFIX = '.revert-'
GiB = 1024 * 1024 * 1024
# The largest volume a store serves, whatever it is configured with: the
# largest layer (a file size that fits off_t, as FUSE and losetup see it).
MAX_SIZE = cow.MAX_SIZE
_VOLUME_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z')
_ZEROS = bytes(1024 * 1024)


class VolumeError(Exception):
    """A volume request that cannot be carried out."""


class VolumeNotFound(VolumeError):
    """No such volume."""


class VolumeExists(VolumeError):
    """A volume of that id exists already."""


class VolumeBusy(VolumeError):
    """The volume is open (attached) and cannot be deleted."""


class VolumeReadOnly(VolumeError):
    """A write to (or writable open of) a read-only volume."""


class VolumeTooLarge(VolumeError):
    """A size larger than the store or its filesystem allows."""


def check_volume_id(value):
    """``value`` if it is a valid volume id, else ValueError."""
    if (not isinstance(value, str) or not _VOLUME_ID.match(value) or
            value in ('.', '..')):
        raise ValueError('bad volume id %r: 1 to 128 characters of '
                         'A-Z a-z 0-9 _ . -, not starting with . _ or -'
                         % (value,))
    return value


def zeros(length):
    if length <= len(_ZEROS):
        return _ZEROS[:length]
    return bytes(length)


class _Volume:
    """One loaded volume: its layer, metadata and open count."""

    def __init__(self, volume_id, layer, image_id, read_only, created_at):
        self.id = volume_id
        self.layer = layer
        self.image_id = image_id
        self.read_only = read_only
        self.created_at = created_at
        self.open_count = 0
        self.image_size = None  # looked up on first read

    def meta(self):
        return {'id': self.id, 'size': self.layer.size,
                'image_id': self.image_id, 'read_only': self.read_only,
                'created_at': self.created_at}


def _write_meta(directory, meta):
    """Write volume.json atomically (see :func:`fsutil.write_atomic`)."""
    fsutil.write_atomic(os.path.join(directory, META_FILE),
                        json.dumps(meta, sort_keys=True).encode('utf-8'))


def _read_meta(directory, volume_id):
    with open(os.path.join(directory, META_FILE), 'rb') as f:
        meta = json.loads(f.read(65536))
    if not isinstance(meta, dict):
        raise ValueError('volume.json is not an object')
    if meta.get('id') != volume_id:
        if meta.get('previous_id') != volume_id:
            raise ValueError('volume.json does not describe volume %s'
                             % volume_id)
        # A rename that ended before its directory moved: it never was.
        LOG.warning('Volume %s: its rename to %s did not finish; it keeps '
                    'its id', volume_id, meta.get('id'))
        meta['id'] = volume_id
    cow.check_size(meta.get('size'), 'volume')
    image_id = meta.get('image_id')
    if image_id is not None and not isinstance(image_id, str):
        raise ValueError('bad image_id %r' % (image_id,))
    if not isinstance(meta.get('read_only'), bool):
        raise ValueError('bad read_only %r' % (meta.get('read_only'),))
    return meta


class VolumeStore:
    """The volumes of a node; thread-safe.

    :param layers_dir: where the volumes' directories live (created if
        missing).
    :param images: has ``image_size(image_id) -> int`` and
        ``read_image(image_id, offset, length) -> bytes`` (which may raise
        IOError when a chunk cannot be fetched).
    :param max_size: the largest volume size, in bytes.
    :param native: the :class:`~thunder_cache.volumes.nativevol.NativeServer`
        serving the volume files, or None when :mod:`.fusefs` does (in
        this process). With it, a layer's I/O is paused in the server
        while it is grown, copied or looked at, and a volume is deleted
        only once the server lets it go.

    Creates, deletes and resizes of one volume id run one at a time (a
    lock per id), so racing requests get clean answers: the volume
    exists, is not found, or the request is done.
    """

    def __init__(self, layers_dir, images, max_size=MAX_SIZE, native=None):
        self.layers_dir = layers_dir
        self.native = native
        self.images = images
        self.max_size = min(cow.check_size(max_size, 'maximum volume'),
                            MAX_SIZE)
        self._lock = threading.Lock()
        self._id_locks = lockutils.Semaphores()
        self._volumes = {}
        os.makedirs(layers_dir, mode=0o700, exist_ok=True)
        self._load()

    def __repr__(self):
        return '<VolumeStore %s: %d volumes>' % (self.layers_dir,
                                                 len(self._volumes))

    def _dir(self, volume_id):
        return os.path.join(self.layers_dir, volume_id)

    @contextlib.contextmanager
    def _locked(self, *volume_ids):
        """Hold the locks of these ids (taken in order: no deadlock)."""
        with contextlib.ExitStack() as stack:
            for volume_id in sorted(set(volume_ids)):
                stack.enter_context(lockutils.lock(
                    volume_id, semaphores=self._id_locks, do_log=False))
            yield

    @contextlib.contextmanager
    def _paused(self, volume):
        """The volume's layer, quiet; yields how often it is open.

        With a native server, its I/O of the volume waits (its bits
        flushed) and the layer is opened again here, since the server
        wrote it.
        """
        if self.native is None:
            yield volume.open_count
            return
        try:
            hold = self.native.hold(volume.id)
            opens = hold.__enter__()
        except nativevol.NativeError as e:
            raise VolumeError('volume %s: the native volume server: %s'
                              % (volume.id, e))
        try:
            volume.layer.close()
            volume.layer = cow.CowLayer.open(self._dir(volume.id))
            yield opens
        finally:
            hold.__exit__(None, None, None)

    def _check_size(self, size):
        cow.check_size(size, 'volume')
        if size > self.max_size:
            raise VolumeTooLarge('volume size %d is larger than the %d bytes '
                                 'allowed' % (size, self.max_size))
        return size

    @staticmethod
    def _too_large(volume_id, size, error):
        """The error to raise for an OSError from making a layer."""
        if error.errno == errno.EFBIG:
            return VolumeTooLarge('the layers filesystem cannot hold volume '
                                  '%s of %d bytes' % (volume_id, size))
        return error

    # -- start ------------------------------------------------------------

    def _load(self):
        for name in sorted(os.listdir(self.layers_dir)):
            directory = self._dir(name)
            if name.startswith(STAGING_PREFIX):
                LOG.warning('Removing %s, left by a revert that did not '
                            'finish', directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            try:
                check_volume_id(name)
            except ValueError:
                LOG.warning('Ignoring %s in the layers directory: not a '
                            'volume id', directory)
                continue
            if not os.path.isdir(directory):
                continue
            try:
                meta = _read_meta(directory, name)
            except FileNotFoundError:
                LOG.warning('Ignoring half-created volume %s (no %s): it is '
                            'not served, and a new create of the id '
                            'replaces it', name, META_FILE)
                continue
            except (OSError, ValueError) as e:
                LOG.error('Ignoring volume %s: unreadable %s: %s', name,
                          META_FILE, e)
                continue
            try:
                layer = cow.CowLayer.open(directory)
            except (OSError, ValueError) as e:
                LOG.error('Ignoring volume %s: its layer cannot be opened: '
                          '%s', name, e)
                continue
            if layer.size != meta['size']:
                # A resize grows the layer, then volume.json: the layer's
                # size is the one the volume had when the request ended.
                LOG.warning('Volume %s: %s says %d bytes, its layer %d; '
                            'keeping the layer\'s', name, META_FILE,
                            meta['size'], layer.size)
            volume = _Volume(name, layer, meta.get('image_id'),
                             meta['read_only'], meta.get('created_at'))
            if layer.size != meta['size']:
                _write_meta(directory, volume.meta())
            self._volumes[name] = volume
        LOG.info('Volume store %s: %d volumes', self.layers_dir,
                 len(self._volumes))

    # -- lookup -----------------------------------------------------------

    def _get(self, volume_id):
        with self._lock:
            volume = self._volumes.get(volume_id)
        if volume is None:
            raise VolumeNotFound('no volume %s' % (volume_id,))
        return volume

    def list(self):
        """The ids of the volumes, sorted."""
        with self._lock:
            return sorted(self._volumes)

    def image_ids(self):
        """{volume id: its image id (None: blank)}; pauses no I/O."""
        with self._lock:
            return {v.id: v.image_id for v in self._volumes.values()}

    def size(self, volume_id):
        """A volume's size in bytes (without pausing its I/O)."""
        return self._get(volume_id).layer.size

    def info(self, volume_id):
        volume = self._get(volume_id)
        with self._paused(volume) as opens:
            return {'id': volume.id, 'size': volume.layer.size,
                    'image_id': volume.image_id,
                    'read_only': volume.read_only,
                    'written_bytes': volume.layer.written_bytes(),
                    'allocated_bytes': volume.layer.allocated_bytes(),
                    'open_count': opens}

    # -- life cycle -------------------------------------------------------

    def create(self, volume_id, size, image_id=None, source=None,
               read_only=False):
        """Create a volume; O(1) unless it copies ``source``'s layer.

        :param image_id: the image the volume reads where it has not
            written; None for a blank volume (zeros).
        :param source: a volume (or snapshot) id whose written blocks are
            copied and whose image the new volume reads.
        :raises VolumeExists: if the id is taken.
        :raises VolumeNotFound: if ``source`` does not exist.
        :raises VolumeError: if the image cannot be used.
        :raises ValueError: for a bad id or size.
        """
        check_volume_id(volume_id)
        self._check_size(size)
        if source is not None:
            check_volume_id(source)
        with self._locked(volume_id, source or volume_id):
            info = self._create(volume_id, size, image_id, source,
                                read_only)
        LOG.info('Created volume %s: %d bytes, %s%s%s', volume_id, size,
                 'image %s' % image_id if image_id else 'blank',
                 ', from %s' % source if source else '',
                 ', read-only' if read_only else '')
        return info

    def _create(self, volume_id, size, image_id, source, read_only):
        src = None
        if source is not None:
            src = self._get(source)
            if image_id is not None and image_id != src.image_id:
                raise ValueError('volume %s reads image %s, not %s'
                                 % (source, src.image_id, image_id))
            image_id = src.image_id
            if size < src.layer.size:
                raise ValueError('volume %s cannot be smaller (%d bytes) '
                                 'than its source %s (%d bytes)'
                                 % (volume_id, size, source,
                                    src.layer.size))
        elif image_id is not None:
            self._image_size(image_id)
        with self._lock:
            if volume_id in self._volumes:
                raise VolumeExists('volume %s exists' % volume_id)
        directory = self._dir(volume_id)
        if os.path.exists(os.path.join(directory, META_FILE)):
            # Left unloaded at start (damaged): never clobber it.
            raise VolumeExists('volume %s exists (damaged, not served)'
                               % volume_id)
        if os.path.lexists(directory):
            LOG.warning('Replacing half-created volume %s', volume_id)
            shutil.rmtree(directory)
        created = datetime.datetime.now(
            datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')
        volume = self._build(directory, _Volume(
            volume_id, None, image_id, bool(read_only), created), size, src)
        with self._lock:
            self._volumes[volume_id] = volume
        return self.info(volume_id)

    def _build(self, directory, volume, size, src):
        """Make ``volume``'s layer and volume.json in ``directory``.

        A copy of ``src``'s layer grown to ``size``, or a new empty one.
        On failure the directory is removed.
        """
        try:
            if src is not None:
                with self._paused(src):
                    volume.layer = src.layer.copy_to(directory)
                if size > volume.layer.size:
                    volume.layer.resize(size)
            else:
                volume.layer = cow.CowLayer.create(directory, size)
            _write_meta(directory, volume.meta())
            fsutil.fsync_dir(self.layers_dir)
        except BaseException as e:
            if volume.layer is not None:
                try:
                    volume.layer.close()
                except (OSError, ValueError) as close_error:
                    LOG.warning('Volume %s: closing its unfinished layer: '
                                '%s', volume.id, close_error)
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(e, OSError):
                raise self._too_large(volume.id, size, e)
            raise
        return volume

    def delete(self, volume_id):
        """Delete a volume that is not open.

        :raises VolumeBusy: while it is open (a loop device over it keeps
            it open until ``losetup -d``).
        :raises VolumeNotFound: if there is no such volume.
        """
        with self._locked(volume_id):
            self._delete(volume_id)
        LOG.info('Deleted volume %s', volume_id)

    def _delete(self, volume_id):
        with self._lock:
            volume = self._volumes.get(volume_id)
            if volume is None:
                raise VolumeNotFound('no volume %s' % (volume_id,))
            if volume.open_count:
                raise VolumeBusy('volume %s is open %d times'
                                 % (volume_id, volume.open_count))
            if self.native is not None:
                self._forget(volume_id)
            del self._volumes[volume_id]
        directory = self._dir(volume_id)
        try:
            volume.layer.close()
        except (OSError, ValueError) as e:
            LOG.warning('Volume %s: closing its layer: %s', volume_id, e)
        try:
            os.unlink(os.path.join(directory, META_FILE))
            fsutil.fsync_dir(directory)
        except FileNotFoundError:
            pass
        shutil.rmtree(directory)
        fsutil.fsync_dir(self.layers_dir)

    def _forget(self, volume_id):
        try:
            self.native.forget(volume_id)
        except nativevol.NativeError as e:
            if nativevol.busy(e):
                raise VolumeBusy('volume %s is open (%s)' % (volume_id, e))
            raise VolumeError('volume %s: the native volume server: %s'
                              % (volume_id, e))

    def resize(self, volume_id, new_size):
        """Grow a volume to ``new_size`` bytes (ValueError on a shrink)."""
        self._check_size(new_size)
        with self._locked(volume_id):
            self._resize(volume_id, new_size)

    def _resize(self, volume_id, new_size):
        volume = self._get(volume_id)
        old = volume.layer.size
        with self._paused(volume):
            try:
                volume.layer.resize(new_size)
            except OSError as e:
                raise self._too_large(volume_id, new_size, e)
            if new_size != old:
                _write_meta(self._dir(volume_id), volume.meta())
        if new_size != old:
            LOG.info('Volume %s grown from %d to %d bytes', volume_id, old,
                     new_size)

    def revert(self, volume_id, snapshot_id):
        """Make a volume read what its snapshot reads; O(snapshot's writes).

        The snapshot's layer is copied beside the volume (grown to the
        volume's size), then exchanged with the volume's directory in one
        atomic ``renameat2(RENAME_EXCHANGE)``: a crash leaves the old
        volume or the reverted one, never a mix, and the leftover
        directory is removed at the next start. The volume keeps its id,
        size and creation time.

        :raises VolumeBusy: while the volume is open (attached).
        :raises VolumeNotFound: if either does not exist.
        :raises VolumeError: if the snapshot reads another image or is
            larger than the volume.
        """
        check_volume_id(volume_id)
        check_volume_id(snapshot_id)
        with self._locked(volume_id, snapshot_id):
            self._revert(volume_id, snapshot_id)
        LOG.info('Reverted volume %s to %s', volume_id, snapshot_id)
        return self.info(volume_id)

    def _check_closed(self, volume):
        """Raise VolumeBusy if the volume is open; caller holds _lock.

        A native server, which counts its own opens, drops the volume
        (its files closed): it opens whatever layer is there next.
        """
        if volume.open_count:
            raise VolumeBusy('volume %s is open %d times (attached?)'
                             % (volume.id, volume.open_count))
        if self.native is not None:
            self._forget(volume.id)

    def _revert(self, volume_id, snapshot_id):
        volume, snap = self._get(volume_id), self._get(snapshot_id)
        if snap.image_id != volume.image_id or (
                snap.layer.size > volume.layer.size):
            raise VolumeError('%s is not a snapshot of volume %s (image %s, '
                              '%d bytes; the volume: image %s, %d bytes)'
                              % (snapshot_id, volume_id, snap.image_id,
                                 snap.layer.size, volume.image_id,
                                 volume.layer.size))
        with self._lock:
            self._check_closed(volume)
        staging = os.path.join(self.layers_dir, STAGING_PREFIX + volume_id)
        shutil.rmtree(staging, ignore_errors=True)
        new = self._build(staging, _Volume(
            volume_id, None, volume.image_id, volume.read_only,
            volume.created_at), volume.layer.size, snap)
        try:
            with self._lock:
                self._check_closed(volume)
                fsutil.exchange(staging, self._dir(volume_id))
                new.layer.directory = self._dir(volume_id)
                self._volumes[volume_id] = new
        except BaseException:
            new.layer.close()
            shutil.rmtree(staging)
            raise
        fsutil.fsync_dir(self.layers_dir)
        try:
            volume.layer.close()
        except (OSError, ValueError) as e:
            LOG.warning('Volume %s: closing its replaced layer: %s',
                        volume_id, e)
        shutil.rmtree(staging)

    def rename(self, volume_id, new_id):
        """Give a volume that is not open another id (Cinder's manage).

        volume.json first names the new id (and the previous one), then
        the directory is renamed: a crash in between leaves the volume
        under its old id (see :func:`_read_meta`).

        :raises VolumeBusy: while it is open.
        :raises VolumeExists: if ``new_id`` is taken.
        :raises VolumeNotFound: if there is no such volume.
        """
        check_volume_id(volume_id)
        check_volume_id(new_id)
        with self._locked(volume_id, new_id):
            self._rename(volume_id, new_id)
        LOG.info('Renamed volume %s to %s', volume_id, new_id)
        return self.info(new_id)

    def _rename(self, volume_id, new_id):
        volume = self._get(volume_id)
        old_dir, new_dir = self._dir(volume_id), self._dir(new_id)
        with self._lock:
            if new_id in self._volumes or os.path.lexists(new_dir):
                raise VolumeExists('volume %s exists' % new_id)
            self._check_closed(volume)
            # Not served while it moves.
            del self._volumes[volume_id]
        try:
            volume.layer.close()
            _write_meta(old_dir, dict(volume.meta(), id=new_id,
                                      previous_id=volume_id))
            os.rename(old_dir, new_dir)
        except BaseException:
            try:
                _write_meta(old_dir, volume.meta())
            finally:
                volume.layer = cow.CowLayer.open(old_dir)
                with self._lock:
                    self._volumes[volume_id] = volume
            raise
        volume.id = new_id
        volume.layer = cow.CowLayer.open(new_dir)
        with self._lock:
            self._volumes[new_id] = volume
        _write_meta(new_dir, volume.meta())
        fsutil.fsync_dir(self.layers_dir)

    # -- opens (FUSE) -----------------------------------------------------

    def open(self, volume_id, writable):
        """Count an open of the volume's file.

        :raises VolumeReadOnly: for a writable open of a read-only volume.
        """
        with self._lock:
            volume = self._volumes.get(volume_id)
            if volume is None:
                raise VolumeNotFound('no volume %s' % (volume_id,))
            if writable and volume.read_only:
                raise VolumeReadOnly('volume %s is read-only' % volume_id)
            volume.open_count += 1

    def release(self, volume_id):
        with self._lock:
            volume = self._volumes.get(volume_id)
            if volume is None or not volume.open_count:
                LOG.warning('Release of volume %s, which is not open',
                            volume_id)
                return
            volume.open_count -= 1

    def open_volumes(self):
        """{volume id: open count} of the volumes open now."""
        with self._lock:
            return {v.id: v.open_count for v in self._volumes.values()
                    if v.open_count}

    # -- I/O --------------------------------------------------------------

    def _image_size(self, image_id):
        try:
            size = self.images.image_size(image_id)
        except LookupError as e:
            raise VolumeError('image %s is not known on this node: %s'
                              % (image_id, e))
        except (OSError, ValueError) as e:
            raise VolumeError('image %s cannot be used: %s' % (image_id, e))
        if not isinstance(size, int) or size < 0:
            raise VolumeError('image %s has a bad size %r' % (image_id,
                                                              size))
        return size

    def _base(self, volume):
        """The volume's base: its image, zeros past its end."""
        image_id = volume.image_id
        if image_id is None:
            return lambda offset, length: zeros(length)
        if volume.image_size is None:
            volume.image_size = self._image_size(image_id)
        image_size = volume.image_size
        read_image = self.images.read_image

        def base(offset, length):
            end = offset + length
            if offset >= image_size:
                return zeros(length)
            if end <= image_size:
                return read_image(image_id, offset, length)
            head = read_image(image_id, offset, image_size - offset)
            return bytes(head) + zeros(end - image_size)

        return base

    def read(self, volume_id, offset, length):
        """``length`` bytes of the volume at ``offset`` (short at the end).

        :raises IOError: if the image's bytes cannot be fetched.
        """
        volume = self._get(volume_id)
        return volume.layer.read(offset, length, self._base(volume))

    def write(self, volume_id, offset, data):
        volume = self._get(volume_id)
        if volume.read_only:
            raise VolumeReadOnly('volume %s is read-only' % volume_id)
        return volume.layer.write(offset, data, self._base(volume))

    def zero(self, volume_id, offset, length):
        """Discard (or write zeros to) a range: it reads zeros afterwards.

        See :meth:`thunder_cache.volumes.cow.CowLayer.zero`.
        """
        volume = self._get(volume_id)
        if volume.read_only:
            raise VolumeReadOnly('volume %s is read-only' % volume_id)
        base = self._base(volume)
        zeros_from = 0 if volume.image_id is None else volume.image_size
        volume.layer.zero(offset, length, base, zeros_from)

    def flush(self, volume_id):
        """Make the volume's writes so far durable."""
        self._get(volume_id).layer.flush()

    def close(self):
        """Flush and close every volume."""
        with self._lock:
            volumes, self._volumes = list(self._volumes.values()), {}
        for volume in volumes:
            try:
                volume.layer.close()
            except (OSError, ValueError) as e:
                LOG.error('Volume %s: closing its layer: %s', volume.id, e)
