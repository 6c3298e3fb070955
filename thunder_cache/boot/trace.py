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

"""Boot traces: the order in which a first boot read an image's chunks.

A :class:`TraceRecorder` attached to an image cache
(``cache.observer = recorder.touch``) notes the first read of each chunk,
in order, from the first read on, for ``window`` seconds or until it holds
``max_chunks`` chunks. The trace is then encoded (:func:`encode`, or
:func:`encode_prefix` for as much of it as fits), split into key/value
pairs that fit the metadata of the image-volume in Cinder
(:func:`to_metadata`, each value at most 255 characters), and read back on
other nodes (:func:`from_metadata`, :func:`decode`) to be replayed as
prefetch (:mod:`thunder_cache.boot.prefetch`).

Text format, version 1: ``1:`` then comma-separated tokens, each a chunk
index ``a`` or an ascending run ``a-b`` (``a`` to ``b`` inclusive, ``a <
b``), numbers in lower-case base 36 without leading zeros. A sequential
stretch of any length costs one token. Indexes below 46656 (11 GiB of
256 KiB chunks, 2.8 GiB of 64 KiB ones) have at most three digits, below
1679616 (410 GiB, 102 GiB) four, so a scattered single chunk takes four
or five characters. A real Debian first boot (1 GiB image) reads 927
chunks of 256 KiB in 2713 characters, 11 values; 3009 chunks of 64 KiB in
1810 tokens (256 runs name 1455 of them): 8065 characters, 32 values (34
metadata keys with the count and the checksum).

A trace takes at most :data:`MAX_PARTS` values (:data:`MAX_TEXT_LENGTH`
characters) and names at most :data:`MAX_TRACE_CHUNKS` chunks; a
recording may hold more than fits the values (scattered reads of a large
image). :func:`encode_prefix` encodes the longest prefix of it that fits,
the start of the boot (a replay fetches in trace order anyway); the rest
is left to demand reads.

A trace is an untrusted hint: it comes from another node through Cinder's
metadata. Decoding is strict (any malformed token, index outside the image
or oversized input is a :class:`ValueError`) and bounded
(:data:`MAX_TRACE_CHUNKS`, :data:`MAX_PARTS`); and a wrong trace can only
make a node prefetch chunks it does not need: every chunk is verified
against the manifest whoever asks for it.
"""

import hashlib
import re
import threading
import time

#: The most chunks a trace may name (4 GiB of 256 KiB chunks, 1 GiB of 64
#: KiB ones; a Debian first boot reads 927 and 3009).
MAX_TRACE_CHUNKS = 16384
#: The most metadata values a trace may take.
MAX_PARTS = 64
#: Longest value Cinder stores in volume metadata.
MAX_VALUE_LENGTH = 255
#: Longest encoded trace.
MAX_TEXT_LENGTH = MAX_PARTS * MAX_VALUE_LENGTH
#: Version prefix of the text format.
VERSION = '1:'
#: The most chunks a recorder may keep: as many as a trace may name. A
#: recording too scattered for MAX_TEXT_LENGTH is published in part
#: (:func:`encode_prefix`).
MAX_RECORD_CHUNKS = MAX_TRACE_CHUNKS
DEFAULT_PREFIX = 'thunder_trace'

_DIGITS = '0123456789abcdefghijklmnopqrstuvwxyz'
_NUMBER = r'(0|[1-9a-z][0-9a-z]{0,7})'
_TOKEN = re.compile(r'\A%s(?:-%s)?\Z' % (_NUMBER, _NUMBER))
_PREFIX = re.compile(r'\A[A-Za-z0-9_.:-]{1,64}\Z')
_PARTS = re.compile(r'\A[1-9][0-9]{0,2}\Z')


class TraceRecorder:
    """Records the order of first reads of an image's chunks.

    :param chunk_count: chunks of the image; other indexes are ignored.
    :param window: seconds of recording, from the first touch.
    :param max_chunks: distinct chunks after which recording ends.
    :param clock: monotonic seconds.
    """

    def __init__(self, chunk_count, window=60.0, max_chunks=1024,
                 clock=time.monotonic):
        if chunk_count < 1:
            raise ValueError('chunk_count must be at least 1')
        if window <= 0:
            raise ValueError('window must be positive')
        if not 1 <= max_chunks <= MAX_RECORD_CHUNKS:
            raise ValueError('max_chunks must be between 1 and %d'
                             % MAX_RECORD_CHUNKS)
        self.chunk_count = chunk_count
        self.window = float(window)
        self.max_chunks = max_chunks
        self._clock = clock
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._seen = set()
        self._order = []
        self._deadline = None

    def touch(self, index):
        """A demand read of chunk ``index``."""
        if self._finished.is_set():
            return
        now = self._clock()
        with self._lock:
            if self._finished.is_set():
                return
            if self._deadline is None:
                self._deadline = now + self.window
            elif now >= self._deadline:
                self._finished.set()
                return
            if not 0 <= index < self.chunk_count or index in self._seen:
                return
            self._seen.add(index)
            self._order.append(index)
            if len(self._order) >= self.max_chunks:
                self._finished.set()

    @property
    def started(self):
        return self._deadline is not None

    @property
    def done(self):
        """True once the window is over or ``max_chunks`` are recorded."""
        if self._finished.is_set():
            return True
        with self._lock:
            if self._deadline is not None and self._clock() >= \
                    self._deadline:
                self._finished.set()
        return self._finished.is_set()

    def finish(self):
        """End the recording now (the image is closing, say)."""
        self._finished.set()

    def wait(self, timeout=None):
        """Wait until the recording is done; returns :attr:`done`."""
        end = None if timeout is None else self._clock() + timeout
        while not self.done:
            step = None
            with self._lock:
                if self._deadline is not None:
                    step = max(0.0, self._deadline - self._clock())
            if end is not None:
                left = end - self._clock()
                if left <= 0:
                    break
                step = left if step is None else min(step, left)
            self._finished.wait(step)
        return self.done

    def indexes(self):
        """The chunks read so far, in the order of their first read."""
        with self._lock:
            return list(self._order)


