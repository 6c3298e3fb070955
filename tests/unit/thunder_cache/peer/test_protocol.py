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

"""The peer protocol's parser and tokens, including hostile input."""

import io
import random

import pytest

from thunder_cache.peer import protocol

SECRET = b's' * 32
NOW = 1_800_000_000
URL = 'http://10.0.0.5:7485'
DEST = 'http://10.0.0.8:7485'
PATH = '/v1/images/img-1/chunks/3'


def _head(data):
    return protocol.read_head(io.BytesIO(data).readline)


def _status(exc_info):
    return exc_info.value.status


# -- request line -------------------------------------------------------------

def test_request_line_ok():
    assert protocol.parse_request_line(b'GET /metrics HTTP/1.1\r\n') == (
        'GET', '/metrics', 'HTTP/1.1')
    assert protocol.parse_request_line(b'GET / HTTP/1.0\n')[2] == 'HTTP/1.0'


@pytest.mark.parametrize('line,status', [
    (b'GET /' + b'a' * 2000 + b' HTTP/1.1\r\n', 414),
    (b'GET /' + b'a' * 1100, 414),
    (b'GET /x HTTP/1.1', 400),             # no end of line (peer hung up)
    (b'GET  /x HTTP/1.1\r\n', 400),        # double space
    (b'GET /x\r\n', 400),                  # HTTP/0.9
    (b'GET /x HTTP/1.1 extra\r\n', 400),
    (b'POST /x HTTP/1.1\r\n', 405),
    (b'get /x HTTP/1.1\r\n', 405),
    (b'DELETE /v1/images/a/chunks/1 HTTP/1.1\r\n', 405),
    (b'G(T /x HTTP/1.1\r\n', 400),
    (b'GET /x HTTP/2.0\r\n', 505),
    (b'GET /x HTTP/1.1x\r\n', 400),
    (b'GET /x http/1.1\r\n', 400),
    (b'GET http://evil/v1/images/a/manifest HTTP/1.1\r\n', 400),
    (b'GET * HTTP/1.1\r\n', 400),
    (b'GET /x?y=1 HTTP/1.1\r\n', 400),
    (b'GET /x#y HTTP/1.1\r\n', 400),
    (b'GET /v1/images/%2e%2e/manifest HTTP/1.1\r\n', 400),
    (b'GET /v1\\images HTTP/1.1\r\n', 400),
    (b'GET /\xff HTTP/1.1\r\n', 400),
    (b'\r\n', 400),
])
def test_request_line_refused(line, status):
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.parse_request_line(line)
    assert _status(e) == status


# -- headers ------------------------------------------------------------------

def test_head_ok():
    method, target, version, headers = _head(
        b'\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nAccept: a\r\n'
        b'Accept: b\r\nX-Empty:\r\n\r\nGET /next HTTP/1.1\r\n')
    assert (method, target, version) == ('GET', '/metrics', 'HTTP/1.1')
    assert headers == {'host': 'x', 'accept': 'a, b', 'x-empty': ''}


def test_head_end_of_connection():
    assert _head(b'') is None
    assert _head(b'\r\n') is None


@pytest.mark.parametrize('data,status', [
    (b'GET / HTTP/1.1\r\n' + b''.join(b'H%d: v\r\n' % i for i in range(40))
     + b'\r\n', 431),
    (b'GET / HTTP/1.1\r\nX: ' + b'v' * 5000 + b'\r\n\r\n', 431),
    (b'GET / HTTP/1.1\r\n' + (b'X: ' + b'v' * 1500 + b'\r\n') * 12 +
     b'\r\n', 431),
    (b'GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nNo colon\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nBad Name: x\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\n: x\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: \xc3\xa9\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX-Thunder-Auth: a\r\nx-thunder-auth: b\r\n\r\n',
     400),
    (b'GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello', 400),
    (b'GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nHost: x\r\n', 400),     # EOF inside the headers
    (b'\r\n' * 6 + b'GET / HTTP/1.1\r\n\r\n', 400),
])
def test_head_refused(data, status):
    with pytest.raises(protocol.ProtocolError) as e:
        _head(data)
    assert _status(e) == status


def test_head_content_length_zero_is_fine():
    assert _head(b'GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n')[3] == {
        'content-length': '0'}


