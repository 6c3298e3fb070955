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

"""Cut-through relaying: a chunk sent on while it arrives, never unverified.

The streams alone first, then a real node relaying a chunk from a scripted
upstream peer (:mod:`tests.hostile_peer`) to a real client.
"""

import threading
import time

import pytest

from tests import cache_helpers
from tests import hostile_peer as hp
from thunder_cache.cache import chunkstream
from thunder_cache.peer import protocol
from thunder_cache.peer import sources

LENGTH = 4 * sources.STREAM_SLICE
SOON = 5.0


def _stream(length=10, deadline=None):
    return chunkstream.ChunkStream(length, deadline or time.monotonic() + 60)


def _take(reader):
    data = bytearray()
    while len(data) < reader.length:
        piece = reader.next()
        if piece is None:
            return data, False
        data += piece
    return data, True


# -- the stream ------------------------------------------------------------

def test_bytes_are_readable_as_they_arrive_the_last_once_verified():
    stream = _stream()
    buffer = stream.begin()
    buffer[:4] = b'abcd'
    stream.advance(4)
    reader = chunkstream.Reader(stream)
    reader.start(time.monotonic() + SOON)
    assert bytes(reader.next()) == b'abcd'
    buffer[4:] = b'efghij'
    stream.advance(10)
    # All ten bytes are in; the tenth waits for the verification.
    assert bytes(reader.next()) == b'efghi'
    with pytest.raises(chunkstream.Broken):
        stream.wait_beyond(9, reader._attempt, time.monotonic() + 0.1)
    stream.verified()
    assert bytes(reader.next()) == b'j'


def test_a_source_given_up_breaks_only_the_readers_that_sent_its_bytes():
    stream = _stream()
    sent_some = chunkstream.Reader(stream)
    waiting = chunkstream.Reader(stream)
    buffer = stream.begin()
    buffer[:3] = b'bad'
    stream.advance(3)
    sent_some.start(time.monotonic() + SOON)
    assert bytes(sent_some.next()) == b'bad'
    stream.fail()
    buffer = stream.begin()
    buffer[:] = b'0123456789'
    stream.advance(10)
    stream.verified()
    assert sent_some.next() is None
    waiting.start(time.monotonic() + SOON)
    assert _take(waiting) == (bytearray(b'0123456789'), True)


def test_a_failed_fetch_breaks_every_reader():
    stream = _stream()
    reader = chunkstream.Reader(stream)
    stream.abort()
    with pytest.raises(chunkstream.Broken):
        reader.start(time.monotonic() + SOON)


def test_a_fetch_silent_past_its_deadline_breaks_its_readers():
    stream = _stream(deadline=time.monotonic() + 0.2)
    stream.begin()
    reader = chunkstream.Reader(stream)
    started = time.monotonic()
    with pytest.raises(chunkstream.Broken):
        reader.start(time.monotonic() + SOON)
    assert time.monotonic() - started < SOON


def test_a_chunk_read_whole_is_published_at_once():
    stream = _stream()
    stream.complete(b'0123456789')
    reader = chunkstream.Reader(stream)
    reader.start(time.monotonic() + SOON)
    assert bytes(reader.next()) == b'012345678'
    stream.verified()
    assert bytes(reader.next()) == b'9'


# -- a relaying node --------------------------------------------------------

@pytest.fixture
def volume(tmp_path):
    return cache_helpers.image_volume(tmp_path, LENGTH * 4, LENGTH)


@pytest.fixture
def peers():
    made = hp.Peers()
    yield made
    made.stop()


def _upstream(peers, manifest, chunk_steps):
    """A scripted peer: the manifest, and ``chunk_steps`` for chunk 0."""
    data = manifest.to_bytes()

    def answer(path):
        if path == protocol.manifest_path('img'):
            return [hp.head(200, len(data)), data]
        if path == protocol.chunk_path('img', 0):
            return chunk_steps
        return [hp.head(404, 0)]
    return peers(answer)