def _base36(number):
    if not number:
        return '0'
    digits = []
    while number:
        number, digit = divmod(number, 36)
        digits.append(_DIGITS[digit])
    return ''.join(reversed(digits))


def _distinct(indexes):
    """``indexes`` in order, duplicates dropped, each checked."""
    seen = set()
    order = []
    for index in indexes:
        if isinstance(index, bool) or not isinstance(index, int) or \
                index < 0 or index >= 36 ** 8:
            raise ValueError('not a chunk index: %r' % (index,))
        if index not in seen:
            seen.add(index)
            order.append(index)
    return order


def _text(order):
    """The text of distinct chunk indexes ``order``, unchecked."""
    tokens = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and order[end + 1] == order[end] + 1:
            end += 1
        if end - start >= 2:
            tokens.append('%s-%s' % (_base36(order[start]),
                                     _base36(order[end])))
        else:
            tokens.extend(_base36(i) for i in order[start:end + 1])
        start = end + 1
    return VERSION + ','.join(tokens)


def _digits(number):
    """Length of ``number`` in base 36."""
    length = 1
    while number >= 36:
        number //= 36
        length += 1
    return length


def _stretch(first, count):
    """Characters and tokens of ``count`` chunks from ``first`` on.

    As :func:`_text` writes them: one index, two indexes, else a run.
    """
    if count == 1:
        return _digits(first), 1
    if count == 2:
        return _digits(first) + _digits(first + 1), 2
    return _digits(first) + 1 + _digits(first + count - 1), 1


def encode(indexes):
    """The text of a trace: chunk ``indexes`` in order, duplicates dropped.

    :raises ValueError: for an index that is not a non-negative integer,
        a trace of more than :data:`MAX_TRACE_CHUNKS` distinct chunks, or
        one whose text would be longer than :data:`MAX_TEXT_LENGTH`.
    """
    order = _distinct(indexes)
    if len(order) > MAX_TRACE_CHUNKS:
        raise ValueError('a trace holds at most %d chunks, not %d'
                         % (MAX_TRACE_CHUNKS, len(order)))
    text = _text(order)
    if len(text) > MAX_TEXT_LENGTH:
        raise ValueError('trace of %d characters; at most %d'
                         % (len(text), MAX_TEXT_LENGTH))
    return text


def encode_prefix(indexes):
    """The text of the longest prefix of a trace that is a valid trace.

    :func:`encode` of the first chunks of ``indexes`` (duplicates dropped)
    for as long as the text fits :data:`MAX_TEXT_LENGTH` and the chunks
    :data:`MAX_TRACE_CHUNKS`: one more chunk would break one of them.

    :returns: ``(text, kept)``, ``kept`` the number of distinct chunks of
        ``indexes`` that ``text`` names (all of them when it fits whole).
    :raises ValueError: for an index that is not a non-negative integer.
    """
    order = _distinct(indexes)
    # The length of the text of order[:kept], kept up to date chunk by
    # chunk: the stretches of consecutive chunks before the last one are
    # final (done_*); the last, from ``first``, ``count`` chunks long, may
    # still grow (``a,b`` becoming ``a-c``, ``a-b`` becoming ``a-c``). The
    # length never shrinks as chunks are added, so the first chunk that
    # does not fit ends the prefix.
    done_chars = done_tokens = 0
    first = count = 0
    kept = 0
    for index in order[:MAX_TRACE_CHUNKS]:
        chars, tokens = done_chars, done_tokens
        if count and index == first + count:
            new_first, new_count = first, count + 1
        else:
            if count:
                last_chars, last_tokens = _stretch(first, count)
                chars += last_chars
                tokens += last_tokens
            new_first, new_count = index, 1
        more_chars, more_tokens = _stretch(new_first, new_count)
        # Commas between tokens.
        length = (len(VERSION) + chars + more_chars +
                  tokens + more_tokens - 1)
        if length > MAX_TEXT_LENGTH:
            break
        done_chars, done_tokens = chars, tokens
        first, count = new_first, new_count
        kept += 1
    return encode(order[:kept]), kept


