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

"""The advertiser: a thread keeping this node's advertisements alive.

See :mod:`thunder_cache.peer.advertise.records` for what it writes.
"""

import logging
import threading
import time
import typing

from thunder_cache.peer.advertise import cinder
from thunder_cache.peer.advertise import records as records_mod
from thunder_cache.peer import protocol

LOG = logging.getLogger(__name__)


class _Advert:
    def __init__(self, since: int) -> None:
        self.since = since
        # Whether the record was read once, to adopt our unexpired item.
        self.read = False
        self.failing = False


class Advertiser:
    """Keeps this node's advertisements alive in Cinder."""

    def __init__(self, records: cinder.CinderRecords, node_id: str, url: str,
                 ttl: int = 300, refresh_interval: float = 100,
                 clock: typing.Callable[[], float] = time.time) -> None:
        if not 0 < refresh_interval < ttl:
            raise ValueError('refresh_interval (%s) must be positive and '
                             'less than ttl (%s)' % (refresh_interval, ttl))
        if ttl > records_mod.MAX_TTL:
            raise ValueError('ttl longer than %d s' % records_mod.MAX_TTL)
        self.records = records
        self.node_id = node_id
        self.key = records_mod.peer_key(node_id)
        self.url = protocol.normalize_url(url)
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.clock = clock
        self._adverts: typing.Dict[str, _Advert] = {}
        self._warned: typing.Set[int] = set()
        self._lock = threading.Lock()
        # Serialises our writes and deletes, so that a withdraw is never
        # followed by a refresh's write of the same item.
        self._io_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: typing.Optional[threading.Thread] = None

    @property
    def volumes(self) -> typing.List[str]:
        """Ids of the image-volumes this node advertises itself on."""
        with self._lock:
            return sorted(self._adverts)

    def advertise(self, volume_id: str) -> None:
        """Advertise this node for the image of this image-volume now.

        Cinder errors are logged; the write is retried at every refresh.
        """
        volume_id = cinder.check_volume_id(volume_id)
        with self._lock:
            advert = self._adverts.get(volume_id)
            if advert is None:
                advert = self._adverts[volume_id] = _Advert(int(self.clock()))
            elif advert.read and not advert.failing:
                return
        self._write(volume_id)

    def _adopt(self, volume_id: str, advert: _Advert) -> None:
        """Keep the ``since`` of our own unexpired item, if there is one."""
        value = self.records.get_metadata(volume_id).get(self.key)
        advert.read = True
        if value is None:
            return
        try:
            url, since, expires = records_mod.parse_peer_value(value)
        except ValueError:
            return
        now = self.clock()
        if url == self.url and now < expires <= now + records_mod.MAX_TTL and \
                since < advert.since:
            advert.since = since

    def _write(self, volume_id: str) -> bool:
        with self._io_lock:
            with self._lock:
                advert = self._adverts.get(volume_id)
            if advert is None:
                return False
            try:
                if not advert.read:
                    self._adopt(volume_id, advert)
                expires = int(self.clock()) + self.ttl
                value = records_mod.peer_value(self.url, advert.since, expires)
                self.records.set_metadata(volume_id, {self.key: value})
            except cinder.RecordsError as exc:
                level = logging.DEBUG if advert.failing else logging.WARNING
                LOG.log(level, 'Could not advertise %s on volume %s (will '
                        'retry in %s s): %s', self.url, volume_id,
                        self.refresh_interval, exc)
                advert.failing = True
                return False
            if advert.failing:
                LOG.info('Advertising %s on volume %s again', self.url,
                         volume_id)
            advert.failing = False
            return True

    def withdraw(self, volume_id: str, lock_timeout: float = -1) -> bool:
        """Stop advertising; delete our item (errors are logged).

        :returns: whether the item is known to be gone.
        """
        volume_id = cinder.check_volume_id(volume_id)
        with self._lock:
            self._adverts.pop(volume_id, None)
        # A refresh that was about to write this item skips it now; one
        # writing it already holds the lock, and is waited for.
        if not self._io_lock.acquire(timeout=lock_timeout):
            LOG.warning('Could not withdraw %s from volume %s in time (it '
                        'expires within %s s)', self.url, volume_id,
                        self.ttl)
            return False
        try:
            self.records.delete_metadata(volume_id, [self.key])
        except cinder.RecordsError as exc:
            LOG.warning('Could not withdraw %s from volume %s (it expires '
                        'within %s s): %s', self.url, volume_id, self.ttl,
                        exc)
            return False
        finally:
            self._io_lock.release()
        return True

    def peers(self, volume_id: str,
              include_self: bool = False) -> typing.List[str]:
        """The image's other holders, oldest first; [] if Cinder fails.

        With ``include_self``, this node's own URL stays at its place in
        the list (a node asks the holders before it, then the origin).

        :raises cinder.VolumeGone: if the image-volume does not exist.
        """
        try:
            metadata, created_at = self.records.get_volume(volume_id)
        except cinder.VolumeGone:
            raise
        except cinder.RecordsError as exc:
            LOG.warning('Could not read the peers of volume %s: %s',
                        volume_id, exc)
            return []
        exclude = () if include_self else (self.url,)
        return records_mod.peers_from_metadata(
            metadata, now=self.clock(), exclude=exclude,
            created_at=created_at, warned=self._warned)

    def refresh(self) -> None:
        """Re-write every advertisement with a new expiry."""
        for volume_id in self.volumes:
            if self._stopping.is_set():
                return
            self._write(volume_id)

    def _run(self) -> None:
        while not self._stopping.wait(self.refresh_interval):
            try:
                self.refresh()
            except Exception:
                LOG.exception('Refreshing peer advertisements failed')

    def start(self) -> None:
        """Refresh every ``refresh_interval`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run,
                                        name='thunder-advertise',
                                        daemon=True)
        self._thread.start()

    def stop(self, withdraw: bool = True, timeout: float = 30) -> None:
        """Stop refreshing, then withdraw every advertisement.

        Best effort within about ``timeout`` seconds (plus one Cinder
        request): what is not withdrawn by then expires on its own.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(max(0, deadline - time.monotonic()))
        if not withdraw:
            return
        for volume_id in self.volumes:
            left = deadline - time.monotonic()
            if left <= 0:
                LOG.warning('Gave up withdrawing %s from %d volumes; the '
                            'advertisements expire within %s s', self.url,
                            len(self.volumes), self.ttl)
                return
            self.withdraw(volume_id, lock_timeout=left)
