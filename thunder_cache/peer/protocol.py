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

"""The peer protocol: strict request parsing and request authentication.

A small subset of HTTP/1.1, parsed by hand so that every limit is ours:

``GET /v1/images/<image_id>/chunks/<index>``
    The verified bytes of one chunk (``application/octet-stream``). A
    ``Range: bytes=...`` header with a single range of the chunk is
    honoured (206). A node that is full for this image answers ``307`` with
    the same path on one of its children.
``GET /v1/images/<image_id>/manifest``
    The image's serialised manifest; the requester checks its digest.
``GET /metrics``
    Counters in the Prometheus text format.

Only ``GET`` exists; requests with a body are refused. Request line,
header lines, header count and total header bytes are bounded
(414/431). Paths are matched segment by segment against fixed patterns
(no percent-decoding, no dot segments, no query), chunk indexes are short
decimal numbers without sign or leading zero.

Every request for image data carries these headers::

    X-Thunder-Node: <node id>
    X-Thunder-Node-URL: <the requester's own serving URL>
    X-Thunder-Destination: <the URL of the node the request is sent to>
    X-Thunder-Via: <URLs of the nodes this request is fetched for, comma
                   separated; may be empty>
    X-Thunder-Ticket: <the ticket of the fetch it serves> (optional)
    X-Thunder-Auth: v2:<issued>:<expiry>:<nonce, 32 hex digits>:
                    <hex HMAC-SHA256>      (times in unix seconds)

The HMAC, keyed with the secret shared by the nodes of a deployment,
covers the method, the path, the destination, the node id, the URL, the
via list, the ticket, the issue and expiry times and the nonce. A server
accepts a token only if the destination is its own URL, and each nonce
only once (:class:`ReplayCache`). A request whose token is missing, malformed,
wrong, expired, valid for longer than the server allows, made for another
node or already used is answered 401 with no body. Version 1 tokens
(``v1:<expiry>:<mac>``, no destination, no nonce) are refused unless the
server accepts them for a rolling upgrade.

A request for a chunk may also carry ``X-Thunder-Looped: 1``: its sender
was redirected round a cycle of full nodes (each sending it to a child
that leads back), and asks the node it first asked to serve it beyond its
fan-out rather than redirect it again. The token does not cover it: it
only changes whether a node serves an authenticated peer or redirects it,
which any holder of the shared secret can already choose by signing as
another node; and a node of the previous release ignores it (the sender
then gives up on that peer for the chunk, as before).

Peer URLs are ``http://HOST:PORT``, or ``https://HOST:PORT`` in a
deployment whose nodes speak TLS (:func:`use_tls`); one scheme per
deployment: a URL of the other scheme is refused wherever it comes from.
"""

import hashlib
import heapq
import hmac
import os
import re
import threading
import time
import typing

API_VERSION = 'v1'

MAX_REQUEST_LINE = 1024
MAX_HEADER_LINE = 4096
MAX_HEADERS = 32
MAX_HEADER_BYTES = 16384
# Longest chain of nodes a request may be relayed through: the depth of
# an image's tree (2**16 nodes with 2 children each).
MAX_HOPS = 16
MAX_URL_LENGTH = 200
# Longest request head a server buffers: a few blank lines, the request
# line and the headers. A head still incomplete at this size is refused.
MAX_HEAD_BYTES = 16 + MAX_REQUEST_LINE + MAX_HEADER_BYTES
# Tokens are short-lived; a server refuses one that claims to stay valid
# longer than this (plus clock skew), whatever its signature.
MAX_TOKEN_LIFETIME = 300
CLOCK_SKEW = 30
MIN_SECRET_BYTES = 16

HEADER_NODE = 'x-thunder-node'
HEADER_URL = 'x-thunder-node-url'
HEADER_VIA = 'x-thunder-via'
HEADER_AUTH = 'x-thunder-auth'
HEADER_TICKET = 'x-thunder-ticket'
HEADER_DESTINATION = 'x-thunder-destination'
HEADER_LOOPED = 'x-thunder-looped'

