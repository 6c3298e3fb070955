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

"""Peer-cache locations advertised in the image-volume's Cinder metadata.

A node that holds an image writes one metadata item on the image's
image-volume (the volume the thunder Glance store wrote, named by the
image's ``cinder://`` location)::

    thunder_peer_<node id> = "<node URL> <since> <expires>"

``since`` is when the node started holding the image (unix seconds, kept
across refreshes so that the order of holders is stable), ``expires`` when
the item stops counting unless refreshed. The daemon refreshes its items
every ``refresh_interval`` seconds and deletes them when it stops. Nodes
read the items back as the image's peers, oldest holder first.

Volume metadata is writable by whoever may update the volume, so it is
parsed as untrusted input: an item that is not exactly of this form, names
anything but an ``http://HOST:PORT`` URL, claims to stay valid for
longer than any node would write, or claims a ``since`` no node could have
written (in the future, or before the image-volume was created: an item
claiming to be the oldest holder would be asked first by every node) is
skipped with a warning. Data read from peers is verified against the
image's manifest anyway; the URLs left go through the node's peer address
policy and cap (:mod:`thunder_cache.peerpolicy`,
:class:`thunder_cache.upstream.Upstream`), and a bogus one costs one
failed request before it is backed off.
"""

import copy
import datetime
import logging
import re
import threading
import time
import urllib.parse
import uuid

from cinderclient import api_versions
from cinderclient import exceptions as cinder_exceptions
from cinderclient.v3 import client as cinder_client
from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

from thunder_cache import protocol

LOG = logging.getLogger(__name__)

GROUP = 'advertise'
PEER_PREFIX = 'thunder_peer_'
# Cinder's limit on volume metadata keys and values.
MAX_METADATA_LENGTH = 255
# No node writes an item valid for longer than this; an item claiming more
# is hostile or broken.
MAX_TTL = 86400
# Unix times in items: at most 12 digits, no sign, no leading zero.
_TIME = re.compile(r'^(0|[1-9][0-9]{0,11})\Z')
# Ignored items remembered so as to be warned about once.
MAX_WARNED = 1024
# Seconds a Cinder request may take unless [advertise] timeout says
# otherwise: the daemon must not hang on an unreachable Cinder.
DEFAULT_TIMEOUT = 10

opts = [
    cfg.BoolOpt('enabled', default=False,
                help='Advertise this node as a peer-cache location of the '
                     'images it holds, in the metadata of each image\'s '
                     'image-volume in Cinder, and read the other holders '
                     'from there. Needs the credentials of this section.'),
    cfg.IntOpt('ttl', default=300, min=30, max=MAX_TTL,
               help='Seconds an advertisement stays valid unless it is '
                    'refreshed. A node that dies without withdrawing stops '
                    'being listed after this long.'),
    cfg.IntOpt('refresh_interval', default=100, min=1,
               help='Seconds between refreshes of this node\'s '
                    'advertisements. Must be less than ttl; ttl / 3 '
                    'survives two failed refreshes.'),
    cfg.StrOpt('region_name',
               help='Region to look Cinder up in, in the service catalog.'),
    cfg.StrOpt('interface', default='internal',
               choices=['public', 'internal', 'admin'],
               help='Endpoint interface of Cinder in the service catalog.'),
    cfg.URIOpt('cinder_endpoint_override', schemes=['http', 'https'],
               help='Cinder endpoint to use instead of the service '
                    'catalog\'s, e.g. http://controller:8776/v3/'
                    '%(project_id)s.'),
    cfg.StrOpt('api_version', default='3.0', regex=r'^3\.[0-9]{1,3}$',
               help='Block Storage API microversion to request. Volume '
                    'metadata needs only 3.0.'),
]


def _session_opts():
    """keystoneauth's session options, with our default timeout."""
    result = []
    for opt in ks_loading.get_session_conf_options():
        if opt.dest == 'timeout':
            opt = copy.deepcopy(opt)
            opt.default = DEFAULT_TIMEOUT
        result.append(opt)
    return result


def register_opts(conf, group=GROUP):
    """Register the options of ``[advertise]``, its auth and session."""
    conf.register_opts(opts, group=group)
    ks_loading.register_session_conf_options(conf, group)
    ks_loading.register_auth_conf_options(conf, group)
    conf.set_default('timeout', DEFAULT_TIMEOUT, group=group)


