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

"""The peer client against hostile peers: deadlines, addresses, sizes.

The peers are scripted servers on loopback (:mod:`tests.hostile_peer`).
Nothing here may connect anywhere else: the address tests fail as soon as a
connection to another address is attempted, before any packet is sent.
"""

import socket
import threading
import time

import pytest

from tests import cache_helpers
from tests import hostile_peer as hp
from thunder_cache.cache import upstream as upstream_mod
from thunder_cache.peer import peerpolicy
from thunder_cache.peer import protocol
from thunder_cache.peer import sources
from thunder_common import manifest as manifest_mod

IMAGE = 'img'
# Per-recv timeout of the clients below: a trickle sending a byte every
# 0.1 s never trips it; only the whole-answer deadline can end it.
TIMEOUT = 1.0
MIN_RATE = 1024 * 1024
# What a base client, timing each recv alone, would wait at least.
TRICKLE_SECONDS = 60


def client(allowed=('127.0.0.0/8',), resolver=socket.getaddrinfo):
    c = cache_helpers.client()
    c.timeout = TIMEOUT
    c.min_rate = MIN_RATE
    c.policy = peerpolicy.AddressPolicy(list(allowed), resolver=resolver)
    return c


def limit(length, c=None):
    """Seconds an answer of ``length`` bytes may take (the contract)."""
    c = c or client()
    return c.timeout + length / c.min_rate


@pytest.fixture
def peers():
    """Make hostile peers; all are stopped after the test."""
    made = hp.Peers()
    yield made
    made.stop()


def _fails_by_deadline(call, limit):
    """``call()`` raises PeerError for its deadline soon after ``limit``."""
    done, error, took = hp.bounded(call, limit + 10)
    assert done, 'still waiting after %.0f s' % took
    assert isinstance(error, sources.PeerError), error
    assert 'deadline' in str(error)
    assert not error.soft
    assert took >= limit - 0.5
    return error


# -- the deadline arithmetic -----------------------------------------------

def test_time_limit_is_the_fixed_part_plus_the_bytes_at_the_rate():
    c = sources.PeerClient(None, timeout=10.0)
    assert c.min_rate == 1024 * 1024
    assert c.time_limit(0) == 10.0
    assert c.time_limit(4 * 1024 * 1024) == 14.0
    c.min_rate = 0.04 * 1024 * 1024      # a 40 Mbit/s testbed, scaled
    assert c.time_limit(256 * 1024) == pytest.approx(10.0 + 6.25)
    c.timeout, c.min_rate = TIMEOUT, MIN_RATE
    assert c.time_limit(LENGTH) == limit(LENGTH)


@pytest.mark.parametrize('length, offset, expected', [
    (32832, None, 32832),
    (None, 32 * 1024 * 1024, 32 + 8192 * 32),
    (None, 0, 32),
    (None, None, 32 + manifest_mod.MAX_CHUNKS * 32),
    (None, 2 ** 50, 32 + manifest_mod.MAX_CHUNKS * 32),
    (2 ** 40, None, 32 + manifest_mod.MAX_CHUNKS * 32),
])
def test_manifest_limit(length, offset, expected):
    assert sources.manifest_limit(length, offset) == expected


# -- whole-answer deadlines ------------------------------------------------

LENGTH = 600


def test_trickled_body_is_cut_at_the_deadline(peers):
    peer = peers(lambda path: [hp.head(200, LENGTH),
                               hp.trickle(b'x' * LENGTH, 0.1)])
    c = client()
    _fails_by_deadline(
        lambda: c.get_chunk(peer.url, IMAGE, 0, LENGTH), limit(LENGTH))
    # The connection was dropped: the next request opens a new one.
    with pytest.raises(sources.PeerError):
        c.get_chunk(peer.url, IMAGE, 0, LENGTH)
    assert peer.connections == 2


@pytest.mark.parametrize('answer', [
    # The status line, a byte at a time.
    [hp.trickle(b'HTTP/1.1 200 OK\r\n' + b'X-Pad: y\r\n' * 200, 0.1)],
    # Endless header lines.
    [b'HTTP/1.1 200 OK\r\n', hp.trickle(b'X-Pad: y\r\n' * 200, 0.1)],
    # An error body.
    [hp.head(503, 4000), hp.trickle(b'e' * 4000, 0.1)],
    # A redirect's body.
    [hp.head(307, 4000, [('Location', 'http://127.0.0.1:9/x')]),
     hp.trickle(b'r' * 4000, 0.1)],
    # Nothing at all, each silence shorter than the recv timeout.
    [hp.pause(0.5), hp.trickle(b'\r\n' * 300, 0.5)],
], ids=['status', 'headers', 'error-body', 'redirect-body', 'blank-lines'])
def test_trickled_heads_and_error_bodies_are_cut(peers, answer):
    peer = peers(lambda path: answer)
    c = client()
    _fails_by_deadline(lambda: c.get_chunk(peer.url, IMAGE, 0, LENGTH),
                       limit(LENGTH))


