"""khibernate's own image (``.khi``): streaming writer (:func:`save`) and reader (:class:`KhiSource`) side by side,
over the layouts of :mod:`khibernate.image.layouts.khi` (``docs/image-format.md`` has every byte).

The writer filters a source at a dump level and compresses blocks of kept pages on worker threads, in pfn order,
the trailer last (a file without one is an interrupted save and is refused); the reader checks header, trailer,
bitmaps and index at open and every block's CRC before its bytes are used.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import os
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO

import zstandard

from khibernate import native
from khibernate.elfcore import Note
from khibernate.image.atomic import atomic_output
from khibernate.image.errors import AddressError, CorruptImageError, TruncatedError, UsageErrorImage
from khibernate.image.inputfile import input_size, open_input
from khibernate.image.layouts.khi import (
    CIPHER_CHACHA20_POLY1305,
    FLAG_RESTORABLE,
    FLAG_SEALED,
    HEADER,
    HEADER_ALIGN,
    INDEX,
    MAGIC,
    MAX_BLOCK_PAGES,
    NO_SLOT,
    SEAL,
    SEAL_MAGIC,
    SEALED_VERSION,
    TRAILER,
    VERSION,
    BlockEntry,
    Header,
    SealInfo,
    Trailer,
    block_ad,
    block_crc,
    seal_record_authenticated,
)
from khibernate.image.pagefilter import DL_ZERO, PageClass, check_level
from khibernate.image.pipeline import BufferPool, EarlyWriteback, ZstdPerThread, ordered_map
from khibernate.image.plan import Chunk, check_source_level, default_notes, plan, ram_mask
from khibernate.image.sources.base import MemorySource, MemRange, PagedSource
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.seal.errors import TamperedError

if TYPE_CHECKING:  # cryptography is imported only when an image is sealed or unsealed
    from khibernate.seal.cipher import ImageCipher
    from khibernate.seal.keysource import KeySource
    from khibernate.seal.sealing import HandedKey, Sealing

# pfns classified at a time: small enough that classifying the next chunk never starves the compressors
PLAN_CHUNK = 1 << 14

# ------------------------------------------------------------------------------------------------ writer


@dataclasses.dataclass
class SaveStats:
    """What a save did: page counts per class and outcome, bytes, time."""

    pages_ram: int = 0
    pages_stored: int = 0
    pages_zero: int = 0
    pages_excluded: int = 0
    class_counts: list[int] = dataclasses.field(default_factory=lambda: [0] * len(PageClass))
    bytes_written: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class _ChunkMasks:
    """Per-pfn stored/zero marks of one plan chunk, filled by the workers; packed into the bitmaps once the chunk
    is planned and its last block written."""

    pfn: int
    stored: bytearray
    zero: bytearray
    blocks_left: int = 0
    planned: bool = False

    def pack_into(self, stored_bits: bytearray, zero_bits: bytearray, stats: SaveStats) -> None:
        """Set this chunk's bits in the image's bitmaps and count its stored and zero pages."""
        lo, nb = self.pfn // 8, -(-len(self.stored) // 8)
        stored_bits[lo:lo + nb] = native.pack_bits(self.stored)[:len(stored_bits) - lo]
        zero_bits[lo:lo + nb] = native.pack_bits(self.zero)[:len(zero_bits) - lo]
        stats.pages_stored += self.stored.count(1)
        stats.pages_zero += self.zero.count(1)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Kept pages [start, start+n) of a chunk in a block: a view of the source's mapping, or (view None) already
    read into the block's buffer at page ``at``."""

    chunk: _ChunkMasks
    start: int
    n: int
    view: memoryview | None
    at: int


@dataclasses.dataclass(frozen=True)
class Block:
    """block_pages kept source pages (fewer at the end) on their way to a worker, and the buffer they go into."""

    buf: bytearray
    segments: list[Segment]