def list_opts():
    """Options for oslo-config-generator (auth shown for 'password')."""
    return [(GROUP, opts + _session_opts() +
             ks_loading.get_auth_common_conf_options() +
             ks_loading.get_auth_plugin_conf_options('password'))]


# -- the record format ----------------------------------------------------

def peer_key(node_id):
    """The metadata key of a node's advertisement."""
    key = PEER_PREFIX + protocol.check_node_id(node_id)
    if len(key) > MAX_METADATA_LENGTH:
        raise ValueError('metadata key longer than %d characters'
                         % MAX_METADATA_LENGTH)
    return key


def _check_time(value, name):
    if (isinstance(value, bool) or not isinstance(value, int) or
            not _TIME.match(str(value))):
        raise ValueError('%s must be a unix time of at most 12 digits, '
                         'not %r' % (name, value))
    return value


def peer_value(url, since, expires):
    """The metadata value of an advertisement: ``<url> <since> <expires>``.

    :raises ValueError: for an invalid URL or time, an expiry before
        ``since``, or a value longer than Cinder accepts.
    """
    url = protocol.normalize_url(url)
    since = _check_time(since, 'since')
    expires = _check_time(expires, 'expires')
    if expires < since:
        raise ValueError('expires (%d) before since (%d)' % (expires, since))
    value = '%s %d %d' % (url, since, expires)
    if len(value) > MAX_METADATA_LENGTH:
        raise ValueError('metadata value longer than %d characters'
                         % MAX_METADATA_LENGTH)
    return value


def parse_peer_value(value):
    """(url, since, expires) of a metadata value; raises ValueError."""
    if not isinstance(value, str):
        raise ValueError('not a string')
    if len(value) > MAX_METADATA_LENGTH:
        raise ValueError('longer than %d characters' % MAX_METADATA_LENGTH)
    parts = value.split(' ')
    if len(parts) != 3:
        raise ValueError('expected "<url> <since> <expires>"')
    url, since, expires = parts
    if not _TIME.match(since) or not _TIME.match(expires):
        raise ValueError('malformed time')
    since, expires = int(since), int(expires)
    if expires < since:
        raise ValueError('expires before since')
    return protocol.normalize_url(url), since, expires


def _shown(text):
    text = str(text)
    return repr(text if len(text) <= 80 else text[:77] + '...')