def test_a_peer_that_never_answers_is_cut(peers):
    peer = peers(lambda path: [hp.HANG])
    c = client()
    c.timeout = 2.0
    _fails_by_deadline(lambda: c.get_chunk(peer.url, IMAGE, 0, LENGTH),
                       limit(LENGTH, c))


class _LateWatchdog:
    """A watchdog whose thread never got the CPU in time."""

    def arm(self, deadline, action):
        return [deadline, 0, action]

    def disarm(self, entry):
        pass


@pytest.mark.parametrize('late', [True, False])
def test_a_recv_timeout_past_the_deadline_reports_the_deadline(
        monkeypatch, late):
    """A recv timeout past the deadline is the deadline (a hard error).

    The recv timeout may end a silent wait just before the watchdog cuts
    the socket.
    """
    monkeypatch.setattr(sources, '_WATCHDOG', _LateWatchdog())
    c = client()
    url = 'http://127.0.0.1:9'
    left = -0.001 if late else 60.0
    transfer = c._deadline(url, time.monotonic() + 0.05)
    with pytest.raises(sources.PeerError) as raised:
        with transfer:
            transfer.deadline = time.monotonic() + left
            raise sources.PeerError('peer %s: timed out' % url)
    assert ('deadline' in str(raised.value)) is late
    assert not raised.value.soft


def test_a_soft_answer_past_the_deadline_stays_soft(monkeypatch):
    monkeypatch.setattr(sources, '_WATCHDOG', _LateWatchdog())
    c = client()
    url = 'http://127.0.0.1:9'
    transfer = c._deadline(url, time.monotonic() + 0.05)
    with pytest.raises(sources.PeerError) as raised:
        with transfer:
            transfer.deadline = time.monotonic() - 0.001
            raise sources.PeerError('busy', status=503, soft=True)
    assert raised.value.soft and 'deadline' not in str(raised.value)


def test_a_complete_answer_within_the_deadline_is_read(peers):
    data = bytes(range(256)) * 4
    peer = peers(lambda path: [hp.head(200, len(data)), data[:500],
                               hp.pause(0.3), data[500:]])
    c = client()
    assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data
    # Kept alive: a second request goes over the same connection.
    assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data
    assert peer.connections == 1


def test_an_answer_closing_the_connection_is_not_reused(peers):
    data = b'c' * 100
    peer = peers(lambda path: [hp.head(200, len(data),
                                       [('Connection', 'close')]), data])
    c = client()
    assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data
    assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data
    assert peer.connections == 2


@pytest.mark.parametrize('answer', [
    b'HTTP/1.1 abc X\r\nContent-Length: 0\r\n\r\n',
    b'SPDY/3 200 X\r\nContent-Length: 0\r\n\r\n',
    b'HTTP/1.1 200 X\r\n\r\n',
    b'HTTP/1.1 200 X\r\nContent-Length: 600\r\nContent-Length: 600'
    b'\r\n\r\n',
    b'HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\nContent-Length: '
    b'600\r\n\r\n',
    b'HTTP/1.1 200 X\r\nBad Header\r\n\r\n',
], ids=['status', 'version', 'no-length', 'two-lengths', 'chunked',
        'header'])
def test_a_malformed_answer_fails_at_once(peers, answer):
    peer = peers(lambda path: [answer, hp.HANG])
    c = client()
    done, error, took = hp.bounded(
        lambda: c.get_chunk(peer.url, IMAGE, 0, LENGTH), 5)
    assert done and isinstance(error, sources.PeerError), error
    assert 'deadline' not in str(error) and took < TIMEOUT


def _counting_reads(monkeypatch):
    """The sizes of the reads of the socket a client makes for bodies."""
    sizes = []
    readinto = sources._Reader.readinto

    def counted(self, view):
        count = readinto(self, view)
        sizes.append(count)
        return count

    monkeypatch.setattr(sources._Reader, 'readinto', counted)
    return sizes


def _pieces(data, size, interval):
    """``data`` in pieces of ``size`` bytes, ``interval`` seconds apart."""
    steps = []
    for start in range(0, len(data), size):
        steps += [hp.pause(interval), data[start:start + size]]
    return steps


