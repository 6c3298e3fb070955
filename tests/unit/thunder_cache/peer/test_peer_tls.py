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

"""The peer protocol over TLS: in-process servers on 127.0.0.x."""

import os
import socket
import ssl
import threading
import time

import pytest

from tests import cache_helpers
from thunder_cache.peer import protocol
from thunder_cache.peer import server as server_mod
from thunder_cache.peer import sources
from thunder_cache.peer import tls
from thunder_stack import pki

# Larger than a TLS slice, so that bodies take several.
CHUNK = 4 * server_mod.RATE_SLICE


@pytest.fixture(scope='module')
def certs(tmp_path_factory):
    """Node certificates of the deployment's CA, and of another CA."""
    base = tmp_path_factory.mktemp('pki')
    ours = pki.Pki(str(base / 'ours'))
    other = pki.Pki(str(base / 'other'), name='another CA')
    return {
        'ca': ours.ca_file,
        'node': ours.node('node', ['127.0.0.1', 'localhost']),
        'client': ours.node('client', ['127.0.0.9']),
        'elsewhere': ours.node('elsewhere', ['127.0.0.4']),
        'other_ca': other.ca_file,
        'rogue': other.node('rogue', ['127.0.0.1']),
    }


def _counted(node, name, value):
    """True once the node's counter is ``value`` (within 10 s)."""
    return cache_helpers.eventually(
        lambda: node.counters.get(name) == value)


def _client_context(certs, which='client', ca='ca'):
    return tls.client_context(*certs[which], certs[ca])


def _client(certs, which='client', ca='ca', name='tester',
            url='https://127.0.0.9:9'):
    signer = protocol.Signer(cache_helpers.SECRET, name, url)
    return cache_helpers.peer_client(
        signer, tls_context=_client_context(certs, which, ca))


@pytest.fixture
def volume(tmp_path):
    image = os.urandom(CHUNK * 3 + 1000)
    path = str(tmp_path / 'volume')
    manifest = cache_helpers.write_volume(path, image, CHUNK)
    return image, manifest, path


@pytest.fixture
def seed(tmp_path, certs, https, volume):
    image, manifest, path = volume
    cluster = cache_helpers.Cluster(tmp_path, client_tls=_client_context(
        certs, 'node'))
    node, srv = cluster.start(
        'seed', dict(image_id='img', manifest_digest=manifest.digest(),
                     origin=cache_helpers.CountingOrigin(path),
                     image_size=manifest.image_size),
        server_kwargs={'tls_context': tls.server_context(*certs['node'],
                                                         certs['ca']),
                       'head_timeout': 1.0})
    yield node, srv
    cluster.stop_all()


def test_chunks_over_tls(seed, certs, volume):
    image, manifest, _ = volume
    node, srv = seed
    assert node.url.startswith('https://127.0.0.1:')
    client = _client(certs)
    for index in range(manifest.chunk_count):
        offset, length = manifest.chunk_range(index)
        assert client.get_chunk(node.url, 'img', index, length) == (
            image[offset:offset + length])
    assert client.get_manifest(node.url, 'img', manifest.digest()) == (
        manifest)
    assert node.cache('img').counters.get('bytes_served_to_peers') == len(
        image)
    client.close()


def test_pipelined_requests_over_tls(seed, certs, volume):
    """Requests sent at once with the handshake: all answered, in order."""
    image, _manifest, _ = volume
    node, srv = seed
    signer = protocol.Signer(cache_helpers.SECRET, 'piper',
                             'https://127.0.0.9:9')
    data = b''
    for index in (2, 0, 1):
        path = protocol.chunk_path('img', index)
        data += ('GET %s HTTP/1.1\r\n%s\r\n' % (path, ''.join(
            '%s: %s\r\n' % item for item in signer.headers(
                'GET', path, destination=node.url).items()))).encode()
    context = _client_context(certs)
    with socket.create_connection(('127.0.0.1', srv.port), timeout=10) as s:
        with context.wrap_socket(s, server_hostname='127.0.0.1') as t:
            t.sendall(data)
            reader = t.makefile('rb')
            bodies = []
            for _ in range(3):
                assert reader.readline() == b'HTTP/1.1 200 OK\r\n'
                headers = dict(line.rstrip(b'\r\n').split(b': ', 1)
                               for line in iter(reader.readline, b'\r\n'))
                bodies.append(reader.read(int(headers[b'Content-Length'])))
            reader.close()
    assert bodies == [image[2 * CHUNK:3 * CHUNK], image[:CHUNK],
                      image[CHUNK:2 * CHUNK]]


def test_rate_limited_upload_over_tls(tmp_path, certs, https, volume):
    image, manifest, path = volume
    cluster = cache_helpers.Cluster(tmp_path)
    try:
        node, _srv = cluster.start(
            'n', dict(image_id='img', manifest_digest=manifest.digest(),
                      origin=cache_helpers.CountingOrigin(path),
                      image_size=manifest.image_size),
            server_kwargs={'tls_context': tls.server_context(
                *certs['node'], certs['ca'])},
            upload_rate=8 * CHUNK, upload_burst=CHUNK)
        client = _client(certs)
        assert client.get_chunk(node.url, 'img', 1, CHUNK) == (
            image[CHUNK:2 * CHUNK])
        assert client.get_chunk(node.url, 'img', 2, CHUNK) == (
            image[2 * CHUNK:3 * CHUNK])
        assert node.bucket.waited > 0
        client.close()
    finally:
        cluster.stop_all()


