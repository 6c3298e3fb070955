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

"""The persistent presence map of one cached image.

One bit per chunk of the image: set when the chunk's verified bytes are
durable in the cache's data file. File layout, integers unsigned
big-endian::

    offset  size  field
    0       8     magic b'VMTHCMAP'
    8       2     format version (1)
    10      2     reserved, 0
    12      4     chunk size in bytes
    16      8     image size in bytes
    24      8     chunk count
    32      32    sha256 digest of the image's manifest (raw bytes)
    64      4     crc32 of bytes 0-63
    68      ...   zero up to 4096
    4096    ceil(N/8)  the bits: chunk i is bit (i % 8) of byte i // 8

Crash consistency comes from ordering, not from journaling:

* the file is created whole (header and zero bits) under a temporary name,
  synced and renamed into place, so a map either exists completely or not
  at all;
* a bit is only ever written after the caller made the chunk's data
  durable (written and ``fdatasync``'ed), and the bits are written from the
  in-memory copy, which only ever gains a bit after that point, then the
  map is ``fdatasync``'ed before :meth:`ChunkMap.set_durable` returns;
* a bit is cleared (a chunk found corrupt) the same way.

So whenever the process dies, every bit on disk names a chunk whose
verified bytes reached the disk before that bit did. A bit lost in a crash
only costs a refetch. A map whose header does not match the manifest, is
torn, or has the wrong length is thrown away and recreated empty
(:func:`open_map` tells the caller, which must then discard the data).
"""

import os
import struct
import threading
import zlib

from thunder_cache import fsutil

MAGIC = b'VMTHCMAP'
VERSION = 1
_HEADER = struct.Struct('>8sHHIQQ32s')
_CRC = struct.Struct('>I')
HEADER_SIZE = _HEADER.size + _CRC.size  # 68
BITS_OFFSET = 4096
PAGE = 4096


class ChunkMapError(ValueError):
    """A map file that does not belong to the image (or is damaged)."""


def map_size(chunk_count):
    """Length in bytes of the map file of an image of chunk_count chunks."""
    return BITS_OFFSET + (chunk_count + 7) // 8


def _header(manifest_digest, chunk_size, image_size, chunk_count):
    digest = bytes.fromhex(manifest_digest)
    if len(digest) != 32:
        raise ValueError('manifest digest must be a sha256 hex digest')
    head = _HEADER.pack(MAGIC, VERSION, 0, chunk_size, image_size,
                        chunk_count, digest)
    return head + _CRC.pack(zlib.crc32(head))


