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

"""A bounded node cache: which images leave it, and when.

Every ``[cache] check_interval`` seconds (and at once when a fetch finds
the cache filesystem full) the :class:`Evictor` adds up the bytes the
image caches take on disk. Over the limit (``max_size`` bytes and/or
``max_size_percent`` of the filesystem, the lower one), it evicts images,
least recently used first, until they take at most ``low_water_percent``
of the limit. Disk full, it evicts the same way as if the limit were just
below what the caches take now, sparing the images whose fetches found it
full (evicting them would only fetch them again).

Never evicted: an image a volume of this node reads (a layer reads its
image for every block it has not written; snapshots are volumes too), one
with a fetch in flight (a read, a prefetch or hydration), one a peer
transfer or a local reader holds (:meth:`ImageCache.pin`), and one peers
are fetching from this node (a child node of its fan-out table, which
holds a child ``[peer] child_ttl`` seconds after its last request).

The last use is a plain store per read in memory
(:attr:`ImageCache.last_used`), saved here as the mtime of the image's
``last_used`` file at most once per check, so the order survives a
restart.

An image deleted in Glance (its image-volume gone from Cinder, or its
descriptor removed before a SIGHUP) is marked gone
(:meth:`Node.mark_gone`); once no volume uses it, its cache, descriptor,
registration and advertisement are removed.

An eviction withdraws the node's advertisement of the image and is
logged; :meth:`Evictor.evict` is also what ``thunder-cache-manage image
evict`` asks for over the control socket.
"""

import collections
import logging
import os
import threading
import time

from oslo_config import cfg

from thunder_cache.cache import node as node_mod
from thunder_cache import metrics

LOG = logging.getLogger(__name__)

#: The file whose mtime is an image's last use (see the module's doc).
STAMP_FILE = 'last_used'
#: Seconds between checks, in Cinder, of images registered but not opened
#: since the start (opened ones are checked at every peer refresh).
GONE_CHECK_INTERVAL = 300.0

opts = [
    cfg.IntOpt('max_size', default=0, min=0,
               help='Bytes the image caches of this node may take on disk. '
                    'Beyond, the least recently used images no volume '
                    'depends on are evicted. 0: no limit in bytes.'),
    cfg.IntOpt('max_size_percent', default=0, min=0, max=100,
               help='Share, in percent of the size of the cache_dir '
                    'filesystem, the image caches may take. 0: no share. '
                    'With max_size too, the lower limit applies.'),
    cfg.IntOpt('low_water_percent', default=90, min=1, max=100,
               help='Eviction stops once the caches take at most this '
                    'percentage of the limit, so that the next fetches do '
                    'not start it again at once.'),
    cfg.FloatOpt('check_interval', default=10.0, min=0.1,
                 help='Seconds between checks of the caches\' size and of '
                      'images to remove. A fetch that finds the cache '
                      'filesystem full starts a check at once.'),
]

COUNTERS = {
    'images_evicted': 'Image caches evicted (size limit, disk full, '
                      'image gone or operator).',
    'bytes_evicted': 'Bytes on disk freed by evictions.',
    'evictions_refused': 'Evictions refused because the image was in use.',
    'cache_full_events': 'Checks started because a fetch found the cache '
                         'filesystem full.',
}

Candidate = collections.namedtuple('Candidate',
                                   'image_id size last_used busy')


def plan(candidates, limit, low_water_percent):
    """The candidates to evict, least recently used first.

    Nothing unless the candidates take more than ``limit`` bytes (0: no
    limit); then the idle ones (``busy`` None), oldest ``last_used``
    first, until what is left takes at most ``low_water_percent`` of the
    limit or no idle one is left.
    """
    used = sum(c.size for c in candidates)
    if not limit or used <= limit:
        return []
    target = limit * low_water_percent // 100
    victims = []
    for candidate in sorted((c for c in candidates if c.busy is None),
                            key=lambda c: (c.last_used, c.image_id)):
        if used <= target:
            break
        victims.append(candidate)
        used -= candidate.size
    return victims


