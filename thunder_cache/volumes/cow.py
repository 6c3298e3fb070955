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

"""The writable copy-on-write layer of one volume.

A layer lives in a directory of two files:

``data``
    A sparse file of exactly the volume's size; a written 4 KiB block
    lives at its offset in the volume. Unwritten blocks are holes.
``bitmap``
    Which blocks of ``data`` the volume has written. Integers unsigned
    big-endian::

        offset  size  field
        0       8     magic b'VMTHCOWB'
        8       2     format version (1)
        10      2     reserved, 0
        12      4     block size in bytes (4096)
        16      8     layer size in bytes
        24      8     block count
        32      4     crc32 of bytes 0-31
        36      ...   zero up to 4096
        4096    ceil(N/8)  the bits: block i is bit (i % 8) of byte i // 8

Everything a block does not hold comes from the layer's *base* (the
image, zeros past its end), a callable ``base(offset, length) -> bytes``
passed to each :meth:`CowLayer.read` and :meth:`CowLayer.write`.

Crash consistency, as for :mod:`thunder_cache.cache.chunkmap`, comes from
ordering: bits are set in memory as blocks are written, and
:meth:`CowLayer.flush` first ``fdatasync``'s the data, then writes the
changed pages of the bitmap and ``fdatasync``'s it. So a bit on disk
always names a block whose bytes reached the disk first; a write not yet
flushed may be lost in a crash, as on any disk with a volatile cache.
Bitmaps are only ever created or replaced whole (temporary name, sync,
rename), so a torn bitmap is an error (:class:`LayerError`), never a
silently empty layer.

Discard and write-zeroes (:meth:`CowLayer.zero`) make a range read zeros
and free the layer's space under it; the loop device promises zeros after
both, so neither may ever let the base's bytes or older data show again.
A block wholly inside the range:

* over the image, keeps (or gets) its bit, and its bytes in ``data`` are
  punched out: a hole reads zeros. Clearing its bit would read the image
  again;
* where the base reads zeros anyway (past the image's end, everywhere for
  a blank volume: from ``zeros_from`` on), its bytes are punched out too,
  and its bit *may* be cleared: this layer clears it (the block is
  unwritten again); keeping it set, as over the image, is also correct.

A block the range covers only partly is written with zeros as any write
(copied up from the base first), unless it reads zeros already (no bit,
base zeros there). ``FALLOC_FL_ZERO_RANGE``'s wish to keep the space
allocated is not honoured: a layer is thin and never reserved it.

The crash rule, the same as for writes: *a bit set on disk vouches for
the block's bytes in* ``data``, *so it reaches the disk only after them*.
Holes are punched before the bits are set, in memory, and
:meth:`CowLayer.flush` syncs ``data`` (``fdatasync`` commits a punched
range's block map, ext4 and XFS) before it writes the bitmap: a set bit on
disk never names bytes the guest discarded. A cleared bit vouches for
nothing (the block reads the base's zeros whatever ``data`` holds), so it
may reach the disk in any order; bytes left under a clear bit by a crash
are never read, and a partial write of such a block copies the block up
from the base first. A discard not yet flushed may be lost in a crash,
leaving the range's bytes from before it, like a write. Discards of very
large ranges are done a step of :data:`ZERO_STEP` blocks at a time,
flushing when too many bitmap pages have changed.

Memory does not grow with the volume's size (a bitmap is 32 MiB per TiB):
the bitmap is read from its file, a piece at a time, and only the pages
changed since the last flush are held in memory, at most
:data:`MAX_DIRTY_PAGES` of them before a write flushes them (data first,
as always). Opening, copying and growing a layer read and write the
bitmap in pieces of :data:`BITS_STEP` bytes, skipping its holes, so they
cost the written part of the volume, not its size.
"""

import errno
import itertools
import logging
import os
import re
import struct
import tempfile
import threading
import zlib

from thunder_cache import fsutil

LOG = logging.getLogger(__name__)