_ALPHABET = b'GET /:\r\n\t -%\x00\xffHTP1.0v9aZ'


def _mutated(rng, valid, changes, longest, copies=False):
    """``valid`` with 1 to ``changes`` random changes.

    Bytes replaced, deleted, inserted (runs of at most ``longest``), and
    with ``copies`` whole lines repeated (duplicate or long headers).
    """
    replace, delete, insert = (0.3, 0.5, 0.7) if copies else (0.4, 0.7, 1)
    data = bytearray(valid)
    for _ in range(rng.randint(1, changes)):
        pos = rng.randrange(len(data))
        op = rng.random()
        if op < replace:
            data[pos] = rng.randrange(256)
        elif op < delete:
            del data[pos]
        elif op < insert:
            data[pos:pos] = bytes(rng.choice(_ALPHABET)
                                  for _ in range(rng.randint(1, longest)))
        else:
            start = data.rfind(b'\n', 0, pos) + 1
            line = data[start:data.find(b'\n', pos) + 1]
            data[start:start] = line * rng.choice((1, 40))
    return bytes(data)


def test_fuzz_read_head():
    """Random and mutated heads raise nothing but ProtocolError."""
    rng = random.Random(4)
    valid = (b'GET /v1/images/abc/chunks/12 HTTP/1.1\r\nHost: h\r\n'
             b'X-Thunder-Auth: v1:1:aa\r\nRange: bytes=0-10\r\n\r\n')
    for i in range(4000):
        if i % 2:
            data = _mutated(rng, valid, 8, 50)
        else:
            data = bytes(rng.choice(_ALPHABET)
                         for _ in range(rng.randint(0, 300)))
        try:
            result = _head(data)
        except protocol.ProtocolError as e:
            assert e.status in protocol.REASONS
            continue
        if result is not None:
            method, target, version, headers = result
            assert method == 'GET' and target.startswith('/')
            assert len(headers) <= protocol.MAX_HEADERS


def _outcome(parse):
    try:
        return parse()
    except protocol.ProtocolError as e:
        return e.status


def test_head_buffer_parses_as_read_head():
    """The plain-head shortcut of HeadBuffer changes no outcome.

    Mutated signed heads: what HeadBuffer.take returns or refuses,
    read_head returns or refuses the same; what the shortcut accepts is
    exactly what read_head makes of the same bytes.
    """
    signer = protocol.Signer(b's' * 32, 'node-a', 'http://10.0.0.1:8080')
    path = protocol.chunk_path('img', 12)
    valid = (''.join(['GET %s HTTP/1.1\r\nHost: 10.0.0.2:8080\r\n' % path] +
                     ['%s: %s\r\n' % item for item in signer.headers(
                         'GET', path, destination='http://10.0.0.2:8080'
                     ).items()] + ['Range: bytes=0-10\r\n\r\n'])
             ).encode('ascii')
    assert protocol._plain_head(bytearray(valid))[0] == _head(valid)
    rng = random.Random(5)
    shortcut = 0
    for i in range(6000):
        data = _mutated(rng, valid, 4, 20, copies=True)
        plain = protocol._plain_head(bytearray(data))
        if plain is not None:
            shortcut += 1
            assert _head(data[:plain[1]]) == plain[0]
        buffer = protocol.HeadBuffer()
        buffer.feed(data)
        taken = _outcome(buffer.take)
        if taken is not None:
            assert _outcome(lambda: _head(data)) == taken
    assert shortcut > 500


# -- routes -------------------------------------------------------------------

def test_routes():
    assert protocol.route('/metrics') == protocol.Route('metrics')
    assert protocol.route('/v1/images/abc-DEF_1/manifest') == protocol.Route(
        'manifest', 'abc-DEF_1')
    assert protocol.route('/v1/images/a/chunks/0') == protocol.Route(
        'chunk', 'a', 0)
    assert protocol.route('/v1/images/a/chunks/4194303').index == 4194303
    image_id = '0' * 64
    assert protocol.route('/v1/images/%s/manifest' % image_id).image_id == (
        image_id)


