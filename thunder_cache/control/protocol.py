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

"""The control socket's wire format: one JSON object per line each way.

A request is an object with an ``"op"`` and the operation's arguments; a
reply is :class:`OkReply` or :class:`ErrorReply`.
"""

import json
import typing

from thunder_cache import errors

#: Longest request or reply line, in bytes.
MAX_LINE = 65536


class OkReply(typing.TypedDict):
    """A request's result."""

    ok: typing.Literal[True]
    result: typing.Any


class ErrorReply(typing.TypedDict):
    """A refusal or a failure: ``error`` names the daemon-side exception."""

    ok: typing.Literal[False]
    error: str
    message: str


Reply = typing.Union[OkReply, ErrorReply]


# -- what the operations answer (the ``result`` of an OkReply) -------------

class PingResult(typing.TypedDict):
    """``ping``: who answers, and where its volume files are."""

    node_id: str
    url: str
    mount_dir: typing.Optional[str]


class StatsResult(typing.TypedDict):
    """``stats``: capacity of the layers' filesystem and what volumes claim."""

    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    volumes: int
    images: int


class RegisterResult(typing.TypedDict):
    """``register_image``: the image and how much of it the node holds."""

    image_size: int
    chunk_size: int
    chunks: int
    chunks_present: int


class VolumeInfo(typing.TypedDict):
    """``create_volume``, ``volume_info``, ``list_volumes`` (a list of)..."""

    id: str
    size: int
    image_id: typing.Optional[str]
    read_only: bool
    written_bytes: int
    allocated_bytes: int
    open_count: int


class EvictResult(typing.TypedDict):
    """``evict_image``."""

    image_id: str
    freed_bytes: int


class ImageStatus(typing.TypedDict):
    """One image of ``cache_status``."""

    open: bool
    busy: typing.Optional[str]
    gone: bool
    peers: typing.List[str]
    last_used: typing.Optional[float]
    trace: typing.Any
    volumes: typing.List[str]


class CacheStatus(typing.TypedDict):
    """``cache_status``: {image id: its status}."""

    images: typing.Dict[str, ImageStatus]


class EnsureResult(typing.TypedDict):
    """``ensure_chunks``: ``usable`` has one '0' or '1' per chunk.

    ``observed``: the daemon records the image's reads (a boot trace).
    """

    image_size: int
    chunk_size: int
    usable: str
    observed: bool


def parse_request(line: bytes
                  ) -> typing.Tuple[str, typing.Dict[str, typing.Any]]:
    """``(op, args)`` from one request line; :class:`BadRequest` if bad."""
    if len(line) > MAX_LINE:
        raise errors.BadRequest('request longer than %d bytes' % MAX_LINE)
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise errors.BadRequest('request is not JSON: %s' % e)
    if not isinstance(request, dict):
        raise errors.BadRequest('request is not a JSON object')
    op = request.pop('op', None)
    if not isinstance(op, str) or not op:
        raise errors.BadRequest('request has no "op"')
    return op, request


def encode(message: typing.Mapping[str, typing.Any]) -> bytes:
    """One line of JSON (sorted keys, compact), newline-terminated."""
    return (json.dumps(message, separators=(',', ':'), sort_keys=True) +
            '\n').encode('utf-8')