def test_a_body_arriving_in_small_pieces_is_read_in_few_wakeups(
        peers, monkeypatch):
    # A slow link delivers a packet at a time: the thread wakes once per
    # RECV_LOWAT bytes, not once per packet.
    sizes = _counting_reads(monkeypatch)
    data = bytes(range(256)) * 384           # 96 KiB, 96 pieces
    peer = peers(lambda path: [hp.head(200, len(data))] +
                 _pieces(data, 1024, 0.002))
    c = client()
    assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data
    assert len(sizes) <= len(data) // sources.RECV_LOWAT + 1, sizes
    assert max(sizes) >= sources.RECV_LOWAT


def test_the_end_of_a_body_and_the_next_head_do_not_wait_for_the_mark(
        peers, monkeypatch):
    # A first read takes the 45000 bytes sent at once (more than the
    # mark); the last 8000 come later, fewer than the mark; then the next
    # answer's head is a few dozen bytes. Neither may wait for bytes that
    # will not come (each would stall for the recv timeout).
    data = bytes(range(250)) * 212
    peer = peers(lambda path: [hp.head(200, len(data)), data[:45000],
                               hp.pause(0.1), data[45000:]])
    c = client()
    c.timeout = 3.0
    started = time.monotonic()
    for _ in range(3):
        assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data
    assert time.monotonic() - started < 2.0
    assert peer.connections == 1


def test_the_mark_never_asks_more_than_the_slowest_allowed_peer_sends(
        peers, monkeypatch):
    marks = []
    wait_for = sources._Reader._wait_for

    def recording(self, count):
        wait_for(self, count)
        marks.append(self._mark)

    monkeypatch.setattr(sources._Reader, '_wait_for', recording)
    data = b'r' * 20000
    peer = peers(lambda path: [hp.head(200, len(data)), data])
    c = client()
    c.timeout = 1.0
    c.min_rate = 1000.0    # bytes/s: 500 bytes in half the timeout
    assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data
    assert max(marks) == 500


def test_the_rate_counts(peers):
    """A slow answer still inside fixed part + bytes / rate is read."""
    data = b'z' * 40
    peer = peers(lambda path: [hp.head(200, len(data)),
                               hp.trickle(data, 0.05)])
    c = client()
    c.timeout = 0.5
    c.min_rate = 20.0          # bytes/s: 0.5 + 40 / 20 = 2.5 s
    assert c.get_chunk(peer.url, IMAGE, 0, len(data)) == data


def test_trickled_manifest_is_cut(peers):
    manifest = manifest_mod.Manifest.build([b'a' * 5000], 4096)
    raw = manifest.to_bytes()
    peer = peers(lambda path: [hp.head(200, len(raw)),
                               hp.trickle(raw, 0.1)])
    c = client()
    _fails_by_deadline(
        lambda: c.get_manifest(peer.url, IMAGE, manifest.digest(),
                               len(raw)),
        limit(len(raw)))


def test_manifest_from_a_peer(peers):
    manifest = manifest_mod.Manifest.build([b'a' * 5000], 4096)
    raw = manifest.to_bytes()
    peer = peers(lambda path: [hp.head(200, len(raw)), raw])
    c = client()
    assert c.get_manifest(peer.url, IMAGE, manifest.digest(),
                          len(raw)).to_bytes() == raw
    assert c.get_manifest(peer.url, IMAGE, manifest.digest(), None,
                          offset=1024 * 1024).to_bytes() == raw


@pytest.mark.parametrize('declared, length, offset', [
    (64 * 1024 * 1024, None, None),     # within the absolute maximum
    (64 * 1024 * 1024, None, 1024 * 1024),
    (32 + 2 * 32 + 32, 32 + 2 * 32, None),
    (10, None, None),
])
def test_oversized_manifest_refused_before_its_body(peers, declared, length,
                                                    offset):
    """The declared size is checked against the descriptor's bound.

    Only a manifest whose header agrees with a declared size within the
    bound is read, and then only as it arrives.
    """
    peer = peers(lambda path: [hp.head(200, declared), hp.HANG])
    c = client()
    done, error, took = hp.bounded(
        lambda: c.get_manifest(peer.url, IMAGE, '0' * 64, length, offset),
        10)
    assert done
    assert isinstance(error, sources.PeerError), error
    assert took < 5


