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

"""The images of one node and what it answers to its peers.

:class:`Node` owns the image caches of a node, keyed by Glance image id.
An image is *registered* with the digest of its manifest (from the Glance
image record), where its origin is and which peers hold it; it is
*activated* on first use: the manifest is read from a local copy, the
origin or a peer, and accepted only if its sha256 is the registered
digest. Registration comes from descriptor files (see
:func:`load_descriptor`), one JSON file per image.

The request logic (authentication aside, which the server does) lives here
so that it can be tested without sockets: :meth:`Node.serve_chunk` returns
a :class:`~thunder_cache.peer.reply.Reply` saying what to send.

Eviction (:meth:`Node.evict`, driven by :mod:`thunder_cache.cache.eviction`):
readers pin the cache they read (:meth:`Node.using`; a peer's reply until
it is sent), and an image is evicted only when its cache can be retired
(no pin, no fetch in flight). Its directory is renamed away under the
image's lock, then deleted: a concurrent activation either got the old
cache before (and holds a pin, so the eviction is refused) or opens a new,
empty one after. Peers asking for an evicted image get 404 rather than
bringing it back; a local use (a volume, a registration) reopens it.
"""

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import typing
import uuid

from thunder_cache.cache import chunkstream
from thunder_cache.cache import image_cache
from thunder_cache.cache import upstream as upstream_mod
from thunder_cache import errors
from thunder_cache import fsutil
from thunder_cache import metrics
from thunder_cache.peer import fanout
from thunder_cache.peer import protocol
from thunder_cache.peer import reply as reply_mod
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

LOG = logging.getLogger(__name__)

MANIFEST_FILE = 'manifest'
#: Prefix of a cache directory being deleted (see :meth:`Node.evict`).
EVICTED_PREFIX = '.evicted-'
MAX_DESCRIPTOR_BYTES = 65536
# What a descriptor may hold (a file's also its ``image_id``).
DESCRIPTOR_KEYS = frozenset((
    'manifest_digest', 'manifest_offset', 'manifest_length', 'image_size',
    'origin', 'peers', 'origin_volume_id'))
_HEX_DIGEST = re.compile(r'^[0-9a-f]{64}\Z')
_UUID = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
                   r'[0-9a-f]{12}\Z')

NODE_COUNTERS = {
    'auth_failures': 'Requests refused for a missing, bad or expired token.',
    'bad_requests': 'Requests refused as malformed or too large.',
    'redirects_sent': 'Requests sent to one of this node\'s children (307) '
                      'because the image\'s fan-out was full.',
    'loop_admissions': 'Requests served beyond the image\'s fan-out '
                       'because their sender had been redirected round a '
                       'cycle of full nodes.',
    'loops_refused': 'Relayed requests refused because serving them would '
                     'wait on the requester (508).',
    'relay_failures': 'Peer requests for a chunk this node could not get '
                      'in time (503).',
    'relays_streamed': 'Peer requests for a chunk this node was still '
                       'fetching, answered as its bytes arrived '
                       '(cut-through).',
    'relays_cut': 'Cut-through answers closed short of the body because '
                  'the fetch they followed went to another source or '
                  'failed.',
    'upload_bytes': 'Bytes of chunk data sent to peers.',
    'head_timeouts': 'Connections closed for not completing a request head '
                     '(or their TLS handshake) within [peer] head_timeout.',
    'connections_dropped': 'Connections closed unserved: beyond [peer] '
                           'max_connections_per_address, or the oldest '
                           'unauthenticated one when '
                           'max_unauthenticated_connections were open.',
    'tls_handshake_failures': 'TLS handshakes that failed (no or a bad '
                              'client certificate, plain HTTP).',
    'replays_refused': 'Requests refused because their token had been '
                       'used before.',
    'v1_tokens': 'Requests accepted with a version 1 token (no destination '
                 'or replay protection; see [peer] accept_v1_tokens).',
}