IMAGE_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z')
NODE_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z')
# Indexes are bounded by the manifest (at most 4 Mi chunks): 7 digits.
_INDEX = re.compile(r'^(0|[1-9][0-9]{0,6})\Z')
_TOKEN_CHARS = re.compile(r'^[!#$%&\'*+.^_`|~0-9A-Za-z-]+\Z')
# Characters a request target may not hold: no query, fragment, escapes.
_TARGET_REFUSED = re.compile(r'[?#%\\]')
_HEADER_VALUE = re.compile(r'^[\x20-\x7e\t]*\Z')
# A header line without its end, all at once (fullmatch): linear in the
# length of the line whatever it holds.
_HEADER_LINE = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+):([\x20-\x7e\t]*)')
_PEER_URL = re.compile(
    r'^(https?)://('
    r'(?:[0-9]{1,3}\.){3}[0-9]{1,3}'          # IPv4
    r'|\[[0-9A-Fa-f:.]{2,45}\]'                # [IPv6]
    r'|[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})'      # host name
    r'(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*'
    r'):([1-9][0-9]{0,4})\Z')
_AUTH_V1 = re.compile(r'^v1:([1-9][0-9]{0,11}):([0-9a-f]{64})\Z')
_AUTH_V2 = re.compile(r'^v2:([1-9][0-9]{0,11}):([1-9][0-9]{0,11}):'
                      r'([0-9a-f]{32}):([0-9a-f]{64})\Z')
_RANGE = re.compile(r'^bytes=([0-9]{0,19})-([0-9]{0,19})\Z')
_TICKET = re.compile(r'^([0-9]{1,12})\.([0-9]{6})-([0-9a-f]{8})\Z')

SINGLE_VALUED = ('host', 'range', 'connection', 'content-length',
                 'transfer-encoding', HEADER_NODE, HEADER_URL, HEADER_VIA,
                 HEADER_AUTH, HEADER_TICKET, HEADER_DESTINATION,
                 HEADER_LOOPED)