@pytest.mark.parametrize('path,status', [
    ('/', 404),
    ('/metrics/', 404),
    ('/v2/images/a/manifest', 404),
    ('/v1/image/a/manifest', 404),
    ('/v1/images/a', 404),
    ('/v1/images/a/', 404),
    ('/v1/images/a/chunks', 404),
    ('/v1/images/a/chunks/1/', 404),
    ('/v1/images/a/chunks/1/2', 404),
    ('/v1/images/a/manifest/x', 404),
    ('//v1/images/a/manifest', 404),
    ('/v1//images/a/manifest', 404),
    ('/v1/images//manifest', 400),
    ('/v1/images/../manifest', 400),
    ('/v1/images/./chunks/1', 400),
    ('/v1/images/.hidden/manifest', 400),
    ('/v1/images/-a/manifest', 400),
    ('/v1/images/a.b/manifest', 400),
    ('/v1/images/%s/manifest' % ('a' * 65), 400),
    ('/v1/images/a/chunks/-1', 400),
    ('/v1/images/a/chunks/+1', 400),
    ('/v1/images/a/chunks/01', 400),
    ('/v1/images/a/chunks/1.0', 400),
    ('/v1/images/a/chunks/0x10', 400),
    ('/v1/images/a/chunks/ 1', 400),
    ('/v1/images/a/chunks/12345678', 400),
    ('/v1/images/a/chunks/%d' % 2 ** 64, 400),
    ('/v1/images/a/chunks/\u0661', 400),     # Arabic-Indic digit one
    ('/v1/images/\u00e9/manifest', 400),
    ('/v1/images/a/chunks/1\n', 400),
])
def test_hostile_routes(path, status):
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.route(path)
    assert _status(e) == status


def test_fuzz_route():
    rng = random.Random(7)
    pieces = ['/', 'v1', 'images', 'chunks', 'manifest', 'metrics', 'a',
              '..', '.', '0', '01', '-1', '9' * 30, '%2f', 'é', '\x00', '']
    for _ in range(5000):
        path = ''.join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        try:
            r = protocol.route(path)
        except protocol.ProtocolError as e:
            assert e.status in (400, 404)
            continue
        if r.kind == 'chunk':
            assert 0 <= r.index < 10 ** 7
            assert protocol.IMAGE_ID.match(r.image_id)


# -- ranges -------------------------------------------------------------------

@pytest.mark.parametrize('value,expected', [
    ('bytes=0-0', (0, 1)),
    ('bytes=0-99', (0, 100)),
    ('bytes=10-', (10, 100)),
    ('bytes=-10', (90, 100)),
    ('bytes=-1000', (0, 100)),
    ('bytes=50-1000', (50, 100)),
    ('bytes=99-99', (99, 100)),
    ('bytes=0-9999999999999999999', (0, 100)),        # 19 digits
    (' bytes=1-2 ', (1, 3)),
])
def test_range_ok(value, expected):
    assert protocol.parse_range(value, 100) == expected


@pytest.mark.parametrize('value,status', [
    ('bytes=100-', 416),
    ('bytes=100-200', 416),
    ('bytes=9999999999999999999-', 416),
    ('bytes=-0', 416),
    ('bytes=0-1,2-3', 416),
    ('bytes=5-2', 400),
    ('bytes=-', 400),
    ('bytes=', 400),
    ('bytes=1-2-3', 400),
    ('bytes=a-b', 400),
    ('bytes=-1-2', 400),
    ('bytes=+1-2', 400),
    ('bytes=0-99999999999999999999', 400),             # 20 digits
    ('bytes=1e3-', 400),
    ('items=0-1', 400),
    ('bytes 0-1', 400),
    ('', 400),
])
def test_range_refused(value, status):
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.parse_range(value, 100)
    assert _status(e) == status


def test_range_of_empty_resource():
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.parse_range('bytes=-5', 0)
    assert _status(e) == 416


def test_fuzz_range():
    rng = random.Random(11)
    for _ in range(5000):
        length = rng.choice([0, 1, 100, 2 ** 20, 2 ** 26])
        value = 'bytes=%s-%s' % (
            rng.choice(['', str(rng.randrange(2 ** 70)),
                        str(rng.randrange(length + 2))]),
            rng.choice(['', str(rng.randrange(2 ** 70)),
                        str(rng.randrange(length + 2))]))
        try:
            start, end = protocol.parse_range(value, length)
        except protocol.ProtocolError as e:
            assert e.status in (400, 416)
            continue
        assert 0 <= start < end <= length


