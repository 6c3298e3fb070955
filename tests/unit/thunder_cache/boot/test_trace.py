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
    # The most chunks a trace may name, in runs of 16.
    indexes = [i for start in range(0, 2 * trace.MAX_TRACE_CHUNKS, 32)
               for i in range(start, start + 16)]
    assert len(indexes) == trace.MAX_TRACE_CHUNKS
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


# -- encode_prefix ------------------------------------------------------------

@pytest.mark.parametrize('indexes', [
    [],
    [7],
    [3, 1, 3, 2, 1],
    list(range(1000)),
    random.Random(4).sample(range(36 ** 3), 3000),
    # The Debian first boot at 64 KiB chunks takes 8065 characters.
    [i for start in range(0, 16384, 16) for i in range(start, start + 3)],
])
def test_encode_prefix_keeps_a_trace_that_fits(indexes):
    distinct = list(dict.fromkeys(indexes))
    assert trace.encode_prefix(indexes) == (trace.encode(indexes),
                                            len(distinct))
    assert trace.encode_prefix(iter(indexes)) == (trace.encode(indexes),
                                                  len(distinct))


def _longest_fitting(order):
    """The longest prefix encode() accepts, by bisection (independent)."""
    low, high = 0, len(order)
    while low < high:
        middle = (low + high + 1) // 2
        try:
            trace.encode(order[:middle])
        except ValueError:
            high = middle - 1
        else:
            low = middle
    return low


@pytest.mark.parametrize('digits', [3, 4, 8])
def test_encode_prefix_cuts_a_scattered_trace(digits):
    rng = random.Random(digits)
    indexes = rng.sample(range(36 ** (digits - 1), 36 ** digits, 2), 5000)
    with pytest.raises(ValueError):
        trace.encode(indexes)
    text, kept = trace.encode_prefix(indexes)
    # Every chunk a token of ``digits`` digits and a comma.
    assert kept == (trace.MAX_TEXT_LENGTH - len(trace.VERSION) + 1) // \
        (digits + 1)
    assert kept == _longest_fitting(indexes)
    assert len(text) <= trace.MAX_TEXT_LENGTH
    assert text == trace.encode(indexes[:kept])
    with pytest.raises(ValueError):
        trace.encode(indexes[:kept + 1])
    assert trace.decode(text, 36 ** digits) == indexes[:kept]
    metadata = trace.to_metadata(text)
    assert int(metadata['thunder_trace_parts']) == trace.MAX_PARTS
    assert trace.from_metadata(metadata) == text


def test_encode_prefix_cuts_a_mixed_trace_exactly():
    rng = random.Random(9)
    indexes = []
    while len(indexes) < 12000:
        start = rng.randrange(36 ** 4)
        indexes.extend(range(start, start + rng.choice((1, 1, 2, 3, 9))))
    order = list(dict.fromkeys(indexes))
    text, kept = trace.encode_prefix(indexes)
    assert 0 < kept < len(order)
    assert kept == _longest_fitting(order)
    assert len(text) <= trace.MAX_TEXT_LENGTH
    assert trace.decode(text, 36 ** 4 + 40) == order[:kept]


def test_encode_prefix_bounds_the_chunks():
    text, kept = trace.encode_prefix(range(trace.MAX_TRACE_CHUNKS + 100))
    assert kept == trace.MAX_TRACE_CHUNKS
    assert text == '1:0-' + trace._base36(trace.MAX_TRACE_CHUNKS - 1)
    assert trace.decode(text, 10 ** 6) == list(range(kept))