def _fill_and_compress(b: Block, *, source: MemorySource, ps: int, drop_zero: bool, zstd: ZstdPerThread
                       ) -> tuple[int, int, int, bytes, int]:
    """On a worker: gather the block's kept, non-zero pages into its buffer (marking the chunk masks), compress,
    CRC.  Returns (pages stored, first pfn, end pfn, frame, CRC); 0 pages when all were zero."""
    if len(b.segments) == 1 and b.segments[0].view is not None:  # one mapped run: compress it in place if whole
        seg, view = b.segments[0], b.segments[0].view
        c = seg.chunk
        if not drop_zero or native.zero_pages(view, ps).count(1) == 0:
            c.stored[seg.start:seg.start + seg.n] = b"\1" * seg.n
            first, end = c.pfn + seg.start, c.pfn + seg.start + seg.n
            frame = zstd.compress(view)
            view.release()
            source.release(first * ps, seg.n * ps)
            return seg.n, first, end, frame, block_crc(VERSION, first, end, seg.n * ps, seg.n, frame)
    fill, first, last = 0, -1, -1
    for seg in b.segments:
        c = seg.chunk
        sv, zv = memoryview(c.stored)[seg.start:seg.start + seg.n], memoryview(c.zero)[seg.start:seg.start + seg.n]
        if seg.view is not None:
            got, _ = native.gather(seg.view, seg.n, ps, drop_zero, b.buf, fill, seg.n, sv, zv)
            seg.view.release()
            source.release((c.pfn + seg.start) * ps, seg.n * ps)
        else:
            region = memoryview(b.buf)[seg.at * ps:(seg.at + seg.n) * ps]
            got, _ = native.gather(region, seg.n, ps, drop_zero, b.buf, fill, seg.n, sv, zv)
        if got:
            if first < 0:
                first = c.pfn + c.stored.find(1, seg.start, seg.start + seg.n)
            last = c.pfn + c.stored.rfind(1, seg.start, seg.start + seg.n)
            fill += got
    if not fill:
        return 0, 0, 0, b"", 0
    frame = zstd.compress(memoryview(b.buf)[:fill * ps])
    return fill, first, last + 1, frame, block_crc(VERSION, first, last + 1, fill * ps, fill, frame)


