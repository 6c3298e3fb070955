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

"""The upload's pipeline: writes in flight and hashes in threads, in order."""

import random
import threading
import time

import pytest

from glance_thunder_store import upload


class Recorder:
    """A hasher that records what it saw, slowly now and then."""

    def __init__(self, seed):
        self.seen = []
        self._random = random.Random(seed)

    def __call__(self, data):
        if self._random.random() < 0.3:
            time.sleep(0.002)
        self.seen.append(data)


def test_every_hasher_sees_every_piece_in_order():
    hashers = [Recorder(seed) for seed in range(3)]
    pipeline = upload._Pipeline(hashers, writes_in_flight=4)
    pieces = [bytes([i]) * 10 for i in range(50)]
    try:
        for piece in pieces:
            pipeline.put(piece)
        pipeline.drain()
    finally:
        pipeline.close()
    for hasher in hashers:
        assert hasher.seen == pieces


class BlockedWrites:
    def __init__(self):
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.done = []

    def write(self, index):
        def run():
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            assert self.release.wait(10)
            with self.lock:
                self.running -= 1
                self.done.append(index)
        return run


def test_at_most_writes_in_flight_are_pending():
    writes = BlockedWrites()
    pipeline = upload._Pipeline([lambda data: None], writes_in_flight=2)
    third = threading.Thread(
        target=lambda: pipeline.put(b'c', writes.write(2)))
    try:
        pipeline.put(b'a', writes.write(0))
        pipeline.put(b'b', writes.write(1))
        third.start()
        third.join(0.3)
        # The third piece waits for a slot: its put has not returned.
        assert third.is_alive()
        assert writes.most <= 2
        writes.release.set()
        third.join(10)
        pipeline.drain()
    finally:
        writes.release.set()
        pipeline.close()
    assert sorted(writes.done) == [0, 1, 2]
    assert writes.most == 2


def test_writes_overlap():
    writes = BlockedWrites()
    pipeline = upload._Pipeline([lambda data: None], writes_in_flight=4)
    try:
        for index in range(4):
            pipeline.put(b'x', writes.write(index))
        deadline = time.monotonic() + 10
        while writes.running < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writes.running == 4
        writes.release.set()
        pipeline.drain()
    finally:
        writes.release.set()
        pipeline.close()
    assert sorted(writes.done) == [0, 1, 2, 3]


def _fail():
    raise OSError(5, 'write failed')


def test_a_failed_write_is_raised_by_drain():
    pipeline = upload._Pipeline([lambda data: None], writes_in_flight=4)
    try:
        pipeline.put(b'a', _fail)
        with pytest.raises(OSError, match='write failed'):
            pipeline.drain()
    finally:
        pipeline.close()


def test_a_failed_write_is_raised_by_a_later_put():
    pipeline = upload._Pipeline([lambda data: None], writes_in_flight=1)
    try:
        pipeline.put(b'a', _fail)
        with pytest.raises(OSError, match='write failed'):
            pipeline.put(b'b', lambda: None)
    finally:
        pipeline.close()


def test_a_failed_hash_is_raised():
    def hasher(data):
        if data == b'bad':
            raise ValueError('bad signature data')

    pipeline = upload._Pipeline([hasher], writes_in_flight=2)
    try:
        pipeline.put(b'good')
        pipeline.put(b'bad')
        with pytest.raises(ValueError, match='bad signature'):
            pipeline.put(b'more')
    finally:
        pipeline.close()


def test_close_waits_for_running_writes_and_drops_pending_ones():
    started = threading.Event()
    release = threading.Event()
    finished = []

    def slow():
        started.set()
        release.wait(10)
        time.sleep(0.05)
        finished.append('slow')

    pipeline = upload._Pipeline([lambda data: None], writes_in_flight=1)
    pipeline.put(b'a', slow)
    assert started.wait(10)
    threading.Timer(0.1, release.set).start()
    pipeline.close()
    # Nothing writes to the volume once close() has returned.
    assert finished == ['slow']