def last_used(directory):
    """Unix time an image cache was last used (its stamp, else its map)."""
    for name in (STAMP_FILE, 'chunkmap', ''):
        try:
            return os.stat(os.path.join(directory, name)).st_mtime
        except OSError:
            continue
    return 0.0


def save_last_used(directory, when):
    """Record ``when`` as the stamp's mtime, if it moved on."""
    path = os.path.join(directory, STAMP_FILE)
    try:
        if os.stat(path).st_mtime >= when:
            return
    except FileNotFoundError:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            return
    except OSError:
        return
    try:
        os.utime(path, (when, when))
    except OSError:
        pass


class Evictor:
    """Keeps the node's caches under their limit; removes gone images.

    :param node: the :class:`~thunder_cache.cache.node.Node`.
    :param conf: the ``[cache]`` option group.
    :param in_use: callable(image_id) -> why the image must stay (the
        volumes reading it) or None.
    :param forget: callable(image_id) called after an eviction: stops the
        image's prefetch and withdraws its advertisement.
    :param volume_gone: callable(volume_id) -> True if the image-volume
        was deleted (checked for images not opened since the start).
    :param descriptors_dir: where a gone image's descriptor is removed.
    :param exclude: directories under ``cache_dir`` that are no cache.
    """

    def __init__(self, node, conf, in_use=None, forget=None,
                 volume_gone=None, descriptors_dir=None, exclude=()):
        self.node = node
        self.max_size = conf.max_size
        self.max_size_percent = conf.max_size_percent
        self.low_water_percent = conf.low_water_percent
        self.interval = conf.check_interval
        self.in_use = in_use
        self.forget = forget
        self.volume_gone = volume_gone
        self.descriptors_dir = descriptors_dir
        self.exclude = tuple(exclude)
        self.counters = metrics.Counters(COUNTERS)
        self.used = 0
        # Images whose fetches found the filesystem full since the last
        # check; None: not full.
        self._full = None
        self._checked_gone = 0.0
        # Whether "over the limit, nothing to evict" was logged.
        self._over_logged = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    def limit(self):
        """The caches' limit in bytes now (0: none)."""
        limits = [self.max_size] if self.max_size else []
        if self.max_size_percent:
            st = os.statvfs(self.node.cache_dir)
            limits.append(st.f_blocks * st.f_frsize *
                          self.max_size_percent // 100)
        return min(limits) if limits else 0

    # -- what is there ------------------------------------------------------

    def _busy(self, image_id, entry):
        reason = self.in_use(image_id) if self.in_use is not None else None
        if reason is None and entry is not None:
            reason = entry.serving()
            if reason is None and entry.cache is not None:
                reason = entry.cache.busy()
        return reason

    def candidates(self):
        """A :class:`Candidate` per image cache on disk."""
        entries = self.node.entries()
        result = []
        for image_id, path in sorted(self.node.cache_dirs(
                self.exclude).items()):
            entry = entries.get(image_id)
            cache = entry.cache if entry is not None else None
            if cache is not None:
                save_last_used(path, cache.last_used)
                used_at = cache.last_used
            else:
                used_at = last_used(path)
            result.append(Candidate(image_id, node_mod.disk_usage(path),
                                    used_at, self._busy(image_id, entry)))
        return result

    # -- evicting -----------------------------------------------------------

    def evict(self, image_id, why, gone=False, withdraw=True):
        """Evict one image now (see :meth:`Node.evict`); bytes freed.

        :param withdraw: call ``forget`` now (Cinder requests); False
            leaves it to the caller, who evicts more first.
        :raises node.ImageBusy: if it is in use.
        """
        with self._lock:
            try:
                freed = self.node.evict(image_id, in_use=self.in_use,
                                        forget=gone)
            except node_mod.ImageBusy:
                self.counters.inc('evictions_refused')
                raise
            if gone and self.descriptors_dir:
                try:
                    os.unlink(os.path.join(self.descriptors_dir,
                                           image_id + '.json'))
                except FileNotFoundError:
                    pass
        self.counters.inc('images_evicted')
        self.counters.inc('bytes_evicted', freed)
        LOG.info('Evicted image %s (%d bytes on disk): %s', image_id, freed,
                 why)
        if withdraw:
            self._forget([image_id])
        return freed

    def _forget(self, image_ids):
        for image_id in image_ids if self.forget is not None else ():
            try:
                self.forget(image_id)
            except Exception:
                LOG.exception('Image %s: withdrawing it after its eviction '
                              'failed', image_id)

    def check(self):
        """Remove gone images, then evict down to the limit; evicted ids.

        The space first: advertisements are withdrawn after the evictions.
        """
        full, self._full = self._full, None
        evicted = self._remove_gone()
        candidates = [c for c in self.candidates()
                      if c.image_id not in evicted]
        self.used = sum(c.size for c in candidates)
        limit = self.limit()
        why = 'the caches take %d bytes, over the limit of %d' % (
            self.used, limit)
        if full is not None and self.used and not (limit and
                                                   limit < self.used):
            limit = self.used - 1
            why = 'the cache filesystem is full'
            candidates = [c._replace(busy=c.busy or 'being fetched')
                          if c.image_id in full else c for c in candidates]
        for victim in plan(candidates, limit, self.low_water_percent):
            try:
                self.used -= self.evict(victim.image_id, why, withdraw=False)
                evicted.append(victim.image_id)
            except node_mod.ImageBusy as e:
                LOG.info('Not evicting image %s: %s', victim.image_id, e)
        self._forget(evicted)
        self._log_over(limit if full is None else 0)
        return evicted

    def _log_over(self, limit):
        """Warn once while in-use images keep the caches over the limit."""
        over = bool(limit) and self.used > limit
        if over and not self._over_logged:
            LOG.warning('The image caches take %d bytes, over the limit of '
                        '%d, and the images left are in use: they stay',
                        self.used, limit)
        elif not over and self._over_logged:
            LOG.info('The image caches are within their limit again')
        self._over_logged = over

    def _remove_gone(self):
        self._note_gone()
        removed = []
        for image_id, entry in sorted(self.node.entries().items()):
            if entry.gone is None:
                continue
            try:
                self.evict(image_id, 'deleted in Glance: %s' % entry.gone,
                           gone=True, withdraw=False)
                removed.append(image_id)
            except node_mod.ImageBusy as e:
                LOG.debug('Keeping gone image %s: %s', image_id, e)
        return removed

    def _note_gone(self):
        """Ask Cinder about images registered but not opened (slowly)."""
        now = time.monotonic()
        if self.volume_gone is None or (
                self._checked_gone and
                now - self._checked_gone < GONE_CHECK_INTERVAL):
            return
        self._checked_gone = now
        for image_id, entry in self.node.entries().items():
            volume_id = entry.spec.origin_volume_id
            if entry.cache is None and entry.gone is None and volume_id:
                if self.volume_gone(volume_id):
                    self.node.mark_gone(image_id, 'its image-volume %s was '
                                        'deleted' % volume_id)

    # -- thread -------------------------------------------------------------

    def cache_full(self, cache=None):
        """A fetch found the filesystem full: check now (never blocks)."""
        self.counters.inc('cache_full_events')
        full = self._full or set()
        if cache is not None:
            full.add(cache.image_id)
        self._full = full
        self._wake.set()

    def _run(self):
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:
                LOG.exception('Checking the image caches failed')

    def start(self):
        self.node.remove_trash()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='cache-evictor')
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    # -- metrics ------------------------------------------------------------

    def add_metrics(self, page, labels):
        for name, value in self.counters.snapshot().items():
            page.add('thunder_cache_%s_total' % name, 'counter',
                     COUNTERS[name], value, labels)
        page.add('thunder_cache_cache_bytes', 'gauge',
                 'Bytes the image caches took on disk at the last check.',
                 self.used, labels)
        page.add('thunder_cache_cache_limit_bytes', 'gauge',
                 'The caches\' limit in bytes (0: none).', self.limit(),
                 labels)