class _Bitmaps:
    """The image's stored-page and zero-page bitmaps, filled a plan chunk at a time once the chunk's last block is
    written (the workers mark pages in the chunk's masks)."""

    def __init__(self, max_pfn: int, stats: SaveStats):
        self.stored = bytearray(-(-max_pfn // 8))  # one bit per pfn
        self.zero = bytearray(len(self.stored))
        self.stats = stats
        self.open: collections.deque[_ChunkMasks] = collections.deque()

    def written(self, blk: Block) -> None:
        """``blk`` is on disk: its chunks have one block less to wait for; pack every chunk now complete."""
        for c in {id(seg.chunk): seg.chunk for seg in blk.segments}.values():
            c.blocks_left -= 1
        self._pack_done()

    def _pack_done(self) -> None:
        """Bitmaps and counts of the oldest chunks that are planned and whose blocks have all been written."""
        while self.open and self.open[0].planned and self.open[0].blocks_left == 0:
            self.open.popleft().pack_into(self.stored, self.zero, self.stats)

    def tables(self, index: list[BlockEntry]) -> bytes:
        """What follows the blocks: both bitmaps and the block index (once every block is written)."""
        self._pack_done()
        if self.open:
            raise AssertionError("save: a chunk's blocks were never all written")
        return bytes(self.stored) + bytes(self.zero) + b"".join(e.pack() for e in index)


def _blocks(chunks: Iterator[Chunk], source: MemorySource, block_pages: int, buffers: BufferPool[bytearray],
            bitmaps: _Bitmaps, progress: Callable[[int], None] | None) -> Iterator[Block]:
    """Blocks of up to block_pages kept source pages, in pfn order: each a list of segments, either a view of the
    source's mapping (gathered on the worker) or pages already read into the block's buffer."""
    ps, stats = source.page_size, bitmaps.stats
    cur = Block(buffers.get(), [])
    src_pages = 0  # source pages placed in cur
    for ch in chunks:
        pfn, keep = ch.pfn, ch.keep
        if pfn % 8:
            raise AssertionError(f"plan chunk at pfn {pfn} is not byte aligned")
        masks = _ChunkMasks(pfn, bytearray(len(keep)), bytearray(len(keep)))
        bitmaps.open.append(masks)
        for i, c in enumerate(native.histogram(ch.classes)[:len(PageClass)]):
            stats.class_counts[i] += c
        nram = ch.ram.count(1)
        stats.pages_ram += nram
        for a, b in native.runs(keep):
            s = a
            while s < b:
                take = min(b - s, block_pages - src_pages)
                paddr = (pfn + s) * ps
                view = source.mapped_view(paddr, take * ps)  # zero-copy: the worker gathers from the mapping
                if view is None:  # read here (readers are not thread-safe), squeezed on the worker
                    source.readinto(paddr, memoryview(cur.buf)[src_pages * ps:(src_pages + take) * ps])
                if not cur.segments or cur.segments[-1].chunk is not masks:
                    masks.blocks_left += 1
                cur.segments.append(Segment(masks, s, take, view, src_pages))
                src_pages += take
                s += take
                if src_pages == block_pages:
                    yield cur
                    cur, src_pages = Block(buffers.get(), []), 0
        masks.planned = True
        if progress:
            progress(nram * ps)
    if cur.segments:
        yield cur
    else:
        buffers.put(cur.buf)


def _tell(out: BinaryIO) -> int:
    """The stream's position, 0 where it has none (a pipe)."""
    try:
        return out.tell()
    except (OSError, ValueError):
        return 0


def save(source: MemorySource, out: BinaryIO, *, vmci: Vmcoreinfo | None, level: int, restorable: bool = False,
         threads: int = 2, zstd_level: int = 1, block_pages: int = 256,
         progress: Callable[[int], None] | None = None, seal: Sealing | None = None) -> SaveStats:
    """Filter ``source`` at dump ``level`` and stream a khibernate image to ``out`` (trailer last); with ``seal``
    a sealed image (version 3: every block encrypted and authenticated, the tables tag before the trailer)."""
    t0 = time.monotonic()
    check_level(level, restorable)
    recorded = check_source_level(source, level, restorable)  # what the image holds: the source's loss included
    if threads < 1 or not 1 <= block_pages <= MAX_BLOCK_PAGES:
        raise UsageErrorImage(f"--threads must be >= 1 and --block-pages 1..{MAX_BLOCK_PAGES}")
    chunks = plan(source, vmci, level, restorable=restorable, chunk=PLAN_CHUNK)
    ps = source.page_size
    # fresh for every save (the sealed image's key is derived from it), or the one a handed image key is for
    image_uuid = (seal.image_uuid if seal else None) or uuidlib.uuid4().bytes
    cipher = seal.cipher(image_uuid) if seal else None
    header = Header(page_size=ps, dump_level=recorded,
                    flags=(FLAG_RESTORABLE if restorable else 0) | (FLAG_SEALED if seal else 0),
                    block_pages=block_pages, uuid=image_uuid, created_ns=time.time_ns(),
                    max_pfn=source.max_pfn, ranges=source.ranges, notes=default_notes(source, vmci),
                    osrelease=vmci.osrelease if vmci else "", build_id=vmci.build_id if vmci else "",
                    compression_level=zstd_level, version=SEALED_VERSION if seal else VERSION,
                    seal=SealInfo(CIPHER_CHACHA20_POLY1305, seal.slot, seal.keyring.key_id, seal.keyring.pack())
                    if seal else None)
    head = header.pack()
    base = _tell(out)  # where the image starts in the file (a store slot's offset)
    writeback = EarlyWriteback(out, base)
    out.write(head)
    pos = len(head)
    stats = SaveStats()
    bitmaps = _Bitmaps(source.max_pfn, stats)
    index: list[BlockEntry] = []
    depth = 4 * threads
    buffers = BufferPool(lambda: bytearray(block_pages * ps), depth + 2)
    work = functools.partial(_fill_and_compress, source=source, ps=ps, drop_zero=bool(level & DL_ZERO),
                             zstd=ZstdPerThread(zstd_level))
    blocks = _blocks(chunks, source, block_pages, buffers, bitmaps, progress)
    for blk, (npages, first, end, frame, crc) in ordered_map(blocks, work, threads, depth):
        if npages:
            if cipher is not None and seal is not None:  # sealed in order: the block number is its nonce
                frame = cipher.seal_block(len(index), frame, block_ad(image_uuid, seal.slot, len(index), first, end,
                                                                      npages * ps, npages))
                crc = block_crc(SEALED_VERSION, first, end, npages * ps, npages, frame)
            out.write(frame)
            index.append(BlockEntry(first, end, pos, len(frame), npages * ps, npages, crc))
            pos += len(frame)
            writeback.written(base + pos)
        buffers.put(blk.buf)
        bitmaps.written(blk)
    tables = bitmaps.tables(index)
    out.write(tables)
    n = len(bitmaps.stored)
    trailer = Trailer(pos, pos + n, n, pos + 2 * n, len(index), stats.pages_stored, stats.pages_zero,
                      tuple(stats.class_counts), zlib.crc32(tables))
    tail = trailer.pack()
    if cipher is not None:  # the tag over every byte but the blocks' (each has its own) and its own 16
        record = seal_record_authenticated(SEAL.pack(magic=SEAL_MAGIC, tables_tag=bytes(16)))
        tail = SEAL.pack(magic=SEAL_MAGIC, tables_tag=cipher.tables_tag(head + tables + record + tail)) + tail
    out.write(tail)
    stats.pages_excluded = stats.pages_ram - stats.pages_stored
    stats.bytes_written = pos + len(tables) + len(tail)
    stats.seconds = time.monotonic() - t0
    return stats


def save_file(source: MemorySource, dest: str | os.PathLike[str], *, sync: bool = True, **kw: object) -> SaveStats:
    """save() into ``dest`` via ``dest.partial`` (+ fsync unless ``sync`` is False) + rename, so an interrupted
    save never looks complete."""
    with atomic_output(dest, sync=sync) as f:
        return save(source, f, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ reader


class KhiSource(PagedSource):
    """A khibernate image as a MemorySource: stored pages decompressed on demand, zero pages read as zeros."""

    def __init__(self, path: str | os.PathLike[str], *, cache_blocks: int = 4, base: int = 0,
                 length: int | None = None, key: KeySource | HandedKey | None = None, slot: int | None = None):
        """``base``/``length``: the image is that region of the file or device (a store slot), not all of it.
        A sealed image needs ``key`` (KeyRequiredError otherwise) — a key source that opens its key slots, or the
        image key handed to a restoring capture kernel (for this one image) — and, read from store slot ``slot``,
        must have been sealed for that slot; an unsealed image ignores both."""
        self.path = os.fspath(path)
        self.base = base
        self._length = length
        self._key, self._slot = key, slot
        self.cipher: ImageCipher | None = None
        self.fd = open_input(self.path)
        try:
            self._open(cache_blocks)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, cache_blocks: int) -> None:
        """Read and check header, trailer, bitmaps and index (everything but the blocks' contents).  A sealed image
        is unsealed with the key, and its tag over header, tables and trailer checked, before any table is parsed;
        every failure of a sealed image's checks is a TamperedError."""
        size = input_size(self.fd) - self.base if self._length is None else self._length
        if size < HEADER.size + TRAILER.size:
            raise TruncatedError(f"{self.path}: too short for a khibernate image; the file is truncated")
        head = self._pread(HEADER_ALIGN, 0)
        size_field = HEADER.unpack(head)["header_size"] if len(head) >= HEADER.size and head[:8] == MAGIC else 0
        if size_field > size - TRAILER.size:
            raise TruncatedError(f"{self.path}: header size {size_field} is beyond the file; it is truncated")
        if size_field > len(head):
            head = self._pread(size_field, 0)
        try:
            self.header, self.header_size = Header.unpack(head)
        except CorruptImageError as e:
            raise self._tampered_if_sealed(head, e) from None
        self.page_size = self.header.page_size
        if self.header.seal is not None:
            self.cipher = self._unseal()
        try:
            tables = self._tables(size, head[:self.header_size])
        except CorruptImageError as e:
            raise self._tampered_if_sealed(head, e) from None
        t = self.trailer
        bmp = t.bitmap_size
        base = t.stored_bitmap_offset
        self.stored_bits = tables[:bmp]
        self.zero_bits = tables[t.zero_bitmap_offset - base:t.zero_bitmap_offset - base + bmp]
        self._present = self._or(self.stored_bits, self.zero_bits)  # stored or zero: what page_present_mask says
        ib = t.index_offset - base
        self.index = [BlockEntry.unpack(tables, ib + i * INDEX.size) for i in range(t.index_count)]
        self._check_index()
        self._firsts = [e.first_pfn for e in self.index]
        self._numbers = {e.offset: i for i, e in enumerate(self.index)}  # block number by frame offset (nonce, AD)
        self._cache: collections.OrderedDict[int, tuple[list[int], bytes]] = collections.OrderedDict()
        self._cache_blocks = cache_blocks
        self._dctx = zstandard.ZstdDecompressor()

    def _tables(self, size: int, head: bytes) -> bytes:
        """The bitmaps and index, read after the trailer (self.trailer), checked against it and, sealed, against
        the tables tag."""
        self.trailer = t = Trailer.unpack(self._pread(TRAILER.size, size - TRAILER.size))
        tables_end = size - TRAILER.size - (SEAL.size if self.cipher else 0)
        bmp = -(-self.header.max_pfn // 8)
        if (t.bitmap_size != bmp or t.stored_bitmap_offset < self.header_size
                or t.zero_bitmap_offset < t.stored_bitmap_offset + t.bitmap_size
                or t.index_offset < t.zero_bitmap_offset + t.bitmap_size
                or t.index_offset + t.index_count * INDEX.size != tables_end):
            raise CorruptImageError(f"{self.path}: trailer's bitmap/index offsets or sizes disagree with the header "
                                    "and the file size; the image is corrupt")
        tables = self._pread(tables_end - t.stored_bitmap_offset, t.stored_bitmap_offset)
        if len(tables) != tables_end - t.stored_bitmap_offset:
            raise TruncatedError(f"{self.path}: tables cut short; the image is truncated")
        if zlib.crc32(tables) != t.tables_crc:
            raise CorruptImageError(f"{self.path}: bitmap/index checksum mismatch; the image is corrupt")
        if self.cipher is not None:
            raw = self._pread(SEAL.size, tables_end)
            seal = SEAL.unpack(raw, error=TruncatedError, what="seal record")
            if seal["magic"] != SEAL_MAGIC:
                raise CorruptImageError(f"{self.path}: no seal record before the trailer; the image is corrupt")
            self.cipher.check_tables(head + tables + seal_record_authenticated(raw)
                                     + self._pread(TRAILER.size, size - TRAILER.size), seal["tables_tag"], self.path)
        return tables

    def _unseal(self) -> ImageCipher:
        """The image's cipher from its key slots and the key given; the slot it was sealed for checked."""
        from khibernate.seal.sealing import HandedKey, unseal

        h = self.header
        assert h.seal is not None
        if self._slot is not None and h.seal.slot != self._slot:
            sealed_for = "a file" if h.seal.slot == NO_SLOT else f"slot {h.seal.slot}"
            raise TamperedError(f"{self.path}: the image in slot {self._slot} was sealed for {sealed_for}: it was "
                                "moved or copied there and cannot be trusted; capture a new one")
        if isinstance(self._key, HandedKey):
            return self._key.cipher_for(h.uuid, h.seal.key_id, self.path)
        from khibernate.seal.cipher import ImageCipher

        return ImageCipher(unseal(h.seal.keyring, h.seal.key_id, self._key, self.path), h.uuid)

    def _tampered_if_sealed(self, head: bytes, e: CorruptImageError) -> CorruptImageError:
        """``e`` as a TamperedError when the (unverified) header says sealed, else ``e``: one error class for any
        change to a sealed image."""
        if isinstance(e, TamperedError) or len(head) < HEADER.size:
            return e
        f = HEADER.unpack(head)
        if f["version"] == SEALED_VERSION or f["flags"] & FLAG_SEALED:
            return TamperedError(f"{e} (a sealed image: it was changed since it was sealed and cannot be trusted; "
                                 "nothing was written)")
        return e

    def _pread(self, size: int, offset: int) -> bytes:
        """Bytes of the image (offsets relative to its start, inside the region)."""
        return os.pread(self.fd, size, self.base + offset)

    def _check_index(self) -> None:
        """Index entries: sorted disjoint pfn ranges inside max_pfn, frames in file order between header and tables,
        sizes within the format's limits."""
        h, t = self.header, self.trailer
        prev_pfn, prev_end = 0, self.header_size
        for i, e in enumerate(self.index):
            bad = ""
            if not prev_pfn <= e.first_pfn < e.end_pfn <= h.max_pfn:
                bad = f"pfn range {e.first_pfn:#x}-{e.end_pfn:#x} is empty, unsorted or beyond max_pfn"
            elif not 1 <= e.npages <= min(h.block_pages, e.end_pfn - e.first_pfn):
                bad = f"{e.npages} pages do not fit its pfn range or block_pages {h.block_pages}"
            elif e.usize != e.npages * h.page_size:
                bad = f"usize {e.usize} != npages x page_size"
            elif e.offset < prev_end or e.offset + e.csize > t.stored_bitmap_offset or e.csize == 0:
                bad = f"frame at {e.offset} (+{e.csize}) overlaps another or lies outside the block area"
            if bad:
                raise CorruptImageError(f"{self.path}: block {i}: {bad}; the image is corrupt")
            prev_pfn, prev_end = e.end_pfn, e.offset + e.csize

    @property
    def ranges(self) -> tuple[MemRange, ...]:
        return self.header.ranges

    @property
    def notes(self) -> tuple[Note, ...]:
        return self.header.notes

    @property
    def max_pfn(self) -> int:
        return self.header.max_pfn

    format_name = "khi"

    @property
    def dump_level(self) -> int:
        return self.header.dump_level

    def describe(self) -> dict[str, object]:
        h, t = self.header, self.trailer
        return {"version": h.version, "dump_level": h.dump_level, "restorable": bool(h.flags & FLAG_RESTORABLE),
                "sealed": h.seal is not None,
                "uuid": str(uuidlib.UUID(bytes=h.uuid)), "created_ns": h.created_ns, "blocks": t.index_count,
                "pages_stored": t.pages_stored, "pages_zero": t.pages_zero,
                "classes": {c.name.lower(): t.class_counts[c] for c in PageClass}, "zstd_level": h.compression_level}

    @staticmethod
    def _or(a: bytes, b: bytes) -> bytes:
        """Bytewise OR of two equally long bitmaps."""
        return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")

    def _bit(self, bits: bytes, pfn: int) -> bool:
        """Bit ``pfn`` of a little-endian bitmap (False beyond max_pfn)."""
        return 0 <= pfn < self.header.max_pfn and bool(bits[pfn >> 3] >> (pfn & 7) & 1)

    def block_pfns(self, e: BlockEntry) -> list[int]:
        """Stored pfns of block ``e``, ascending."""
        return native.bits_to_pfns(self.stored_bits, e.first_pfn, e.end_pfn)

    def frame(self, e: BlockEntry) -> bytes:
        """The compressed frame of block ``e``, checked against its index entry's CRC and, sealed, decrypted and
        authenticated (bound to its number, this image and its slot)."""
        frame = self._pread(e.csize, e.offset)
        if len(frame) != e.csize:
            raise TruncatedError(f"{self.path}: block at {e.offset} cut short; the image is truncated")
        if block_crc(self.header.version, e.first_pfn, e.end_pfn, e.usize, e.npages, frame) != e.crc32:
            cls = CorruptImageError if self.cipher is None else TamperedError
            raise cls(f"{self.path}: block at offset {e.offset} (pfn {e.first_pfn:#x}) checksum mismatch; the image "
                      f"is corrupt{'' if self.cipher is None else ' (sealed: changed since it was sealed)'}")
        if self.cipher is None:
            return frame
        n, h = self._numbers[e.offset], self.header
        assert h.seal is not None
        return self.cipher.open_block(n, frame, block_ad(h.uuid, h.seal.slot, n, e.first_pfn, e.end_pfn, e.usize,
                                                         e.npages), f"{self.path}: block {n} (pfn {e.first_pfn:#x})")

    def decompress(self, e: BlockEntry) -> bytes:
        """Verified uncompressed bytes of block ``e``."""
        frame = self.frame(e)
        try:
            data = self._dctx.decompress(frame, max_output_size=e.usize)
        except zstandard.ZstdError as exc:
            raise CorruptImageError(f"{self.path}: block at offset {e.offset} does not decompress ({exc})") from None
        if len(data) != e.usize or e.usize != e.npages * self.page_size:
            raise CorruptImageError(f"{self.path}: block at offset {e.offset} has the wrong size; image corrupt")
        return data

    def _block(self, i: int) -> tuple[list[int], bytes]:
        """(pfns, data) of block ``i``, decompressed and verified, from a small LRU cache."""
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        e = self.index[i]
        pfns = self.block_pfns(e)
        if len(pfns) != e.npages:
            raise CorruptImageError(f"{self.path}: block {i} page count disagrees with the bitmap; image corrupt")
        hit = (pfns, self.decompress(e))
        self._cache[i] = hit
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return hit

    def read_page(self, pfn: int) -> bytes:
        """One page: stored data, zeros for a zero page, AddressError for an excluded page."""
        ps = self.page_size
        if self._bit(self.stored_bits, pfn):
            i = bisect.bisect_right(self._firsts, pfn) - 1
            if i < 0 or pfn >= self.index[i].end_pfn:
                raise CorruptImageError(f"{self.path}: page {pfn:#x} is marked stored but no block holds it; the "
                                        "image is corrupt")
            pfns, data = self._block(i)
            k = bisect.bisect_left(pfns, pfn)
            return data[k * ps:(k + 1) * ps]
        if self._bit(self.zero_bits, pfn):
            return bytes(ps)
        raise AddressError(f"physical page {pfn * ps:#x} was excluded from the image (dump level "
                           f"{self.header.dump_level}) or is not RAM")

    def page_present_mask(self, pfn: int, count: int) -> bytearray:
        """1 per stored or zero page of pfn..pfn+count, 0 for the others (and beyond max_pfn)."""
        n = max(0, min(count, self.header.max_pfn - pfn))
        out = native.unpack_bits(self._present, pfn, n) if pfn >= 0 else bytearray(n)
        out += bytes(count - n)
        return out

    def check_frames(self, progress: Callable[[int], None] | None = None) -> int:
        """Every block's CRC over its compressed frame (no decompression): what a restore checks before its first
        write; returns the number of blocks, CorruptImageError/TruncatedError naming the first bad one."""
        for e in self.index:
            self.frame(e)
            if progress:
                progress(e.csize)
        return len(self.index)

    def iter_blocks(self) -> Iterator[tuple[list[int], bytes]]:
        """(pfns ascending, data) of every block in order, each verified."""
        for e in self.index:
            pfns = self.block_pfns(e)
            if len(pfns) != e.npages:
                raise CorruptImageError(f"{self.path}: block at {e.offset} page count disagrees with the bitmap")
            yield pfns, self.decompress(e)

    def verify(self, progress: Callable[[int], None] | None = None, decompress: bool = True) -> dict[str, int]:
        """Check every checksum and count, and that bitmaps, index and trailer agree; CorruptImageError if not.
        ``decompress=False`` checks the frames' CRCs without decompressing them (progress counts frame bytes)."""
        n = 0
        if decompress:
            for pfns, data in self.iter_blocks():
                n += len(pfns)
                if progress:
                    progress(len(data))
        else:
            self.check_frames(progress)
            for e in self.index:
                if native.unpack_bits(self.stored_bits, e.first_pfn, e.end_pfn - e.first_pfn).count(1) != e.npages:
                    raise CorruptImageError(f"{self.path}: block at {e.offset} page count disagrees with the bitmap")
                n += e.npages
        # the bitmaps as integers cut to max_pfn (bit i = pfn i): whole-bitmap set algebra without a per-page loop
        lim = (1 << self.header.max_pfn) - 1
        stored = int.from_bytes(self.stored_bits, "little") & lim
        zero = int.from_bytes(self.zero_bits, "little") & lim
        total, nzero = stored.bit_count(), zero.bit_count()
        if n != total or total != self.trailer.pages_stored:
            raise CorruptImageError(f"{self.path}: {n} pages in blocks, {total} in the bitmap, "
                                    f"{self.trailer.pages_stored} in the trailer; the image is corrupt")
        if nzero != self.trailer.pages_zero:
            raise CorruptImageError(f"{self.path}: {nzero} zero pages in the bitmap, {self.trailer.pages_zero} in "
                                    "the trailer; the image is corrupt")
        both = (stored & zero).bit_count()
        if both:
            raise CorruptImageError(f"{self.path}: {both} pages are marked both stored and zero; the image is corrupt")
        ram = ram_mask(self.header.ranges, 0, self.header.max_pfn, self.page_size)
        outside = ((stored | zero) & ~int.from_bytes(native.pack_bits(ram), "little")).bit_count()
        if outside:
            raise CorruptImageError(f"{self.path}: {outside} pages are marked present outside the memory ranges; "
                                    "the image is corrupt")
        if (self.bitmap_tail(self.stored_bits) | self.bitmap_tail(self.zero_bits)) and self.header.max_pfn % 8:
            raise CorruptImageError(f"{self.path}: bitmap bits set beyond max_pfn; the image is corrupt")
        return {"blocks": len(self.index), "pages_stored": n, "pages_zero": self.trailer.pages_zero}

    def bitmap_tail(self, bits: bytes) -> int:
        """The bits of the last bitmap byte that lie beyond max_pfn (0 in a well-formed image)."""
        rem = self.header.max_pfn % 8
        return bits[-1] >> rem if rem and len(bits) else 0

    def vmcoreinfo(self) -> Vmcoreinfo | None:
        """VMCOREINFO kept in the header, if any."""
        text = self.vmcoreinfo_text
        return Vmcoreinfo.parse(text) if text else None

    def close(self) -> None:
        self._cache.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------------------------------------------ registry


def probe(head: bytes) -> bool:
    """True if the file starts with the .khi magic."""
    return head.startswith(MAGIC)


def open(path: str | os.PathLike[str], key: KeySource | None = None) -> KhiSource:  # noqa: A001 - the registry's name
    """The .khi reader for ``path`` (``key``: for a sealed image)."""
    return KhiSource(path, key=key)