BLOCK_SIZE = 4096
MAGIC = b'VMTHCOWB'
VERSION = 1
DATA_FILE = 'data'
BITMAP_FILE = 'bitmap'
BITS_OFFSET = 4096
PAGE = 4096
# The largest layer: its data file's size must fit off_t.
MAX_SIZE = (1 << 63) - BLOCK_SIZE
# Bytes of bitmap read, counted or copied at a time (32 GiB of volume).
BITS_STEP = 1024 * 1024
# Changed bitmap pages (each 128 MiB of volume) a layer holds in memory;
# a write past this many flushes them.
MAX_DIRTY_PAGES = 64
# Blocks zeroed under one hold of the lock (1 GiB, 8 bitmap pages).
ZERO_STEP = 8 * PAGE * 8
_HEADER = struct.Struct('>8sHHIQQ')
_CRC = struct.Struct('>I')
HEADER_SIZE = _HEADER.size + _CRC.size  # 36
_COPY_STEP = 1024 * 1024
_FULL = 0xff
_NOT_EMPTY = re.compile(b'[^\x00]')
_NOT_FULL = re.compile(b'[^\xff]')


class LayerError(ValueError):
    """A layer whose files are damaged, torn or not a layer at all."""


def block_count(size):
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE


def bits_length(size):
    """Length in bytes of the bits of a layer of ``size`` bytes."""
    return (block_count(size) + 7) // 8


def bitmap_size(size):
    """Length in bytes of the bitmap file of a layer of ``size`` bytes."""
    return BITS_OFFSET + bits_length(size)


def _header(size):
    head = _HEADER.pack(MAGIC, VERSION, 0, BLOCK_SIZE, size,
                        block_count(size))
    return head + _CRC.pack(zlib.crc32(head))


def check_size(size, what='layer'):
    """``size`` if it is a positive integer number of bytes that fits."""
    if (not isinstance(size, int) or isinstance(size, bool) or
            not 0 < size <= MAX_SIZE):
        raise ValueError('%s size must be a positive integer of at most %d '
                         'bytes, not %r' % (what, MAX_SIZE, size))
    return size


def _data_spans(fd, start, end):
    """(offset, end) of the parts of [start, end) of ``fd`` not holes."""
    position = start
    while position < end:
        try:
            position = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to the end
                return
            raise
        if position >= end:
            return
        stop = min(os.lseek(fd, position, os.SEEK_HOLE), end)
        yield position, stop
        position = stop


def _pieces(fd, start, end):
    """(offset, bytes) pieces of [start, end) of ``fd``, holes skipped.

    Each piece is at most :data:`BITS_STEP` bytes.
    """
    for position, stop in _data_spans(fd, start, end):
        while position < stop:
            piece = os.pread(fd, min(BITS_STEP, stop - position), position)
            if not piece:
                raise LayerError('bitmap ends early (torn)')
            yield position, piece
            position += len(piece)


def _write_bitmap(directory, size, source_fd=None, source_size=None):
    """Create or replace the bitmap whole: temporary name, sync, rename.

    With ``source_fd``, the bits of the bitmap of a layer of
    ``source_size`` bytes (at most ``size``) are copied over, a piece at
    a time; the rest are zeros (holes).
    """
    path = os.path.join(directory, BITMAP_FILE)
    fd, tmp = tempfile.mkstemp(prefix='.%s.' % BITMAP_FILE, suffix='.tmp',
                               dir=directory)
    try:
        os.pwrite(fd, _header(size), 0)
        if source_fd is not None:
            end = BITS_OFFSET + bits_length(source_size)
            for position, piece in _pieces(source_fd, BITS_OFFSET, end):
                if piece.count(0) != len(piece):
                    os.pwrite(fd, piece, position)
        os.ftruncate(fd, bitmap_size(size))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsutil.fsync_dir(directory)