def disk_usage(directory):
    """Bytes the files of ``directory`` (not its sub-directories) take."""
    total = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        try:
            st = os.lstat(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        if not os.path.isdir(os.path.join(directory, name)):
            total += st.st_blocks * 512
    return total


def cache_dirs(cache_dir, exclude=()):
    """{image id: directory} of the image caches in ``cache_dir``.

    A directory counts if it is named as an image id and holds a chunk
    map or a manifest; ``exclude`` lists directories never to count (the
    layers, the mount, the descriptors).
    """
    skip = {os.path.realpath(p) for p in exclude if p}
    found = {}
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return found
    for name in names:
        path = os.path.join(cache_dir, name)
        if (not protocol.IMAGE_ID.match(name) or
                os.path.realpath(path) in skip or
                os.path.islink(path) or os.path.ismount(path)):
            continue
        if any(os.path.isfile(os.path.join(path, f)) for f in
               (image_cache.MAP_FILE, MANIFEST_FILE)):
            found[name] = path
    return found


def _held(cache, answer, *args):
    """``answer(*args)``, ``cache`` pinned until its file span is sent."""
    try:
        reply = answer(*args)
    except BaseException:
        cache.unpin()
        raise
    if reply.span is None and reply.stream is None:
        cache.unpin()
    else:
        reply.release = cache.unpin
    return reply


class DescriptorError(ValueError):
    """An image descriptor that cannot be used."""


class BadDescriptor(DescriptorError, errors.BadRequest):
    """A descriptor refused outright (``BadRequest`` on the socket).

    A malformed value, an unknown key, or an origin the daemon does not
    allow.
    """


class ImageBusy(Exception):
    """An image that cannot be evicted now (the message says why)."""


class ImageSpec:
    """What a node needs to know about an image to cache it."""

    def __init__(self, image_id, manifest_digest, origin=None, peers=(),
                 manifest_offset=None, manifest_length=None,
                 image_size=None, origin_volume_id=None):
        if not isinstance(image_id, str) or not protocol.IMAGE_ID.match(
                image_id):
            raise BadDescriptor('bad image id %r' % (
                image_id[:80] if isinstance(image_id, str) else image_id,))
        if (not isinstance(manifest_digest, str) or
                not _HEX_DIGEST.match(manifest_digest)):
            raise BadDescriptor('manifest digest must be a lower-case '
                                'sha256 hex digest')
        if manifest_offset is None:
            if image_size is None:
                raise BadDescriptor('need manifest_offset or image_size')
            if manifest_mod.is_size(image_size):
                manifest_offset = manifest_mod.volume_offset(image_size)
        try:
            manifest_mod.check_placement(manifest_offset, manifest_length,
                                         image_size)
        except ValueError as e:
            raise BadDescriptor(str(e))
        if origin_volume_id is not None and (
                not isinstance(origin_volume_id, str) or
                not _UUID.match(origin_volume_id)):
            raise BadDescriptor('origin_volume_id must be a volume UUID')
        try:
            self.peers = tuple(protocol.normalize_url(p) for p in peers)
        except ValueError as e:
            raise BadDescriptor(str(e))
        self.image_id = image_id
        self.origin_volume_id = origin_volume_id
        self.manifest_digest = manifest_digest
        self.origin = origin
        self.manifest_offset = manifest_offset
        self.manifest_length = manifest_length
        self.image_size = image_size


def load_descriptor(path, origin_factory):
    """An :class:`ImageSpec` from a JSON descriptor file.

    The file ``<image id>.json`` holds an object with
    ``manifest_digest`` (from the image's location metadata),
    ``manifest_offset`` and optionally ``manifest_length`` (or
    ``image_size`` to compute the offset), ``origin`` (an image-volume
    the daemon's configuration allows: ``{"type": "rbd"[, "pool": ...,
    "image": ..., "snapshot": ...]}``, ``{"type": "file", "path": ...}``
    or null; see :mod:`thunder_cache.cache.origins`), ``peers`` (a list of peer
    URLs) and ``origin_volume_id`` (the Cinder id of the image-volume,
    whose metadata carries the image's peer-cache locations and boot
    trace). It goes through the same checks as a registration over the
    control socket.
    """
    image_id = os.path.basename(path)[:-len('.json')]
    try:
        with open(path, 'rb') as f:
            raw = f.read(MAX_DESCRIPTOR_BYTES + 1)
        if len(raw) > MAX_DESCRIPTOR_BYTES:
            raise DescriptorError('descriptor larger than %d bytes'
                                  % MAX_DESCRIPTOR_BYTES)
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:
        raise DescriptorError('cannot read %s: %s' % (path, e))
    if not isinstance(data, dict):
        raise DescriptorError('%s does not hold a JSON object' % path)
    if data.pop('image_id', image_id) != image_id:
        raise DescriptorError('%s names another image' % path)
    return spec_from_dict(image_id, data, origin_factory)


def spec_from_dict(image_id, data, origin_factory):
    """An :class:`ImageSpec` from a descriptor's JSON object.

    ``origin_factory(origin, origin_volume_id=...)`` builds the origin
    (see :class:`thunder_cache.cache.origins.OriginPolicy`).
    """
    if not isinstance(image_id, str):
        raise BadDescriptor('image id must be a string')
    unknown = sorted(str(k)[:40] for k in set(data) - DESCRIPTOR_KEYS)
    if unknown:
        raise BadDescriptor('unknown descriptor keys: %s (allowed: %s)'
                            % (', '.join(unknown[:8]),
                               ', '.join(sorted(DESCRIPTOR_KEYS))))
    peers = data.get('peers') or []
    if not isinstance(peers, list):
        raise BadDescriptor('peers must be a list of URLs')
    origin_volume_id = data.get('origin_volume_id')
    origin = data.get('origin')
    spec = ImageSpec(image_id, data.get('manifest_digest'), None, peers,
                     data.get('manifest_offset'), data.get('manifest_length'),
                     data.get('image_size'), origin_volume_id)
    if origin is not None:
        if not isinstance(origin, dict):
            raise BadDescriptor('origin must be an object or null')
        spec.origin = origin_factory(origin,
                                     origin_volume_id=origin_volume_id)
    return spec


class ImageEntry:
    """A registered image and, once activated, its cache."""

    def __init__(self, spec, max_children, child_ttl, stripes=1):
        self.spec = spec
        self.children = fanout.ChildTable(max_children, child_ttl,
                                          stripes=stripes)
        self.cache = None
        self.manifest_bytes = None
        self.lock = threading.Lock()
        self.retry_at = 0.0
        self.last_error = None
        # Evicted: peers get 404 until a local use opens it again.
        self.evicted = False
        # Why the image is gone (deleted in Glance), or None.
        self.gone = None

    def serving(self):
        """Why peers still fetch the image here (children), or None."""
        children = self.children.children()
        if children:
            return 'serving %d peers (%s)' % (
                len(children), ', '.join(sorted(children)[:5]))
        return None


class Node:
    """The caches of one node and its side of the peer protocol.

    :param node_id: this node's id, sent to peers and checked by them.
    :param url: this node's serving URL as its peers know it.
    :param cache_dir: where the image caches live.
    :param client: a :class:`~thunder_cache.peer.sources.PeerClient`.
    :param max_children: children served per image (per stripe) before
        redirecting.
    :param stripes: stripes the chunks of an image are dealt into, each
        fetched from its own parent (see
        :func:`thunder_cache.cache.upstream.stripe_parents`).
    :param relay_timeout: seconds a peer request waits for a chunk this
        node must fetch first (with ``cut_through``, for its first bytes).
    :param cut_through: send a chunk this node is fetching to the peers
        that ask for it as its bytes arrive, the last once verified,
        rather than once it is stored; the fetches run in up to
        ``relay_threads`` threads.
    :param read_retry: seconds a local read retries a chunk no source
        could provide (see
        :class:`~thunder_cache.cache.image_cache.ImageCache`).
    :param retry_interval, retry_max_interval, max_peers: the back-off of
        failing peers and the cap on peers per image (see
        :class:`~thunder_cache.cache.upstream.Upstream`).
    """

    def __init__(self, node_id: str, url: str, cache_dir: str,
                 client: typing.Optional[sources.PeerClient], max_children=2,
                 child_ttl=10.0, upload_rate=0, upload_burst=None,
                 relay_timeout=10.0, max_redirects=16, retry_interval=30.0,
                 retry_max_interval=300.0, max_peers=None,
                 verify_persisted=True, commit_interval=0.0,
                 read_retry=0.0, activation_retry=5.0, on_activate=None,
                 stripes=1, cut_through=False, relay_threads=64):
        self.node_id = protocol.check_node_id(node_id)
        self.url = protocol.normalize_url(url)
        self.cache_dir = cache_dir
        self.client = client
        self.max_children = max_children
        self.child_ttl = child_ttl
        self.stripes = stripes
        self.relay_timeout = relay_timeout
        self.max_redirects = max_redirects
        self.retry_interval = retry_interval
        self.retry_max_interval = retry_max_interval
        self.max_peers = max_peers
        self.verify_persisted = verify_persisted
        self.commit_interval = commit_interval
        self.read_retry = read_retry
        self.activation_retry = activation_retry
        # Called as on_activate(spec, cache) once an image's cache opens.
        self.on_activate = on_activate
        # Set on every cache opened: see ImageCache.on_full.
        self.on_full = None
        # callable(page, labels) adding node-wide samples to /metrics.
        self.metrics_hooks: typing.List[typing.Callable[..., None]] = []
        self.bucket = fanout.TokenBucket(upload_rate, upload_burst)
        self.counters = metrics.Counters(NODE_COUNTERS)
        # Where relayed fetches run while their requests stream the bytes.
        self._relays = concurrent.futures.ThreadPoolExecutor(
            relay_threads, thread_name_prefix='relay-fetch') if (
                cut_through) else None
        self.responses = metrics.Counters(protocol.REASONS)
        self._images: typing.Dict[str, ImageEntry] = {}
        self._lock = threading.Lock()
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)

    # -- registration -----------------------------------------------------

    def register(self, spec):
        """Register (or update the peers and origin of) an image."""
        with self._lock:
            entry = self._images.get(spec.image_id)
            if entry is None:
                self._images[spec.image_id] = ImageEntry(
                    spec, self.max_children, self.child_ttl, self.stripes)
                LOG.info('Registered image %s (manifest %s, %d peers)',
                         spec.image_id, spec.manifest_digest[:16],
                         len(spec.peers))
                return
        if entry.spec.manifest_digest != spec.manifest_digest:
            raise DescriptorError('image %s is registered with another '
                                  'manifest digest' % spec.image_id)
        with entry.lock:
            old = entry.spec.origin
            if old is not None and spec.origin is not None and (
                    old.name == spec.origin.name):
                # The same image-volume: keep the origin already open.
                spec.origin.close()
                spec.origin = old
            entry.spec = spec
            # Registered again (by the driver, from Glance's record): not
            # gone after all.
            entry.gone = None
            if entry.cache is not None:
                entry.cache.upstream.origin = spec.origin
                entry.cache.upstream.set_peers(spec.peers)

    def unregister(self, image_id):
        """Forget an image whose cache was never opened (a failed one)."""
        with self._lock:
            entry = self._images.get(image_id)
            if entry is None or entry.cache is not None:
                return
            del self._images[image_id]
        with entry.lock:
            if entry.spec.origin is not None:
                entry.spec.origin.close()

    def mark_gone(self, image_id, reason):
        """Note that an image was deleted (see :mod:`.eviction`)."""
        entry = self._entry(image_id)
        if entry is not None and entry.gone is None:
            entry.gone = reason
            LOG.info('Image %s is gone (%s): its cache is removed once no '
                     'volume uses it', image_id, reason)

    def load_descriptors(self, directory, origin_factory):
        """Register every ``*.json`` descriptor of ``directory``.

        A registered image whose descriptor was removed is marked gone.
        """
        loaded = 0
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return 0
        for image_id in set(self.image_ids()) - {
                n[:-len('.json')] for n in names if n.endswith('.json')}:
            self.mark_gone(image_id, 'its descriptor was removed')
        for name in names:
            if not name.endswith('.json'):
                continue
            try:
                self.register(load_descriptor(os.path.join(directory, name),
                                              origin_factory))
                loaded += 1
            except DescriptorError as e:
                LOG.error('Ignoring image descriptor %s: %s', name, e)
        return loaded

    def image_ids(self):
        with self._lock:
            return sorted(self._images)

    # -- activation -------------------------------------------------------

    def _entry(self, image_id):
        with self._lock:
            return self._images.get(image_id)

    def cache(self, image_id, reopen=True):
        """The activated cache of a registered image.

        :param reopen: False for peers: an evicted image is not opened
            again (KeyError).
        :raises KeyError: if the image is not registered.
        :raises sources.ManifestError: if its manifest cannot be loaded.
        """
        entry = self._entry(image_id)
        if entry is None:
            raise KeyError(image_id)
        if entry.cache is not None:
            return entry.cache
        with entry.lock:
            if entry.cache is not None:
                return entry.cache
            if entry.evicted and not reopen:
                raise KeyError(image_id)
            now = time.monotonic()
            if now < entry.retry_at:
                raise sources.ManifestError(entry.last_error)
            try:
                self._activate(entry)
            except sources.ManifestError as e:
                entry.last_error = str(e)
                entry.retry_at = now + self.activation_retry
                raise
            cache = entry.cache
            cache.on_full = self.on_full
            entry.evicted = False
        if self.on_activate is not None:
            try:
                self.on_activate(entry.spec, cache)
            except Exception:
                LOG.exception('Activation hook failed for image %s',
                              entry.spec.image_id)
        return cache

    def _activate(self, entry):
        spec = entry.spec
        directory = os.path.join(self.cache_dir, spec.image_id)
        made = not os.path.isdir(directory)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._open(entry, directory)
        except (OSError, sources.ManifestError) as e:
            if made:
                # An image never verified leaves nothing behind.
                shutil.rmtree(directory, ignore_errors=True)
            if not isinstance(e, OSError):
                raise
            if e.errno in image_cache.FULL_ERRNOS and self.on_full:
                self.on_full(None)
            raise sources.ManifestError('cannot open the cache of image %s: '
                                        '%s' % (spec.image_id, e))

    def _open(self, entry, directory):
        spec = entry.spec
        manifest = self._load_manifest(spec, directory)
        upstream = upstream_mod.Upstream(
            spec.image_id, spec.origin, spec.peers, self.client, self.url,
            max_redirects=self.max_redirects,
            retry_interval=self.retry_interval,
            retry_max_interval=self.retry_max_interval,
            max_peers=self.max_peers, stripes=self.stripes,
            fanout=self.max_children)
        entry.manifest_bytes = manifest.to_bytes()
        entry.cache = image_cache.ImageCache(
            directory, spec.image_id, manifest, upstream,
            verify_persisted=self.verify_persisted,
            commit_interval=self.commit_interval,
            read_retry=self.read_retry)

    def _load_manifest(self, spec, directory):
        local = os.path.join(directory, MANIFEST_FILE)
        errors = []
        try:
            with open(local, 'rb') as f:
                return manifest_mod.load_verified(f.read(),
                                                  spec.manifest_digest)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            errors.append('local copy: %s' % e)
        manifest = None
        if spec.origin is not None:
            try:
                manifest = self._origin_manifest(spec)
            except (IOError, sources.ManifestError) as e:
                errors.append('%s: %s' % (spec.origin.name, e))
        for url in spec.peers if manifest is None else ():
            if url == self.url:
                continue
            try:
                manifest = self.client.get_manifest(
                    url, spec.image_id, spec.manifest_digest,
                    spec.manifest_length, spec.manifest_offset)
                break
            except (IOError, sources.ManifestError) as e:
                errors.append('peer %s: %s' % (url, e))
        if manifest is None:
            raise sources.ManifestError(
                'no verified manifest for image %s (%s)'
                % (spec.image_id, '; '.join(errors) or 'no origin, no peers'))
        fsutil.write_atomic(local, manifest.to_bytes())
        return manifest

    @staticmethod
    def _origin_manifest(spec):
        """The manifest read from the image-volume, where it must be."""
        manifest = sources.load_manifest(
            spec.origin.read, spec.manifest_digest, spec.manifest_offset,
            spec.manifest_length)
        if spec.image_size not in (None, manifest.image_size) or (
                manifest_mod.volume_offset(manifest.image_size) !=
                spec.manifest_offset):
            raise sources.ManifestError(
                'the manifest does not describe the image whose end its '
                'offset marks')
        return manifest

    @contextlib.contextmanager
    def using(self, image_id, reopen=True):
        """The image's cache, pinned (not evicted) while in use."""
        cache = self._pinned(image_id, reopen)
        try:
            yield cache
        finally:
            cache.unpin()

    def _pinned(self, image_id, reopen=True):
        while True:
            cache = self.cache(image_id, reopen)
            if cache.pin():
                return cache
            time.sleep(0.001)  # being evicted: the next one is new

    # -- eviction -----------------------------------------------------------

    def entries(self):
        """{image id: ImageEntry} of the registered images."""
        with self._lock:
            return dict(self._images)

    def cache_dirs(self, exclude=()):
        """{image id: directory} of the caches (:func:`cache_dirs`)."""
        return cache_dirs(self.cache_dir, exclude)

    def evict(self, image_id, in_use=None, forget=False):
        """Remove an image's cache from this node.

        :param in_use: callable(image_id) -> why the image must stay (its
            volumes) or None; asked under the image's lock.
        :param forget: unregister the image too; only if it is still
            marked gone (see :meth:`mark_gone`) under its lock.
        :raises ImageBusy: if it is in use or its cache busy, or registered
            again when ``forget`` is set.
        :returns: the bytes the cache took on disk.
        """
        entry = self._entry(image_id)
        if entry is None:
            with self._lock:
                if image_id not in self._images:
                    return self._remove_dir(image_id)
            return self.evict(image_id, in_use, forget)
        with entry.lock:
            reason = in_use(image_id) if in_use is not None else None
            if forget and entry.gone is None:
                reason = 'registered again'
            if reason is None:
                reason = entry.serving()
            cache = entry.cache
            if reason is None and cache is not None:
                reason = cache.retire()
            if reason is not None:
                raise ImageBusy('image %s is in use: %s' % (image_id, reason))
            entry.cache = None
            entry.manifest_bytes = None
            entry.evicted = True
            if cache is not None:
                cache.close()
            freed = self._remove_dir(image_id)
        if forget:
            with self._lock:
                if self._images.get(image_id) is entry:
                    del self._images[image_id]
            if entry.spec.origin is not None:
                entry.spec.origin.close()
        return freed

    def _remove_dir(self, image_id):
        """Rename the cache directory away, then delete it; its bytes."""
        directory = os.path.join(self.cache_dir, image_id)
        trash = os.path.join(self.cache_dir, '%s%s.%s' % (
            EVICTED_PREFIX, image_id, uuid.uuid4().hex[:8]))
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return 0
        fsutil.fsync_dir(self.cache_dir)
        freed = disk_usage(trash)
        shutil.rmtree(trash, ignore_errors=True)
        fsutil.fsync_dir(self.cache_dir)
        return freed

    def remove_trash(self):
        """Delete what an eviction interrupted by a crash left."""
        for name in os.listdir(self.cache_dir):
            if name.startswith(EVICTED_PREFIX):
                shutil.rmtree(os.path.join(self.cache_dir, name),
                              ignore_errors=True)

    # -- local reads --------------------------------------------------------

    def read_image(self, image_id, offset, length):
        """Bytes of a registered image (fetching missing chunks)."""
        with self.using(image_id) as cache:
            return cache.read(offset, length)

    def image_size(self, image_id):
        return self.cache(image_id).manifest.image_size

    def set_peers(self, image_id, peers):
        """Replace the peers an activated image is fetched from."""
        entry = self._entry(image_id)
        if entry is None:
            raise KeyError(image_id)
        peers = tuple(protocol.normalize_url(p) for p in peers)
        with entry.lock:
            if entry.cache is not None:
                entry.cache.upstream.set_peers(peers)

    # -- peer requests ------------------------------------------------------

    def serve_manifest(self, peer, image_id):
        try:
            self.cache(image_id, reopen=False)
        except KeyError:
            return reply_mod.error(404, 'unknown image')
        except sources.ManifestError:
            return reply_mod.error(503, 'manifest not available')
        entry = self._entry(image_id)
        manifest = entry.manifest_bytes if entry is not None else None
        if manifest is None:  # evicted meanwhile
            return reply_mod.error(404, 'image not cached here')
        return reply_mod.Reply(
            200, [('Content-Type', 'application/octet-stream')], manifest)

    def serve_chunk(self, peer, image_id, index, range_header=None,
                    looped=False):
        """The answer to an authenticated chunk request.

        ``looped``: the peer was redirected round a cycle of full nodes
        (``X-Thunder-Looped``); it is served even if the fan-out is full.
        """
        entry = self._entry(image_id)
        if entry is None:
            return reply_mod.error(404, 'unknown image')
        try:
            cache = self._pinned(image_id, reopen=False)
        except KeyError:
            return reply_mod.error(404, 'image not cached here')
        except sources.ManifestError:
            return reply_mod.error(503, 'manifest not available')
        return _held(cache, self._serve_chunk, entry, cache, peer, image_id,
                     index, range_header, looped)

    def _serve_chunk(self, entry, cache, peer, image_id, index,
                     range_header, looped):
        if index >= cache.manifest.chunk_count:
            return reply_mod.error(404, 'no such chunk')
        waiting = peer.via + (peer.url,)
        if self.url in waiting:
            self.counters.inc('loops_refused')
            return reply_mod.error(508, 'request came back to this node')
        admission = entry.children.admit(peer.node_id, peer.url, index)
        if not admission.serve:
            if looped:
                self.counters.inc('loop_admissions')
            else:
                self.counters.inc('redirects_sent')
                location = admission.redirect_url + protocol.chunk_path(
                    image_id, index)
                return reply_mod.Reply(307, [('Location', location)])
        if not cache.has(index):
            if len(waiting) >= protocol.MAX_HOPS:
                self.counters.inc('loops_refused')
                return reply_mod.error(508, 'relayed through too many nodes')
            if self._relays is not None and range_header is None:
                return self._relay_reply(cache, peer, image_id, index,
                                         waiting)
            try:
                cache.ensure(index, via=waiting,
                             timeout=self.relay_timeout, ticket=peer.ticket)
            except image_cache.LoopError:
                self.counters.inc('loops_refused')
                return reply_mod.error(508,
                                       'fetch in flight from the requester')
            except image_cache.FetchError as e:
                self.counters.inc('relay_failures')
                LOG.info('Image %s: cannot serve chunk %d to %s: %s',
                         image_id, index, peer.node_id, e)
                return reply_mod.error(503, 'chunk not available')
        return self._chunk_reply(cache, index, range_header, local=False)

    def _relay_reply(self, cache, peer, image_id, index, waiting):
        """A chunk this node does not hold, sent as its fetch receives it.

        Waits up to ``relay_timeout`` for the first bytes (503 if none
        come); the rest follows as it arrives, the last byte once this
        node verified the chunk (see :mod:`thunder_cache.cache.chunkstream`).
        """
        try:
            stream = cache.relay(index, waiting, peer.ticket,
                                 self._relays.submit)
        except image_cache.LoopError:
            self.counters.inc('loops_refused')
            return reply_mod.error(508, 'fetch in flight from the requester')
        except (image_cache.FetchError, RuntimeError) as e:
            # RuntimeError: the relay threads are shut down (closing).
            self.counters.inc('relay_failures')
            LOG.info('Image %s: cannot serve chunk %d to %s: %s',
                     image_id, index, peer.node_id, e)
            return reply_mod.error(503, 'chunk not available')
        if stream is None:
            return self._chunk_reply(cache, index, None, local=False)
        reader = chunkstream.Reader(stream)
        try:
            reader.start(time.monotonic() + self.relay_timeout)
        except chunkstream.Broken as e:
            if cache.has(index):  # brought by another fetch meanwhile
                return self._chunk_reply(cache, index, None, local=False)
            self.counters.inc('relay_failures')
            LOG.info('Image %s: cannot serve chunk %d to %s: %s',
                     image_id, index, peer.node_id, e)
            return reply_mod.error(503, 'chunk not available')
        self.counters.inc('relays_streamed')
        length = reader.length
        node_counters = self.counters

        def sent(count):
            cache.counters.inc('bytes_served_to_peers', count)
            node_counters.inc('upload_bytes', count)
            if count == length:
                cache.counters.inc('chunks_served_to_peers')
            else:
                node_counters.inc('relays_cut')

        return reply_mod.Reply(
            200, [('Content-Type', 'application/octet-stream')],
            stream=reader, on_sent=sent)

    def serve_local(self, image_id, index, range_header=None):
        """The answer to a local reader's chunk request."""
        try:
            cache = self._pinned(image_id)
        except KeyError:
            return reply_mod.error(404, 'unknown image')
        except sources.ManifestError:
            return reply_mod.error(503, 'manifest not available')
        return _held(cache, self._serve_local, cache, image_id, index,
                     range_header)

    def _serve_local(self, cache, image_id, index, range_header):
        if index >= cache.manifest.chunk_count:
            return reply_mod.error(404, 'no such chunk')
        try:
            cache.ensure(index)
        except image_cache.FetchError as e:
            LOG.warning('Image %s: local read of chunk %d failed: %s',
                        image_id, index, e)
            return reply_mod.error(503, 'chunk not available')
        return self._chunk_reply(cache, index, range_header, local=True)

    def _chunk_reply(self, cache, index, range_header, local):
        cache.last_used = time.time()
        offset, length = cache.manifest.chunk_range(index)
        status = 200
        headers = [('Content-Type', 'application/octet-stream')]
        if range_header is not None:
            start, end = protocol.parse_range(range_header, length)
            headers.append(('Content-Range', 'bytes %d-%d/%d'
                            % (start, end - 1, length)))
            offset, length, status = offset + start, end - start, 206
        whole = status == 200

        def sent(count):
            if local:
                cache.counters.inc('bytes_served_local', count)
                return
            cache.counters.inc('bytes_served_to_peers', count)
            if whole and count == length:
                cache.counters.inc('chunks_served_to_peers')
            self.counters.inc('upload_bytes', count)

        return reply_mod.Reply(status, headers,
                               span=(cache.fileno, offset, length),
                               on_sent=sent)

    # -- metrics ------------------------------------------------------------

    def metrics_text(self):
        page = metrics.Exposition()
        node = {'node': self.node_id}
        for name, value in self.counters.snapshot().items():
            page.add('thunder_cache_%s_total' % name, 'counter',
                     NODE_COUNTERS[name], value, node)
        for status, value in sorted(self.responses.snapshot().items()):
            if value:
                page.add('thunder_cache_responses_total', 'counter',
                         'Responses sent, by HTTP status.', value,
                         dict(node, status=status))
        page.add('thunder_cache_upload_throttled_seconds_total', 'counter',
                 'Seconds uploads waited for the upload rate limit.',
                 self.bucket.waited, node)
        for hook in self.metrics_hooks:
            hook(page, node)
        with self._lock:
            entries = sorted(self._images.items())
        for image_id, entry in entries:
            labels = dict(node, image=image_id)
            page.add('thunder_cache_children', 'gauge',
                     'Child nodes served for the image.',
                     len(entry.children.children()), labels)
            cache = entry.cache
            if cache is None:
                continue
            snap = cache.counters.snapshot()
            for name, value in snap.items():
                page.add('thunder_cache_%s_total' % name, 'counter',
                         metrics.IMAGE_COUNTERS[name], value, labels)
            reads = snap['chunk_hits'] + snap['chunk_misses'] + snap[
                'inflight_joins']
            page.add('thunder_cache_hit_ratio', 'gauge',
                     'Chunk reads served from the cache over all chunk '
                     'reads.', (snap['chunk_hits'] / reads) if reads else 0.0,
                     labels)
            page.add('thunder_cache_chunks_present', 'gauge',
                     'Chunks of the image held by this node.',
                     cache.present_count(), labels)
            page.add('thunder_cache_chunks', 'gauge',
                     'Chunks of the image.', cache.manifest.chunk_count,
                     labels)
            for kind, histogram in sorted(cache.fetch_latency.items()):
                page.add_histogram(
                    'thunder_cache_fetch_seconds',
                    'Time to fetch and verify one chunk, by source kind.',
                    histogram, dict(labels, source=kind))
        return page.render()

    # -- lifecycle ----------------------------------------------------------

    def close(self):
        if self._relays is not None:
            # Running fetches end with their deadlines or the caches.
            self._relays.shutdown(wait=False)
        with self._lock:
            entries = list(self._images.values())
        for entry in entries:
            with entry.lock:
                if entry.cache is not None:
                    entry.cache.close()
                    entry.cache = None
                if entry.spec.origin is not None:
                    entry.spec.origin.close()
        self.client.close()