def test_client_certificate_of_another_ca_is_refused(seed, certs):
    node, _srv = seed
    client = _client(certs, 'rogue', ca='ca')
    with pytest.raises(sources.PeerError):
        client.get_chunk(node.url, 'img', 0, CHUNK)
    assert _counted(node, 'tls_handshake_failures', 1)
    assert node.cache('img').counters.get('bytes_served_to_peers') == 0


def test_no_client_certificate_is_refused(seed, certs):
    node, srv = seed
    context = ssl.create_default_context(cafile=certs['ca'])
    with socket.create_connection(('127.0.0.1', srv.port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(s, server_hostname='127.0.0.1') as t:
                # TLS 1.3: the server's refusal arrives with the first read.
                t.sendall(b'GET /metrics HTTP/1.1\r\n\r\n')
                assert t.recv(100) == b''
                raise ConnectionError('closed')


def test_tls_before_1_3_is_refused(seed, certs):
    node, srv = seed
    context = _client_context(certs)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(('127.0.0.1', srv.port), timeout=5) as s:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(s, server_hostname='127.0.0.1')
    assert _counted(node, 'tls_handshake_failures', 1)


def test_server_certificate_of_another_ca_is_refused(seed, certs):
    node, _srv = seed
    client = _client(certs, 'client', ca='other_ca')
    with pytest.raises(sources.PeerError, match='CERTIFICATE_VERIFY_FAILED'):
        client.get_chunk(node.url, 'img', 0, CHUNK)
    assert node.cache('img').counters.get('bytes_served_to_peers') == 0


def test_server_certificate_for_another_host_is_refused(certs, https):
    """The certificate must name the host of the URL the client asked."""
    srv = server_mod.PeerServer(
        ('127.0.0.4', 0), None, cache_helpers.SECRET,
        tls_context=tls.server_context(*certs['node'], certs['ca']))
    threading.Thread(target=srv.serve_forever, args=(0.05,),
                     daemon=True).start()
    try:
        client = _client(certs)
        with pytest.raises(sources.PeerError, match='mismatch'):
            client.get_chunk('https://127.0.0.4:%d' % srv.port, 'img', 0,
                             CHUNK)
    finally:
        srv.stop(grace=1)


def test_plain_http_client_is_refused(seed, volume):
    node, srv = seed
    path = protocol.chunk_path('img', 0)
    headers = protocol.Signer(cache_helpers.SECRET, 'plain',
                              'https://127.0.0.9:9').headers(
        'GET', path, destination=node.url)
    request = ('GET %s HTTP/1.1\r\n%s\r\n' % (path, ''.join(
        '%s: %s\r\n' % item for item in headers.items()))).encode()
    with socket.create_connection(('127.0.0.1', srv.port), timeout=5) as s:
        s.sendall(request)
        answer = b''
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    assert b'HTTP/1.1' not in answer
    assert _counted(node, 'tls_handshake_failures', 1)
    assert node.cache('img').counters.get('bytes_served_to_peers') == 0


def test_stalled_handshake_is_closed_by_the_head_deadline(seed):
    node, srv = seed
    started = time.monotonic()
    with socket.create_connection(('127.0.0.1', srv.port), timeout=30) as s:
        # Half a ClientHello, then silence.
        s.sendall(b'\x16\x03\x01\x02\x00\x01\x00\x01')
        assert s.recv(100) == b''
    # head_timeout is 1 s.
    assert time.monotonic() - started < 10
    assert _counted(node, 'head_timeouts', 1)


def test_plain_urls_refused_with_tls(https):
    with pytest.raises(ValueError, match='same scheme'):
        protocol.normalize_url('http://127.0.0.1:7485')
    assert protocol.normalize_url('https://[::1]:7485/') == (
        'https://[::1]:7485')
    assert sources.split_url('https://[::1]:7485') == ('::1', 7485)
    client = sources.PeerClient(protocol.Signer(
        cache_helpers.SECRET, 'n', 'https://127.0.0.1:1'))
    with pytest.raises(sources.PeerError, match='plain HTTP'):
        client.get_chunk('https://127.0.0.1:1', 'img', 0, 1)


@pytest.mark.parametrize('peer,message', [
    ('tls_enabled = true\n', 'needs [peer] tls_certificate'),
    ('tls_enabled = true\ntls_certificate = {node}\ntls_key = {key}\n'
     'tls_ca_file = {d}/missing.pem\n', 'tls_ca_file'),
    ('tls_enabled = true\ntls_certificate = {node}\ntls_key = {other_key}\n'
     'tls_ca_file = {ca}\n', 'tls_key'),
    ('tls_enabled = true\ntls_certificate = {node}\ntls_key = {key}\n'
     'tls_ca_file = {ca}\n[node]\nadvertise_url = http://127.0.0.1:1\n',
     'advertise_url'),
])
def test_daemon_refuses_bad_tls_settings(tmp_path, certs, peer, message):
    d = str(tmp_path)
    result = cache_helpers.run_daemon(d, peer.format(
        d=d, node=certs['node'][0], key=certs['node'][1],
        other_key=certs['rogue'][1], ca=certs['ca']))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert 'Cannot start: ' in output and message in output, output
    assert 'Traceback' not in output
    assert not os.path.exists(os.path.join(d, 'pid'))