def _check_bitmap(fd, path, data_size):
    """The layer size a bitmap file holds, and its count of written blocks.

    Reads the header, the length and the last byte, then counts the bits
    a piece at a time, skipping holes: no more memory than a piece.
    """
    head = os.pread(fd, HEADER_SIZE, 0)
    if len(head) != HEADER_SIZE:
        raise LayerError('bitmap %s is torn (%d bytes)' % (path, len(head)))
    fields = _HEADER.unpack_from(head)
    crc = _CRC.unpack_from(head, _HEADER.size)[0]
    magic, version, _reserved, block, size, count = fields
    if magic != MAGIC:
        raise LayerError('%s is not a volume layer bitmap' % path)
    if zlib.crc32(head[:_HEADER.size]) != crc:
        raise LayerError('bitmap %s has a damaged header' % path)
    if version != VERSION:
        raise LayerError('bitmap %s has format version %d, not %d'
                         % (path, version, VERSION))
    if (block != BLOCK_SIZE or not 0 < size <= MAX_SIZE or
            count != block_count(size)):
        raise LayerError('bitmap %s has an inconsistent header' % path)
    length = os.fstat(fd).st_size
    if length != bitmap_size(size):
        raise LayerError('bitmap %s holds %d bytes of bits, expected %d '
                         '(torn)' % (path, length - BITS_OFFSET,
                                     bits_length(size)))
    tail = count % 8
    if tail and os.pread(fd, 1, length - 1)[0] >> tail:
        raise LayerError('bitmap %s marks blocks past the end' % path)
    if data_size < size:
        raise LayerError('data file of %s is %d bytes, smaller than the '
                         'layer (%d bytes)' % (path, data_size, size))
    written = sum(int.from_bytes(piece, 'little').bit_count()
                  for _position, piece in _pieces(fd, BITS_OFFSET, length))
    return size, written


def _bit(bits, index):
    return bool(bits[index >> 3] & (1 << (index & 7)))


def _runs_in(bits, origin, first, stop):
    """(start, end, written) runs of blocks [first, stop).

    ``bits`` holds the bits of the blocks from ``origin`` (a multiple of
    8) on. Whole bytes of one state are skipped at C speed.
    """
    block = first
    while block < stop:
        state = _bit(bits, block - origin)
        end = block + 1
        while end < stop and (end - origin) & 7:
            if _bit(bits, end - origin) != state:
                break
            end += 1
        else:
            if end < stop:
                whole = (stop - origin) >> 3  # bytes wholly before stop
                other = (_NOT_FULL if state else _NOT_EMPTY).search(
                    bits, (end - origin) >> 3, whole)
                end = origin + 8 * (other.start() if other else whole)
                while end < stop and _bit(bits, end - origin) == state:
                    end += 1
        yield block, end, state
        block = end


