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

"""Image location URIs: strict parsing and formatting.

Three forms reach the driver and the store:

``thunder://[STORE/]VOLUME_ID?image_id=IMAGE_ID``
    The thunder store's own location: the image-volume's Cinder id, with the
    Glance store name in multi-store deployments, and the id of the Glance
    image the volume holds (the store checks it against the volume's
    ``glance_image_id``). Images stored before the image id was added keep
    the older ``thunder://[STORE/]VOLUME_ID``, which is still accepted.
``cinder://[STORE/]VOLUME_ID``
    The same image-volume in the form upstream Cinder recognises when it
    looks for an image-volume to clone.
``rbd://FSID/POOL/IMAGE/SNAPSHOT``
    An RBD snapshot, the form Nova's RBD image backend and Cinder's RBD
    driver clone from.

Locations come from image records, so they are parsed as untrusted input:
anything that is not exactly one of these forms raises
:class:`InvalidLocation` with the reason.
"""

import dataclasses
import re
from typing import Mapping, Optional, Tuple, Union
import urllib.parse
import uuid

THUNDER_SCHEME = 'thunder'
CINDER_SCHEME = 'cinder'
RBD_SCHEME = 'rbd'

# Location metadata (and image-volume metadata) the thunder store records
# with an image-volume that lives in RBD: where its bytes are.
META_RBD_FSID = 'thunder_rbd_fsid'
META_RBD_POOL = 'thunder_rbd_pool'
META_RBD_IMAGE = 'thunder_rbd_image'
META_RBD_SNAPSHOT = 'thunder_rbd_snapshot'

# A location is a short string; anything longer is hostile or broken.
MAX_LOCATION_LENGTH = 2048
# Longest pool, image or snapshot name accepted (RBD itself allows long
# names, but no deployment names its objects with kilobytes).
MAX_NAME_LENGTH = 255
# Store names are oslo.config group names.
_STORE_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z')
# Characters that may never appear in an RBD pool, image or snapshot name
# after unquoting: the path and snapshot separators, and anything that is
# not printable.
_FORBIDDEN_IN_NAME = re.compile(r'[/@\x00-\x20\x7f]')
_UUID = re.compile(r'^[0-9a-fA-F]{8}(-?)[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1'
                   r'[0-9a-fA-F]{4}\1[0-9a-fA-F]{12}$')
# A Glance image id, as Glance's image schema accepts it: a dashed UUID.
# Kept verbatim (not canonicalised): it is compared with the
# ``glance_image_id`` the store recorded from the same Glance id.
_IMAGE_ID = re.compile(r'[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-'
                       r'[0-9a-fA-F]{4}-[0-9a-fA-F]{12}')
# The one query a thunder:// location may carry.
IMAGE_ID_QUERY = 'image_id'
_NO_QUERY = 'query or fragment not allowed'


class InvalidLocation(ValueError):
    """A location URI that is not one VMThunder understands."""

    def __init__(self, location: str, reason: str) -> None:
        self.location = location
        self.reason = reason
        shown = location if len(location) <= 120 else location[:117] + '...'
        super().__init__('Invalid image location %r: %s' % (shown, reason))


@dataclasses.dataclass(frozen=True)
class VolumeLocation:
    """An image-volume named by its Cinder volume id.

    ``image_id`` is the Glance image a ``thunder://`` location says the
    volume holds (None in the older form and in ``cinder://``).
    """

    scheme: str
    volume_id: str
    store: Optional[str] = None
    image_id: Optional[str] = None

    @property
    def url(self) -> str:
        if self.store:
            url = '%s://%s/%s' % (self.scheme, self.store, self.volume_id)
        else:
            url = '%s://%s' % (self.scheme, self.volume_id)
        if self.image_id:
            url += '?%s=%s' % (IMAGE_ID_QUERY, self.image_id)
        return url


@dataclasses.dataclass(frozen=True)
class RbdLocation:
    """An RBD snapshot on the cluster with the given fsid."""

    fsid: str
    pool: str
    image: str
    snapshot: str

    @property
    def url(self) -> str:
        parts = [self.fsid, self.pool, self.image, self.snapshot]
        return 'rbd://' + '/'.join(urllib.parse.quote(p, safe='')
                                   for p in parts)


#: What :func:`parse` returns.
Location = Union[VolumeLocation, RbdLocation]


def thunder_location(volume_id: str, store: Optional[str] = None,
                     image_id: Optional[str] = None) -> VolumeLocation:
    """The thunder store's location for an image-volume.

    :param image_id: the Glance image the volume holds; None gives the
        older form, without it.
    :raises ValueError: if an id is malformed.
    """
    if image_id is not None and not is_image_id(image_id):
        raise ValueError('image id is not a dashed UUID')
    return VolumeLocation(THUNDER_SCHEME, _canonical_uuid(volume_id),
                          store, image_id)


def is_image_id(value: object) -> bool:
    """True if value is a Glance image id (a dashed UUID, any case)."""
    return isinstance(value, str) and bool(_IMAGE_ID.fullmatch(value))


def cinder_location(volume_id: str,
                    store: Optional[str] = None) -> VolumeLocation:
    """The upstream ``cinder://`` location for the same image-volume."""
    return VolumeLocation(CINDER_SCHEME, _canonical_uuid(volume_id), store)


