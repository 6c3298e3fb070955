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

"""Boot traces: recording, text encoding, Cinder metadata."""

import random
import threading

import pytest

from thunder_cache.boot import trace


class FakeClock:

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# -- encode / decode ------------------------------------------------------

@pytest.mark.parametrize('indexes', [
    [],
    [0],
    [5, 6],
    [0, 1, 2, 3],
    [10, 11, 12, 3, 4, 5, 100, 7, 99, 98, 97],
    list(range(1000)),
    list(range(999, -1, -1)),
])
def test_round_trip(indexes):
    text = trace.encode(indexes)
    assert text.startswith('1:')
    assert text.isascii() and text.isprintable()
    assert trace.decode(text, 1000) == indexes


def test_runs_are_compact():
    assert trace.encode([0, 1, 2, 3]) == '1:0-3'
    assert trace.encode([35, 36, 37, 4]) == '1:z-11,4'
    assert trace.encode([7, 8]) == '1:7,8'
    assert trace.encode(list(range(4096))) == '1:0-35r'


def test_boot_sized_random_trace_fits_few_values():
    rng = random.Random(7)
    # 300 scattered chunks of a 10 GiB image in 1 MiB chunks.
    indexes = rng.sample(range(10240), 300)
    text = trace.encode(indexes)
    assert trace.decode(text, 10240) == indexes
    metadata = trace.to_metadata(text)
    assert int(metadata['thunder_trace_parts']) <= 5


def test_large_round_trip():
    rng = random.Random(1)
    indexes = rng.sample(range(36 ** 3), 3000)
    text = trace.encode(indexes)
    assert trace.decode(text, 36 ** 3) == indexes
    assert trace.from_metadata(trace.to_metadata(text)) == text
    # The longest run-free trace that still fits.
    indexes = list(range(0, 2 * trace.MAX_TRACE_CHUNKS, 2))
    text = trace.encode(indexes)
    assert trace.decode(text, 2 * trace.MAX_TRACE_CHUNKS) == indexes


def test_encode_refuses_what_would_not_fit_the_metadata():
    rng = random.Random(2)
    with pytest.raises(ValueError):
        trace.encode(rng.sample(range(2 ** 30), trace.MAX_TRACE_CHUNKS))


def test_encode_drops_duplicates_keeping_the_first():
    assert trace.encode([3, 1, 3, 2, 1]) == '1:3,1,2'
    assert trace.decode('1:3,1,3,0-3', 10) == [3, 1, 0, 2]


@pytest.mark.parametrize('bad', [-1, 1.5, '3', None, True, 36 ** 8])
def test_encode_rejects_non_indexes(bad):
    with pytest.raises(ValueError):
        trace.encode([1, bad])


def test_encode_rejects_too_many_chunks():
    with pytest.raises(ValueError):
        trace.encode(range(trace.MAX_TRACE_CHUNKS + 1))


@pytest.mark.parametrize('text', [
    '', '0-3', '2:0-3', '1:,', '1:1,', '1:,1', '1:1,,2', '1: 1', '1:1 ',
    '1:-1', '1:1--3', '1:1-', '1:-', '1:A', '1:01', '1:0x1', '1:1-2-3',
    '1:3-1', '1:3-3', '1:zzzzzzzzz', '1:\u0661', '1:1;2', '1:1\n', b'1:1',
    None, 1,
])
def test_decode_rejects_malformed(text):
    with pytest.raises(ValueError):
        trace.decode(text, 10 ** 9)


def test_decode_rejects_out_of_range():
    assert trace.decode('1:9', 10) == [9]
    for text in ('1:a', '1:0-a', '1:zzzzzzzz', '1:5-zzzzzzzz'):
        with pytest.raises(ValueError):
            trace.decode(text, 10)


