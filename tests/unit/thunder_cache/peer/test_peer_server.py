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

"""The peer server over real sockets, the node's answers, descriptors."""

import json
import os
import socket
import struct
import threading
import time

import pytest

from tests import cache_helpers
from thunder_cache.cache import node as node_mod
from thunder_cache.control import client as control_client
from thunder_cache import daemon
from thunder_cache.peer import protocol
from thunder_cache.peer import server as server_mod
from thunder_cache.peer import sources

CHUNK = 64 * 1024


@pytest.fixture
def volume(tmp_path):
    return cache_helpers.image_volume(tmp_path, CHUNK * 6 + 100, CHUNK)


def _spec(manifest, origin=None, peers=(), image_id='img'):
    return dict(image_id=image_id, manifest_digest=manifest.digest(),
                origin=origin, peers=peers,
                image_size=manifest.image_size)


@pytest.fixture
def seed(cluster, volume):
    image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    node, srv = cluster.start('seed', _spec(manifest, origin),
                              max_children=2)
    node.origin = origin
    return node, srv


def _raw(port, data, read_timeout=5, source=None):
    """Send raw bytes; return everything the server sends until close."""
    with socket.create_connection(('127.0.0.1', port), timeout=5,
                                  source_address=(source, 0) if source
                                  else None) as s:
        s.sendall(data)
        s.settimeout(read_timeout)
        out = b''
        while True:
            try:
                got = s.recv(65536)
            except socket.timeout:
                break
            if not got:
                break
            out += got
        return out


def _request(path, headers=None, close=True):
    lines = ['GET %s HTTP/1.1' % path, 'Host: x']
    for k, v in (headers or {}).items():
        lines.append('%s: %s' % (k, v))
    if close:
        lines.append('Connection: close')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('ascii')


def _signed(path, dest, name='peer', url='http://127.0.0.1:9', via=(),
            secret=cache_helpers.SECRET, **kw):
    return protocol.Signer(secret, name, url, **kw).headers(
        'GET', path, via, destination=dest)


def _split(response):
    head, _sep, body = response.partition(b'\r\n\r\n')
    lines = head.decode('ascii').split('\r\n')
    status = int(lines[0].split()[1])
    headers = dict(line.split(': ', 1) for line in lines[1:])
    return status, headers, body


# -- the server over sockets -----------------------------------------------

def test_chunk_served(seed, volume):
    image, manifest, _ = volume
    node, srv = seed
    path = protocol.chunk_path('img', 2)
    status, headers, body = _split(_raw(srv.port,
                                        _request(path, _signed(path,
                                                               node.url))))
    assert status == 200
    assert body == image[2 * CHUNK:3 * CHUNK]
    assert headers['Content-Length'] == str(CHUNK)
    assert headers['Connection'] == 'close'
    snap = node.cache('img').counters.snapshot()
    assert snap['bytes_served_to_peers'] == CHUNK
    assert snap['chunks_served_to_peers'] == 1


def test_keep_alive_many_requests(seed, volume):
    image, manifest, _ = volume
    node, srv = seed
    data = b''.join(_request(protocol.chunk_path('img', i),
                             _signed(protocol.chunk_path('img', i),
                                     node.url),
                             close=False)
                    for i in range(manifest.chunk_count))
    out = _raw(srv.port, data, read_timeout=1)
    body = b''
    rest = out
    for _ in range(manifest.chunk_count):
        head, _sep, rest = rest.partition(b'\r\n\r\n')
        length = int(head.split(b'Content-Length: ')[1].split(b'\r\n')[0])
        body += rest[:length]
        rest = rest[length:]
    assert body == image
    assert rest == b''


def test_range_request(seed, volume):
    image, _manifest, _ = volume
    node, srv = seed
    path = protocol.chunk_path('img', 1)
    headers = dict(_signed(path, node.url), Range='bytes=10-19')
    status, h, body = _split(_raw(srv.port, _request(path, headers)))
    assert status == 206
    assert h['Content-Range'] == 'bytes 10-19/%d' % CHUNK
    assert body == image[CHUNK + 10:CHUNK + 20]
    # A fresh token: each is accepted once.
    headers = dict(_signed(path, node.url), Range='bytes=%d-' % CHUNK)
    assert _split(_raw(srv.port, _request(path, headers)))[0] == 416


