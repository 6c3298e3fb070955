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

"""What the peer server sends for a request: :class:`Reply`."""

import typing


class Reply:
    """What to answer: a status, headers and a body, span or stream.

    A span is a part of a file; a stream a chunk sent as its fetch
    receives it (a :class:`thunder_cache.cache.chunkstream.Reader`).
    """

    __slots__ = ('status', 'headers', 'body', 'span', 'stream', 'on_sent',
                 'release')

    def __init__(self, status: int,
                 headers: typing.Iterable[typing.Tuple[str, str]] = (),
                 body: bytes = b'',
                 span: typing.Optional[typing.Tuple[int, int, int]] = None,
                 on_sent: typing.Optional[typing.Callable[..., None]] = None,
                 stream: typing.Any = None) -> None:
        # Called once the reply is sent or dropped (unpins its cache).
        self.release: typing.Optional[typing.Callable[[], None]] = None
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.span = span  # (fd, offset, length)
        self.stream = stream
        self.on_sent = on_sent

    def __repr__(self) -> str:
        return '<Reply %d>' % self.status

    @property
    def length(self) -> int:
        if self.stream is not None:
            length: int = self.stream.length
            return length
        return self.span[2] if self.span else len(self.body)


def error(status: int, message: str = '') -> Reply:
    """A reply of ``status`` with ``message`` (ASCII) as plain text."""
    body = (message + '\n').encode('ascii', 'replace') if message else b''
    return Reply(status, [('Content-Type', 'text/plain')] if body else [],
                 body)