def _filler(tail, room=0):
    """Scattered chunks before ``tail``: their text is ``room`` short of full.

    Tokens of three digits (four characters with their comma) and up to
    three of two (three characters), far from ``tail`` (below 100).
    """
    free = trace.MAX_TEXT_LENGTH - room - len(trace.encode(tail))
    short = next(k for k in range(4) if (free - 3 * k) % 4 == 0)
    filler = list(range(200, 200 + 2 * short, 2))
    filler += list(range(36 ** 2, 36 ** 2 + 2 * ((free - 3 * short) // 4),
                         2))
    assert len(trace.encode(filler + list(tail))) == \
        trace.MAX_TEXT_LENGTH - room
    return filler


def _after(filler, indexes):
    """encode_prefix(filler + indexes), checked: chunks and text after it."""
    text, kept = trace.encode_prefix(filler + list(indexes))
    assert len(text) <= trace.MAX_TEXT_LENGTH
    assert trace.decode(text, 36 ** 4) == (filler + list(indexes))[:kept]
    head = trace.encode(filler) + ','
    assert text.startswith(head)
    return kept - len(filler), text[len(head):]


def test_encode_prefix_a_pair_becoming_a_run_at_no_cost():
    # "a,b" (10, 11) then 12: "a-c", as long: it still fits; 50 does not.
    filler = _filler([10, 11])
    assert _after(filler, [10, 11, 12, 50]) == (3, 'a-c')


def test_encode_prefix_a_pair_becoming_a_longer_run():
    # "y,z" (34, 35) then 36: "y-10", one character more.
    filler = _filler([34, 35])
    assert _after(filler, [34, 35, 36]) == (2, 'y,z')
    filler = _filler([34, 35], room=1)
    assert _after(filler, [34, 35, 36, 37, 50]) == (4, 'y-11')


def test_encode_prefix_a_run_growing_a_digit():
    # "0-z" then 36: "0-10", one character more.
    filler = _filler(range(36))
    assert _after(filler, range(37)) == (36, '0-z')
    filler = _filler(range(36), room=1)
    assert _after(filler, list(range(38)) + [50]) == (38, '0-11')
    # Within the same digits a run grows for free.
    filler = _filler(range(30))
    assert _after(filler, list(range(32)) + [50]) == (32, '0-v')


def test_encode_prefix_a_single_becoming_a_pair():
    # "a" then 11: "a,b", two characters more.
    filler = _filler([10], room=1)
    assert _after(filler, [10, 11]) == (1, 'a')
    filler = _filler([10], room=2)
    assert _after(filler, [10, 11, 12, 13]) == (4, 'a-d')


def test_encode_prefix_duplicates_cost_nothing():
    indexes = _filler([10]) + [10]
    text, kept = trace.encode_prefix(indexes + [10, 200, 10, 11])
    assert kept == len(indexes)
    assert text == trace.encode(indexes)


@pytest.mark.parametrize('bad', [-1, 1.5, '3', None, True, 36 ** 8])
def test_encode_prefix_rejects_non_indexes(bad):
    with pytest.raises(ValueError):
        trace.encode_prefix([1, bad])
    # Even past the cut.
    with pytest.raises(ValueError):
        trace.encode_prefix(list(range(0, 40000, 2)) + [bad])


# -- decode -------------------------------------------------------------------

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


def test_decode_bounds_the_chunks_at_max_trace_chunks():
    last = trace._base36(trace.MAX_TRACE_CHUNKS - 1)
    assert len(trace.decode('1:0-' + last, 36 ** 8)) == \
        trace.MAX_TRACE_CHUNKS
    for text in ('1:0-' + trace._base36(trace.MAX_TRACE_CHUNKS),
                 '1:1-' + last + ',0,zzzzzzz',
                 # Runs naming the same chunks count whole.
                 '1:' + ','.join(['0-' + last] * 2),
                 '1:0-zzzzzzzz'):
        with pytest.raises(ValueError):
            trace.decode(text, 36 ** 8)


def test_decode_bounds_the_text():
    body = '0,' * ((trace.MAX_TEXT_LENGTH - 4) // 2) + '10'
    text = trace.VERSION + body
    assert len(text) == trace.MAX_TEXT_LENGTH
    assert trace.decode(text, 100) == [0, 36]
    with pytest.raises(ValueError):
        trace.decode(text + '0', 2000)
    with pytest.raises(ValueError):
        trace.decode(trace.VERSION + '0,' * trace.MAX_TEXT_LENGTH + '0',
                     100)


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
    with pytest.raises(ValueError):
        trace.TraceRecorder(10, max_chunks=0)


def test_recorder_may_keep_as_many_chunks_as_a_trace_names():
    assert trace.MAX_RECORD_CHUNKS == trace.MAX_TRACE_CHUNKS == 16384
    rec = trace.TraceRecorder(10, max_chunks=trace.MAX_TRACE_CHUNKS)
    assert rec.max_chunks == trace.MAX_TRACE_CHUNKS


def test_recorder_beyond_the_old_worst_case_bound():
    # 6144 chunks (the default), more than the 1813 that would fit however
    # scattered: a boot read in sequential stretches is published whole.
    rec = trace.TraceRecorder(36 ** 4, max_chunks=6144, clock=FakeClock())
    for start in range(0, 36 ** 4, 64):
        for index in range(start, start + 8):
            rec.touch(index)
    assert rec.done
    assert len(rec.indexes()) == 6144
    text, kept = trace.encode_prefix(rec.indexes())
    assert kept == 6144
    assert trace.decode(trace.from_metadata(trace.to_metadata(text)),
                        36 ** 4) == rec.indexes()


def test_any_recorded_trace_can_be_published():
    # The worst case: every chunk scattered, every index of eight digits.
    rec = trace.TraceRecorder(36 ** 8, max_chunks=trace.MAX_RECORD_CHUNKS,
                              clock=FakeClock())
    for n in range(trace.MAX_RECORD_CHUNKS + 10):
        rec.touch(36 ** 8 - 1 - 2 * n)
    assert rec.done
    recorded = rec.indexes()
    assert len(recorded) == trace.MAX_RECORD_CHUNKS
    with pytest.raises(ValueError):
        trace.encode(recorded)
    text, kept = trace.encode_prefix(recorded)
    assert kept == (trace.MAX_TEXT_LENGTH - len(trace.VERSION) + 1) // 9
    assert trace.decode(trace.from_metadata(trace.to_metadata(text)),
                        36 ** 8) == recorded[:kept]


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