# -- tokens -------------------------------------------------------------------

def _signed(path=PATH, via=(), now=NOW, node='node-1', url=URL,
            secret=SECRET, lifetime=60, dest=DEST):
    signer = protocol.Signer(secret, node, url, lifetime=lifetime,
                             clock=lambda: now)
    return {k.lower(): v for k, v in signer.headers(
        'GET', path, via, destination=dest).items()}


def _auth(headers, path=PATH, now=NOW, method='GET', secret=SECRET,
          dest=DEST, **kwargs):
    return protocol.authenticate(secret, method, path, headers,
                                 clock=lambda: now, destination=dest,
                                 **kwargs)


def test_token_ok():
    peer = _auth(_signed(via=('http://10.0.0.9:1',)))
    assert peer.node_id == 'node-1'
    assert peer.url == URL
    assert peer.via == ('http://10.0.0.9:1',)
    assert _auth(_signed(now=NOW - 59)).node_id == 'node-1'


def _tamper(name, value):
    headers = _signed()
    headers[name] = value
    return headers


@pytest.mark.parametrize('headers,kwargs', [
    ({}, {}),
    (_signed(secret=b'x' * 32), {}),
    (_signed(), {'path': '/v1/images/img-1/chunks/4'}),
    (_signed(), {'path': '/v1/images/img-1/manifest'}),
    (_signed(), {'method': 'HEAD'}),
    (_signed(), {'now': NOW + 61}),                          # expired
    (_signed(now=NOW + 400), {}),                            # far future
    (_signed(lifetime=300, now=NOW + 31), {}),               # > max + skew
    (_tamper('x-thunder-node', 'node-2'), {}),
    (_tamper('x-thunder-node', ''), {}),
    (_tamper('x-thunder-node', '../x'), {}),
    (_tamper('x-thunder-node-url', 'http://10.0.0.6:7485'), {}),
    (_tamper('x-thunder-node-url', 'ftp://10.0.0.5:7485'), {}),
    (_tamper('x-thunder-node-url', ''), {}),
    (_tamper('x-thunder-via', 'http://10.0.0.7:1'), {}),
    (_tamper('x-thunder-auth', ''), {}),
    (_tamper('x-thunder-auth', 'v1:%d:%s' % (NOW + 30, 'a' * 64)), {}),
    (_tamper('x-thunder-auth', 'v1' + _signed()['x-thunder-auth'][2:]),
     {}),
    (_tamper('x-thunder-auth', 'v3' + _signed()['x-thunder-auth'][2:]),
     {}),
    (_tamper('x-thunder-auth', _signed()['x-thunder-auth'].upper()), {}),
    (_tamper('x-thunder-auth', _signed()['x-thunder-auth'] + '0'), {}),
    (_tamper('x-thunder-auth', 'v1:-5:' + 'a' * 64), {}),
    (_tamper('x-thunder-auth', 'v1:99999999999999999999:' + 'a' * 64), {}),
    (_tamper('x-thunder-auth', 'v1:0:' + 'a' * 64), {}),
])
def test_token_refused(headers, kwargs):
    with pytest.raises(protocol.AuthError) as e:
        _auth(headers, **kwargs)
    assert _status(e) == 401


def test_token_expiry_changed_is_refused():
    headers = _signed()
    _v, issued, expiry, nonce, mac = headers['x-thunder-auth'].split(':')
    for changed in ((issued, int(expiry) + 10), (int(issued) - 10, expiry),
                    (int(issued) + 1, expiry)):
        headers['x-thunder-auth'] = 'v2:%s:%s:%s:%s' % (changed + (nonce,
                                                                   mac))
        with pytest.raises(protocol.AuthError):
            _auth(headers)


def test_via_limits():
    via = tuple('http://10.0.0.%d:1' % i for i in range(protocol.MAX_HOPS))
    assert _auth(_signed(via=via)).via == via
    too_long = _signed()
    too_long['x-thunder-via'] = ','.join(via + ('http://10.0.1.1:1',))
    with pytest.raises(protocol.ProtocolError) as e:
        _auth(too_long)
    assert _status(e) == 508
    bad = _signed()
    bad['x-thunder-via'] = 'http://10.0.0.1:1,javascript:x'
    with pytest.raises(protocol.ProtocolError) as e:
        _auth(bad)
    assert _status(e) == 400