class CowLayer:
    """A volume's written blocks over a read-only base; thread-safe.

    Use :meth:`create` or :meth:`open`. Reads run concurrently; writes,
    resizes and copies take the layer's lock; flushes are serialized
    among themselves (and with resizes and copies) but let writes go on
    while the data is synced.
    """

    def __init__(self, directory, size, written, data_fd, bitmap_fd):
        self.directory = directory
        self.size = size
        self._data_fd = data_fd
        self._bitmap_fd = bitmap_fd
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        # Bitmap pages changed since they were last written to the file:
        # they, not the file, hold the bits of their blocks.
        self._pages = {}
        self._dirty = set()  # pages changed since the last flush began
        self._written = written

    def __repr__(self):
        return '<CowLayer %s: %d bytes, %d blocks written>' % (
            self.directory, self.size, self._written)

    # -- creation ---------------------------------------------------------

    @classmethod
    def create(cls, directory, size):
        """A new empty layer of ``size`` bytes in ``directory``; O(1).

        :raises FileExistsError: if the directory already holds a layer.
        """
        check_size(size)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        data_path = os.path.join(directory, DATA_FILE)
        if os.path.exists(os.path.join(directory, BITMAP_FILE)):
            raise FileExistsError(errno.EEXIST, 'layer exists', directory)
        fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        _write_bitmap(directory, size)
        fsutil.fsync_parent(directory)
        return cls.open(directory)

    @classmethod
    def open(cls, directory):
        """The layer in ``directory``.

        :raises LayerError: if its bitmap is torn, damaged or foreign, or
            its data file is too short.
        :raises FileNotFoundError: if a file is missing.
        """
        path = os.path.join(directory, BITMAP_FILE)
        data_fd = os.open(os.path.join(directory, DATA_FILE), os.O_RDWR)
        try:
            bitmap_fd = os.open(path, os.O_RDWR)
            try:
                size, written = _check_bitmap(bitmap_fd, path,
                                              os.fstat(data_fd).st_size)
            except BaseException:
                os.close(bitmap_fd)
                raise
        except BaseException:
            os.close(data_fd)
            raise
        return cls(directory, size, written, data_fd, bitmap_fd)

    # -- bits -------------------------------------------------------------

    def _bits(self, first, stop):
        """The bits of blocks [first & ~7, stop), a bytearray.

        The changed pages are looked up before the file is read: a page
        leaves memory only once the file holds it.
        """
        lo, hi = first >> 3, ((stop - 1) >> 3) + 1
        pages = self._pages
        held = [(page, pages.get(page))
                for page in range(lo // PAGE, (hi - 1) // PAGE + 1)]
        bits = bytearray(os.pread(self._bitmap_fd, hi - lo,
                                  BITS_OFFSET + lo))
        if len(bits) != hi - lo:
            raise IOError(errno.EIO, 'short read from the bitmap in %s'
                          % self.directory)
        for page, buf in held:
            if buf is not None:
                start, end = max(lo, page * PAGE), min(hi, (page + 1) * PAGE)
                bits[start - lo:end - lo] = buf[start - page * PAGE:
                                                end - page * PAGE]
        return bits

    def _is_set(self, block):
        return bool(self._bits(block, block + 1)[0] & (1 << (block & 7)))

    def _any_set(self, first, stop):
        """True if a block in [first, stop) is written."""
        bits = self._bits(first, stop)
        origin = first & ~7
        head = first - origin
        if len(bits) == 1:
            return bool(bits[0] >> head & ((1 << (stop - first)) - 1))
        tail = (stop - origin) & 7
        if bits[0] >> head:
            return True
        if bits[-1] & (((1 << tail) - 1) if tail else _FULL):
            return True
        return bits.count(0, 1, len(bits) - 1) != len(bits) - 2

    def _runs(self, first, stop):
        """(start block, end block, written) runs covering [first, stop)."""
        return _runs_in(self._bits(first, stop), first & ~7, first, stop)

    def _page(self, page):
        """The in-memory copy of a bitmap page; caller holds the lock."""
        buf = self._pages.get(page)
        if buf is None:
            buf = bytearray(PAGE)
            length = min(PAGE, bits_length(self.size) - page * PAGE)
            data = os.pread(self._bitmap_fd, length,
                            BITS_OFFSET + page * PAGE)
            if len(data) != length:
                raise IOError(errno.EIO, 'short read from the bitmap in %s'
                              % self.directory)
            buf[:length] = data
            self._pages[page] = buf
        return buf

    def _set_bits(self, first, stop, on=True):
        """Set (or clear) the bits of blocks [first, stop); lock held.

        Only pages whose bits change are taken into memory.
        """
        value = _FULL if on else 0
        block = first
        while block < stop:
            page = block // (PAGE * 8)
            page_stop = min(stop, (page + 1) * PAGE * 8)
            origin = block & ~7
            held = self._pages.get(page)
            if held is None:
                bits = self._bits(block, page_stop)
            else:  # a copy of the held page's bytes: no read
                bits = held[origin // 8 - page * PAGE:
                            ((page_stop - 1) >> 3) + 1 - page * PAGE]
            new = bytearray(bits)
            lo = (block - origin + 7) >> 3  # whole bytes in the range
            hi = (page_stop - origin) >> 3
            if lo < hi:
                new[lo:hi] = bytes([value]) * (hi - lo)
                edges = itertools.chain(range(block, origin + 8 * lo),
                                        range(origin + 8 * hi, page_stop))
            else:
                edges = range(block, page_stop)
            for index in edges:
                mask = 1 << (index & 7)
                byte = (index - origin) >> 3
                new[byte] = (new[byte] | mask) if on else (new[byte] & ~mask)
            if new != bits:
                buf = self._page(page)
                start = origin // 8 - page * PAGE
                buf[start:start + len(new)] = new
                self._written += (int.from_bytes(new, 'little').bit_count() -
                                  int.from_bytes(bits, 'little').bit_count())
                self._dirty.add(page)
            block = page_stop

    # -- I/O --------------------------------------------------------------

    def _pread(self, length, offset):
        data = os.pread(self._data_fd, length, offset)
        if len(data) != length:
            raise IOError(errno.EIO, 'short read from the layer data file '
                          'in %s' % self.directory)
        return data

    def _base(self, base, offset, length):
        data = base(offset, length)
        if len(data) != length:
            raise IOError(errno.EIO, 'base returned %d bytes at %d, '
                          'expected %d' % (len(data), offset, length))
        return data

    def read(self, offset, length, base):
        """``length`` bytes at ``offset`` (short past the end).

        Written blocks come from the data file, the rest from
        ``base(offset, length)``; a range with nothing written is one
        call of ``base``.
        """
        if offset < 0 or length < 0:
            raise ValueError('negative offset or length')
        size = self.size
        if offset >= size or not length:
            return b''
        end = min(size, offset + length)
        first = offset // BLOCK_SIZE
        stop = (end - 1) // BLOCK_SIZE + 1
        if not self._any_set(first, stop):
            return self._base(base, offset, end - offset)
        parts = []
        for run_first, run_stop, written in self._runs(first, stop):
            start = max(offset, run_first * BLOCK_SIZE)
            stop_at = min(end, run_stop * BLOCK_SIZE)
            if written:
                parts.append(self._pread(stop_at - start, start))
            else:
                parts.append(self._base(base, start, stop_at - start))
        return b''.join(parts)

    def write(self, offset, data, base):
        """Write ``data`` at ``offset``; return the bytes written.

        A block the write covers only partly and that was never written is
        first copied up from ``base``. A write reaching past the end is
        cut short there; one starting at or past the end fails with
        ``ENOSPC``.
        """
        if offset < 0:
            raise ValueError('negative offset')
        if not data:
            return 0
        if offset >= self.size:
            raise OSError(errno.ENOSPC, 'write at %d beyond the end of the '
                          'volume (%d bytes)' % (offset, self.size))
        with self._lock:
            self._check_open()
            done = self._write(offset, data, base)
            too_many = len(self._pages) > MAX_DIRTY_PAGES
        if too_many:
            self.flush()
        return done

    def _check_open(self):
        if self._data_fd is None:
            raise ValueError('layer %s is closed' % self.directory)

    def _write(self, offset, data, base):
        """:meth:`write` of a range inside the layer; lock held."""
        size = self.size
        data = memoryview(data)[:size - offset]
        end = offset + len(data)
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        for block in sorted({first, last}):
            start = block * BLOCK_SIZE
            block_end = min(start + BLOCK_SIZE, size)
            covered = offset <= start and end >= block_end
            if not covered and not self._is_set(block):
                os.pwrite(self._data_fd,
                          self._base(base, start, block_end - start), start)
        done = 0
        while done < len(data):
            done += os.pwrite(self._data_fd, data[done:], offset + done)
        self._set_bits(first, last + 1)
        return len(data)

    def zero(self, offset, length, base, zeros_from):
        """Make [offset, offset + length) read zeros; free its space.

        Discard and write-zeroes, as the module's docstring describes.
        ``base`` is the layer's base (for partly covered blocks), which
        reads zeros from ``zeros_from`` on. The part past the end is
        ignored.

        :raises OSError: ``EOPNOTSUPP`` if the layer's filesystem cannot
            punch holes (nothing changed then).
        """
        if offset < 0 or length < 0 or zeros_from < 0:
            raise ValueError('negative offset, length or zeros_from')
        size = self.size
        end = min(size, offset + length)
        if offset >= end:
            return
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        whole_first = first if offset == first * BLOCK_SIZE else first + 1
        whole_stop = (last + 1 if end == min((last + 1) * BLOCK_SIZE, size)
                      else last)
        zero_block = -(-zeros_from // BLOCK_SIZE)  # first wholly in zeros
        block = whole_first
        while block < whole_stop:
            stop = min(whole_stop, block + ZERO_STEP)
            with self._lock:
                self._check_open()
                fsutil.punch_hole(self._data_fd, block * BLOCK_SIZE,
                                  min(stop * BLOCK_SIZE, size) -
                                  block * BLOCK_SIZE)
                split = max(block, min(stop, zero_block))
                self._set_bits(block, split, on=True)
                self._set_bits(split, stop, on=False)
                too_many = len(self._pages) > MAX_DIRTY_PAGES
            if too_many:
                self.flush()
            block = stop
        for block in sorted({first, last}):
            if whole_first <= block < whole_stop:
                continue
            start = max(offset, block * BLOCK_SIZE)
            stop_at = min(end, (block + 1) * BLOCK_SIZE)
            with self._lock:
                self._check_open()
                if block >= zero_block and not self._is_set(block):
                    continue  # reads zeros already
                self._write(start, bytes(stop_at - start), base)

    def flush(self):
        """Make every write so far durable: data first, then the bitmap."""
        with self._flush_lock:
            self._flush()

    def _flush(self):
        """:meth:`flush`; the caller holds the flush lock."""
        with self._lock:
            self._check_open()
            pages = sorted(self._dirty)
            self._dirty = set()
            length = bits_length(self.size)
            snapshot = [(page, bytes(self._pages[page][
                :min(PAGE, length - page * PAGE)])) for page in pages]
        try:
            os.fdatasync(self._data_fd)
            if not snapshot:
                return
            for page, chunk in snapshot:
                os.pwrite(self._bitmap_fd, chunk, BITS_OFFSET + page * PAGE)
            os.fdatasync(self._bitmap_fd)
        except BaseException:
            with self._lock:
                self._dirty.update(pages)
            raise
        with self._lock:
            # The file now holds these pages; those not changed since
            # leave memory.
            for page in pages:
                if page not in self._dirty:
                    self._pages.pop(page, None)

    def resize(self, new_size):
        """Grow the layer to ``new_size`` bytes, durably.

        :raises ValueError: on a shrink.
        """
        check_size(new_size)
        with self._flush_lock:
            self._flush()
            with self._lock:
                self._resize(new_size)

    def _resize(self, new_size):
        """:meth:`resize`; the caller holds both locks, and flushed."""
        if new_size < self.size:
            raise ValueError('layer %s cannot shrink from %d to %d bytes'
                             % (self.directory, self.size, new_size))
        if new_size == self.size:
            return
        # Writes since the flush: their bits go into the new bitmap.
        self._write_pages()
        # The new blocks are holes: the data file may grow first. The
        # bitmap with the new size replaces the old one whole, so a
        # crash leaves either size, never a torn bitmap.
        os.ftruncate(self._data_fd, new_size)
        os.fsync(self._data_fd)
        _write_bitmap(self.directory, new_size, self._bitmap_fd, self.size)
        # Readers do not lock: the descriptor they use now names the new
        # bitmap (dup2 is atomic), which holds the same bits and more.
        fd = os.open(os.path.join(self.directory, BITMAP_FILE), os.O_RDWR)
        try:
            os.dup2(fd, self._bitmap_fd, inheritable=False)
        finally:
            os.close(fd)
        old, self.size = self.size, new_size
        LOG.info('Layer %s grown from %d to %d bytes', self.directory, old,
                 new_size)

    def _write_pages(self):
        """Data, then every changed page, synced; caller holds both locks.

        Afterwards the file holds every bit and no page is in memory.
        """
        if not self._pages:
            return
        os.fdatasync(self._data_fd)
        length = bits_length(self.size)
        for page, buf in sorted(self._pages.items()):
            os.pwrite(self._bitmap_fd, bytes(buf[:min(PAGE, length -
                                                      page * PAGE)]),
                      BITS_OFFSET + page * PAGE)
        os.fdatasync(self._bitmap_fd)
        self._pages = {}
        self._dirty = set()

    def copy_to(self, directory):
        """A new layer in ``directory`` holding this one's written blocks.

        Same size and bits; only written blocks are copied, so it costs
        the written bytes, not the size. Writes wait while it copies, so
        the copy is one point in time.
        """
        made = False
        try:
            with self._flush_lock, self._lock:
                self._check_open()
                self._write_pages()
                os.makedirs(directory, mode=0o700, exist_ok=True)
                data_path = os.path.join(directory, DATA_FILE)
                fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL,
                             0o600)
                made = True
                try:
                    os.ftruncate(fd, self.size)
                    self._copy_written(fd)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _write_bitmap(directory, self.size, self._bitmap_fd,
                              self.size)
            fsutil.fsync_parent(directory)
            return CowLayer.open(directory)
        except BaseException:
            if made:
                for name in (DATA_FILE, BITMAP_FILE):
                    try:
                        os.unlink(os.path.join(directory, name))
                    except FileNotFoundError:
                        pass
            raise

    def _copy_written(self, fd):
        """Copy the written blocks to ``fd``, a bitmap piece at a time."""
        stop = block_count(self.size)
        end = BITS_OFFSET + bits_length(self.size)
        for position, piece in _pieces(self._bitmap_fd, BITS_OFFSET, end):
            origin = (position - BITS_OFFSET) * 8
            last = min(stop, origin + len(piece) * 8)
            for first, run_end, written in _runs_in(piece, origin, origin,
                                                    last):
                if not written:
                    continue
                # Discarded blocks are holes: the copy's holes read zeros.
                for start, span_end in _data_spans(
                        self._data_fd, first * BLOCK_SIZE,
                        min(run_end * BLOCK_SIZE, self.size)):
                    self._copy_range(fd, start, span_end - start)

    def _copy_range(self, fd, offset, length):
        done = 0
        while done < length:
            step = min(_COPY_STEP, length - done)
            try:
                n = os.copy_file_range(self._data_fd, fd, step,
                                       offset + done, offset + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                   errno.EOPNOTSUPP):
                    raise
                n = 0
            if not n:
                chunk = self._pread(step, offset + done)
                n = os.pwrite(fd, chunk, offset + done)
            done += n

    def allocated_bytes(self):
        """Bytes the layer's data file takes on its filesystem.

        0 once closed, as a volume being deleted may be asked about.
        """
        fd = self._data_fd
        try:
            return 0 if fd is None else os.fstat(fd).st_blocks * 512
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
            return 0

    def written_bytes(self):
        """Bytes of the volume this layer holds (written blocks)."""
        written = self._written * BLOCK_SIZE
        tail = self.size % BLOCK_SIZE
        if written and tail and self._is_set(block_count(self.size) - 1):
            written -= BLOCK_SIZE - tail
        return written

    def close(self):
        """Flush, then close the files; idempotent."""
        if self._data_fd is None:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                fds = (self._data_fd, self._bitmap_fd)
                self._data_fd = self._bitmap_fd = None
                self._pages = {}
            for fd in fds:
                if fd is not None:
                    os.close(fd)