def test_decode_bounds_its_output():
    # A run naming far more chunks than allowed is refused before it is
    # expanded, whatever the image size.
    with pytest.raises(ValueError):
        trace.decode('1:0-zzzzzzz', 36 ** 8)
    assert len(trace.decode('1:0-9,b-k', 100, max_chunks=20)) == 20
    with pytest.raises(ValueError):
        trace.decode('1:0-9,b-l', 100, max_chunks=20)
    tokens = ','.join(trace._base36(i * 2) for i in range(11))
    with pytest.raises(ValueError):
        trace.decode('1:' + tokens, 100, max_chunks=10)
    with pytest.raises(ValueError):
        trace.decode('1:' + '1,' * trace.MAX_TEXT_LENGTH, 10)


def test_decode_of_garbage_never_escapes_value_error():
    rng = random.Random(3)
    alphabet = '0123456789az-,:1 \x00\xff'
    for _ in range(2000):
        text = '1:' + ''.join(rng.choice(alphabet)
                              for _ in range(rng.randrange(12)))
        try:
            result = trace.decode(text, 50)
        except ValueError:
            continue
        assert all(0 <= i < 50 for i in result)
        assert len(set(result)) == len(result)


# -- metadata ---------------------------------------------------------------

def test_metadata_round_trip_and_value_sizes():
    rng = random.Random(5)
    text = trace.encode(rng.sample(range(50000), 600))
    assert len(text) > 5 * 255
    metadata = trace.to_metadata(text)
    parts = int(metadata['thunder_trace_parts'])
    assert parts == -(-len(text) // 255)
    assert set(metadata) == ({'thunder_trace_%d' % i for i in range(parts)}
                             | {'thunder_trace_parts',
                                'thunder_trace_sha256'})
    for key, value in metadata.items():
        assert isinstance(value, str)
        assert len(key) <= 255 and len(value) <= 255
    assert trace.from_metadata(dict(metadata, other='x')) == text
    assert trace.metadata_keys(dict(metadata, other='x',
                                    thunder_trace_x='y')) == sorted(metadata)


def test_metadata_custom_prefix_and_empty_trace():
    metadata = trace.to_metadata('1:', prefix='boot')
    assert metadata['boot_0'] == '1:'
    assert trace.from_metadata(metadata, prefix='boot') == '1:'
    assert trace.from_metadata(metadata) is None
    with pytest.raises(ValueError):
        trace.to_metadata('1:', prefix='bad prefix')


def test_metadata_absent():
    assert trace.from_metadata({}) is None
    assert trace.from_metadata({'image_id': 'x'}) is None


def _split(text):
    return trace.to_metadata(text)


def test_metadata_missing_part_detected():
    text = trace.encode(list(range(0, 2000, 2)))
    metadata = _split(text)
    assert int(metadata['thunder_trace_parts']) > 3
    for key in ('thunder_trace_0', 'thunder_trace_2', 'thunder_trace_sha256'):
        broken = dict(metadata)
        del broken[key]
        with pytest.raises(ValueError):
            trace.from_metadata(broken)
    broken = dict(metadata)
    del broken['thunder_trace_parts']
    with pytest.raises(ValueError):
        trace.from_metadata(broken)


def test_metadata_mixed_writes_detected():
    old = _split(trace.encode(list(range(0, 2000, 2))))
    new = _split(trace.encode(list(range(1, 2000, 2))))
    mixed = dict(old, thunder_trace_1=new['thunder_trace_1'])
    with pytest.raises(ValueError):
        trace.from_metadata(mixed)
    # A count from one write and parts from the other.
    shorter = _split(trace.encode(list(range(0, 1000, 2))))
    with pytest.raises(ValueError):
        trace.from_metadata(dict(old, thunder_trace_parts=shorter[
            'thunder_trace_parts']))


@pytest.mark.parametrize('parts', ['0', '-1', '65', '1000', 'x', '', ' 1',
                                   '01', 1])
def test_metadata_bad_count(parts):
    metadata = dict(_split('1:1'), thunder_trace_parts=parts)
    with pytest.raises(ValueError):
        trace.from_metadata(metadata)


def test_metadata_oversized_part_rejected():
    text = '1:' + 'a,' * 200
    metadata = _split(text)
    metadata['thunder_trace_0'] += 'b'
    with pytest.raises(ValueError):
        trace.from_metadata(metadata)


def test_to_metadata_bounds():
    with pytest.raises(ValueError):
        trace.to_metadata('1:' + '1' * trace.MAX_TEXT_LENGTH)
    with pytest.raises(ValueError):
        trace.to_metadata('1:1\n')
    with pytest.raises(ValueError):
        trace.to_metadata('1:\xe9')


# -- recorder ---------------------------------------------------------------

def test_recorder_keeps_first_touches_in_order():
    clock = FakeClock()
    rec = trace.TraceRecorder(100, window=10, max_chunks=50, clock=clock)
    assert not rec.started and not rec.done
    for index in (5, 3, 5, 7, 3, 99, 100, -1, 0):
        rec.touch(index)
    assert rec.started
    assert rec.indexes() == [5, 3, 7, 99, 0]
    assert not rec.done


def test_recorder_window_starts_at_first_touch():
    clock = FakeClock()
    rec = trace.TraceRecorder(100, window=10, clock=clock)
    clock.now += 1000  # no touch yet: the window has not started
    rec.touch(1)
    clock.now += 9.5
    rec.touch(2)
    assert not rec.done
    clock.now += 0.5
    assert rec.done
    rec.touch(3)
    assert rec.indexes() == [1, 2]
    assert rec.wait(0)


def test_recorder_window_ends_on_touch_after_it():
    clock = FakeClock()
    rec = trace.TraceRecorder(100, window=10, clock=clock)
    rec.touch(1)
    clock.now += 11
    rec.touch(2)
    assert rec._finished.is_set()
    assert rec.indexes() == [1]


def test_recorder_max_chunks():
    rec = trace.TraceRecorder(100, window=10, max_chunks=3,
                              clock=FakeClock())
    for index in (1, 1, 2, 2, 3, 4, 5):
        rec.touch(index)
    assert rec.done
    assert rec.indexes() == [1, 2, 3]


def test_recorder_finish_and_wait():
    rec = trace.TraceRecorder(10, window=1000)
    assert not rec.wait(0.01)
    rec.touch(4)
    threading.Timer(0.05, rec.finish).start()
    assert rec.wait(30)
    rec.touch(5)
    assert rec.indexes() == [4]


def test_recorder_rejects_bad_parameters():
    with pytest.raises(ValueError):
        trace.TraceRecorder(0)
    with pytest.raises(ValueError):
        trace.TraceRecorder(10, window=0)
    with pytest.raises(ValueError):
        trace.TraceRecorder(10, max_chunks=trace.MAX_RECORD_CHUNKS + 1)


def test_any_recorded_trace_fits_the_metadata():
    rec = trace.TraceRecorder(36 ** 8, max_chunks=trace.MAX_RECORD_CHUNKS)
    for n in range(trace.MAX_RECORD_CHUNKS + 10):
        rec.touch(36 ** 8 - 1 - 2 * n)
    assert rec.done
    text = trace.encode(rec.indexes())
    assert trace.decode(trace.from_metadata(trace.to_metadata(text)),
                        36 ** 8) == rec.indexes()


def _in_threads(target, count=8):
    barrier = threading.Barrier(count)

    def run(n):
        barrier.wait()
        target(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_recorder_is_thread_safe():
    count = trace.MAX_RECORD_CHUNKS
    rec = trace.TraceRecorder(count, window=1000, max_chunks=count)

    def reader(seed):
        order = list(range(count))
        random.Random(seed).shuffle(order)
        for index in order:
            rec.touch(index)

    _in_threads(reader)
    assert sorted(rec.indexes()) == list(range(count))
    assert rec.done


def test_recorder_max_is_exact_under_concurrency():
    rec = trace.TraceRecorder(5000, window=1000, max_chunks=700)

    def reader(offset):
        for index in range(offset, 5000, 8):
            rec.touch(index)

    _in_threads(reader)
    recorded = rec.indexes()
    assert len(recorded) == 700 == len(set(recorded))
    assert trace.decode(trace.encode(recorded), 5000) == recorded