def test_signer_checks():
    with pytest.raises(ValueError):
        protocol.Signer(b'short', 'n', URL)
    with pytest.raises(ValueError):
        protocol.Signer(SECRET, 'bad id!', URL)
    with pytest.raises(ValueError):
        protocol.Signer(SECRET, 'n', 'http://x')
    with pytest.raises(ValueError):
        protocol.Signer(SECRET, 'n', URL, lifetime=301)


@pytest.mark.parametrize('url', [
    'http://127.0.0.1:1', 'http://[::1]:7485', 'http://node-3.example:80',
    'http://node:80', 'http://a:65535/'])
def test_normalize_url_ok(url):
    assert protocol.normalize_url(url) == url.rstrip('/')


@pytest.mark.parametrize('url', [
    'http://127.0.0.1', 'http://127.0.0.1:0', 'http://127.0.0.1:65536',
    'https://a:1', 'http://a:1/path', 'http://user@a:1', 'http://a b:1',
    'http://:1', 'http://a:01', 'http://' + 'a' * 300 + ':1', None, 5,
    'http://a:1?x', 'http://-a:1'])
def test_normalize_url_refused(url):
    with pytest.raises(ValueError):
        protocol.normalize_url(url)


def test_load_secret(tmp_path):
    path = tmp_path / 'secret'
    path.write_bytes(b'  ' + b'k' * 20 + b'\n')
    assert protocol.load_secret(str(path)) == b'k' * 20
    path.write_bytes(b'short\n')
    with pytest.raises(ValueError):
        protocol.load_secret(str(path))


def test_response_head():
    head = protocol.response_head(307, [('Location', 'http://a:1/x')])
    assert head == (b'HTTP/1.1 307 Temporary Redirect\r\n'
                    b'Location: http://a:1/x\r\nContent-Length: 0\r\n\r\n')


def test_tickets():
    first = protocol.new_ticket(clock=lambda: 1000.5)
    second = protocol.new_ticket(clock=lambda: 1000.75)
    assert first.startswith('1000.500000-')
    assert protocol.ticket_key(first) < protocol.ticket_key(second)
    for bad in ('', None, '1.5-abcd', '1.500000-ABCDEF01', 'x.000000-0000'):
        with pytest.raises(ValueError):
            protocol.ticket_key(bad)


def test_ticket_is_signed():
    ticket = protocol.new_ticket()
    signer = protocol.Signer(SECRET, 'node-1', URL, clock=lambda: NOW)
    headers = {k.lower(): v for k, v in signer.headers(
        'GET', PATH, (), ticket, destination=DEST).items()}
    assert _auth(headers).ticket == ticket
    assert _auth(_signed()).ticket is None
    headers['x-thunder-ticket'] = protocol.new_ticket()
    with pytest.raises(protocol.AuthError):
        _auth(headers)
    headers['x-thunder-ticket'] = 'not a ticket'
    with pytest.raises(protocol.ProtocolError) as e:
        _auth(headers)
    assert _status(e) == 400


# -- request heads as they arrive --------------------------------------------

HEAD = (b'GET /v1/images/img-1/chunks/3 HTTP/1.1\r\nHost: x\r\n'
        b'X-Thunder-Node: n\r\n\r\n')


def test_head_buffer_byte_by_byte():
    buffer = protocol.HeadBuffer()
    for i in range(len(HEAD) - 1):
        buffer.feed(HEAD[i:i + 1])
        assert buffer.take() is None
    buffer.feed(HEAD[-1:] + HEAD + b'GET /met')
    first = buffer.take()
    assert first[:3] == ('GET', PATH, 'HTTP/1.1')
    assert first[3] == {'host': 'x', 'x-thunder-node': 'n'}
    assert buffer.take() == first
    # What follows stays for the next head.
    assert buffer.take() is None and len(buffer) == len(b'GET /met')
    buffer.feed(b'rics HTTP/1.0\n\n')
    assert buffer.take()[:2] == ('GET', '/metrics')
    assert len(buffer) == 0 and buffer.take() is None