def decode(text, chunk_count, max_chunks=MAX_TRACE_CHUNKS):
    """The chunk indexes of a trace, in order, duplicates dropped.

    :param chunk_count: chunks of the image; larger indexes are errors.
    :param max_chunks: the most chunks accepted (runs count whole).
    :raises ValueError: for anything but a well-formed version 1 trace
        of at most ``max_chunks`` chunks inside the image.
    """
    if not isinstance(text, str):
        raise ValueError('a trace is text, not %s' % type(text).__name__)
    if len(text) > MAX_TEXT_LENGTH:
        raise ValueError('trace of %d characters; at most %d'
                         % (len(text), MAX_TEXT_LENGTH))
    if not text.startswith(VERSION):
        raise ValueError('not a version 1 trace')
    body = text[len(VERSION):]
    if not body:
        return []
    tokens = body.split(',')
    if len(tokens) > max_chunks:
        raise ValueError('trace of %d tokens; at most %d chunks'
                         % (len(tokens), max_chunks))
    seen = set()
    order = []
    total = 0
    for token in tokens:
        match = _TOKEN.match(token)
        if match is None:
            raise ValueError('malformed trace token %r' % token[:20])
        first = int(match.group(1), 36)
        last = first if match.group(2) is None else int(match.group(2), 36)
        if match.group(2) is not None and last <= first:
            raise ValueError('trace run %r does not ascend' % token)
        if last >= chunk_count:
            raise ValueError('trace names chunk %d of an image of %d'
                             % (last, chunk_count))
        total += last - first + 1
        if total > max_chunks:
            raise ValueError('trace of more than %d chunks' % max_chunks)
        for index in range(first, last + 1):
            if index not in seen:
                seen.add(index)
                order.append(index)
    return order


def _check_prefix(prefix):
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ValueError('bad metadata prefix %r' % (prefix,))


def _digest(text):
    return hashlib.sha256(text.encode('ascii')).hexdigest()


def to_metadata(text, prefix=DEFAULT_PREFIX):
    """Key/value strings holding ``text``, each value of <= 255 characters.

    ``<prefix>_0`` ... ``<prefix>_<n-1>`` hold the text in order,
    ``<prefix>_parts`` their count ``n`` and ``<prefix>_sha256`` the
    sha256 of the text, so that a set written in part (or mixed from two
    writes) is detected.
    """
    _check_prefix(prefix)
    if not isinstance(text, str) or not text.isascii() or \
            not text.isprintable():
        raise ValueError('a trace is printable ASCII text')
    if len(text) > MAX_TEXT_LENGTH:
        raise ValueError('trace of %d characters; at most %d'
                         % (len(text), MAX_TEXT_LENGTH))
    parts = [text[i:i + MAX_VALUE_LENGTH]
             for i in range(0, len(text), MAX_VALUE_LENGTH)] or ['']
    metadata = {'%s_%d' % (prefix, i): part for i, part in enumerate(parts)}
    metadata['%s_parts' % prefix] = str(len(parts))
    metadata['%s_sha256' % prefix] = _digest(text)
    return metadata


def metadata_keys(metadata, prefix=DEFAULT_PREFIX):
    """The keys of ``metadata`` that belong to a trace under ``prefix``.

    To delete an old trace before writing a new one.
    """
    _check_prefix(prefix)
    own = re.compile(r'\A%s_(?:parts|sha256|[0-9]+)\Z' % re.escape(prefix))
    return sorted(k for k in metadata if isinstance(k, str) and own.match(k))


def from_metadata(metadata, prefix=DEFAULT_PREFIX):
    """The trace text stored by :func:`to_metadata`, or None if absent.

    :raises ValueError: when the keys are there but inconsistent: a
        missing or oversized part, a bad count, a checksum mismatch.
    """
    _check_prefix(prefix)
    count = metadata.get('%s_parts' % prefix)
    if count is None:
        if metadata.get('%s_0' % prefix) is not None:
            raise ValueError('trace parts without a count')
        return None
    if not isinstance(count, str) or not _PARTS.match(count) or \
            int(count) > MAX_PARTS:
        raise ValueError('bad trace part count %r' % (count,))
    digest = metadata.get('%s_sha256' % prefix)
    if not isinstance(digest, str):
        raise ValueError('trace without a checksum')
    parts = []
    for i in range(int(count)):
        part = metadata.get('%s_%d' % (prefix, i))
        if not isinstance(part, str):
            raise ValueError('trace part %d of %s is missing' % (i, count))
        if len(part) > MAX_VALUE_LENGTH or not part.isascii():
            raise ValueError('trace part %d is not a trace value' % i)
        parts.append(part)
    text = ''.join(parts)
    if _digest(text) != digest:
        raise ValueError('trace parts do not match their checksum')
    return text