class ChunkMap:
    """The presence bits of an image; thread-safe.

    Use :func:`open_map` to get one. Bits may only be set with
    :meth:`set_durable` once the chunks' data is durable.
    """

    def __init__(self, path, fd, chunk_count, bits):
        self.path = path
        self.chunk_count = chunk_count
        self._fd = fd
        self._bits = bits
        self._lock = threading.Lock()
        self._present = sum(bin(b).count('1') for b in bits)

    def __repr__(self):
        return '<ChunkMap %s: %d of %d chunks>' % (
            self.path, self._present, self.chunk_count)

    def _check(self, index):
        if (not isinstance(index, int) or isinstance(index, bool) or
                not 0 <= index < self.chunk_count):
            raise IndexError('chunk index %r out of range [0, %d)'
                             % (index, self.chunk_count))

    def has(self, index):
        self._check(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def count(self):
        """Number of chunks marked present."""
        return self._present

    def complete(self):
        return self._present == self.chunk_count

    def present(self):
        """The indexes marked present, in order."""
        bits = bytes(self._bits)
        for byte_index, byte in enumerate(bits):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield byte_index * 8 + bit

    def missing(self):
        """The indexes not marked present, in order."""
        bits = bytes(self._bits)
        for index in range(self.chunk_count):
            if not bits[index >> 3] & (1 << (index & 7)):
                yield index

    def set_durable(self, indexes):
        """Mark chunks present and make the marks durable.

        The caller guarantees that the data of every chunk in ``indexes``
        was verified and is already durable in the data file.
        """
        self._update(indexes, True)

    def clear(self, indexes):
        """Mark chunks absent (their data was found corrupt), durably."""
        self._update(indexes, False)

    def _update(self, indexes, value):
        indexes = list(indexes)
        for index in indexes:
            self._check(index)
        if not indexes:
            return
        with self._lock:
            if self._fd is None:
                raise ValueError('chunk map %s is closed' % self.path)
            pages = set()
            for index in indexes:
                mask = 1 << (index & 7)
                old = self._bits[index >> 3]
                new = (old | mask) if value else (old & ~mask)
                if new != old:
                    self._bits[index >> 3] = new
                    self._present += 1 if value else -1
                    pages.add((index >> 3) // PAGE)
            if not pages:
                return
            for page in sorted(pages):
                start = page * PAGE
                chunk = bytes(self._bits[start:start + PAGE])
                os.pwrite(self._fd, chunk, BITS_OFFSET + start)
            os.fdatasync(self._fd)

    def close(self):
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def create_map(path, manifest_digest, chunk_size, image_size, chunk_count):
    """Create an empty map atomically (replacing any file at ``path``)."""
    header = _header(manifest_digest, chunk_size, image_size, chunk_count)
    tmp = '%s.tmp.%d' % (path, os.getpid())
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, map_size(chunk_count))
        # Blocks reserved now: setting a bit never needs room on disk.
        os.posix_fallocate(fd, 0, map_size(chunk_count))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsutil.fsync_parent(path)


def remove_map(path):
    """Remove a map file durably; missing is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsutil.fsync_parent(path)


def read_map(path, manifest_digest, chunk_size, image_size, chunk_count):
    """The bits of the map at ``path``.

    :raises ChunkMapError: if the file is not a whole, undamaged map of
        this manifest.
    :raises FileNotFoundError: if there is no map.
    """
    expected = _header(manifest_digest, chunk_size, image_size, chunk_count)
    with open(path, 'rb') as f:
        data = f.read(map_size(chunk_count) + 1)
    if len(data) != map_size(chunk_count):
        raise ChunkMapError('chunk map %s is %d bytes, expected %d'
                            % (path, len(data), map_size(chunk_count)))
    if data[:HEADER_SIZE] != expected:
        head = data[:_HEADER.size]
        crc = _CRC.unpack_from(data, _HEADER.size)[0]
        if head[:8] != MAGIC or zlib.crc32(head) != crc:
            raise ChunkMapError('chunk map %s has a damaged header' % path)
        raise ChunkMapError('chunk map %s belongs to another manifest'
                            % path)
    bits = bytearray(data[BITS_OFFSET:])
    # Bits past the last chunk must be zero.
    tail = chunk_count % 8
    if tail and bits[-1] >> tail:
        raise ChunkMapError('chunk map %s marks chunks past the end' % path)
    return bits


def open_map(path, manifest_digest, chunk_size, image_size, chunk_count,
             on_reset=None):
    """Open the map at ``path``, or create it empty.

    :param on_reset: called when no valid map of this manifest exists,
        after the old map is durably gone and before the new empty one is
        created: the place to empty the data file.
    :returns: (ChunkMap, reset) where ``reset`` is True when the map was
        recreated empty.
    """
    reset = False
    try:
        bits = read_map(path, manifest_digest, chunk_size, image_size,
                        chunk_count)
    except (FileNotFoundError, ChunkMapError):
        reset = True
        remove_map(path)
        if on_reset is not None:
            on_reset()
        create_map(path, manifest_digest, chunk_size, image_size,
                   chunk_count)
        bits = bytearray(map_size(chunk_count) - BITS_OFFSET)
    fd = os.open(path, os.O_RDWR)
    return ChunkMap(path, fd, chunk_count, bits), reset