def parse(location: object) -> Location:
    """Parse a location URI into a VolumeLocation or an RbdLocation.

    :raises InvalidLocation: if the URI is malformed or of another scheme.
    """
    if not isinstance(location, str):
        raise InvalidLocation(repr(location), 'not a string')
    if len(location) > MAX_LOCATION_LENGTH:
        raise InvalidLocation(location, 'longer than %d characters'
                              % MAX_LOCATION_LENGTH)
    scheme, sep, rest = location.partition('://')
    if not sep:
        raise InvalidLocation(location, 'no scheme')
    if scheme == RBD_SCHEME:
        return _parse_rbd(location, rest)
    if scheme in (THUNDER_SCHEME, CINDER_SCHEME):
        return _parse_volume(location, scheme, rest)
    raise InvalidLocation(location, 'unsupported scheme %r' % scheme[:16])


def _parse_rbd(location: str, rest: str) -> RbdLocation:
    _reject_query_and_fragment(location, rest)
    raw_parts = rest.split('/')
    if len(raw_parts) != 4:
        raise InvalidLocation(location, 'expected rbd://FSID/POOL/IMAGE/'
                              'SNAPSHOT, got %d components' % len(raw_parts))
    parts = []
    for raw in raw_parts:
        try:
            part = urllib.parse.unquote(raw, errors='strict')
        except UnicodeDecodeError:
            raise InvalidLocation(location, 'invalid percent-encoding')
        if not part:
            raise InvalidLocation(location, 'empty component')
        if len(part) > MAX_NAME_LENGTH:
            raise InvalidLocation(location, 'component longer than %d '
                                  'characters' % MAX_NAME_LENGTH)
        parts.append(part)
    fsid, pool, image, snapshot = parts
    try:
        fsid = _canonical_uuid(fsid)
    except ValueError:
        raise InvalidLocation(location, 'cluster fsid is not a UUID')
    for name in (pool, image, snapshot):
        # isprintable() also rejects what the regex cannot see: Unicode
        # controls and separators, and lone surrogates (not UTF-8).
        if _FORBIDDEN_IN_NAME.search(name) or not name.isprintable():
            raise InvalidLocation(location, 'forbidden character in %r'
                                  % name[:32])
    return RbdLocation(fsid, pool, image, snapshot)


def _parse_volume(location: str, scheme: str,
                  rest: str) -> VolumeLocation:
    rest, image_id = _split_image_id(location, scheme, rest)
    parts = rest.split('/')
    if len(parts) == 1:
        store, volume_id = None, parts[0]
    elif len(parts) == 2:
        store, volume_id = parts
        if not _STORE_NAME.match(store):
            raise InvalidLocation(location, 'invalid store name')
    else:
        raise InvalidLocation(location, 'expected %s://[STORE/]VOLUME_ID'
                              % scheme)
    try:
        volume_id = _canonical_uuid(volume_id)
    except ValueError:
        raise InvalidLocation(location, 'volume id is not a UUID')
    return VolumeLocation(scheme, volume_id, store, image_id)


def _split_image_id(location: str, scheme: str,
                    rest: str) -> Tuple[str, Optional[str]]:
    """(rest without its query, image id or None).

    Only ``thunder://`` takes a query, and only ``?image_id=IMAGE_ID``
    exactly: no other key, no second parameter, no percent-encoding.
    """
    if '#' in rest:
        raise InvalidLocation(location, _NO_QUERY)
    rest, sep, query = rest.partition('?')
    if not sep:
        return rest, None
    key, sep, value = query.partition('=')
    if (scheme != THUNDER_SCHEME or key != IMAGE_ID_QUERY or not sep):
        raise InvalidLocation(location, '%s, but ?%s=IMAGE_ID in a %s:// '
                              'location' % (_NO_QUERY, IMAGE_ID_QUERY,
                                            THUNDER_SCHEME))
    if not is_image_id(value):
        raise InvalidLocation(location, 'image id is not a dashed UUID')
    return rest, value


def _reject_query_and_fragment(location: str, rest: str) -> None:
    if '?' in rest or '#' in rest:
        raise InvalidLocation(location, _NO_QUERY)


def _canonical_uuid(value: str) -> str:
    """Return value as a lower-case dashed UUID; ValueError otherwise."""
    if not _UUID.match(value):
        raise ValueError(value)
    return str(uuid.UUID(value))


def rbd_from_metadata(
        metadata: Optional[Mapping[str, str]]) -> Optional[Location]:
    """The :class:`RbdLocation` that location metadata names, or None.

    :raises InvalidLocation: if the names are malformed.
    """
    metadata = metadata or {}
    parts = [metadata.get(key) for key in (META_RBD_FSID, META_RBD_POOL,
                                           META_RBD_IMAGE, META_RBD_SNAPSHOT)]
    names = [part for part in parts if isinstance(part, str) and part]
    if len(names) != len(parts):
        return None
    return parse(RbdLocation(*names).url)


def volume_id_from_name(name: str, template: str) -> Optional[str]:
    """The volume id in an RBD image name, or None.

    ``template`` is Cinder's ``volume_name_template`` (``volume-%s``): the
    name of a volume's RBD image. None when ``name`` is not of that form
    with a volume UUID in it.
    """
    prefix, sep, suffix = template.partition('%s')
    if (not sep or len(name) <= len(prefix) + len(suffix) or
            not name.startswith(prefix) or not name.endswith(suffix)):
        return None
    try:
        return _canonical_uuid(name[len(prefix):len(name) - len(suffix)])
    except ValueError:
        return None
