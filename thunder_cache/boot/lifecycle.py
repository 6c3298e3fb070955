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

"""What a node does with an image once it holds its cache.

When an image's cache opens (:attr:`thunder_cache.cache.node.Node.on_activate`)
the node

* advertises itself as a holder of the image in the image-volume's Cinder
  metadata (:mod:`thunder_cache.peer.advertise`), when ``[advertise]`` is on;
* replays the image's boot trace ahead of the guest when one is published
  (:class:`thunder_cache.boot.prefetch.Prefetcher`), or else records the
  trace of this first boot (:class:`thunder_cache.boot.trace.TraceRecorder`)
  and, once recorded, publishes it next to the peer records (first
  publisher wins; as much of it as fits the metadata,
  :func:`thunder_cache.boot.trace.encode_prefix`) and keeps a copy in the
  image's cache directory;
* optionally hydrates the whole image in the background.

The Cinder calls (advertise, read the peers and the published trace) run
in a thread of their own: the read that opened the cache (after a restart,
a guest's) waits for them at most :data:`ACTIVATION_WAIT` seconds, and
records its boot meanwhile (the recording is dropped if a published trace
turns up).

A periodic tick publishes finished traces and refreshes each image's peer
list from the advertisements, so nodes that arrive later are found. An
image-volume that Cinder answers 404 for at :data:`GONE_AFTER` refreshes
in a row marks its image gone (deleted in Glance,
:meth:`thunder_cache.cache.node.Node.mark_gone`); the evictor removes it once
no volume uses it and calls :meth:`ImageLifecycle.forget`, which stops its
prefetch and withdraws its advertisement (as after any eviction).
"""

import logging
import os
import threading

from thunder_cache.boot import prefetch
from thunder_cache.boot import trace as trace_mod
from thunder_cache.peer.advertise import cinder as cinder_records

LOG = logging.getLogger(__name__)

TRACE_FILE = 'trace'
#: Seconds the read that opened an image waits for the Cinder calls of its
#: activation (peers found before the first fetch); they go on behind it.
ACTIVATION_WAIT = 5.0
#: Refreshes in a row that must find the image-volume gone (404).
GONE_AFTER = 2


class _Image:

    def __init__(self, spec, cache):
        self.spec = spec
        self.cache = cache
        self.recorder = None
        self.prefetcher = None
        self.hydrator = None
        self.published = False
        # Refreshes in a row that found the image-volume gone.
        self.missing = 0