@pytest.mark.parametrize('value', ['0', 'yes', '1, 1', ''])
def test_a_malformed_looped_mark_is_refused(seed, value):
    node, srv = seed
    path = protocol.chunk_path('img', 0)
    headers = dict(_signed(path, node.url), **{'X-Thunder-Looped': value})
    status, _h, _body = _split(_raw(srv.port, _request(path, headers)))
    assert status == 400
    assert node.counters.get('loop_admissions') == 0


@pytest.mark.parametrize('mutate', [
    lambda h, d: {},
    lambda h, d: dict(h, **{'X-Thunder-Auth': 'v1:1:' + 'a' * 64}),
    lambda h, d: dict(h, **{'X-Thunder-Node': 'someone-else'}),
    lambda h, d: _signed(protocol.chunk_path('img', 1), d),   # other path
    lambda h, d: _signed(protocol.chunk_path('img', 0), d,
                         secret=b'w' * 32),
    lambda h, d: _signed(protocol.chunk_path('img', 0), d, lifetime=300,
                         clock=lambda: time.time() + 200),
    lambda h, d: _signed(protocol.chunk_path('img', 0), d,
                         clock=lambda: time.time() - 120),    # expired
    # Made for another node, or claiming to be while signed for it.
    lambda h, d: _signed(protocol.chunk_path('img', 0),
                         'http://127.0.0.1:1'),
    lambda h, d: dict(_signed(protocol.chunk_path('img', 0),
                              'http://127.0.0.1:1'),
                      **{'X-Thunder-Destination': d}),
    lambda h, d: dict(h, **{'X-Thunder-Destination': ''}),
])
def test_bad_tokens_get_401_without_body(seed, mutate):
    node, srv = seed
    path = protocol.chunk_path('img', 0)
    headers = mutate(_signed(path, node.url), node.url)
    status, h, body = _split(_raw(srv.port, _request(path, headers)))
    assert status == 401
    assert body == b''
    assert h['Content-Length'] == '0'
    assert node.counters.get('auth_failures') == 1
    # Nothing was fetched for an unauthenticated request.
    assert sum(node.origin.reads.values()) == 0


