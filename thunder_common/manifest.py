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

"""The per-chunk digest manifest of an image.

The Glance store computes it while it writes an image; the peer mode
verifies every chunk a node receives (from a peer or from the origin)
against it. It is stored in the image-volume itself, after the image data,
and its sha256 digest is recorded in the image's location metadata, which
binds the whole manifest (and so every chunk) to the Glance image record.

Serialised form, all integers unsigned big-endian::

    offset  size  field
    0       8     magic b'VMTHMFST'
    8       2     format version (1)
    10      2     digest algorithm (1 = sha256, 32-byte digests)
    12      4     chunk size in bytes: a power of two, 4 KiB to 64 MiB
    16      8     image size in bytes
    24      8     chunk count: ceil(image size / chunk size)
    32      32*N  the sha256 of each chunk, in order

Chunk ``i`` covers bytes ``[i * chunk_size, min((i + 1) * chunk_size,
image_size))`` of the image; only the last chunk may be short. Parsing is
strict: any other length, count, size or version is refused with a
ValueError, before anything is allocated from the header's numbers.

In an image-volume the manifest starts at the first multiple of
:data:`ALIGNMENT` at or after the end of the image data
(:func:`volume_offset`), so any node that can read the image-volume can
read the manifest.
"""

import hashlib
import re
import struct
from typing import BinaryIO, Dict, Mapping, Optional, Tuple

MAGIC = b'VMTHMFST'
VERSION = 1
ALGORITHM_SHA256 = 1
ALGORITHM_NAMES = {ALGORITHM_SHA256: 'sha256'}
DIGEST_SIZE = 32

_HEADER = struct.Struct('>8sHHIQQ')
HEADER_SIZE = _HEADER.size  # 32

# 256 KiB: a real first boot (benchmarks/data/boot-trace.json) reads
# 155.6 MiB that lie in 231.8 MiB of 256 KiB chunks (1.49x) against 326
# MiB of 1 MiB ones. 64 KiB chunks (188.1 MiB, 1.21x) boot faster on slow
# links, but cost every transfer a request per 64 KiB: a node's peer
# server and cold reads move a quarter to a half as many bytes per second
# (doc/source/bulk-boot.rst, "Chunk size"); the store's
# thunder_store_manifest_chunk_size chooses.
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
# At most 4 Mi chunks (a 128 MiB manifest): 1 TiB at the default chunk
# size, 256 GiB at 64 KiB. A larger image gets a larger chunk size
# (chunk_size_for).
MAX_CHUNKS = 4 * 1024 * 1024

# The largest image a manifest can describe, and the largest manifest.
MAX_IMAGE_SIZE = MAX_CHUNKS * MAX_CHUNK_SIZE
MAX_LENGTH = HEADER_SIZE + MAX_CHUNKS * DIGEST_SIZE

# Where the manifest starts in an image-volume: aligned to 1 MiB.
ALIGNMENT = 1024 * 1024

# Keys of the location metadata (Glance) and the volume metadata (Cinder)
# that locate the manifest in the image-volume and bind its digest.
META_DIGEST = 'thunder_manifest_digest'
META_OFFSET = 'thunder_manifest_offset'
META_LENGTH = 'thunder_manifest_length'
META_CHUNK_SIZE = 'thunder_manifest_chunk_size'

_HEX_DIGEST = re.compile(r'^[0-9a-f]{64}\Z')
_DECIMAL = re.compile(r'^(0|[1-9][0-9]{0,18})\Z')


def check_chunk_size(chunk_size: int) -> None:
    """Raise ValueError unless chunk_size is a valid manifest chunk size."""
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or
            chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE or
            chunk_size & (chunk_size - 1)):
        raise ValueError('chunk size must be a power of two between %d and '
                         '%d bytes, not %r' % (MIN_CHUNK_SIZE, MAX_CHUNK_SIZE,
                                               chunk_size))


