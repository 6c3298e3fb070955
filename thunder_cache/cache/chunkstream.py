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

"""A chunk's bytes as its fetch receives them: cut-through relaying.

A node relaying a chunk to its children does not wait for the whole chunk
to arrive: each child's answer sends the bytes as they land in the fetch's
buffer. What keeps a child from ever holding a bad chunk from this node:

* the last byte of the chunk is sent only once this node verified the
  whole chunk against the manifest, so a child never completes a chunk
  this node did not verify (the child verifies it again, as it verifies
  everything);
* an attempt abandoned for another source, or a fetch that failed, breaks
  every answer streaming from it (:class:`Broken`): the connection is
  closed short of the body and the child asks elsewhere.

The fetch (one thread) calls :meth:`ChunkStream.begin` for each source's
body, :meth:`~ChunkStream.advance` as bytes land in its buffer, then
:meth:`~ChunkStream.verified`, or :meth:`~ChunkStream.fail` before trying
another source; :meth:`~ChunkStream.complete` publishes a chunk a source
returned in one piece, :meth:`~ChunkStream.abort` ends a fetch that found
no source. Each answer reads through a :class:`Reader`.
"""

import logging
import threading
import time
import typing

LOG = logging.getLogger(__name__)

# States: no bytes of the current attempt yet, some, all of them checked,
# and the fetch over without the chunk.
_WAITING, _RECEIVING, _VERIFIED, _DEAD = range(4)

#: Longest single wait on the condition: deadlines that move (the fetch
#: going to another source) are looked at again at least this often.
_RECHECK = 1.0


class Broken(Exception):
    """The stream a reader was sending from will not complete."""


class ChunkStream:
    """The bytes of one chunk's fetch, readable while they arrive.

    :param length: the chunk's length.
    :param deadline: the ``time.monotonic()`` time after which a reader
        stops waiting for more bytes (the fetch's current source's time
        limit); the fetch moves :attr:`deadline` as it goes from source to
        source.
    """

    def __init__(self, length: int, deadline: float) -> None:
        self.length = length
        self.deadline = deadline
        self._cond = threading.Condition(threading.Lock())
        self._state = _WAITING
        self._attempt = 0
        self._received = 0
        self.buffer: typing.Any = None

    # -- the fetch's side ---------------------------------------------------

    def begin(self) -> bytearray:
        """A source's body starts: a fresh buffer for it.

        Readers of an earlier attempt are broken (their bytes came from
        a source that was given up).
        """
        with self._cond:
            self._attempt += 1
            self._received = 0
            self._state = _RECEIVING
            self.buffer = bytearray(self.length)
            self._cond.notify_all()
            return self.buffer

    def advance(self, received: int) -> None:
        """``received`` bytes of the current attempt are in the buffer."""
        with self._cond:
            if received > self._received:
                self._received = received
                self._cond.notify_all()

    def complete(self, data: typing.Any) -> None:
        """The whole chunk, from a source that returns it in one piece."""
        with self._cond:
            if data is not self.buffer:
                self._attempt += 1
                self.buffer = data
            self._received = len(data)
            self._state = _RECEIVING
            self._cond.notify_all()

    def verified(self) -> None:
        """The buffer holds the chunk, checked: its last byte may go."""
        with self._cond:
            self._state = _VERIFIED
            self._cond.notify_all()

    def fail(self) -> None:
        """The current attempt is given up (a bad or broken source).

        Readers that sent bytes of it are broken; the others wait for
        the next source's.
        """
        with self._cond:
            if self._state != _VERIFIED:
                self._attempt += 1
                self._received = 0
                self._state = _WAITING
                self._cond.notify_all()

    def abort(self) -> None:
        """The fetch is over without the chunk."""
        with self._cond:
            if self._state != _VERIFIED:
                self._state = _DEAD
                self._cond.notify_all()

    @property
    def dead(self) -> bool:
        return self._state == _DEAD

    # -- the readers' side --------------------------------------------------

    def wait_beyond(self, sent: int, attempt: typing.Optional[int],
                    give_up: float
                    ) -> typing.Tuple[typing.Any, int, int]:
        """Wait until more than ``sent`` bytes may be sent.

        :param attempt: the attempt the reader sent its first bytes from
            (None before it sent any).
        :param give_up: ``time.monotonic()`` time after which the reader
            stops waiting whatever the fetch's deadline.
        :returns: (buffer, bytes that may be sent, attempt).
        :raises Broken: if the fetch gave up the reader's attempt, failed,
            or sent nothing new by its deadline or ``give_up``.
        """
        with self._cond:
            while True:
                state = self._state
                if attempt is not None and self._attempt != attempt:
                    raise Broken('the fetch went to another source')
                if state == _DEAD:
                    raise Broken('the fetch failed')
                if state != _WAITING:
                    ready = self._received
                    if state != _VERIFIED:
                        ready = min(ready, self.length - 1)
                    if ready > sent:
                        return self.buffer, ready, self._attempt
                now = time.monotonic()
                limit = min(give_up, self.deadline)
                if now >= limit:
                    raise Broken('no bytes from the fetch by its deadline')
                self._cond.wait(min(limit - now, _RECHECK))


class Reader:
    """One answer's way through a stream: the bytes to send next."""

    def __init__(self, stream: ChunkStream) -> None:
        self.stream = stream
        self.length = stream.length
        self.sent = 0
        self._attempt: typing.Optional[int] = None
        self._first: typing.Optional[memoryview] = None

    def start(self, give_up: float) -> None:
        """Wait for the first bytes; :class:`Broken` if none by ``give_up``.

        Until then nothing was sent, so the request can still be answered
        otherwise (from the file if another fetch brought the chunk, or
        with an error).
        """
        self._first = self._wait(give_up)

    def next(self) -> typing.Optional[memoryview]:
        """The next bytes to send, all taken as sent; None if broken."""
        if self._first is not None:
            view, self._first = self._first, None
            return view
        try:
            return self._wait(float('inf'))
        except Broken as e:
            LOG.debug('Relayed chunk cut after %d of %d bytes: %s',
                      self.sent, self.length, e)
            return None

    def _wait(self, give_up: float) -> memoryview:
        buffer, ready, self._attempt = self.stream.wait_beyond(
            self.sent, self._attempt, give_up)
        view = memoryview(buffer)[self.sent:ready]
        self.sent = ready
        return view