def unix_time(value):
    """Unix seconds of an ISO 8601 time (UTC unless it says so), or None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _entry(key, value, now, created_at):
    """(since, url) of an advertisement, None if it expired.

    :raises ValueError: saying why the item is ignored.
    """
    if not protocol.NODE_ID.match(key[len(PEER_PREFIX):]):
        raise ValueError('invalid node id')
    try:
        url, since, expires = parse_peer_value(value)
    except ValueError as exc:
        raise ValueError('%s: %s' % (_shown(value), exc))
    if expires > now + MAX_TTL + protocol.CLOCK_SKEW:
        raise ValueError('it claims to stay valid for more than %d s'
                         % MAX_TTL)
    if expires <= now:
        return None
    if since > now + protocol.CLOCK_SKEW:
        raise ValueError('it claims to hold the image since a time in the '
                         'future')
    if created_at is not None and since < created_at - protocol.CLOCK_SKEW:
        raise ValueError('it claims to hold the image since before its '
                         'image-volume was created')
    return since, url


def peers_from_metadata(metadata, now=None, exclude=(), created_at=None,
                        warned=None):
    """The unexpired peer URLs of an image-volume's metadata.

    Oldest ``since`` first, ties by key; a URL listed under several keys
    counts once, at its oldest place. Items whose key is not of a valid
    node id, whose value is malformed, whose URL is not ``http://HOST:PORT``,
    whose expiry is further away than :data:`MAX_TTL`, or whose ``since``
    is in the future or before ``created_at`` (beyond
    :data:`~thunder_cache.protocol.CLOCK_SKEW`) are skipped with a
    warning; other metadata is ignored.

    :param exclude: URLs left out of the result (e.g. the node's own).
    :param created_at: unix time the image-volume was created, if known.
    :param warned: a set kept across calls: an item is warned about once
        while it stays the same (the peers are read every few seconds).
    """
    if now is None:
        now = time.time()
    excluded = set()
    for url in exclude:
        try:
            excluded.add(protocol.normalize_url(url))
        except ValueError:
            pass
    if not isinstance(metadata, dict):
        if metadata is not None:
            LOG.warning('Ignoring volume metadata of type %s',
                        type(metadata).__name__)
        return []
    entries = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.startswith(PEER_PREFIX):
            continue
        try:
            entry = _entry(key, value, now, created_at)
        except ValueError as exc:
            _warn_once(warned, key, value, exc)
            continue
        if entry is not None:
            entries.append((entry[0], key, entry[1]))
    entries.sort()
    seen = set(excluded)
    result = []
    for _since, _key, url in entries:
        if url not in seen:
            seen.add(url)
            result.append(url)
    return result


def _warn_once(warned, key, value, reason):
    if warned is not None:
        mark = hash((key, repr(value)[:MAX_METADATA_LENGTH + 2]))
        if mark in warned:
            return
        if len(warned) >= MAX_WARNED:
            warned.clear()
        warned.add(mark)
    LOG.warning('Ignoring peer advertisement %s: %s', _shown(key), reason)


# -- Cinder ----------------------------------------------------------------

class RecordsError(Exception):
    """Cinder (or Keystone) could not read or write an advertisement."""

    def __init__(self, message, cause=None):
        super().__init__(message)
        self.cause = cause


class VolumeGone(RecordsError):
    """Cinder answered that the image-volume does not exist (404)."""


_ERRORS = (cinder_exceptions.ClientException,
           ks_exceptions.ClientException)


def check_volume_id(volume_id):
    """The canonical form of a Cinder volume id (a UUID); ValueError."""
    if not isinstance(volume_id, str) or len(volume_id) > 64:
        raise ValueError('volume id must be a UUID, not %r' % (volume_id,))
    return str(uuid.UUID(volume_id))


class CinderRecords:
    """Volume metadata through python-cinderclient v3."""

    def __init__(self, client):
        self.client = client

    @classmethod
    def from_conf(cls, conf, group=GROUP):
        """A client with the credentials and session of ``[group]``.

        :raises RecordsError: when the section names no usable auth.
        """
        section = conf[group]
        try:
            auth = ks_loading.load_auth_from_conf_options(conf, group)
        except ks_exceptions.ClientException as exc:
            raise RecordsError('[%s] has no usable credentials: %s'
                               % (group, exc), exc)
        if auth is None:
            raise RecordsError('[%s] auth_type is not set: the node needs '
                               'credentials to advertise in Cinder' % group)
        session = ks_loading.load_session_from_conf_options(conf, group,
                                                            auth=auth)
        client = cinder_client.Client(
            session=session,
            region_name=section.region_name,
            endpoint_type=section.interface,
            os_endpoint=section.cinder_endpoint_override,
            api_version=api_versions.APIVersion(section.api_version))
        return cls(client)

    def _call(self, what, volume_id, func, *args):
        check_volume_id(volume_id)
        try:
            return func(*args)
        except cinder_exceptions.NotFound as exc:
            raise VolumeGone('Cinder: volume %s not found: %s'
                             % (volume_id, exc), exc)
        except _ERRORS as exc:
            raise RecordsError('Cinder: could not %s of volume %s: %s: %s'
                               % (what, volume_id, type(exc).__name__, exc),
                               exc)

    def get_metadata(self, volume_id):
        """The volume's metadata (a dict of strings)."""
        return self.get_volume(volume_id)[0]

    def get_volume(self, volume_id):
        """(metadata, created_at in unix seconds or None) of the volume."""
        volume = self._call('read the metadata', volume_id,
                            self.client.volumes.get, volume_id)
        return (dict(getattr(volume, 'metadata', None) or {}),
                unix_time(getattr(volume, 'created_at', None)))

    def set_metadata(self, volume_id, metadata):
        """Add or replace these items (others are kept)."""
        self._call('update the metadata', volume_id,
                   self.client.volumes.set_metadata, volume_id,
                   dict(metadata))

    def delete_metadata(self, volume_id, keys):
        """Delete these items, one request each; missing ones are fine.

        Per-key DELETE leaves concurrent writers' items alone (the 3.15+
        client rewrites the whole metadata instead).
        """
        volume_id = check_volume_id(volume_id)
        http = self.client.client
        for key in keys:
            try:
                http.delete('/volumes/%s/metadata/%s'
                            % (volume_id, urllib.parse.quote(key, safe='')))
            except cinder_exceptions.NotFound:
                continue
            except _ERRORS as exc:
                raise RecordsError(
                    'Cinder: could not delete %s of volume %s: %s: %s'
                    % (key, volume_id, type(exc).__name__, exc), exc)


# -- the advertiser ----------------------------------------------------------

class _Advert:
    def __init__(self, since):
        self.since = since
        # Whether the record was read once, to adopt our unexpired item.
        self.read = False
        self.failing = False


class Advertiser:
    """Keeps this node's advertisements alive in Cinder."""

    def __init__(self, records, node_id, url, ttl=300, refresh_interval=100,
                 clock=time.time):
        if not 0 < refresh_interval < ttl:
            raise ValueError('refresh_interval (%s) must be positive and '
                             'less than ttl (%s)' % (refresh_interval, ttl))
        if ttl > MAX_TTL:
            raise ValueError('ttl longer than %d s' % MAX_TTL)
        self.records = records
        self.node_id = node_id
        self.key = peer_key(node_id)
        self.url = protocol.normalize_url(url)
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.clock = clock
        self._adverts = {}
        self._warned = set()
        self._lock = threading.Lock()
        # Serialises our writes and deletes, so that a withdraw is never
        # followed by a refresh's write of the same item.
        self._io_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = None

    @property
    def volumes(self):
        """Ids of the image-volumes this node advertises itself on."""
        with self._lock:
            return sorted(self._adverts)

    def advertise(self, volume_id):
        """Advertise this node for the image of this image-volume now.

        Cinder errors are logged; the write is retried at every refresh.
        """
        volume_id = check_volume_id(volume_id)
        with self._lock:
            advert = self._adverts.get(volume_id)
            if advert is None:
                advert = self._adverts[volume_id] = _Advert(int(self.clock()))
            elif advert.read and not advert.failing:
                return
        self._write(volume_id)

    def _adopt(self, volume_id, advert):
        """Keep the ``since`` of our own unexpired item, if there is one."""
        value = self.records.get_metadata(volume_id).get(self.key)
        advert.read = True
        if value is None:
            return
        try:
            url, since, expires = parse_peer_value(value)
        except ValueError:
            return
        now = self.clock()
        if url == self.url and now < expires <= now + MAX_TTL and \
                since < advert.since:
            advert.since = since

    def _write(self, volume_id):
        with self._io_lock:
            with self._lock:
                advert = self._adverts.get(volume_id)
            if advert is None:
                return False
            try:
                if not advert.read:
                    self._adopt(volume_id, advert)
                expires = int(self.clock()) + self.ttl
                value = peer_value(self.url, advert.since, expires)
                self.records.set_metadata(volume_id, {self.key: value})
            except RecordsError as exc:
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

    def withdraw(self, volume_id, lock_timeout=-1):
        """Stop advertising; delete our item (errors are logged).

        :returns: whether the item is known to be gone.
        """
        volume_id = check_volume_id(volume_id)
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
        except RecordsError as exc:
            LOG.warning('Could not withdraw %s from volume %s (it expires '
                        'within %s s): %s', self.url, volume_id, self.ttl,
                        exc)
            return False
        finally:
            self._io_lock.release()
        return True

    def peers(self, volume_id, include_self=False):
        """The image's other holders, oldest first; [] if Cinder fails.

        With ``include_self``, this node's own URL stays at its place in
        the list (a node asks the holders before it, then the origin).

        :raises VolumeGone: if the image-volume does not exist.
        """
        try:
            metadata, created_at = self.records.get_volume(volume_id)
        except VolumeGone:
            raise
        except RecordsError as exc:
            LOG.warning('Could not read the peers of volume %s: %s',
                        volume_id, exc)
            return []
        exclude = () if include_self else (self.url,)
        return peers_from_metadata(metadata, now=self.clock(),
                                   exclude=exclude, created_at=created_at,
                                   warned=self._warned)

    def refresh(self):
        """Re-write every advertisement with a new expiry."""
        for volume_id in self.volumes:
            if self._stopping.is_set():
                return
            self._write(volume_id)

    def _run(self):
        while not self._stopping.wait(self.refresh_interval):
            try:
                self.refresh()
            except Exception:
                LOG.exception('Refreshing peer advertisements failed')

    def start(self):
        """Refresh every ``refresh_interval`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run,
                                        name='thunder-advertise',
                                        daemon=True)
        self._thread.start()

    def stop(self, withdraw=True, timeout=30):
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
