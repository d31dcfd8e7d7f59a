"""khibernate's own image (``.khi``): layouts, streaming writer (:func:`save`) and reader (:class:`KhiSource`).

Layout (little-endian; ``docs/image-format.md`` has every byte): a header (magic, version, page size, dump level,
OSRELEASE, BUILD-ID, UUID, time, memory ranges, ELF notes incl. VMCOREINFO) padded to 4 KiB; zstd blocks of up to
``block_pages`` kept pages each, in pfn order; the stored-page and zero-page bitmaps; the block index; a 128-byte
trailer written last.  A file without a valid trailer is an interrupted save and is refused.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import os
import struct
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import zstandard

from khibernate import native
from khibernate.elfcore import VMCOREINFO_NOTE, Note, pack_notes, parse_notes
from khibernate.image.atomic import atomic_output
from khibernate.image.errors import (
    ELF_ERRORS,
    AddressError,
    CorruptImageError,
    IncompleteImageError,
    NotAVmcoreError,
    TruncatedError,
    UnsupportedError,
    UsageErrorImage,
)
from khibernate.image.inputfile import MAX_PHYS_ADDR, input_size, open_input
from khibernate.image.levels import RESTORABLE_LEVEL
from khibernate.image.pagefilter import DL_ZERO, PageClass, check_level
from khibernate.image.pipeline import BufferPool, EarlyWriteback, ZstdPerThread, ordered_map
from khibernate.image.plan import plan, ram_mask
from khibernate.image.sources.base import MemorySource, MemRange, PagedSource
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.layout import Layout

MAGIC = b"KHIMG\x00\r\n"
TRAILER_MAGIC = b"KHIEND\x00\x00"
VERSION = 2  # 2: each block's CRC is seeded with its index fields (binds a frame to its pfn range)
READ_VERSIONS = (1, 2)
FLAG_RESTORABLE = 1
COMPRESS_ZSTD = 1
HEADER_ALIGN = 4096

HEADER = Layout("khi_header", "<", [
    ("magic", "8s"), ("version", "I"), ("header_size", "I"), ("page_size", "I"), ("dump_level", "I"), ("flags", "I"),
    ("block_pages", "I"), ("uuid", "16s"), ("created_ns", "Q"), ("max_pfn", "Q"), ("nr_ranges", "I"),
    ("notes_size", "I"), ("osrelease", "65s"), ("build_id", "65s"), ("pad", "2x"), ("compression", "I"),
    ("compression_level", "i"), ("reserved", "40s"), ("header_crc32", "I")])
RANGE = Layout("khi_range", "<", [("start", "Q"), ("end", "Q")])
INDEX = Layout("khi_index_entry", "<", [("first_pfn", "Q"), ("end_pfn", "Q"), ("offset", "Q"), ("csize", "I"),
                                        ("usize", "I"), ("npages", "I"), ("crc32", "I")])
TRAILER = Layout("khi_trailer", "<", [
    ("magic", "8s"), ("stored_bitmap_offset", "Q"), ("zero_bitmap_offset", "Q"), ("bitmap_size", "Q"),
    ("index_offset", "Q"), ("index_count", "Q"), ("pages_stored", "Q"), ("pages_zero", "Q"), ("class_counts", "7Q"),
    ("tables_crc32", "I"), ("trailer_crc32", "I")])
BLOCK_BIND = Layout("khi_block_bind", "<", [("first_pfn", "Q"), ("end_pfn", "Q"), ("usize", "I"), ("npages", "I")])
HEADER_CRC_OFFSET = HEADER.offsets["header_crc32"]
assert HEADER.size == 256 and TRAILER.size == 128 and INDEX.size == 40
MAX_BLOCK_PAGES = 1 << 16
# pfns classified at a time: small enough that classifying the next chunk never starves the compressors
PLAN_CHUNK = 1 << 14


def block_crc(version: int, first_pfn: int, end_pfn: int, usize: int, npages: int, frame: bytes) -> int:
    """The CRC-32 an index entry stores: of the frame alone (v1), or seeded with the entry's pfn range (v2)."""
    if version < 2:
        return zlib.crc32(frame)
    return zlib.crc32(frame, zlib.crc32(BLOCK_BIND.pack(first_pfn=first_pfn, end_pfn=end_pfn, usize=usize,
                                                        npages=npages)))