@pytest.mark.parametrize('data,status', [
    (b'GET /' + b'a' * 5000 + b' HTTP/1.1\r\n\r\n', 414),
    (b'GET /metrics HTTP/1.1\r\nX: ' + b'a' * 5000 + b'\r\n\r\n', 431),
    (b'GET /metrics HTTP/1.1\r\n' + b''.join(b'A%d: b\r\n' % i
                                             for i in range(100)) + b'\r\n',
     431),
    (b'POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc', 405),
    (b'GET /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc', 400),
    (b'GET /v1/images/../chunks/1 HTTP/1.1\r\n\r\n', 400),
    (b'GET /v1/images/img/chunks/-1 HTTP/1.1\r\n\r\n', 400),
    (b'GET /v1/images/img/chunks/99999999 HTTP/1.1\r\n\r\n', 400),
    (b'GET /etc/passwd HTTP/1.1\r\n\r\n', 404),
    (b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n', 400),  # TLS
])
def test_malformed_requests(seed, data, status):
    _node, srv = seed
    out = _raw(srv.port, data)
    assert _split(out)[0] == status
    assert b'Connection: close' in out


def test_chunk_index_past_the_image(seed, volume):
    _image, manifest, _ = volume
    node, srv = seed
    path = protocol.chunk_path('img', manifest.chunk_count)
    assert _split(_raw(srv.port, _request(path, _signed(path, node.url))))[
        0] == 404
    path = protocol.chunk_path('other', 0)
    assert _split(_raw(srv.port, _request(path, _signed(path, node.url))))[
        0] == 404


def test_manifest_endpoint(seed, volume):
    _image, manifest, _ = volume
    node, srv = seed
    got = cache_helpers.client().get_manifest(node.url, 'img',
                                              manifest.digest())
    assert got == manifest
    with pytest.raises(sources.ManifestError):
        cache_helpers.client().get_manifest(node.url, 'img', 'a' * 64)


def test_metrics(seed, volume):
    image, _manifest, _ = volume
    node, srv = seed
    node.read_image('img', 0, len(image))
    node.read_image('img', 0, len(image))
    status, headers, body = _split(_raw(srv.port, _request('/metrics')))
    assert status == 200
    assert headers['Content-Type'].startswith('text/plain')
    text = body.decode()
    assert 'thunder_cache_chunks_from_origin_total{image="img",' \
           'node="seed"} 7' in text
    assert 'thunder_cache_bytes_from_origin_total{image="img",' \
           'node="seed"} %d' % len(image) in text
    assert 'thunder_cache_hit_ratio{image="img",node="seed"} 0.5' in text
    assert ('thunder_cache_fetch_seconds_count{image="img",node="seed",'
            'source="origin"} 7') in text
    assert '# TYPE thunder_cache_fetch_seconds histogram' in text
    for line in text.splitlines():
        assert line.startswith('#') or len(line.split(' ')) == 2


def test_metrics_can_require_auth(tmp_path, seed):
    node, srv = seed
    srv.metrics_auth = True
    assert _split(_raw(srv.port, _request('/metrics')))[0] == 401
    status, _h, body = _split(_raw(srv.port, _request(
        '/metrics', _signed('/metrics', node.url))))
    assert status == 200 and b'thunder_cache' in body


def test_fanout_redirects_over_http(seed, volume):
    image, manifest, _ = volume
    node, srv = seed
    clients = [cache_helpers.client('c%d' % i, 'http://127.0.0.1:%d' % (
        10 + i)) for i in range(3)]
    assert clients[0].get_chunk(node.url, 'img', 0, CHUNK) == image[:CHUNK]
    assert clients[1].get_chunk(node.url, 'img', 0, CHUNK) == image[:CHUNK]
    with pytest.raises(sources.Redirect) as e:
        clients[2].get_chunk(node.url, 'img', 0, CHUNK)
    assert e.value.url == 'http://127.0.0.1:10'
    with pytest.raises(sources.Redirect) as e:
        clients[2].get_chunk(node.url, 'img', 0, CHUNK)
    assert e.value.url == 'http://127.0.0.1:11'
    assert node.counters.get('redirects_sent') == 2


def test_request_that_loops_back_is_refused(seed):
    node, srv = seed
    client = cache_helpers.client()
    with pytest.raises(sources.PeerError) as e:
        client.get_chunk(node.url, 'img', 0, CHUNK, via=(node.url,))
    assert e.value.status == 508 and e.value.soft


def test_relay_failure_is_503(cluster, volume):
    _image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    node, _srv = cluster.start('n', _spec(manifest, origin))
    node.cache('img')
    origin.down = True
    with pytest.raises(sources.PeerError) as e:
        cache_helpers.client().get_chunk(node.url, 'img', 0, CHUNK)
    assert e.value.status == 503 and e.value.soft


def test_upload_rate_limit(cluster, volume):
    image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    rate = 4 * CHUNK   # bytes per second
    node, _srv = cluster.start('n', _spec(manifest, origin),
                               upload_rate=rate, upload_burst=CHUNK)
    node.read_image('img', 0, len(image))
    client = cache_helpers.client()
    started = time.monotonic()
    for index in range(5):
        client.get_chunk(node.url, 'img', index, CHUNK)
    elapsed = time.monotonic() - started
    # 5 chunks, one of burst: at least 4 chunks' worth of time at the rate.
    assert elapsed >= 0.9
    assert node.bucket.waited >= 0.9


def test_connection_limit(cluster, volume):
    """Authenticated connections beyond max_connections get 503."""
    _image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    node, srv = cluster.start('n', _spec(manifest, origin),
                              server_kwargs={'max_connections': 1})
    chunk = protocol.chunk_path('img', 0)
    with socket.create_connection(('127.0.0.1', srv.port)) as first:
        # A keep-alive connection that authenticated holds the only slot.
        first.sendall(_request(chunk, _signed(chunk, node.url), close=False))
        first.settimeout(5)
        assert first.recv(65536).startswith(b'HTTP/1.1 200 OK')
        status = _split(_raw(srv.port, _request(chunk, _signed(
            chunk, node.url), close=False)))[0]
        assert status == 503
    assert srv.slots.authenticated <= 1


@pytest.mark.parametrize('answer, linger, error', [
    # Killed mid-transfer: closes after part of the body.
    (b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n' + b'x' * 10, 0.0,
     'closed after 10 of 1000'),
    # Oversized: a body longer than the chunk is not read.
    (b'HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n', 0.2,
     'announced'),
], ids=['killed-mid-transfer', 'oversized'])
def test_bad_peer_answer_is_an_error(answer, linger, error):
    """A peer's answer that is not the chunk raises PeerError."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(answer)
        time.sleep(linger)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(sources.PeerError, match=error):
        cache_helpers.client().get_chunk('http://127.0.0.1:%d' % port, 'img',
                                         0, 1000)
    t.join()
    listener.close()


def test_stop_is_graceful(cluster, volume):
    image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    node, srv = cluster.start('n', _spec(manifest, origin))
    client = cache_helpers.client()
    client.get_chunk(node.url, 'img', 0, CHUNK)   # leaves a keep-alive
    started = time.monotonic()
    cluster.stop(node)
    assert time.monotonic() - started < 1.0
    with pytest.raises(sources.PeerError):
        client.get_chunk(node.url, 'img', 0, CHUNK)


# -- resources before authentication ----------------------------------------

HALF_HEAD = b'GET /v1/images/img/chunks/0 HTTP/1.1\r\nHost: x\r\n'


def _guarded(cluster, volume, head_timeout):
    """A seed whose limits are small enough to reach in a test."""
    _image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    return cluster.start('seed', _spec(manifest, origin), server_kwargs={
        'head_timeout': head_timeout, 'idle_timeout': 30,
        'max_connections': 4, 'max_unauthenticated': 8,
        'max_per_address': 6})


@pytest.fixture
def guarded(cluster, volume):
    return _guarded(cluster, volume, head_timeout=1.0)


@pytest.fixture
def crowded(cluster, volume):
    """The same, with a head deadline longer than any test."""
    return _guarded(cluster, volume, head_timeout=60.0)


def _connect(port, source='127.0.0.1'):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect(('127.0.0.1', port))
    return s


def _closed_within(sock, seconds, trickle=None):
    """True if the server closes ``sock`` within ``seconds``.

    ``trickle``, if given, is sent a byte at a time every 0.2 s meanwhile
    (a slowloris: every single wait is short).
    """
    deadline = time.monotonic() + seconds
    data = list(trickle or b'')
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            pass
        except ConnectionResetError:
            return True
        if data:
            try:
                sock.send(bytes([data.pop(0)]))
            except OSError:
                return True
    return False


def _authenticated(node, srv, source='127.0.0.1'):
    """A keep-alive connection that was served a chunk (holds a slot)."""
    path = protocol.chunk_path('img', 0)
    s = _connect(srv.port, source)
    s.sendall(_request(path, _signed(path, node.url), close=False))
    s.settimeout(5)
    assert s.recv(65536).startswith(b'HTTP/1.1 200 OK')
    return s


def _get(node, srv, index=0, source='127.0.0.1'):
    """Status of one signed request from ``source``."""
    path = protocol.chunk_path('img', index)
    return _split(_raw(srv.port, _request(path, _signed(path, node.url)),
                       source=source))[0]


def test_half_sent_head_is_closed_at_the_head_deadline(guarded):
    node, srv = guarded
    with _connect(srv.port) as s:
        s.sendall(HALF_HEAD)
        # A header byte every 0.2 s: no wait is ever idle_timeout long,
        # the head is never complete.
        assert _closed_within(s, 10, trickle=b'X-Slow: ' + b'z' * 100)
    assert node.counters.get('head_timeouts') == 1
    # A connection that sends nothing at all too.
    with _connect(srv.port) as s:
        assert _closed_within(s, 10)
    assert node.counters.get('head_timeouts') == 2


def test_head_deadline_on_keep_alive_connections(guarded):
    """Idle between requests up to idle_timeout, then head_timeout."""
    node, srv = guarded
    with _authenticated(node, srv) as s:
        # Idle longer than head_timeout: still open.
        assert not _closed_within(s, 2.5)
        s.sendall(HALF_HEAD)
        assert _closed_within(s, 10, trickle=b'X-Slow: ' + b'z' * 100)
    assert node.counters.get('head_timeouts') == 1


# -- waits of the connection threads (blocking sockets) ----------------------

def _quick(cluster, volume):
    """A seed whose connection threads give up after 1 s of waiting."""
    _image, manifest, path = volume
    origin = cache_helpers.CountingOrigin(path)
    return cluster.start('seed', _spec(manifest, origin), server_kwargs={
        'head_timeout': 1.0, 'idle_timeout': 1.0})


def _freed_within(srv, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if srv.slots.authenticated == 0:
            return True
        time.sleep(0.05)
    return False


def test_idle_keep_alive_connection_closed_after_idle_timeout(cluster,
                                                              volume):
    node, srv = _quick(cluster, volume)
    with _authenticated(node, srv) as s:
        assert srv.slots.authenticated == 1
        # The thread waits in a blocking recv: the kernel's bound ends it.
        assert _closed_within(s, 10)
    assert _freed_within(srv, 10)


def test_reader_that_never_reads_is_cut_off(cluster, volume):
    """A full send buffer is waited for idle_timeout, then dropped."""
    node, srv = _quick(cluster, volume)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    with s:
        s.connect(('127.0.0.1', srv.port))
        # Far more answers than the socket buffers hold, never read.
        for _ in range(400):
            path = protocol.chunk_path('img', 0)
            try:
                s.sendall(_request(path, _signed(path, node.url),
                                   close=False))
            except OSError:
                break  # the server gave up already
        assert _freed_within(srv, 20)
    # The server still serves.
    assert _get(node, srv) == 200


def test_blocking_sendfile_times_out(tmp_path):
    """Nothing sent within SO_SNDTIMEO: socket.timeout, not a hang."""
    data = tmp_path / 'data'
    data.write_bytes(os.urandom(8 * 1024 * 1024))
    ours, theirs = socket.socketpair()
    with ours, theirs, open(data, 'rb') as f:
        ours.setblocking(True)
        server_mod._set_wait(ours, socket.SO_SNDTIMEO, 0.2)
        with pytest.raises(socket.timeout):
            server_mod._Serving._sendfile(ours, f.fileno(), 0,
                                          8 * 1024 * 1024,
                                          server_mod._UNLIMITED)


def test_set_wait_never_unbounded():
    """A zero (or negative) bound is a millisecond, not none at all."""
    def bound(sock):
        whole, micro = struct.unpack('ll', sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        return whole + micro / 1e6

    ours, theirs = socket.socketpair()
    with ours, theirs:
        for seconds in (0, -1):
            server_mod._set_wait(ours, socket.SO_RCVTIMEO, seconds)
            # The kernel rounds up to its clock tick: not zero.
            assert 0 < bound(ours) < 0.1
        server_mod._set_wait(ours, socket.SO_RCVTIMEO, 2.5)
        assert 2.49 < bound(ours) < 2.51


def test_unauthenticated_connections_hold_no_thread(crowded):
    node, srv = crowded
    before = threading.active_count()
    socks = []
    try:
        for i in range(40):
            s = _connect(srv.port, '127.0.0.%d' % (10 + i % 10))
            s.sendall(HALF_HEAD)
            socks.append(s)
        # The oldest were closed for the newest.
        assert cache_helpers.eventually(
            lambda: node.counters.get('connections_dropped') == 32)
        assert threading.active_count() <= before
        assert srv.slots.unauthenticated == 8
        # A peer with the secret is served all the same.
        assert _get(node, srv) == 200
    finally:
        for s in socks:
            s.close()


def test_full_unauthenticated_pool_never_blocks_a_peer(crowded):
    node, srv = crowded
    socks = [_connect(srv.port, '127.0.0.%d' % (20 + i % 4))
             for i in range(8)]
    try:
        for s in socks:
            s.sendall(HALF_HEAD)
        assert cache_helpers.eventually(
            lambda: srv.slots.unauthenticated == 8)
        for index in range(4):
            assert _get(node, srv, index) == 200
        # The first newcomer closed the oldest half-sent head; the others
        # found its place free.
        assert node.counters.get('connections_dropped') == 1
        assert _closed_within(socks[0], 1)
        assert not any(_closed_within(s, 0.1) for s in socks[1:])
    finally:
        for s in socks:
            s.close()


def test_connections_per_address(crowded):
    """Half-sent heads of an address give way to its newcomers."""
    node, srv = crowded
    socks = [_connect(srv.port, '127.0.0.2') for _ in range(6)]
    try:
        for s in socks:
            s.sendall(HALF_HEAD)
        assert cache_helpers.eventually(
            lambda: srv.slots.of_address('127.0.0.2') == 6)
        # A peer sharing the address is served; the oldest half-sent
        # head of the address made room for it.
        assert _get(node, srv, source='127.0.0.2') == 200
        assert node.counters.get('connections_dropped') == 1
        assert _closed_within(socks[0], 1)
        assert not any(_closed_within(s, 0.1) for s in socks[1:])
        # Other addresses are not affected.
        assert _get(node, srv, source='127.0.0.3') == 200
        assert srv.slots.of_address('127.0.0.2') == 5
    finally:
        for s in socks:
            s.close()
    assert cache_helpers.eventually(
        lambda: srv.slots.of_address('127.0.0.2') == 0)


def test_authenticated_connections_per_address(cluster, volume):
    """An address whose connections all authenticated gets no more."""
    _image, manifest, path = volume
    node, srv = cluster.start('seed', _spec(
        manifest, cache_helpers.CountingOrigin(path)), server_kwargs={
            'max_connections': 8, 'max_per_address': 3})
    held = []
    try:
        for _ in range(3):
            held.append(_authenticated(node, srv, '127.0.0.2'))
        extra = _connect(srv.port, '127.0.0.2')
        # Closed at once, with a 503 (plain HTTP).
        extra.settimeout(5)
        assert extra.recv(65536).startswith(b'HTTP/1.1 503')
        extra.close()
        assert node.counters.get('connections_dropped') == 1
        assert srv.slots.of_address('127.0.0.2') == 3
        assert _get(node, srv, source='127.0.0.3') == 200
    finally:
        for s in held:
            s.close()
    assert cache_helpers.eventually(
        lambda: srv.slots.of_address('127.0.0.2') == 0)
    assert _get(node, srv, source='127.0.0.2') == 200


def test_authenticated_slots_are_apart(crowded):
    """A slot is taken only by a valid token, and given back at close."""
    node, srv = crowded
    path = protocol.chunk_path('img', 0)
    held = []
    try:
        for _ in range(4):
            held.append(_authenticated(node, srv, '127.0.0.5'))
        assert srv.slots.authenticated == 4
        assert _get(node, srv) == 503
        # A bad token gets its 401 from the reactor, full or not.
        with _connect(srv.port) as s:
            s.sendall(_request(path, _signed(path, node.url,
                                             secret=b'w' * 32)))
            s.settimeout(5)
            assert s.recv(65536).startswith(b'HTTP/1.1 401')
    finally:
        for s in held:
            s.close()
    assert cache_helpers.eventually(lambda: srv.slots.authenticated == 0)
    assert _get(node, srv) == 200


def test_replayed_request_is_refused(seed):
    node, srv = seed
    path = protocol.chunk_path('img', 0)
    request = _request(path, _signed(path, node.url))
    assert _split(_raw(srv.port, request))[0] == 200
    status, _h, body = _split(_raw(srv.port, request))
    assert (status, body) == (401, b'')
    assert node.counters.get('replays_refused') == 1
    assert node.cache('img').counters.get('chunks_served_to_peers') == 1


def test_v1_tokens_accepted_only_when_configured(cluster, volume):
    _image, manifest, path = volume
    expiry = int(time.time()) + 60
    chunk = protocol.chunk_path('img', 0)
    v1 = {'X-Thunder-Node': 'old', 'X-Thunder-Node-URL': 'http://127.0.0.1:9',
          'X-Thunder-Via': '', 'X-Thunder-Auth': 'v1:%d:%s' % (
              expiry, protocol._mac_v1(cache_helpers.SECRET, 'GET', chunk,
                                       'old', 'http://127.0.0.1:9', (), None,
                                       expiry))}
    strict, strict_srv = cluster.start('strict', _spec(
        manifest, cache_helpers.CountingOrigin(path)))
    assert _split(_raw(strict_srv.port, _request(chunk, v1)))[0] == 401
    lenient, srv = cluster.start('lenient', _spec(
        manifest, cache_helpers.CountingOrigin(path)),
        server_kwargs={'accept_v1_tokens': True})
    assert _split(_raw(srv.port, _request(chunk, v1)))[0] == 200
    assert lenient.counters.get('v1_tokens') == 1
    assert _get(lenient, srv) == 200
    assert lenient.counters.get('v1_tokens') == 1


def test_slots_accounting():
    slots = server_mod.Slots(max_authenticated=2, max_unauthenticated=3,
                             max_per_address=2)
    assert slots.open('a') and slots.open('a')
    assert not slots.open('a')
    assert slots.open('b') and slots.open('c')
    assert slots.unauthenticated == 4 and slots.unauthenticated_full()
    assert slots.promote() and slots.promote()
    assert not slots.promote()           # authenticated slots all taken
    assert (slots.authenticated, slots.unauthenticated) == (2, 2)
    assert not slots.unauthenticated_full()
    slots.close('a', True)
    assert slots.of_address('a') == 1 and slots.open('a')
    assert slots.promote()
    for address, authenticated in (('a', True), ('a', True), ('b', False),
                                   ('c', False)):
        slots.close(address, authenticated)
    assert (slots.authenticated, slots.unauthenticated) == (0, 0)
    assert slots.of_address('a') == 0
    unlimited = server_mod.Slots(1, 1, None)
    assert all(unlimited.open('local') for _ in range(1000))


# -- registration and descriptors ------------------------------------------

def test_descriptors(tmp_path, volume):
    _image, manifest, path = volume
    directory = tmp_path / 'images.d'
    directory.mkdir()
    good = {'manifest_digest': manifest.digest(),
            'image_size': manifest.image_size,
            'origin': {'type': 'file', 'path': path},
            'peers': ['http://127.0.0.1:7485/']}
    (directory / 'img.json').write_text(json.dumps(good))
    for name, body in [
            ('bad-digest', dict(good, manifest_digest='x')),
            ('no-offset', {'manifest_digest': manifest.digest()}),
            ('bad-peer', dict(good, peers=['ftp://x:1'])),
            ('peers-str', dict(good, peers='http://a:1')),
            ('bad-origin', dict(good, origin={'type': 'nfs'})),
            ('origin-no-path', dict(good, origin={'type': 'file'})),
            ('other-id', dict(good, image_id='img')),
            ('negative', dict(good, image_size=-1)),
            ('..', good)]:
        (directory / ('%s.json' % name)).write_text(json.dumps(body))
    (directory / 'list.json').write_text('[]')
    (directory / 'broken.json').write_text('{')
    (directory / 'huge.json').write_text(' ' * 70000 + '{}')
    (directory / 'README').write_text('not a descriptor')
    node = node_mod.Node('n', 'http://127.0.0.1:7485', str(tmp_path / 'c'),
                         client=cache_helpers.client())
    conf = type('Conf', (), {})()
    conf.origin = type('Origin', (), dict(
        rbd_ceph_conf='/nonexistent', rbd_user=None, rbd_keyring=None,
        rbd_cluster_name='ceph', rbd_connect_timeout=1,
        rbd_pools=['volumes'], rbd_volume_name_template='volume-%s',
        file_origin_dirs=[os.path.dirname(path)]))()
    assert node.load_descriptors(str(directory),
                                 daemon.origin_factory(conf)) == 1
    assert node.image_ids() == ['img']
    cache = node.cache('img')
    assert cache.manifest == manifest
    # The verified manifest is kept next to the cache.
    with open(os.path.join(cache.directory, node_mod.MANIFEST_FILE),
              'rb') as f:
        assert f.read() == manifest.to_bytes()
    node.close()


def test_manifest_digest_mismatch_refuses_image(tmp_path, volume):
    _image, manifest, path = volume
    node = node_mod.Node('n', 'http://127.0.0.1:7485', str(tmp_path / 'c'),
                         client=cache_helpers.client(), activation_retry=60)
    node.register(node_mod.ImageSpec(
        'img', 'b' * 64, sources.FileOrigin(path),
        image_size=manifest.image_size))
    with pytest.raises(sources.ManifestError, match='does not match'):
        node.cache('img')
    # Retried only after activation_retry.
    with pytest.raises(sources.ManifestError):
        node.cache('img')
    node.close()


def test_manifest_from_peer_when_origin_unreachable(cluster, volume):
    image, manifest, path = volume
    seed, _ = cluster.start('seed', _spec(
        manifest, cache_helpers.CountingOrigin(path)))
    other, _ = cluster.start('other', _spec(
        manifest, sources.FileOrigin(path + '.missing'), peers=[seed.url]))
    assert other.read_image('img', 0, len(image)) == image
    assert other.cache('img').counters.get('bytes_from_peers') == len(image)


def test_register_other_digest_refused(tmp_path, volume):
    _image, manifest, path = volume
    node = node_mod.Node('n', 'http://127.0.0.1:7485', str(tmp_path / 'c'),
                         client=cache_helpers.client())
    node.register(node_mod.ImageSpec('img', manifest.digest(),
                                     image_size=1))
    with pytest.raises(node_mod.DescriptorError):
        node.register(node_mod.ImageSpec('img', 'c' * 64, image_size=1))
    node.close()


# -- daemon helpers --------------------------------------------------------

def test_pid_file(tmp_path):
    path = str(tmp_path / 'run' / 'x.pid')
    daemon.write_pid_file(path)
    with open(path) as f:
        assert int(f.read()) == os.getpid()
    daemon.write_pid_file(path)  # our own PID: fine
    daemon.remove_pid_file(path)
    assert not os.path.exists(path)
    # A stale PID file (dead process) is replaced.
    with open(path, 'w') as f:
        f.write('999999999\n')
    daemon.write_pid_file(path)
    daemon.remove_pid_file(path)


# -- the local socket ------------------------------------------------------

def test_local_reads(tmp_path, seed, volume):
    image, manifest, _ = volume
    node, _srv = seed
    path = str(tmp_path / 'run' / 'local.sock')
    local = server_mod.LocalServer(path, node)
    t = threading.Thread(target=local.serve_forever, args=(0.05,),
                         daemon=True)
    t.start()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o660)
        reader = control_client.LocalClient(path)
        assert reader.manifest('img', manifest.digest()) == manifest
        for offset, length in [(0, len(image)), (5, 10), (CHUNK - 3, 7),
                               (len(image) - 5, 100), (CHUNK, CHUNK),
                               (len(image), 10)]:
            assert reader.read('img', offset, length) == (
                image[offset:offset + length])
        # Local reads are neither children nor uploads.
        assert node._entry('img').children.children() == {}
        snap = node.cache('img').counters.snapshot()
        assert snap['bytes_served_to_peers'] == 0
        assert snap['bytes_served_local'] > len(image)
        with pytest.raises(IOError, match='404'):
            reader.read('nope', 0, 1)
        reader.close()
    finally:
        local.stop(grace=1)
    assert not os.path.exists(path)


@pytest.mark.parametrize('section', [
    '[advertise]\nenabled = true\n',  # no credentials to advertise with
    '[blockdev]\nenabled = true\nmount_dir = {d}/vol\nlayers_dir = {d}/l\n'
    'control_socket = {d}/c.sock\ncontrol_group = no-such-group-vmth\n'
    'volume_server = python\n',
    # The native server (the default) not installed: no fallback.
    '[blockdev]\nenabled = true\nmount_dir = {d}/vol\nlayers_dir = {d}/l\n'
    'control_socket = {d}/c.sock\nnative_server_socket = {d}/n.sock\n'
    'native_server_binary = {d}/no-such-thunder-volume-server\n',
    '[peer]\nallowed_networks = 10.0.0.0/24, 10.1.0.1/16\n',  # not a network
])
def test_daemon_refuses_to_start_clearly(tmp_path, section):
    """A part that cannot start: exit 1, nothing left behind, no hang."""
    d = str(tmp_path)
    result = cache_helpers.run_daemon(d, section.format(d=d))
    assert result.returncode == 1, result.stderr
    assert 'Cannot start: ' in result.stdout + result.stderr
    assert 'Traceback' not in result.stdout + result.stderr
    for left in ('pid', 'local.sock', 'c.sock'):
        assert not os.path.exists(os.path.join(d, left)), left
    assert not os.path.ismount(os.path.join(d, 'vol'))
