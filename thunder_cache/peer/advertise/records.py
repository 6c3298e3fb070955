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
policy and cap (:mod:`thunder_cache.peer.peerpolicy`,
:class:`thunder_cache.cache.upstream.Upstream`), and a bogus one costs one
failed request before it is backed off.
"""

import datetime
import logging
import re
import time
import typing

from thunder_cache.peer import protocol

LOG = logging.getLogger(__name__)

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


def peer_key(node_id: str) -> str:
    """The metadata key of a node's advertisement."""
    key = PEER_PREFIX + protocol.check_node_id(node_id)
    if len(key) > MAX_METADATA_LENGTH:
        raise ValueError('metadata key longer than %d characters'
                         % MAX_METADATA_LENGTH)
    return key


def _check_time(value: typing.Any, name: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or
            not _TIME.match(str(value))):
        raise ValueError('%s must be a unix time of at most 12 digits, '
                         'not %r' % (name, value))
    return value


def peer_value(url: str, since: int, expires: int) -> str:
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


def parse_peer_value(value: typing.Any) -> typing.Tuple[str, int, int]:
    """(url, since, expires) of a metadata value; raises ValueError."""
    if not isinstance(value, str):
        raise ValueError('not a string')
    if len(value) > MAX_METADATA_LENGTH:
        raise ValueError('longer than %d characters' % MAX_METADATA_LENGTH)
    parts = value.split(' ')
    if len(parts) != 3:
        raise ValueError('expected "<url> <since> <expires>"')
    url, since_text, expires_text = parts
    if not _TIME.match(since_text) or not _TIME.match(expires_text):
        raise ValueError('malformed time')
    since, expires = int(since_text), int(expires_text)
    if expires < since:
        raise ValueError('expires before since')
    return protocol.normalize_url(url), since, expires


def _shown(text: typing.Any) -> str:
    text = str(text)
    return repr(text if len(text) <= 80 else text[:77] + '...')


def unix_time(value: typing.Any) -> typing.Optional[float]:
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


def _entry(key: str, value: typing.Any, now: float,
           created_at: typing.Optional[float]
           ) -> typing.Optional[typing.Tuple[int, str]]:
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


def peers_from_metadata(metadata: typing.Any,
                        now: typing.Optional[float] = None,
                        exclude: typing.Iterable[str] = (),
                        created_at: typing.Optional[float] = None,
                        warned: typing.Optional[typing.Set[int]] = None
                        ) -> typing.List[str]:
    """The unexpired peer URLs of an image-volume's metadata.

    Oldest ``since`` first, ties by key; a URL listed under several keys
    counts once, at its oldest place. Items whose key is not of a valid
    node id, whose value is malformed, whose URL is not ``http://HOST:PORT``,
    whose expiry is further away than :data:`MAX_TTL`, or whose ``since``
    is in the future or before ``created_at`` (beyond
    :data:`~thunder_cache.peer.protocol.CLOCK_SKEW`) are skipped with a
    warning; other metadata is ignored.

    :param exclude: URLs left out of the result (e.g. the node's own).
    :param created_at: unix time the image-volume was created, if known.
    :param warned: a set kept across calls: an item is warned about once
        while it stays the same (the peers are read every few seconds).
    """
    if now is None:
        now = time.time()
    excluded: typing.Set[str] = set()
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
    entries: typing.List[typing.Tuple[int, str, str]] = []
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
    result: typing.List[str] = []
    for _since, _key, url in entries:
        if url not in seen:
            seen.add(url)
            result.append(url)
    return result


def _warn_once(warned: typing.Optional[typing.Set[int]], key: str,
               value: typing.Any, reason: typing.Any) -> None:
    if warned is not None:
        mark = hash((key, repr(value)[:MAX_METADATA_LENGTH + 2]))
        if mark in warned:
            return
        if len(warned) >= MAX_WARNED:
            warned.clear()
        warned.add(mark)
    LOG.warning('Ignoring peer advertisement %s: %s', _shown(key), reason)