def chunk_count(image_size: int, chunk_size: int) -> int:
    """Number of chunks of an image of image_size bytes."""
    return -(-image_size // chunk_size)


def chunk_size_for(image_size: int,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """The chunk size of the manifest of an image of image_size bytes.

    ``chunk_size`` (the one configured), doubled until the image takes at
    most :data:`MAX_CHUNKS` chunks. ValueError for an invalid chunk size or
    an image larger than :data:`MAX_IMAGE_SIZE`.
    """
    check_chunk_size(chunk_size)
    if not is_size(image_size) or image_size > MAX_IMAGE_SIZE:
        raise ValueError('no manifest describes an image of %r bytes (at '
                         'most %d)' % (image_size, MAX_IMAGE_SIZE))
    while chunk_count(image_size, chunk_size) > MAX_CHUNKS:
        chunk_size *= 2
    return chunk_size


def serialized_size(image_size: int,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Length in bytes of the manifest of an image of image_size bytes."""
    return HEADER_SIZE + DIGEST_SIZE * chunk_count(image_size, chunk_size)


def volume_offset(image_size: int) -> int:
    """Offset of the manifest in an image-volume holding image_size bytes."""
    return -(-image_size // ALIGNMENT) * ALIGNMENT


def volume_bytes_needed(image_size: int,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Bytes an image-volume needs for the image and its manifest."""
    return volume_offset(image_size) + serialized_size(image_size,
                                                       chunk_size)


def is_size(value: object) -> bool:
    """True if ``value`` is a non-negative integer (not a boolean)."""
    return (isinstance(value, int) and not isinstance(value, bool) and
            value >= 0)


def check_placement(offset: int, length: Optional[int] = None,
                    image_size: Optional[int] = None) -> None:
    """Raise ValueError unless a manifest may lie where it is said to.

    ``offset`` and ``length`` (None: not known) place the manifest in an
    image-volume holding ``image_size`` bytes of image (None: not known):
    a manifest starts at an :data:`ALIGNMENT` boundary, right after the
    image when its size is known, and holds a whole number of digests, as
    many as the image has chunks at one of the chunk sizes.
    """
    for name, value in (('image size', image_size), ('offset', offset),
                        ('length', length)):
        if not is_size(value) and (value is not None or name == 'offset'):
            raise ValueError('manifest %s must be a non-negative integer'
                             % name)
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        raise ValueError('an image of %d bytes is larger than a manifest '
                         'can describe (%d bytes)'
                         % (image_size, MAX_IMAGE_SIZE))
    if offset % ALIGNMENT:
        raise ValueError('manifest offset %d is not aligned to %d'
                         % (offset, ALIGNMENT))
    if offset > volume_offset(MAX_IMAGE_SIZE):
        raise ValueError('manifest offset %d is past the largest image '
                         'a manifest can describe' % offset)
    if image_size is not None and offset != volume_offset(image_size):
        raise ValueError('manifest offset %d is not where the image-volume '
                         'of a %d-byte image holds it (%d)'
                         % (offset, image_size, volume_offset(image_size)))
    if length is None:
        return
    if not HEADER_SIZE <= length <= MAX_LENGTH:
        raise ValueError('manifest length %d out of range' % length)
    if (length - HEADER_SIZE) % DIGEST_SIZE:
        raise ValueError('manifest length %d is not a whole number of '
                         'digests' % length)
    if image_size is not None and not any(
            serialized_size(image_size, MIN_CHUNK_SIZE << shift) == length
            for shift in range((MAX_CHUNK_SIZE // MIN_CHUNK_SIZE)
                               .bit_length())):
        raise ValueError('manifest length %d fits an image of %d bytes at '
                         'no chunk size' % (length, image_size))


class Manifest:
    """The chunk digests of one image; immutable."""

    def __init__(self, chunk_size: int, image_size: int,
                 digests: bytes) -> None:
        check_chunk_size(chunk_size)
        if (not isinstance(image_size, int) or isinstance(image_size, bool)
                or image_size < 0):
            raise ValueError('image size must be a non-negative integer, '
                             'not %r' % (image_size,))
        count = chunk_count(image_size, chunk_size)
        if count > MAX_CHUNKS:
            raise ValueError('an image of %d bytes has %d chunks of %d '
                             'bytes, more than the %d a manifest may hold'
                             % (image_size, count, chunk_size, MAX_CHUNKS))
        digests = bytes(digests)
        if len(digests) != count * DIGEST_SIZE:
            raise ValueError('expected %d digests (%d bytes), got %d bytes'
                             % (count, count * DIGEST_SIZE, len(digests)))
        self.chunk_size = chunk_size
        self.image_size = image_size
        self.algorithm = ALGORITHM_NAMES[ALGORITHM_SHA256]
        self._digests = digests

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Manifest) and
                self.to_bytes() == other.to_bytes())

    def __repr__(self) -> str:
        return ('<Manifest %d bytes in %d chunks of %d, digest %s>'
                % (self.image_size, self.chunk_count, self.chunk_size,
                   self.digest()[:16]))

    @property
    def chunk_count(self) -> int:
        return len(self._digests) // DIGEST_SIZE

    @classmethod
    def build(cls, stream: BinaryIO,
              chunk_size: int = DEFAULT_CHUNK_SIZE) -> 'Manifest':
        """The manifest of everything read from a file-like or iterable."""
        builder = ManifestBuilder(chunk_size)
        if hasattr(stream, 'read'):
            while True:
                data = stream.read(chunk_size)
                if not data:
                    break
                builder.update(data)
        else:
            for data in stream:
                builder.update(data)
        return builder.finish()

    # -- chunks -----------------------------------------------------------

    def _check_index(self, index: int) -> None:
        if (not isinstance(index, int) or isinstance(index, bool) or
                not 0 <= index < self.chunk_count):
            raise IndexError('chunk index %r out of range [0, %d)'
                             % (index, self.chunk_count))

    def chunk_range(self, index: int) -> Tuple[int, int]:
        """(offset, length) of chunk ``index`` in the image."""
        self._check_index(index)
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.image_size - offset)

    def digest_of(self, index: int) -> bytes:
        """The 32-byte sha256 digest of chunk ``index``."""
        self._check_index(index)
        start = index * DIGEST_SIZE
        return self._digests[start:start + DIGEST_SIZE]

    def verify_chunk(self, index: int, data: bytes) -> bool:
        """True if ``data`` is exactly chunk ``index`` of the image.

        :raises IndexError: if the image has no chunk ``index``.
        """
        _offset, length = self.chunk_range(index)
        if len(data) != length:
            return False
        return hashlib.sha256(data).digest() == self.digest_of(index)

    # -- serialised form --------------------------------------------------

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(MAGIC, VERSION, ALGORITHM_SHA256,
                              self.chunk_size, self.image_size,
                              self.chunk_count)
        return header + self._digests

    def digest(self) -> str:
        """sha256 hex digest of the serialised manifest."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @staticmethod
    def parse_header(data: bytes,
                     max_chunks: int = MAX_CHUNKS) -> Tuple[int, int, int]:
        """Validate a header; return (chunk_size, image_size, total length).

        Reading the first :data:`HEADER_SIZE` bytes is enough to know how
        many more to read. The errors say which field is wrong, never its
        value: the bytes may be anything an origin holds.
        """
        if len(data) < HEADER_SIZE:
            raise ValueError('manifest truncated: %d bytes, its header alone '
                             'is %d' % (len(data), HEADER_SIZE))
        magic, version, algorithm, chunk_size, image_size, count = (
            _HEADER.unpack_from(data))
        if magic != MAGIC:
            raise ValueError('not a VMThunder manifest (bad magic)')
        if version != VERSION:
            raise ValueError('unsupported manifest version (this reader '
                             'knows version %d)' % VERSION)
        if algorithm not in ALGORITHM_NAMES:
            raise ValueError('unsupported manifest digest algorithm')
        try:
            check_chunk_size(chunk_size)
        except ValueError:
            raise ValueError('manifest chunk size is not a power of two '
                             'between %d and %d bytes'
                             % (MIN_CHUNK_SIZE, MAX_CHUNK_SIZE))
        if count > min(max_chunks, MAX_CHUNKS):
            raise ValueError('manifest chunk count is more than the %d '
                             'allowed' % min(max_chunks, MAX_CHUNKS))
        if count != chunk_count(image_size, chunk_size):
            raise ValueError('manifest chunk count does not match its image '
                             'size and chunk size')
        return chunk_size, image_size, HEADER_SIZE + count * DIGEST_SIZE

    @classmethod
    def from_bytes(cls, data: bytes,
                   max_chunks: int = MAX_CHUNKS) -> 'Manifest':
        """Parse a serialised manifest, strictly.

        :raises ValueError: if ``data`` is not exactly one valid manifest.
        """
        data = bytes(data)
        chunk_size, image_size, length = cls.parse_header(data, max_chunks)
        if len(data) < length:
            raise ValueError('manifest truncated: %d bytes, fewer than its '
                             'header announces' % len(data))
        if len(data) > length:
            raise ValueError('unexpected bytes after the manifest')
        return cls(chunk_size, image_size, data[HEADER_SIZE:])

    # -- metadata ---------------------------------------------------------

    def metadata(self, offset: int) -> Dict[str, str]:
        """Location and volume metadata for this manifest at ``offset``.

        Glance and Cinder metadata values are strings.
        """
        return {META_DIGEST: self.digest(),
                META_OFFSET: str(offset),
                META_LENGTH: str(len(self._digests) + HEADER_SIZE),
                META_CHUNK_SIZE: str(self.chunk_size)}


def from_metadata(metadata: Mapping[str, object]) -> Tuple[int, int, str]:
    """(offset, length, digest) of a manifest named by location metadata.

    :raises ValueError: if the keys are missing or malformed.
    """
    try:
        digest = metadata[META_DIGEST]
        raw = (metadata[META_OFFSET], metadata[META_LENGTH])
    except (KeyError, TypeError):
        raise ValueError('metadata does not name a manifest')
    if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
        raise ValueError('manifest digest is not a sha256 hex digest')
    values = []
    for name, value in zip(('offset', 'length'), raw):
        if not isinstance(value, str) or not _DECIMAL.match(value):
            raise ValueError('manifest %s is not a decimal number' % name)
        values.append(int(value))
    offset, length = values
    check_placement(offset, length)
    return offset, length, digest


def load_verified(data: bytes, expected_digest: str,
                  max_chunks: int = MAX_CHUNKS) -> Manifest:
    """Parse a manifest whose digest must be ``expected_digest``.

    :raises ValueError: if the digest differs or the data is malformed.
    """
    if hashlib.sha256(bytes(data)).hexdigest() != expected_digest:
        # Never the digest computed: the bytes may be anything an origin
        # holds, and their digest would tell them apart.
        raise ValueError('manifest does not match the image record\'s '
                         'digest %s' % expected_digest)
    return Manifest.from_bytes(data, max_chunks)


class TooManyChunks(ValueError):
    """More data than :data:`MAX_CHUNKS` chunks of the builder's size."""


class ManifestBuilder:
    """Compute a manifest incrementally from data of any split."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.bytes_seen = 0
        self._digests = bytearray()
        self._hasher = hashlib.sha256()
        self._in_chunk = 0
        self._finished = False

    def update(self, data: bytes) -> None:
        if self._finished:
            raise ValueError('manifest already finished')
        view = memoryview(data).cast('B')
        while view:
            take = min(len(view), self.chunk_size - self._in_chunk)
            self._hasher.update(view[:take])
            self._in_chunk += take
            self.bytes_seen += take
            view = view[take:]
            if self._in_chunk == self.chunk_size:
                self._close_chunk()

    def _close_chunk(self) -> None:
        if len(self._digests) // DIGEST_SIZE >= MAX_CHUNKS:
            raise TooManyChunks('image larger than a manifest of %d chunks '
                                'of %d bytes can describe'
                                % (MAX_CHUNKS, self.chunk_size))
        self._digests += self._hasher.digest()
        self._hasher = hashlib.sha256()
        self._in_chunk = 0

    def finish(self) -> Manifest:
        """The manifest of everything passed to update()."""
        if not self._finished:
            if self._in_chunk:
                self._close_chunk()
            self._finished = True
        return Manifest(self.chunk_size, self.bytes_seen,
                        bytes(self._digests))