class ImageLifecycle:
    """Advertisement, boot traces and hydration of a node's images.

    :param node: the :class:`~thunder_cache.cache.node.Node`.
    :param conf: the ``[prefetch]`` option group.
    :param advertiser: an
        :class:`~thunder_cache.peer.advertise.advertiser.Advertiser`,
        or None when ``[advertise]`` is off (traces are then kept on this
        node only).
    :param interval: seconds between ticks.
    :param activation_wait: seconds :meth:`activated` waits for Cinder.
    """

    def __init__(self, node, conf, advertiser=None, interval=5.0,
                 activation_wait=ACTIVATION_WAIT):
        self.node = node
        self.conf = conf
        self.advertiser = advertiser
        self.interval = interval
        self.activation_wait = activation_wait
        self._images = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # -- activation -------------------------------------------------------

    def activated(self, spec, cache):
        """Start what an image needs; :attr:`Node.on_activate`."""
        state = _Image(spec, cache)
        with self._lock:
            if spec.image_id in self._images or self._stop.is_set():
                return
            self._images[spec.image_id] = state
        if not cache.complete():
            if self.conf.record:
                state.recorder = trace_mod.TraceRecorder(
                    cache.manifest.chunk_count,
                    window=self.conf.record_window,
                    max_chunks=self.conf.record_max_chunks)
                cache.observer = state.recorder.touch
            if self.conf.hydrate:
                state.hydrator = prefetch.Hydrator(
                    cache, prefetch.hydrate_rate_bytes(self.conf),
                    self.conf.hydrate_delay,
                    demand_allowance=self.conf.demand_allowance)
                state.hydrator.start()
        worker = threading.Thread(target=self._settle, args=(state,),
                                  daemon=True,
                                  name='activate-%s' % spec.image_id[:16])
        worker.start()
        worker.join(self.activation_wait)
        if worker.is_alive():
            LOG.warning('Image %s: Cinder has not answered in %.0f s; its '
                        'advertisement and boot trace go on in the '
                        'background', spec.image_id, self.activation_wait)

    def _settle(self, state):
        """The Cinder side of an activation: advertise, peers, trace."""
        spec, cache = state.spec, state.cache
        try:
            volume_id = spec.origin_volume_id
            if self.advertiser is not None and volume_id:
                self.advertiser.advertise(volume_id)
                self._refresh_peers(state)
            if cache.complete():
                return
            indexes = self._known_trace(state) if self.conf.replay else None
            if not indexes:
                if state.recorder is not None:
                    LOG.info('Image %s: no boot trace yet; recording this '
                             'one', spec.image_id)
                return
            if state.recorder is not None:
                cache.observer = None
                state.recorder = None
            LOG.info('Image %s: replaying a boot trace of %d chunks',
                     spec.image_id, len(indexes))
            state.prefetcher = prefetch.Prefetcher(
                cache, indexes, concurrency=self.conf.replay_concurrency,
                demand_allowance=self.conf.demand_allowance)
            if self._stop.is_set():
                return
            state.prefetcher.start()
        except Exception:
            LOG.exception('Image %s: activation failed', spec.image_id)

    def _trace_path(self, state):
        return os.path.join(state.cache.directory, TRACE_FILE)

    def _known_trace(self, state):
        """The image's published (else locally kept) trace, decoded."""
        chunk_count = state.cache.manifest.chunk_count
        text = None
        volume_id = state.spec.origin_volume_id
        if self.advertiser is not None and volume_id:
            try:
                text = trace_mod.from_metadata(
                    self.advertiser.records.get_metadata(volume_id))
            except (cinder_records.RecordsError, ValueError) as e:
                LOG.warning('Image %s: cannot read its boot trace: %s',
                            state.spec.image_id, e)
        if text is None:
            try:
                with open(self._trace_path(state)) as f:
                    text = f.read(1024 * 1024)
            except OSError:
                return None
        try:
            return trace_mod.decode(text, chunk_count)
        except ValueError as e:
            LOG.warning('Image %s: ignoring a malformed boot trace: %s',
                        state.spec.image_id, e)
            return None

    # -- the tick ---------------------------------------------------------

    def tick(self):
        with self._lock:
            images = list(self._images.values())
        for state in images:
            recorder = state.recorder
            if recorder is not None and recorder.done and \
                    not state.published:
                state.cache.observer = None
                self._publish(state, recorder.indexes())
            if self.advertiser is not None and state.spec.origin_volume_id:
                self._refresh_peers(state)

    def _publish(self, state, indexes):
        image_id = state.spec.image_id
        if not indexes:
            state.published = True
            return
        text, kept = trace_mod.encode_prefix(indexes)
        recorded = len(set(indexes))
        if kept < recorded:
            LOG.warning('Image %s: keeping the first %d of the %d chunks '
                        'of its boot trace: a trace names at most %d '
                        'chunks in the %d Cinder metadata values of a '
                        'trace (%d characters)', image_id, kept, recorded,
                        trace_mod.MAX_TRACE_CHUNKS, trace_mod.MAX_PARTS,
                        trace_mod.MAX_TEXT_LENGTH)
        path = self._trace_path(state)
        try:
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.write(text)
            os.rename(tmp, path)
        except OSError as e:
            LOG.warning('Image %s: cannot keep its boot trace: %s',
                        image_id, e)
        volume_id = state.spec.origin_volume_id
        if self.advertiser is not None and volume_id:
            records = self.advertiser.records
            try:
                try:
                    published = trace_mod.from_metadata(
                        records.get_metadata(volume_id))
                except ValueError as e:
                    # A torn or forged set: ours replaces it.
                    LOG.warning('Image %s: replacing a malformed boot '
                                'trace: %s', image_id, e)
                    published = None
                if published is None:
                    records.set_metadata(volume_id,
                                         trace_mod.to_metadata(text))
                    LOG.info('Image %s: published a boot trace of %d '
                             'chunks', image_id, kept)
                else:
                    LOG.info('Image %s: a boot trace is already published',
                             image_id)
            except cinder_records.RecordsError as e:
                LOG.warning('Image %s: cannot publish its boot trace '
                            '(retried): %s', image_id, e)
                return
        state.published = True

    def _refresh_peers(self, state):
        volume_id = state.spec.origin_volume_id
        try:
            advertised = self.advertiser.peers(volume_id, include_self=True)
        except cinder_records.VolumeGone:
            state.missing += 1
            if state.missing >= GONE_AFTER:
                self.node.mark_gone(state.spec.image_id, 'its image-volume '
                                    '%s was deleted' % volume_id)
            return
        state.missing = 0
        peers = list(state.spec.peers)
        peers += [url for url in advertised if url not in peers]
        try:
            self.node.set_peers(state.spec.image_id, peers)
        except (KeyError, ValueError) as e:
            LOG.warning('Image %s: cannot update its peers: %s',
                        state.spec.image_id, e)

    # -- eviction ---------------------------------------------------------

    def forget(self, image_id):
        """The image's cache was evicted: stop its work, withdraw it."""
        with self._lock:
            state = self._images.pop(image_id, None)
        if state is None:
            return
        state.cache.observer = None
        for worker in (state.prefetcher, state.hydrator):
            if worker is not None:
                worker.stop()
        volume_id = state.spec.origin_volume_id
        if self.advertiser is not None and volume_id:
            if self.advertiser.withdraw(volume_id):
                LOG.info('Image %s: withdrew this node\'s advertisement '
                         'from volume %s', image_id, volume_id)

    def trace_state(self, image_id):
        """The image's boot trace here: what the node does with it, or None.

        ``recording`` (this boot), ``recorded`` (published or kept),
        ``replaying`` or ``replayed`` (a published trace), ``none``.
        """
        with self._lock:
            state = self._images.get(image_id)
        if state is None:
            return None
        if state.prefetcher is not None:
            return 'replayed' if state.prefetcher.done else 'replaying'
        if state.published:
            return 'recorded'
        if state.recorder is not None:
            return 'recording'
        return 'none'

    def volume_gone(self, volume_id):
        """True if Cinder says the image-volume does not exist."""
        if self.advertiser is None:
            return False
        try:
            self.advertiser.records.get_volume(volume_id)
        except cinder_records.VolumeGone:
            return True
        except cinder_records.RecordsError as e:
            LOG.debug('Cannot check volume %s: %s', volume_id, e)
        return False

    # -- thread -----------------------------------------------------------

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:
                LOG.exception('Image lifecycle tick failed')

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='image-lifecycle')
        self._thread.start()

    def stop(self):
        """Stop prefetching and hydrating; withdraw advertisements."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
        with self._lock:
            images = list(self._images.values())
        for state in images:
            for worker in (state.prefetcher, state.hydrator):
                if worker is not None:
                    worker.stop()
        if self.advertiser is not None:
            self.advertiser.stop(withdraw=True)