def _relay(cluster, manifest, upstream_urls, **options):
    options.setdefault('cut_through', True)
    node, _srv = cluster.start('relay', dict(
        image_id='img', manifest_digest=manifest.digest(), origin=None,
        peers=list(upstream_urls), image_size=manifest.image_size),
        **options)
    return node


def _fetch_in_thread(node, sink=None):
    """The child: chunk 0 from ``node``, in a thread; (result, thread)."""
    result = {}
    client = cache_helpers.client('child', 'http://127.0.0.2:9')

    def run():
        try:
            result['data'] = client.get_chunk(node.url, 'img', 0, LENGTH,
                                              sink=sink)
        except sources.PeerError as e:
            result['error'] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return result, thread


def _half_held(cluster, peers, volume, **options):
    """A relay over an upstream that holds back half of chunk 0.

    :returns: the chunk, the event that releases the second half, the
        relay, and the child's stream, result and thread.
    """
    image, manifest, _path = volume
    chunk = image[:LENGTH]
    release = threading.Event()
    upstream = _upstream(peers, manifest, [
        hp.head(200, LENGTH), chunk[:LENGTH // 2], hp.gate(release),
        chunk[LENGTH // 2:]])
    relay = _relay(cluster, manifest, [upstream.url], **options)
    child = _stream(LENGTH)
    result, thread = _fetch_in_thread(relay, sink=child)
    return chunk, release, relay, child, result, thread


def test_a_relay_sends_a_chunk_before_it_has_all_of_it(
        cluster, peers, volume):
    chunk, release, relay, child, result, thread = _half_held(
        cluster, peers, volume)
    # The child holds the first half while the upstream still holds back
    # the second: the relay did not wait for the whole chunk.
    _buffer, ready, _attempt = child.wait_beyond(0, None,
                                                 time.monotonic() + 10)
    assert ready >= 1
    assert not relay.cache('img').has(0)
    release.set()
    thread.join(10)
    assert result.get('data') == chunk
    # Verified before the last byte went, stored just after.
    assert cache_helpers.eventually(lambda: relay.cache('img').has(0))
    assert relay.counters.get('relays_streamed') == 1


def test_a_bad_chunk_is_never_completed_through_a_relay(
        cluster, peers, volume):
    image, manifest, _path = volume
    bad = bytearray(image[:LENGTH])
    bad[-1] ^= 1   # wrong in the very last byte
    upstream = _upstream(peers, manifest, [hp.head(200, LENGTH), bytes(bad)])
    relay = _relay(cluster, manifest, [upstream.url])
    result, thread = _fetch_in_thread(relay)
    thread.join(20)
    assert not thread.is_alive()
    assert 'data' not in result
    assert isinstance(result['error'], sources.PeerError)
    assert not relay.cache('img').has(0)
    cache = relay.cache('img')
    assert cache.counters.get('chunks_rejected') >= 1


def test_a_relay_whose_source_breaks_off_cuts_the_answer(cluster, peers,
                                                         volume):
    """Half a chunk from the only source: the child sees a short body."""
    image, manifest, _path = volume
    upstream = _upstream(peers, manifest, [
        hp.head(200, LENGTH), image[:LENGTH // 2]])
    relay = _relay(cluster, manifest, [upstream.url])
    result, thread = _fetch_in_thread(relay)
    thread.join(20)
    assert 'data' not in result
    assert 'error' in result
    assert cache_helpers.eventually(
        lambda: relay.counters.get('relays_cut') == 1)


def test_without_cut_through_the_relay_answers_once_it_holds_the_chunk(
        cluster, peers, volume):
    chunk, release, relay, child, result, thread = _half_held(
        cluster, peers, volume, cut_through=False)
    with pytest.raises(chunkstream.Broken):
        child.wait_beyond(0, None, time.monotonic() + 1.0)
    release.set()
    thread.join(10)
    assert result.get('data') == chunk
    assert relay.counters.get('relays_streamed') == 0