def _ascii(text: str) -> bytes:
    """At most 64 ASCII bytes of ``text`` (others become '?'), so the reader reads back what the writer wrote."""
    return text.encode("ascii", "replace")[:64]


def _text(raw: bytes) -> str:
    """A NUL-padded header string field."""
    return raw.split(b"\0")[0].decode("ascii", "replace")


@dataclasses.dataclass(frozen=True)
class Header:
    """The image header: everything known before the first page is written."""

    page_size: int
    dump_level: int
    flags: int
    block_pages: int
    uuid: bytes
    created_ns: int
    max_pfn: int
    ranges: tuple[MemRange, ...]
    notes: tuple[Note, ...]
    osrelease: str
    build_id: str
    compression: int = COMPRESS_ZSTD
    compression_level: int = 1
    version: int = VERSION

    def pack(self) -> bytes:
        """Header bytes, padded to HEADER_ALIGN, with its CRC filled in."""
        notes = pack_notes(self.notes)
        body = b"".join(RANGE.pack(start=r.start, end=r.end) for r in self.ranges) + notes
        size = -(-(HEADER.size + len(body)) // HEADER_ALIGN) * HEADER_ALIGN
        fixed = HEADER.pack(magic=MAGIC, version=self.version, header_size=size, page_size=self.page_size,
                            dump_level=self.dump_level, flags=self.flags, block_pages=self.block_pages,
                            uuid=self.uuid, created_ns=self.created_ns, max_pfn=self.max_pfn,
                            nr_ranges=len(self.ranges), notes_size=len(notes), osrelease=_ascii(self.osrelease),
                            build_id=_ascii(self.build_id), compression=self.compression,
                            compression_level=self.compression_level)
        raw = bytearray(fixed + body + bytes(size - HEADER.size - len(body)))
        struct.pack_into("<I", raw, HEADER_CRC_OFFSET, zlib.crc32(raw))
        return bytes(raw)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> tuple[Header, int]:
        """(Header, its size in bytes) from the start of an image; errors name what is wrong."""
        if len(data) < HEADER.size or bytes(data[:8]) != MAGIC:
            raise NotAVmcoreError("not a khibernate image (bad magic)")
        f = HEADER.unpack(data)
        version, size = f["version"], f["header_size"]
        if version not in READ_VERSIONS:
            raise UnsupportedError(f"khibernate image version {version} is not supported (this khibernate reads "
                                   f"versions {', '.join(map(str, READ_VERSIONS))}); use the khibernate that wrote it")
        if size < HEADER.size or size > len(data):
            raise TruncatedError("khibernate image header is cut short; the file is truncated")
        raw = bytearray(data[:size])
        struct.pack_into("<I", raw, HEADER_CRC_OFFSET, 0)
        if zlib.crc32(raw) != f["header_crc32"]:
            raise CorruptImageError("khibernate image header checksum mismatch; the file is corrupt")
        page_size, block_pages, max_pfn = f["page_size"], f["block_pages"], f["max_pfn"]
        nr_ranges, notes_size, compression = f["nr_ranges"], f["notes_size"], f["compression"]
        bad = ""
        if page_size < 512 or page_size > 1 << 20 or page_size & (page_size - 1):
            bad = f"page_size {page_size} is not a page size"
        elif not 1 <= block_pages <= MAX_BLOCK_PAGES:
            bad = f"block_pages {block_pages} is outside 1..{MAX_BLOCK_PAGES}"
        elif max_pfn * page_size > MAX_PHYS_ADDR:
            bad = f"max_pfn {max_pfn} is beyond {MAX_PHYS_ADDR >> 40} TiB"
        elif HEADER.size + nr_ranges * RANGE.size + notes_size > size:
            bad = f"{nr_ranges} ranges and {notes_size} note bytes do not fit in a {size}-byte header"
        elif compression != COMPRESS_ZSTD:
            bad = f"compression id {compression} is unknown (1 = zstd)"
        if bad:
            raise CorruptImageError(f"khibernate image header: {bad}; the file is corrupt")
        off = HEADER.size
        ranges = tuple(MemRange(**RANGE.unpack(data, off + i * RANGE.size)) for i in range(nr_ranges))
        prev = 0
        for r in ranges:
            if r.start >= r.end or r.start < prev or -(-r.end // page_size) > max_pfn:
                raise CorruptImageError(f"khibernate image range {r.start:#x}-{r.end:#x} is empty, unsorted or "
                                        "beyond max_pfn; the file is corrupt")
            prev = r.end
        off += nr_ranges * RANGE.size
        notes = tuple(parse_notes(bytes(data[off:off + notes_size]), errors=ELF_ERRORS))
        return cls(page_size=page_size, dump_level=f["dump_level"], flags=f["flags"], block_pages=block_pages,
                   uuid=f["uuid"], created_ns=f["created_ns"], max_pfn=max_pfn, ranges=ranges, notes=notes,
                   osrelease=_text(f["osrelease"]), build_id=_text(f["build_id"]), compression=compression,
                   compression_level=f["compression_level"], version=version), size


@dataclasses.dataclass(frozen=True)
class BlockEntry:
    """One block: the pfn range it covers, where its zstd frame lies, and its checksum."""

    first_pfn: int
    end_pfn: int
    offset: int
    csize: int
    usize: int
    npages: int
    crc32: int


@dataclasses.dataclass(frozen=True)
class Trailer:
    """Written last: where the bitmaps and index are, page counts, and checksums."""

    stored_bitmap_offset: int
    zero_bitmap_offset: int
    bitmap_size: int
    index_offset: int
    index_count: int
    pages_stored: int
    pages_zero: int
    class_counts: tuple[int, ...]
    tables_crc: int

    def pack(self) -> bytes:
        """Trailer bytes with its own CRC."""
        raw = TRAILER.pack(magic=TRAILER_MAGIC, stored_bitmap_offset=self.stored_bitmap_offset,
                           zero_bitmap_offset=self.zero_bitmap_offset, bitmap_size=self.bitmap_size,
                           index_offset=self.index_offset, index_count=self.index_count,
                           pages_stored=self.pages_stored, pages_zero=self.pages_zero,
                           class_counts=self.class_counts, tables_crc32=self.tables_crc)
        return raw[:-4] + struct.pack("<I", zlib.crc32(raw[:-4]))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Trailer:
        """Trailer from the last TRAILER.size bytes; IncompleteImageError if it is absent."""
        if len(data) != TRAILER.size or bytes(data[:8]) != TRAILER_MAGIC:
            raise IncompleteImageError("khibernate image has no trailer: the save was interrupted; save it again")
        f = TRAILER.unpack(bytes(data))
        if zlib.crc32(bytes(data[:-4])) != f["trailer_crc32"]:
            raise CorruptImageError("khibernate image trailer checksum mismatch; the file is corrupt")
        return cls(f["stored_bitmap_offset"], f["zero_bitmap_offset"], f["bitmap_size"], f["index_offset"],
                   f["index_count"], f["pages_stored"], f["pages_zero"], f["class_counts"], f["tables_crc32"])


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


def default_notes(source: MemorySource, vmci: Vmcoreinfo | None) -> tuple[Note, ...]:
    """The source's notes, plus a VMCOREINFO note when it came from elsewhere (-i FILE, sysfs)."""
    notes = tuple(source.notes)
    if vmci is not None and not any(n.name == VMCOREINFO_NOTE for n in notes):
        notes += (Note(VMCOREINFO_NOTE, 0, vmci.text.encode()),)
    return notes


def check_source_level(source: MemorySource, level: int, restorable: bool) -> int:
    """The dump level an output of ``source`` filtered at ``level`` has (the source's own level included);
    UsageErrorImage when ``restorable`` is asked of a source that already lost more than zero and free pages."""
    eff = level | source.dump_level
    if restorable and eff & ~RESTORABLE_LEVEL:
        raise UsageErrorImage(f"the source was already filtered at dump level {source.dump_level}, which drops "
                              "cache or user pages: no image of it can be restored; pass -d "
                              f"{eff} to save it anyway (not restorable)")
    return eff


def _tell(out: BinaryIO) -> int:
    """The stream's position, 0 where it has none (a pipe)."""
    try:
        return out.tell()
    except (OSError, ValueError):
        return 0


def save(source: MemorySource, out: BinaryIO, *, vmci: Vmcoreinfo | None, level: int, restorable: bool = False,
         threads: int = 2, zstd_level: int = 1, block_pages: int = 256,
         progress: Callable[[int], None] | None = None) -> SaveStats:
    """Filter ``source`` at dump ``level`` and stream a khibernate image to ``out`` (trailer last)."""
    t0 = time.monotonic()
    check_level(level, restorable)
    recorded = check_source_level(source, level, restorable)  # what the image holds: the source's loss included
    if threads < 1 or not 1 <= block_pages <= 1 << 16:
        raise UsageErrorImage("--threads must be >= 1 and --block-pages 1..65536")
    chunks = plan(source, vmci, level, restorable=restorable, chunk=PLAN_CHUNK)
    ps = source.page_size
    max_pfn = source.max_pfn
    header = Header(page_size=ps, dump_level=recorded, flags=FLAG_RESTORABLE if restorable else 0,
                    block_pages=block_pages, uuid=uuidlib.uuid4().bytes, created_ns=time.time_ns(),
                    max_pfn=max_pfn, ranges=source.ranges, notes=default_notes(source, vmci),
                    osrelease=vmci.osrelease if vmci else "", build_id=vmci.build_id if vmci else "",
                    compression_level=zstd_level)
    head = header.pack()
    base = _tell(out)  # where the image starts in the file (a store slot's offset)
    writeback = EarlyWriteback(out, base)
    out.write(head)
    pos = len(head)
    stored_bits = bytearray(-(-max_pfn // 8))  # one bit per pfn, filled chunk by chunk
    zero_bits = bytearray(len(stored_bits))
    stats = SaveStats()
    index: list[BlockEntry] = []
    drop_zero = bool(level & DL_ZERO)
    depth = 4 * threads
    buffers = BufferPool(lambda: bytearray(block_pages * ps), depth + 2)
    zstd = ZstdPerThread(zstd_level)

    open_chunks: collections.deque[_ChunkMasks] = collections.deque()
    work = functools.partial(_fill_and_compress, source=source, ps=ps, drop_zero=drop_zero, zstd=zstd)

    def pack_done() -> None:
        """Bitmaps and counts of the oldest chunks whose blocks have all been written."""
        while open_chunks and open_chunks[0].planned and open_chunks[0].blocks_left == 0:
            open_chunks.popleft().pack_into(stored_bits, zero_bits, stats)

    def blocks() -> Iterator[Block]:
        """Blocks of up to block_pages kept source pages, in pfn order: each a list of segments, either a view of
        the source's mapping (gathered on the worker) or pages already read into the block's buffer."""
        cur = Block(buffers.get(), [])
        src_pages = 0  # source pages placed in cur
        for ch in chunks:
            pfn, keep = ch.pfn, ch.keep
            if pfn % 8:
                raise AssertionError(f"plan chunk at pfn {pfn} is not byte aligned")
            masks = _ChunkMasks(pfn, bytearray(len(keep)), bytearray(len(keep)))
            open_chunks.append(masks)
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

    for blk, (npages, first, end, frame, crc) in ordered_map(blocks(), work, threads, depth):
        if npages:
            out.write(frame)
            index.append(BlockEntry(first, end, pos, len(frame), npages * ps, npages, crc))
            pos += len(frame)
            writeback.written(base + pos)
        buffers.put(blk.buf)
        for c in {id(seg.chunk): seg.chunk for seg in blk.segments}.values():
            c.blocks_left -= 1
        pack_done()
    pack_done()
    if open_chunks:
        raise AssertionError("save: a chunk's blocks were never all written")
    stats.pages_excluded = stats.pages_ram - stats.pages_stored
    table = b"".join(INDEX.pack(first_pfn=e.first_pfn, end_pfn=e.end_pfn, offset=e.offset, csize=e.csize,
                                usize=e.usize, npages=e.npages, crc32=e.crc32) for e in index)
    tables = bytes(stored_bits) + bytes(zero_bits) + table
    out.write(tables)
    trailer = Trailer(pos, pos + len(stored_bits), len(stored_bits), pos + 2 * len(stored_bits), len(index),
                      stats.pages_stored, stats.pages_zero, tuple(stats.class_counts), zlib.crc32(tables))
    out.write(trailer.pack())
    stats.bytes_written = pos + len(tables) + TRAILER.size
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
                 length: int | None = None):
        """``base``/``length``: the image is that region of the file or device (a store slot), not all of it."""
        self.path = os.fspath(path)
        self.base = base
        self._length = length
        self.fd = open_input(self.path)
        try:
            self._open(cache_blocks)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, cache_blocks: int) -> None:
        """Read and check header, trailer, bitmaps and index (everything but the blocks' contents)."""
        size = input_size(self.fd) - self.base if self._length is None else self._length
        if size < HEADER.size + TRAILER.size:
            raise TruncatedError(f"{self.path}: too short for a khibernate image; the file is truncated")
        head = self._pread(HEADER_ALIGN, 0)
        size_field = HEADER.unpack(head)["header_size"] if len(head) >= HEADER.size and head[:8] == MAGIC else 0
        if size_field > size - TRAILER.size:
            raise TruncatedError(f"{self.path}: header size {size_field} is beyond the file; it is truncated")
        if size_field > len(head):
            head = self._pread(size_field, 0)
        self.header, self.header_size = Header.unpack(head)
        self.page_size = self.header.page_size
        self.trailer = t = Trailer.unpack(self._pread(TRAILER.size, size - TRAILER.size))
        tables_end = size - TRAILER.size
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
        base = t.stored_bitmap_offset
        self.stored_bits = tables[:bmp]
        self.zero_bits = tables[t.zero_bitmap_offset - base:t.zero_bitmap_offset - base + bmp]
        self._present = self._or(self.stored_bits, self.zero_bits)  # stored or zero: what page_present_mask says
        ib = t.index_offset - base
        self.index = [BlockEntry(**INDEX.unpack(tables, ib + i * INDEX.size)) for i in range(t.index_count)]
        self._check_index()
        self._firsts = [e.first_pfn for e in self.index]
        self._cache: collections.OrderedDict[int, tuple[list[int], bytes]] = collections.OrderedDict()
        self._cache_blocks = cache_blocks
        self._dctx = zstandard.ZstdDecompressor()

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
        """The compressed frame of block ``e``, checked against its index entry's CRC."""
        frame = self._pread(e.csize, e.offset)
        if len(frame) != e.csize:
            raise TruncatedError(f"{self.path}: block at {e.offset} cut short; the image is truncated")
        if block_crc(self.header.version, e.first_pfn, e.end_pfn, e.usize, e.npages, frame) != e.crc32:
            raise CorruptImageError(f"{self.path}: block at offset {e.offset} (pfn {e.first_pfn:#x}) checksum "
                                    "mismatch; the image is corrupt")
        return frame

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


def open(path: str | os.PathLike[str]) -> KhiSource:  # noqa: A001 - the registry's name for "open this format"
    """The .khi reader for ``path``."""
    return KhiSource(path)