def test_manifest_whose_header_disagrees_with_its_size(peers):
    small = manifest_mod.Manifest.build([b'a' * 5000], 4096).to_bytes()
    declared = 32 + 100 * 32
    peer = peers(lambda path: [hp.head(200, declared), small, hp.HANG])
    c = client()
    with pytest.raises(sources.ManifestError, match='header says'):
        c.get_manifest(peer.url, IMAGE, '0' * 64, None, 1024 * 1024)


def test_redirects_share_one_deadline(peers):
    """Each hop answers in time; all of them together do not."""
    hops = []

    def answer(path):
        # Every hop redirects to a new one after 0.4 s.
        nxt = peers(answer)
        hops.append(nxt)
        return [hp.pause(0.4), hp.head(307, 0, [('Location',
                                                 nxt.url + path)])]

    first = peers(answer)
    c = client()
    up = upstream_mod.Upstream(IMAGE, None, [first.url], c,
                               'http://127.0.0.1:1', max_redirects=64)
    source = sources.PeerSource(up, first.url)
    bound = limit(LENGTH)
    done, error, took = hp.bounded(
        lambda: source.read_chunk(0, 0, LENGTH), bound + 10)
    assert done
    assert isinstance(error, sources.PeerError)
    assert 'deadline' in str(error)
    assert took < bound + 5
    assert len(hops) < 64


# -- where requests may go ------------------------------------------------

class ConnectGuard:
    """Fails the test at any connection attempt not to ``allowed``."""

    def __init__(self, monkeypatch, allowed=()):
        self.allowed = set(allowed)
        self.attempts = []
        real_create = socket.create_connection
        real_connect = socket.socket.connect

        def create_connection(address, *args, **kwargs):
            self._check(address, record=False)
            return real_create(address, *args, **kwargs)

        def connect(sock, address):
            self._check(address)
            return real_connect(sock, address)

        monkeypatch.setattr(socket, 'create_connection', create_connection)
        monkeypatch.setattr(socket.socket, 'connect', connect)

    def _check(self, address, record=True):
        if record:
            self.attempts.append(address)
        if address[0] not in self.allowed:
            raise AssertionError('connection attempted to %r' % (address,))


def fake_dns(table):
    def resolve(host, port, family=0, type=0):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, 'unknown')
        return [(socket.AF_INET6 if ':' in a else socket.AF_INET,
                 socket.SOCK_STREAM, 6, '', (a, 0)) for a in table[host]]
    return resolve


REFUSED_URLS = [
    'http://169.254.169.254:80', 'http://127.0.0.2:7485',
    'http://127.0.0.1:7485', 'http://0.0.0.0:7485', 'http://[::1]:7485',
    'http://[::ffff:169.254.169.254]:80', 'http://[fe80::1]:7485',
    'http://10.0.1.99:7485', 'http://224.0.0.1:7485',
    'http://metadata.internal:80', 'http://rebind.example:7485',
    'http://0x7f.1:7485', 'http://2130706433:7485',
]
DNS = {'metadata.internal': ['169.254.169.254'],
       'rebind.example': ['10.0.0.5', '127.0.0.1']}


@pytest.mark.parametrize('url', REFUSED_URLS)
def test_no_connection_to_a_refused_address(monkeypatch, url):
    guard = ConnectGuard(monkeypatch)
    c = client(allowed=['10.0.0.0/24'], resolver=fake_dns(DNS))
    with pytest.raises(sources.PeerError, match='peer'):
        c.get_chunk(url, IMAGE, 0, LENGTH)
    with pytest.raises(sources.PeerError):
        c.get_manifest(url, IMAGE, '0' * 64)
    assert guard.attempts == []
    assert not c.permits(url)


def test_no_policy_refuses_everything(monkeypatch):
    guard = ConnectGuard(monkeypatch)
    c = sources.PeerClient(protocol.Signer(cache_helpers.SECRET, 'n',
                                           'http://127.0.0.1:9'), timeout=1)
    with pytest.raises(sources.PeerError, match='no peer address policy'):
        c.get_chunk('http://10.0.0.5:7485', IMAGE, 0, LENGTH)
    assert guard.attempts == []
    assert not c.permits('http://10.0.0.5:7485')