@pytest.mark.parametrize('data,status', [
    (b'GET /' + b'a' * 2000, 414),                     # no end of line yet
    (b'GET / HTTP/1.1\r\nX: ' + b'a' * 5000, 431),
    (b'GET / HTTP/1.1\r\n' + b'X: y\r\n' * 3000, 431),
    (b'\r\n' * 6, 400),
    (b'GET / HTTP/1.1\r\n\x80: y\r\n', 400),
])
def test_head_buffer_refuses(data, status):
    buffer = protocol.HeadBuffer()
    buffer.feed(data)
    with pytest.raises(protocol.ProtocolError) as e:
        buffer.take()
    assert _status(e) == status


def test_head_buffer_is_bounded():
    """However a head is cut, an incomplete one never exceeds the bound."""
    buffer = protocol.HeadBuffer()
    rng = random.Random(5)
    line = b'X-Pad: ' + b'p' * 200 + b'\r\n'
    data = b'GET / HTTP/1.1\r\n' + line * 100
    with pytest.raises(protocol.ProtocolError) as e:
        position = 0
        while True:
            step = min(rng.randint(1, 300), buffer.room())
            buffer.feed(data[position:position + step])
            position += step
            assert len(buffer) <= protocol.MAX_HEAD_BYTES
            assert buffer.take() is None
    assert _status(e) == 431


# -- tokens for one node, once ------------------------------------------------

def test_token_is_for_its_destination_only():
    headers = _signed(dest=DEST)
    with pytest.raises(protocol.AuthError, match='made for'):
        _auth(headers, dest='http://10.0.0.9:7485')
    # Claiming the other destination does not help: it is signed.
    headers['x-thunder-destination'] = 'http://10.0.0.9:7485'
    with pytest.raises(protocol.AuthError, match='bad token'):
        _auth(headers, dest='http://10.0.0.9:7485')
    for value in ('', 'http://10.0.0.9', 'ftp://10.0.0.9:1'):
        headers['x-thunder-destination'] = value
        with pytest.raises(protocol.AuthError):
            _auth(headers, dest=DEST)


def test_signer_makes_a_new_nonce_each_time():
    signer = protocol.Signer(SECRET, 'node-1', URL, clock=lambda: NOW)
    tokens = {signer.headers('GET', PATH, destination=DEST)['X-Thunder-Auth']
              for _ in range(100)}
    assert len(tokens) == 100
    with pytest.raises(ValueError):
        signer.headers('GET', PATH, destination='http://x')
    with pytest.raises(TypeError):
        signer.headers('GET', PATH)


def test_replayed_token_is_refused():
    replays = protocol.ReplayCache(1000)
    headers = _signed()
    assert _auth(headers, replays=replays).node_id == 'node-1'
    with pytest.raises(protocol.ReplayError) as e:
        _auth(headers, replays=replays, now=NOW + 30)
    assert _status(e) == 401
    # Another token of the same node for the same request is fine.
    assert _auth(_signed(), replays=replays).node_id == 'node-1'
    # A refused token does not take a place in the cache.
    with pytest.raises(protocol.AuthError):
        _auth(_signed(secret=b'x' * 32), replays=replays)
    assert len(replays) == 2