class ProtocolError(Exception):
    """A request this server will not process; ``status`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class AuthError(ProtocolError):
    """A request without a valid token (401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(401, reason)


class ReplayError(AuthError):
    """A token whose nonce this server has already accepted."""


class ReplayWindowError(ProtocolError):
    """A valid token older than the nonces the server had to forget.

    Answered 503: the requester asks elsewhere, or again with a fresh
    token (see :class:`ReplayCache`).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason)


# -- request parsing -------------------------------------------------------

def _strip_eol(line: bytes, limit: int, status: int) -> bytes:
    if len(line) > limit:
        raise ProtocolError(status, 'line longer than %d bytes' % limit)
    if line.endswith(b'\r\n'):
        return line[:-2]
    if line.endswith(b'\n'):
        return line[:-1]
    # The peer hung up in the middle of a line.
    raise ProtocolError(400, 'incomplete line')


def _ascii(data: bytes) -> str:
    try:
        return data.decode('ascii')
    except UnicodeDecodeError:
        raise ProtocolError(400, 'non-ASCII bytes')


def parse_request_line(line: bytes) -> typing.Tuple[str, str, str]:
    """(method, target, version) of a request line (bytes, with its EOL).

    :raises ProtocolError: 414 if too long, 400 if malformed, 405 for
        methods other than GET, 505 for versions other than HTTP/1.x.
    """
    text = _ascii(_strip_eol(line, MAX_REQUEST_LINE, 414))
    parts = text.split(' ')
    if len(parts) != 3 or not all(parts):
        raise ProtocolError(400, 'malformed request line')
    method, target, version = parts
    if not _TOKEN_CHARS.match(method):
        raise ProtocolError(400, 'malformed method')
    if version not in ('HTTP/1.1', 'HTTP/1.0'):
        if re.match(r'^HTTP/[0-9]\.[0-9]\Z', version):
            raise ProtocolError(505, 'unsupported HTTP version')
        raise ProtocolError(400, 'malformed HTTP version')
    if method != 'GET':
        raise ProtocolError(405, 'only GET is supported')
    if not target.startswith('/') or _TARGET_REFUSED.search(target):
        raise ProtocolError(400, 'malformed request target')
    return method, target, version


def parse_header_line(line: bytes) -> typing.Tuple[str, str]:
    """(lower-case name, value) of one header line (bytes, with its EOL)."""
    text = _ascii(_strip_eol(line, MAX_HEADER_LINE, 431))
    if text[:1] in (' ', '\t'):
        raise ProtocolError(400, 'obsolete header line folding')
    name, sep, value = text.partition(':')
    if not sep or not _TOKEN_CHARS.match(name):
        raise ProtocolError(400, 'malformed header line')
    value = value.strip(' \t')
    if not _HEADER_VALUE.match(value):
        raise ProtocolError(400, 'control characters in a header value')
    return name.lower(), value


#: (method, target, version, {lower-case name: value}) of a request.
Head = typing.Tuple[str, str, str, typing.Dict[str, str]]


def read_head(readline: typing.Callable[[int], bytes]
              ) -> typing.Optional[Head]:
    """Read one request head with ``readline(limit)``.

    :returns: (method, target, version, headers) or None at a clean end of
        the connection before a request starts.
    :raises ProtocolError: on anything malformed or too large.
    """
    line = readline(MAX_REQUEST_LINE + 1)
    # Tolerate (a few) empty lines between requests, as RFC 9112 allows.
    blanks = 0
    while line in (b'\r\n', b'\n'):
        blanks += 1
        if blanks > 4:
            raise ProtocolError(400, 'empty lines instead of a request')
        line = readline(MAX_REQUEST_LINE + 1)
    if not line:
        return None
    method, target, version = parse_request_line(line)
    headers = read_headers(readline, 'request')
    if 'transfer-encoding' in headers or headers.get(
            'content-length', '0') != '0':
        raise ProtocolError(400, 'requests with a body are not accepted')
    return method, target, version, headers


def read_headers(readline: typing.Callable[[int], bytes],
                 what: str = 'response') -> typing.Dict[str, str]:
    """The header lines of a head, up to its empty line, with ``readline``.

    :returns: {lower-case name: value}, repeated headers joined by ", ".
    :raises ProtocolError: on anything malformed or too large.
    """
    headers: typing.Dict[str, str] = {}
    total = 0
    while True:
        line = readline(MAX_HEADER_LINE + 1)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise ProtocolError(431, '%s headers too large' % what)
        if line in (b'\r\n', b'\n'):
            return headers
        if not line:
            raise ProtocolError(400, 'connection closed inside the headers')
        name, value = parse_header_line(line)
        if name in headers:
            if name in SINGLE_VALUED:
                raise ProtocolError(400, 'duplicate %s header' % name)
            headers[name] += ', ' + value
        else:
            if len(headers) >= MAX_HEADERS:
                raise ProtocolError(431, 'too many %s headers' % what)
            headers[name] = value


class _Incomplete(Exception):
    pass


def _plain_head(data: bytearray) -> typing.Optional[typing.Tuple[Head, int]]:
    """A plain, valid head at the start of ``data``, parsed at once.

    (head, bytes it took), or None for anything else: a head sent in
    parts, blank lines before it, lines ended by a bare LF, duplicate or
    too many headers, anything malformed. :func:`read_head` then decides,
    line by line, and refuses what it refuses. What this accepts,
    :func:`read_head` accepts the same, with the same result: the
    common case of every chunk request without a call per line.
    """
    end = data.find(b'\r\n\r\n', 0, MAX_HEAD_BYTES)
    if end < 0:
        return None
    try:
        text = data[:end].decode('ascii')
    except UnicodeDecodeError:
        return None
    lines = text.split('\r\n')
    if (len(lines) > MAX_HEADERS + 1 or
            text.count('\r') != len(lines) - 1 or
            text.count('\n') != len(lines) - 1 or
            len(lines[0]) + 2 > MAX_REQUEST_LINE or
            end + 4 - len(lines[0]) - 2 > MAX_HEADER_BYTES):
        return None
    try:
        method, target, version = parse_request_line(
            lines[0].encode('ascii') + b'\r\n')
    except ProtocolError:
        return None
    headers: typing.Dict[str, str] = {}
    for line in lines[1:]:
        match = _HEADER_LINE.fullmatch(line)
        if match is None or len(line) + 2 > MAX_HEADER_LINE:
            return None
        name = match[1].lower()
        if name in headers:
            return None
        headers[name] = match[2].strip(' \t')
    if 'transfer-encoding' in headers or headers.get(
            'content-length', '0') != '0':
        return None
    return (method, target, version, headers), end + 4


class HeadBuffer:
    """Bytes received on a connection, cut into request heads.

    Bytes are fed as they arrive (:meth:`feed`); :meth:`take` returns the
    next complete head, parsed by :func:`read_head`, or None while it is
    incomplete. The buffer never holds more than :data:`MAX_HEAD_BYTES`
    of an incomplete head: :meth:`room` says how much more to receive.
    """

    def __init__(self) -> None:
        self._data = bytearray()

    def __len__(self) -> int:
        return len(self._data)

    def room(self) -> int:
        """Bytes that may still be received for the head under way."""
        return max(0, MAX_HEAD_BYTES - len(self._data))

    def feed(self, data: bytes) -> None:
        """Add bytes received."""
        self._data += data

    def take(self) -> typing.Optional[Head]:
        """The next head, or None if incomplete.

        :raises ProtocolError: if the head is malformed or too large.
        """
        data = self._data
        if not data:
            return None
        plain = _plain_head(data)
        if plain is not None:
            del data[:plain[1]]
            return plain[0]
        position = 0

        def readline(limit: int) -> bytes:
            nonlocal position
            end = data.find(b'\n', position, position + limit)
            if end < 0:
                if len(data) - position < limit:
                    raise _Incomplete()
                end = position + limit - 1
            line = bytes(data[position:end + 1])
            position = end + 1
            return line

        try:
            head = read_head(readline)
        except _Incomplete:
            if len(data) >= MAX_HEAD_BYTES:
                raise ProtocolError(431, 'request head too large')
            return None
        del data[:position]
        return head


class Route:
    """What a request path names."""

    __slots__ = ('kind', 'image_id', 'index')

    def __init__(self, kind: str, image_id: typing.Optional[str] = None,
                 index: typing.Optional[int] = None) -> None:
        self.kind = kind
        self.image_id = image_id
        self.index = index

    def __repr__(self) -> str:
        return '<Route %s %s %s>' % (self.kind, self.image_id, self.index)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Route) and
                (self.kind, self.image_id, self.index) ==
                (other.kind, other.image_id, other.index))


def route(path: str) -> Route:
    """The Route of a request path.

    :raises ProtocolError: 404 for paths the protocol does not define, 400
        for malformed image ids or chunk indexes.
    """
    if path == '/metrics':
        return Route('metrics')
    segments = path.split('/')
    # ['', 'v1', 'images', ID, 'chunks', N] or ['', 'v1', 'images', ID,
    # 'manifest']
    if (len(segments) not in (5, 6) or segments[0] != '' or
            segments[1] != API_VERSION or segments[2] != 'images'):
        raise ProtocolError(404, 'no such resource')
    image_id = segments[3]
    if not IMAGE_ID.match(image_id):
        raise ProtocolError(400, 'malformed image id')
    if len(segments) == 5 and segments[4] == 'manifest':
        return Route('manifest', image_id)
    if len(segments) == 6 and segments[4] == 'chunks':
        if not _INDEX.match(segments[5]):
            raise ProtocolError(400, 'malformed chunk index')
        return Route('chunk', image_id, int(segments[5]))
    raise ProtocolError(404, 'no such resource')


def chunk_path(image_id: str, index: int) -> str:
    """The path of a chunk of an image."""
    return '/%s/images/%s/chunks/%d' % (API_VERSION, image_id, index)


def manifest_path(image_id: str) -> str:
    """The path of an image's manifest."""
    return '/%s/images/%s/manifest' % (API_VERSION, image_id)


def parse_range(value: str, length: int) -> typing.Tuple[int, int]:
    """(start, end) (end exclusive) of a single-range Range header.

    :raises ProtocolError: 400 if malformed, 416 if it asks for several
        ranges or for none of the ``length`` bytes.
    """
    if ',' in value:
        raise ProtocolError(416, 'multiple ranges are not supported')
    match = _RANGE.match(value.strip())
    if not match:
        raise ProtocolError(400, 'malformed Range header')
    first, last = match.groups()
    if not first and not last:
        raise ProtocolError(400, 'malformed Range header')
    if not first:
        # Suffix range: the last N bytes.
        suffix = int(last)
        if suffix == 0 or length == 0:
            raise ProtocolError(416, 'empty suffix range')
        return max(0, length - suffix), length
    start = int(first)
    if start >= length:
        raise ProtocolError(416, 'range starts past the end')
    if not last:
        return start, length
    end = int(last)
    if end < start:
        raise ProtocolError(400, 'range ends before it starts')
    return start, min(end, length - 1) + 1


# -- peer identity ---------------------------------------------------------

def check_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not NODE_ID.match(node_id):
        raise ValueError('node id must match %s, not %r'
                         % (NODE_ID.pattern, node_id))
    return node_id


_scheme = 'http'


def use_tls(enabled: bool) -> None:
    """Make this process's peer URLs https:// (True) or http:// (False).

    Called once at start from ``[peer] tls_enabled``: every node of a
    deployment speaks the same scheme, and :func:`normalize_url` refuses
    URLs of the other one wherever they come from (descriptors,
    advertisements, redirects, request headers).
    """
    global _scheme
    _scheme = 'https' if enabled else 'http'


def url_scheme() -> str:
    """``'https'`` if this process's peers speak TLS, else ``'http'``."""
    return _scheme


def normalize_url(url: typing.Any) -> str:
    """A peer's base URL, validated; raises ValueError."""
    if not isinstance(url, str):
        raise ValueError('peer URL must be a string, not %r' % (url,))
    url = url.rstrip('/')
    if len(url) > MAX_URL_LENGTH:
        raise ValueError('peer URL longer than %d characters'
                         % MAX_URL_LENGTH)
    match = _PEER_URL.match(url)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise ValueError('peer URL must be %s://HOST:PORT, not %r'
                         % (_scheme, url[:80]))
    if match.group(1) != _scheme:
        raise ValueError(
            'peer URL %r is %s:// but the peers of this node speak %s '
            '([peer] tls_enabled is %s): every node of a deployment must '
            'use the same scheme' % (url[:80], match.group(1), _scheme,
                                     'on' if _scheme == 'https' else 'off'))
    return url


def split_url(url: str) -> typing.Tuple[str, str, int]:
    """(scheme, host, port) of a normalized peer URL (no IPv6 brackets)."""
    match = _PEER_URL.match(url)
    if not match:
        raise ValueError('not a peer URL: %r' % url[:80])
    return match.group(1), match.group(2).strip('[]'), int(match.group(3))


def parse_via(value: str) -> typing.Tuple[str, ...]:
    """The list of node URLs a request was relayed for."""
    if not value:
        return ()
    urls = [u.strip() for u in value.split(',')]
    if len(urls) > MAX_HOPS:
        raise ProtocolError(508, 'request relayed through more than %d '
                            'nodes' % MAX_HOPS)
    try:
        return tuple(normalize_url(u) for u in urls)
    except ValueError:
        raise ProtocolError(400, 'malformed %s header' % HEADER_VIA)


def parse_looped(headers: typing.Mapping[str, str]) -> bool:
    """Whether a request says it was redirected round a cycle (see above)."""
    value = headers.get(HEADER_LOOPED)
    if value is None:
        return False
    if value != '1':
        raise ProtocolError(400, 'malformed %s header' % HEADER_LOOPED)
    return True


def new_ticket(clock: typing.Callable[[], float] = time.time) -> str:
    """A fresh fetch ticket: the time it was made, and a random tie-break.

    Tickets order the fetches of an image across nodes, so that waits
    between them cannot form a cycle (see
    :meth:`thunder_cache.cache.image_cache.ImageCache.ensure`).
    """
    now = clock()
    return '%d.%06d-%s' % (int(now), int((now % 1) * 1e6),
                           os.urandom(4).hex())


def ticket_key(ticket: str) -> typing.Tuple[int, int, str]:
    """A comparable form of a ticket; raises ValueError if malformed."""
    match = _TICKET.match(ticket or '')
    if not match:
        raise ValueError('malformed ticket %r' % (ticket,))
    return int(match.group(1)), int(match.group(2)), match.group(3)


def load_secret(path: str) -> bytes:
    """The shared secret from a file (surrounding whitespace dropped)."""
    with open(path, 'rb') as f:
        secret = f.read(65536).strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError('shared secret in %s is shorter than %d bytes'
                         % (path, MIN_SECRET_BYTES))
    return secret


def _mac_v1(secret: bytes, method: str, path: str, node_id: str, url: str,
            via: typing.Sequence[str], ticket: typing.Optional[str],
            expiry: int) -> str:
    message = '\n'.join(('thunder-peer-v1', method, path, node_id, url,
                         ','.join(via), ticket or '', str(expiry)))
    return hmac.new(secret, message.encode('ascii'),
                    hashlib.sha256).hexdigest()


def _mac(secret: bytes, method: str, path: str, destination: str,
         node_id: str, url: str, via: typing.Sequence[str],
         ticket: typing.Optional[str], issued: int, expiry: int,
         nonce: str) -> str:
    message = '\n'.join(('thunder-peer-v2', method, path, destination,
                         node_id, url, ','.join(via), ticket or '',
                         str(issued), str(expiry), nonce))
    return hmac.new(secret, message.encode('ascii'),
                    hashlib.sha256).hexdigest()


class Peer:
    """An authenticated requester; ``version`` is its token's version."""

    __slots__ = ('node_id', 'url', 'via', 'ticket', 'version')

    def __init__(self, node_id: str, url: str, via: typing.Sequence[str],
                 ticket: typing.Optional[str] = None,
                 version: int = 2) -> None:
        self.node_id = node_id
        self.url = url
        self.via = via
        self.ticket = ticket
        self.version = version

    def __repr__(self) -> str:
        return '<Peer %s at %s>' % (self.node_id, self.url)


class Signer:
    """Signs this node's requests to its peers."""

    def __init__(self, secret: bytes, node_id: str, url: str,
                 lifetime: int = 60,
                 clock: typing.Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError('shared secret shorter than %d bytes'
                             % MIN_SECRET_BYTES)
        if not 0 < lifetime <= MAX_TOKEN_LIFETIME:
            raise ValueError('token lifetime must be in (0, %d] seconds'
                             % MAX_TOKEN_LIFETIME)
        self.secret = secret
        self.node_id = check_node_id(node_id)
        self.url = normalize_url(url)
        self.lifetime = lifetime
        self._clock = clock

    def headers(self, method: str, path: str,
                via: typing.Sequence[str] = (),
                ticket: typing.Optional[str] = None, *,
                destination: str) -> typing.Dict[str, str]:
        """Headers of one request to the node at ``destination``.

        Every call makes a new token (a fresh nonce): a token serves one
        request, to one node.
        """
        destination = normalize_url(destination)
        issued = int(self._clock())
        expiry = issued + self.lifetime
        nonce = os.urandom(16).hex()
        via = tuple(via)
        headers = {
            'X-Thunder-Node': self.node_id,
            'X-Thunder-Node-URL': self.url,
            'X-Thunder-Destination': destination,
            'X-Thunder-Via': ','.join(via),
            'X-Thunder-Auth': 'v2:%d:%d:%s:%s' % (issued, expiry, nonce, _mac(
                self.secret, method, path, destination, self.node_id,
                self.url, via, ticket, issued, expiry, nonce)),
        }
        if ticket:
            headers['X-Thunder-Ticket'] = ticket
        return headers


def authenticate(secret: bytes, method: str, path: str,
                 headers: typing.Mapping[str, str],
                 clock: typing.Callable[[], float] = time.time,
                 max_lifetime: int = MAX_TOKEN_LIFETIME, *, destination: str,
                 replays: typing.Optional['ReplayCache'] = None,
                 accept_v1: bool = False) -> Peer:
    """The Peer that signed a request sent to this node.

    :param destination: this node's own URL: a token is valid only for
        the node it was made for.
    :param replays: the :class:`ReplayCache` of this node; None checks
        no nonce (tests of the MAC only).
    :param accept_v1: accept version 1 tokens (no destination, no nonce:
        neither bound to this node nor protected against replay), for a
        rolling upgrade from nodes that only sign those.
    :raises AuthError: if the token is missing, malformed, wrong, expired,
        made for another node or already used (:class:`ReplayError`).
    :raises ReplayWindowError: for a valid token made before this node
        started, or older than the nonces the replay cache had to forget.
    :raises ProtocolError: if the via list or the ticket is malformed, or
        the via list too long.
    """
    node_id = headers.get(HEADER_NODE, '')
    token = headers.get(HEADER_AUTH, '')
    match = _AUTH_V2.match(token)
    version = 2
    if match is None and accept_v1:
        match = _AUTH_V1.match(token)
        version = 1
    if not match or not NODE_ID.match(node_id):
        if token.startswith('v1:') and not accept_v1:
            raise AuthError('version 1 token refused ([peer] '
                            'accept_v1_tokens is off)')
        raise AuthError('missing or malformed token')
    try:
        url = normalize_url(headers.get(HEADER_URL, ''))
    except ValueError:
        raise AuthError('missing or malformed node URL')
    if version == 2:
        _check_destination(headers.get(HEADER_DESTINATION, ''), destination)
    via = parse_via(headers.get(HEADER_VIA, ''))
    ticket = headers.get(HEADER_TICKET) or None
    if ticket is not None and not _TICKET.match(ticket):
        raise ProtocolError(400, 'malformed %s header' % HEADER_TICKET)
    now = clock()
    if version == 1:
        expiry, mac = int(match.group(1)), match.group(2)
    else:
        issued, expiry = int(match.group(1)), int(match.group(2))
        nonce, mac = match.group(3), match.group(4)
        if (not 0 < expiry - issued <= max_lifetime or
                issued > now + CLOCK_SKEW):
            raise AuthError('token issued in the future or valid for '
                            'too long')
    if expiry < now:
        raise AuthError('token expired')
    if expiry > now + max_lifetime + CLOCK_SKEW:
        raise AuthError('token valid for too long')
    if version == 1:
        expected = _mac_v1(secret, method, path, node_id, url, via, ticket,
                           expiry)
    else:
        expected = _mac(secret, method, path, destination, node_id, url,
                        via, ticket, issued, expiry, nonce)
    if not hmac.compare_digest(expected, mac):
        raise AuthError('bad token')
    if version == 2 and replays is not None:
        replays.check(nonce, issued, expiry, now)
    return Peer(node_id, url, via, ticket, version)


def _check_destination(value: str, destination: str) -> None:
    try:
        value = normalize_url(value)
    except ValueError:
        raise AuthError('missing or malformed destination')
    if value != destination:
        raise AuthError('token made for %s, not for this node (%s)'
                        % (value, destination))


class ReplayCache:
    """The nonces of the tokens a server accepted, until the tokens expire.

    A nonce seen again while its token is valid is a replay
    (:class:`ReplayError`). Nonces live in memory only: tokens issued
    before the second the cache was made in (the node's start) are
    refused (:class:`ReplayWindowError`, 503), as the node cannot know
    which it accepted before. At most ``capacity``
    nonces are kept, in
    buckets by expiry second. When one more would exceed it, the bucket
    expiring first is forgotten and every token expiring no later than it
    is refused from then on (:class:`ReplayWindowError`, 503): a replay is
    never accepted; under more than ``capacity / token lifetime`` requests
    a second, tokens older than the freshest ones are turned away and
    their requesters sign new ones.
    """

    def __init__(self, capacity: int = 100000,
                 clock: typing.Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError('replay cache capacity must be positive')
        self.capacity = capacity
        # Tokens issued before this time are refused.
        self.started = int(clock())
        # Tokens expiring at or before this time are refused.
        self.floor = 0
        self.overflows = 0
        self._buckets: typing.Dict[int, typing.Set[int]] = {}
        self._expiries: typing.List[int] = []
        self._size = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def check(self, nonce: str, issued: int, expiry: int,
              now: float) -> None:
        """Record the nonce of a valid token.

        :raises ReplayError: if the nonce was recorded before.
        :raises ReplayWindowError: if the token was issued before this
            cache was made, or expires no later than tokens whose nonces
            were forgotten.
        """
        if issued < self.started:
            raise ReplayWindowError('token made before this node started; '
                                    'sign a new one')
        key = int(nonce, 16)
        with self._lock:
            while self._expiries and self._expiries[0] < now:
                self._drop_first()
            if expiry <= self.floor:
                raise ReplayWindowError(
                    'token too old for the replay cache (full); sign a '
                    'new one')
            bucket = self._buckets.get(expiry)
            if bucket is None:
                bucket = self._buckets[expiry] = set()
                heapq.heappush(self._expiries, expiry)
            elif key in bucket:
                raise ReplayError('token already used')
            bucket.add(key)
            self._size += 1
            while self._size > self.capacity:
                self.floor = max(self.floor, self._drop_first())
                self.overflows += 1

    def _drop_first(self) -> int:
        expiry = heapq.heappop(self._expiries)
        self._size -= len(self._buckets.pop(expiry))
        return expiry


# -- responses -------------------------------------------------------------

REASONS = {
    200: 'OK', 206: 'Partial Content', 307: 'Temporary Redirect',
    400: 'Bad Request', 401: 'Unauthorized', 404: 'Not Found',
    405: 'Method Not Allowed', 409: 'Conflict', 414: 'URI Too Long',
    416: 'Range Not Satisfiable', 431: 'Request Header Fields Too Large',
    500: 'Internal Server Error', 502: 'Bad Gateway',
    503: 'Service Unavailable', 505: 'HTTP Version Not Supported',
    508: 'Loop Detected',
}


def response_head(status: int,
                  headers: typing.Iterable[typing.Tuple[str, str]] = (),
                  length: int = 0) -> bytes:
    """The bytes of a response status line and headers."""
    lines = ['HTTP/1.1 %d %s' % (status, REASONS.get(status, 'Unknown'))]
    lines.extend('%s: %s' % item for item in headers)
    lines.append('Content-Length: %d' % length)
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('ascii')