def test_connection_goes_to_the_checked_address(monkeypatch, peers):
    """A host name is connected to at the address that was checked."""
    peer = peers(lambda path: [hp.head(200, 3), b'abc'])
    guard = ConnectGuard(monkeypatch, allowed=['127.0.0.1'])
    answers = [['127.0.0.1'], ['169.254.169.254']]

    def resolver(host, port, family=0, type=0):
        return fake_dns({'peer.example': answers.pop(0)})(host, port)

    c = client(allowed=['127.0.0.1/32'], resolver=resolver)
    url = 'http://peer.example:%d' % peer.port
    assert c.permits(url)
    assert c.get_chunk(url, IMAGE, 0, 3) == b'abc'
    c.close()
    # A second connection uses the pinned, checked address: the name is
    # not resolved again (it would now say 169.254.169.254).
    assert c.get_chunk(url, IMAGE, 0, 3) == b'abc'
    assert [a[0] for a in guard.attempts] == ['127.0.0.1', '127.0.0.1']
    assert len(answers) == 1


@pytest.mark.parametrize('target', [
    'http://127.0.0.2:%(canary)d', 'http://169.254.169.254:80',
    'http://[::1]:%(canary)d', 'http://metadata.internal:80'])
def test_redirect_to_a_refused_address_is_not_followed(monkeypatch, peers,
                                                       target):
    canary = peers(lambda path: [hp.head(200, 3), b'abc'], host='127.0.0.2')
    location = target % {'canary': canary.port}
    peer = peers(lambda path: [hp.head(307, 0, [('Location',
                                                 location + path)])])
    guard = ConnectGuard(monkeypatch, allowed=['127.0.0.1'])
    c = client(allowed=['127.0.0.1/32'], resolver=fake_dns(DNS))
    with pytest.raises(sources.PeerError, match='outside the allowed'):
        c.get_chunk(peer.url, IMAGE, 0, 3)
    assert canary.connections == 0
    assert [a[0] for a in guard.attempts] == ['127.0.0.1']


def test_refused_redirect_backs_the_redirecting_peer_off(peers):
    peer = peers(lambda path: [hp.head(307, 0, [(
        'Location', 'http://169.254.169.254:80' + path)])])
    c = client(allowed=['127.0.0.1/32'])
    up = upstream_mod.Upstream(IMAGE, None, [peer.url], c,
                               'http://127.0.0.1:1', retry_interval=30)
    source = next(up.candidates())
    with pytest.raises(sources.PeerError) as raised:
        source.read_chunk(0, 0, 3)
    up.report(source, False, raised.value)
    assert up.banned() == {peer.url}


# -- the watchdog ----------------------------------------------------------

def test_watchdog_runs_actions_at_their_deadlines_only():
    dog = sources.Watchdog()
    ran = []
    now = time.monotonic()
    late = dog.arm(now + 0.3, lambda: ran.append('late'))
    early = dog.arm(now + 0.1, lambda: ran.append('early'))
    dropped = dog.arm(now + 0.2, lambda: ran.append('dropped'))
    dog.disarm(dropped)
    time.sleep(0.6)
    assert ran == ['early', 'late']
    dog.disarm(early)
    dog.disarm(late)
    # Idle: the thread is gone.
    deadline = time.monotonic() + 5
    while dog._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dog._thread is None


def test_watchdog_repeats_an_action_until_disarmed():
    dog = sources.Watchdog()
    count = []
    entry = dog.arm(time.monotonic(), lambda: count.append(1) or True)
    time.sleep(0.3)
    dog.disarm(entry)
    seen = len(count)
    time.sleep(0.2)
    assert seen >= 3
    assert len(count) == seen


def test_no_thread_left_after_transfers(peers):
    peer = peers(lambda path: [hp.head(200, 3), b'abc'])
    c = client()
    for _ in range(3):
        assert c.get_chunk(peer.url, IMAGE, 0, 3) == b'abc'
    c.close()
    deadline = time.monotonic() + limit(3) + 5
    while time.monotonic() < deadline and any(
            t.name == 'peer-deadlines' for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name == 'peer-deadlines'
                   for t in threading.enumerate())


# -- soft answers -----------------------------------------------------------

@pytest.mark.parametrize('delay, soft', [(0.0, True), (0.8, False)])
def test_a_slow_busy_answer_counts_as_a_failure(peers, delay, soft):
    """503 after most of the deadline, for every chunk: backed off."""
    peer = peers(lambda path: [hp.pause(delay), hp.head(503, 5), b'busy\n'])
    c = client()
    up = upstream_mod.Upstream(IMAGE, None, [peer.url], c,
                               'http://127.0.0.1:1', retry_interval=30)
    source = sources.PeerSource(up, peer.url)
    with pytest.raises(sources.PeerError) as raised:
        source.read_chunk(0, 0, LENGTH)
    assert raised.value.soft is soft
    assert raised.value.status == 503
    up.report(source, False, raised.value)
    assert up.banned() == (set() if soft else {peer.url})