def test_replay_cache_bound():
    """Memory stays bounded; a replay is refused even after the bound."""
    replays = protocol.ReplayCache(100)
    first = _signed(now=NOW - 50)
    _auth(first, replays=replays)
    for i in range(1000):
        # Tokens made over 50 seconds, all still valid.
        _auth(_signed(now=NOW - 50 + i // 20), replays=replays)
        assert len(replays) <= 100
    assert replays.overflows > 0
    # The first nonce was forgotten: its token is refused all the same.
    with pytest.raises(protocol.ReplayWindowError) as e:
        _auth(first, replays=replays)
    assert _status(e) == 503
    # An older, never seen token too; a fresh one passes.
    with pytest.raises(protocol.ReplayWindowError):
        _auth(_signed(now=NOW - 40), replays=replays)
    assert _auth(_signed(), replays=replays).node_id == 'node-1'


@pytest.mark.parametrize('issued,expiry', [
    # Issued after it expires, valid for longer than allowed, or issued
    # in the future: well signed, refused all the same.
    (NOW + 10, NOW + 5), (NOW - 400, NOW + 5), (NOW + 40, NOW + 60)])
def test_token_times_refused(issued, expiry):
    nonce = 'ab' * 16
    mac = protocol._mac(SECRET, 'GET', PATH, DEST, 'node-1', URL, (), None,
                        issued, expiry, nonce)
    signed = dict(_signed(), **{'x-thunder-auth': 'v2:%d:%d:%s:%s' % (
        issued, expiry, nonce, mac)})
    with pytest.raises(protocol.AuthError):
        _auth(signed)


def test_tokens_made_before_a_restart_are_refused():
    """Nonces live in memory: a node refuses what it may have accepted."""
    replays = protocol.ReplayCache(1000, clock=lambda: NOW + 0.5)
    for made in (NOW - 30, NOW - 1):
        with pytest.raises(protocol.ReplayWindowError) as e:
            _auth(_signed(now=made), replays=replays, now=NOW + 1)
        assert _status(e) == 503
    for made in (NOW, NOW + 1):
        assert _auth(_signed(now=made), replays=replays,
                     now=NOW + 1).node_id == 'node-1'
    assert len(replays) == 2


def test_replay_cache_forgets_expired_tokens():
    replays = protocol.ReplayCache(1000)
    for i in range(500):
        _auth(_signed(now=NOW + i // 100), replays=replays)
    assert len(replays) == 500
    # 61 s later the first 100 tokens have expired, and they are gone.
    _auth(_signed(now=NOW + 61), replays=replays, now=NOW + 61)
    assert len(replays) == 401
    assert replays.overflows == 0 and replays.floor == 0


def _v1_headers(path=PATH, node='node-1', url=URL, now=NOW):
    """What a node of the previous release sends."""
    expiry = now + 60
    return {'x-thunder-node': node, 'x-thunder-node-url': url,
            'x-thunder-via': '',
            'x-thunder-auth': 'v1:%d:%s' % (expiry, protocol._mac_v1(
                SECRET, 'GET', path, node, url, (), None, expiry))}


def test_v1_tokens_only_when_accepted():
    with pytest.raises(protocol.AuthError, match='accept_v1_tokens'):
        _auth(_v1_headers())
    peer = _auth(_v1_headers(), accept_v1=True)
    assert (peer.node_id, peer.version) == ('node-1', 1)
    assert _auth(_signed(), accept_v1=True).version == 2
    for tampered in (_v1_headers(),
                     dict(_v1_headers(), **{'x-thunder-auth': 'v1:%d:%s' % (
                         NOW + 60, 'a' * 64)})):
        tampered['x-thunder-node'] = 'node-2'
        with pytest.raises(protocol.AuthError, match='bad token'):
            _auth(tampered, accept_v1=True)
    # A v2 token cut down to v1's shape is no v1 token.
    _v, _issued, expiry, _nonce, mac = _signed()['x-thunder-auth'].split(
        ':')
    with pytest.raises(protocol.AuthError):
        _auth(dict(_signed(), **{'x-thunder-auth': 'v1:%s:%s' % (expiry,
                                                                 mac)}),
              accept_v1=True)


# -- one scheme per deployment ----------------------------------------------

def test_https_urls_refused_without_tls():
    with pytest.raises(ValueError, match='tls_enabled is off'):
        protocol.normalize_url('https://10.0.0.5:7485')
    assert protocol.split_url('http://[::1]:80') == ('http', '::1', 80)


def test_http_urls_refused_with_tls(https):
    assert protocol.url_scheme() == 'https'
    assert protocol.normalize_url('https://node-3:7485/') == (
        'https://node-3:7485')
    with pytest.raises(ValueError, match='tls_enabled is on'):
        protocol.normalize_url(URL)
    # Requesters and relays must speak the same scheme.
    signer = protocol.Signer(SECRET, 'n', 'https://10.0.0.5:1',
                             clock=lambda: NOW)
    headers = {k.lower(): v for k, v in signer.headers(
        'GET', PATH, ('https://10.0.0.6:1',),
        destination='https://10.0.0.8:1').items()}
    assert _auth(headers, dest='https://10.0.0.8:1').via == (
        'https://10.0.0.6:1',)
    headers['x-thunder-via'] = URL
    with pytest.raises(protocol.ProtocolError):
        _auth(headers, dest='https://10.0.0.8:1')
