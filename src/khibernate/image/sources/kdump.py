"""kdump-compressed files (makedumpfile's format) and the flattened stream: reader (:class:`KdumpSource`) and writer
(:func:`write_kdump`) side by side, over the layouts of :mod:`khibernate.image.layouts.kdump`.
"""

from __future__ import annotations

import array
import bisect
import functools
import itertools
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

import zstandard

from khibernate import native
from khibernate.elfcore import VMCOREINFO_NOTE, Note, pack_notes, parse_notes
from khibernate.image.errors import (
    ELF_ERRORS,
    AddressError,
    CompressionError,
    CorruptImageError,
    IncompleteImageError,
    NotAVmcoreError,
    TruncatedError,
    UnsupportedError,
)
from khibernate.image.inputfile import input_size, open_input
from khibernate.image.layouts import MAX_PHYS_ADDR
from khibernate.image.layouts.kdump import (
    COMPRESS_FLAGS,
    DUMP_DH_COMPRESSED_INCOMPLETE,
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    FLAT_HEADER,
    FLAT_HEADER_SIZE,
    FLAT_RECORD,
    FLAT_SIGNATURE,
    PAGE_DESC,
    SIGNATURE,
    bitmap_bytes,
    pack_headers,
    parse_header,
)
from khibernate.image.levels import DL_ZERO
from khibernate.image.pipeline import ZstdPerThread, ordered_map
from khibernate.image.sources.base import MemorySource, MemRange, PagedSource, StoredSource, merge_ranges

# ------------------------------------------------------------------------------------------------ byte access


class _Plain:
    """Positioned reads of a plain kdump file, clamped to the file's end (a short result means truncation)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = input_size(fd)

    def pread(self, off: int, n: int) -> bytes:
        if off < 0 or n < 0:
            raise CorruptImageError(f"kdump offset {off} or size {n} is negative; the file is corrupt")
        if self.size:
            n = max(0, min(n, self.size - off))
        elif n > 1 << 30:
            raise CorruptImageError(f"kdump read of {n} bytes is beyond any header's size; the file is corrupt")
        return os.pread(self.fd, n, off) if n else b""


class _Flat:
    """Random access into a flattened stream: records indexed by their target offset; later records win."""

    def __init__(self, fd: int):
        self.fd = fd
        self.phys_size = size = input_size(fd)
        head = os.pread(fd, FLAT_HEADER_SIZE, 0)
        if len(head) < FLAT_HEADER_SIZE:
            raise TruncatedError("flattened stream shorter than its 4096-byte header; the file is truncated")
        fh = FLAT_HEADER.unpack(head)
        if not fh["signature"].startswith(FLAT_SIGNATURE + b"\0") or fh["type"] != 1:
            raise NotAVmcoreError("not a makedumpfile flattened stream (bad signature or type)")
        starts, ends, poss = [], [], []
        pos = FLAT_HEADER_SIZE
        while True:
            rec = os.pread(fd, FLAT_RECORD.size, pos)
            if len(rec) < FLAT_RECORD.size:
                raise IncompleteImageError("flattened stream ends without its end marker: the transfer was cut; "
                                           "send it again")
            r = FLAT_RECORD.unpack(rec)
            off, n = r["offset"], r["buf_size"]
            pos += FLAT_RECORD.size
            if off == -1 and n == -1:
                break
            if off < 0 or n < 0 or pos + n > size or off + n > MAX_PHYS_ADDR:
                raise TruncatedError("flattened stream record runs past the end of the file; it is truncated")
            starts.append(off)
            ends.append(off + n)
            poss.append(pos)
            pos += n
        order = sorted(range(len(starts)), key=lambda i: (starts[i], i))
        self.starts = [starts[i] for i in order]
        self.ends = [ends[i] for i in order]
        self.poss = [poss[i] for i in order]
        self.seq = order
        self.maxlen = max((e - s for s, e in zip(starts, ends, strict=True)), default=0)
        self.size = max(ends, default=0)  # the logical (unflattened) file size

    def pread(self, off: int, n: int) -> bytes:
        if off < 0 or n < 0:
            raise CorruptImageError(f"kdump offset {off} or size {n} is negative; the file is corrupt")
        n = max(0, min(n, self.size - off))
        if n > self.phys_size:
            raise CorruptImageError(f"kdump read of {n} bytes is larger than the whole stream; the file is corrupt")
        out = bytearray(n)
        lo = bisect.bisect_left(self.starts, off - self.maxlen)
        hi = bisect.bisect_left(self.starts, off + n)
        hits = sorted((self.seq[i], i) for i in range(lo, hi) if self.ends[i] > off)
        for _, i in hits:
            a, b = max(off, self.starts[i]), min(off + n, self.ends[i])
            out[a - off:b - off] = os.pread(self.fd, b - a, self.poss[i] + a - self.starts[i])
        return bytes(out)


# ------------------------------------------------------------------------------------------------ reader


class KdumpSource(PagedSource, StoredSource):
    """A makedumpfile kdump-compressed file (plain or flattened) as a MemorySource."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.fd = open_input(self.path)
        try:
            magic = os.pread(self.fd, 16, 0)
            self.io: _Plain | _Flat = _Flat(self.fd) if magic.startswith(FLAT_SIGNATURE + b"\0") else _Plain(self.fd)
            self._init()
        except BaseException:
            os.close(self.fd)
            raise

    def _init(self) -> None:
        h = self.header = parse_header(self.io.pread)
        bs = self.page_size = h.block_size
        size = self.io.size
        self.incomplete = bool(h.status & DUMP_DH_COMPRESSED_INCOMPLETE)

        def blob(what: str, off: int, n: int) -> bytes:
            if off < 0 or n < 0 or (size and off + n > size) or n > 1 << 30:
                raise CorruptImageError(f"{self.path}: kdump {what} at {off} size {n} lies outside the file; "
                                        "the file is corrupt")
            data = self.io.pread(off, n)
            if len(data) != n:
                raise TruncatedError(f"{self.path}: kdump {what} cut short; the file is truncated")
            return data

        notes: list[Note] = []
        if h.offset_note and h.size_note:
            notes = parse_notes(blob("ELF notes", h.offset_note, h.size_note), errors=ELF_ERRORS)
        elif h.offset_vmcoreinfo and h.size_vmcoreinfo:
            notes = [Note(VMCOREINFO_NOTE, 0, blob("VMCOREINFO", h.offset_vmcoreinfo, h.size_vmcoreinfo))]
        self._notes = tuple(notes)
        per = bitmap_bytes(h.max_mapnr, bs)
        bitmap_off = (1 + h.sub_hdr_size) * bs
        total = h.bitmap_blocks * bs
        if total < per:
            raise CorruptImageError(f"{self.path}: kdump bitmaps ({total} bytes) cannot cover max_mapnr "
                                    f"{h.max_mapnr} ({per} bytes each); the file is corrupt")
        raw = blob("bitmaps", bitmap_off, total)
        two = total >= 2 * per
        self.bitmap1 = raw[:per]
        self.bitmap2 = raw[per:2 * per] if two else raw[:per]
        self.desc_offset = bitmap_off + total
        # bitmap2 as 64-bit words (bit i of word w: pfn 64w+i) and the dumpable pages before each word: a page's
        # descriptor index is one lookup and one popcount, whatever the dump's size
        self._words = array.array("Q", self.bitmap2 + bytes(-len(self.bitmap2) % 8))
        if sys.byteorder != "little":
            self._words.byteswap()
        self._rank = array.array("q", itertools.accumulate(map(int.bit_count, self._words), initial=0))
        ndesc = self._rank[-1]
        if size and self.desc_offset + ndesc * PAGE_DESC.size > size and not self.incomplete:
            raise TruncatedError(f"{self.path}: {ndesc} page descriptors do not fit in the file; it is truncated "
                                 "(makedumpfile was interrupted?) - take the dump again")
        ram: list[MemRange] = []  # bitmap1's runs, a chunk at a time (merge_ranges joins them across chunks)
        for lo in range(0, h.max_mapnr, 1 << 20):
            chunk = native.unpack_bits(self.bitmap1, lo, min(1 << 20, h.max_mapnr - lo))
            ram += (MemRange((lo + a) * bs, (lo + b) * bs) for a, b in native.runs(chunk))
        self._ranges = merge_ranges(ram)
        self._dctx = zstandard.ZstdDecompressor()

    @property
    def max_pfn(self) -> int:
        return self.header.max_mapnr

    @property
    def format_name(self) -> str:  # type: ignore[override]
        return "kdump-flat" if isinstance(self.io, _Flat) else "kdump"

    @property
    def dump_level(self) -> int:
        return self.header.dump_level

    def describe(self) -> dict[str, object]:
        h = self.header
        return {"header_version": h.version, "dump_level": h.dump_level, "status": h.status,
                "utsname": list(h.utsname), "incomplete": self.incomplete}

    def _dumpable(self, pfn: int) -> bool:
        return 0 <= pfn < self.header.max_mapnr and bool(self._words[pfn >> 6] >> (pfn & 63) & 1)

    def page_present_mask(self, pfn: int, count: int) -> bytearray:
        """1 per dumpable page of pfn..pfn+count (bitmap2), 0 for the others and beyond max_mapnr."""
        n = max(0, min(count, self.header.max_mapnr - pfn))
        out = native.unpack_bits(self.bitmap2, pfn, n) if pfn >= 0 else bytearray(n)
        out += bytes(count - n)
        return out

    def read_page(self, pfn: int) -> bytes:
        """One page, decompressed; AddressError if it was excluded."""
        bs = self.page_size
        if not self._dumpable(pfn):
            raise AddressError(f"physical page {pfn * bs:#x} is not in the dump (excluded or not RAM)")
        w = pfn >> 6
        below = self._rank[w] + (self._words[w] & ((1 << (pfn & 63)) - 1)).bit_count()
        desc = self.io.pread(self.desc_offset + below * PAGE_DESC.size, PAGE_DESC.size)
        if len(desc) != PAGE_DESC.size:
            if self.incomplete:
                raise IncompleteImageError(f"page {pfn:#x} was never written: makedumpfile marked the dump "
                                           "incomplete (its disk filled up); take it again with more space")
            raise TruncatedError(f"page {pfn:#x} descriptor cut short; the file is truncated")
        d = PAGE_DESC.unpack(desc)
        off, size, flags = d["offset"], d["size"], d["flags"]
        if off == 0:
            raise IncompleteImageError(f"page {pfn:#x} was never written: the dump is incomplete")
        if off < 0 or size < 0 or size > bs:
            raise CorruptImageError(f"page {pfn:#x} descriptor size {size} > block size; the file is corrupt")
        data = self.io.pread(off, size)
        if len(data) != size:
            if self.incomplete:
                raise IncompleteImageError(f"page {pfn:#x} was never written: makedumpfile marked the dump "
                                           "incomplete (its disk filled up); take it again with more space")
            raise TruncatedError(f"page {pfn:#x} data cut short; the file is truncated")
        try:
            if flags & DUMP_DH_COMPRESSED_ZLIB:
                data = zlib.decompress(data)
            elif flags & DUMP_DH_COMPRESSED_ZSTD:
                data = self._dctx.decompress(data, max_output_size=bs)
            elif flags & (DUMP_DH_COMPRESSED_LZO | DUMP_DH_COMPRESSED_SNAPPY):
                raise UnsupportedError("lzo/snappy pages are not supported; re-run makedumpfile with -c or -z")
        except (zlib.error, zstandard.ZstdError) as e:
            raise CorruptImageError(f"page {pfn:#x} does not decompress ({e}); the file is corrupt") from None
        if len(data) != bs:
            raise CorruptImageError(f"page {pfn:#x} decompresses to {len(data)} bytes, not {bs}")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------------------------------------------ writer


class _Out:
    """Positioned writes to a seekable file, or flattened records to a stream."""

    def __init__(self, f: BinaryIO, flat: bool):
        self.f, self.flat = f, flat
        if flat:
            f.write(FLAT_HEADER.pack(signature=FLAT_SIGNATURE, type=1, version=1).ljust(FLAT_HEADER_SIZE, b"\0"))

    def write_at(self, off: int, data: bytes | bytearray | memoryview) -> None:
        if not len(data):
            return
        if self.flat:
            self.f.write(FLAT_RECORD.pack(offset=off, buf_size=len(data)))
        else:
            self.f.seek(off)
        self.f.write(data)

    def end(self, total: int) -> None:
        if self.flat:
            self.f.write(FLAT_RECORD.pack(offset=-1, buf_size=-1))
        else:
            self.f.truncate(total)


def write_kdump(out: BinaryIO, source: MemorySource, keep: bytes | bytearray, ram: bytes | bytearray, *,
                notes: Iterable[Note], utsname: Sequence[str], dump_level: int, phys_base: int, crashtime: int,
                compress: str = "zstd", flat: bool = False, threads: int = 2,
                progress: Callable[[int], None] | None = None) -> int:
    """Write a makedumpfile-compatible kdump file of the pages in ``keep`` (0/1 byte per pfn); returns its size."""
    bs = source.page_size
    head, sub = pack_headers(block_size=bs, max_mapnr=len(keep), note_blob=pack_notes(notes), utsname=utsname,
                             status=COMPRESS_FLAGS[compress], dump_level=dump_level, phys_base=phys_base,
                             crashtime=crashtime)
    per = bitmap_bytes(len(keep), bs)
    bitmap_off = len(head) + len(sub)
    desc_off = bitmap_off + 2 * per
    pos = desc_off + keep.count(1) * PAGE_DESC.size
    w = _Out(out, flat)
    w.write_at(0, head)
    w.write_at(bs, sub)
    w.write_at(bitmap_off, native.pack_bits(ram).ljust(per, b"\0"))
    w.write_at(bitmap_off + per, native.pack_bits(keep).ljust(per, b"\0"))
    zero_desc = None
    if dump_level & DL_ZERO:  # every zero page shares one stored zero page
        w.write_at(pos, bytes(bs))
        zero_desc = PAGE_DESC.pack(offset=pos, size=bs)
        pos += bs
    pack = functools.partial(_pack_pages, bs=bs, compress=compress, share_zero=zero_desc is not None,
                             zstd=ZstdPerThread(1))
    desc_i = 0
    for data, packed in ordered_map(_kept_batches(source, keep), pack, max(1, threads)):
        pos, desc_i = _emit(w, len(data) // bs, packed, pos, desc_off, desc_i, zero_desc, compress, progress, bs)
    w.end(pos)
    return pos


def _pack_pages(data: bytes, *, bs: int, compress: str, share_zero: bool, zstd: ZstdPerThread) -> list[bytes | None]:
    """On a worker, per page of ``data``: its stored bytes (compressed unless that does not make it smaller), or
    None for a zero page when zero pages are shared."""
    out_pages: list[bytes | None] = []
    zero = native.zero_pages(data, bs) if share_zero else bytes(len(data) // bs)
    view = memoryview(data)
    for i in range(0, len(data), bs):
        if zero[i // bs]:
            out_pages.append(None)
            continue
        page = view[i:i + bs]
        try:
            if compress == "zlib":
                comp = zlib.compress(page, 1)
            elif compress == "zstd":
                comp = zstd.compress(page)
            else:
                comp = bytes(page)
        except (zlib.error, zstandard.ZstdError) as e:
            raise CompressionError(f"page compression failed: {e}") from None
        out_pages.append(comp if len(comp) < bs else bytes(page))
    return out_pages


def _kept_batches(source: MemorySource, keep: bytes | bytearray, batch: int = 1024) -> Iterator[bytes]:
    """The kept pages' bytes, ``batch`` pages at a time, in pfn order."""
    bs = source.page_size
    parts: list[bytes] = []
    have = 0
    for a, b in native.runs(keep):
        while a < b:
            take = min(b - a, batch - have)
            parts.append(source.read(a * bs, take * bs))  # pread costs what a copy out of a mapping does
            have += take
            a += take
            if have == batch:
                yield b"".join(parts)
                parts, have = [], 0
    if parts:
        yield b"".join(parts)


def _emit(w: _Out, npages: int, packed: list[bytes | None], pos: int, desc_off: int, desc_i: int,
          zero_desc: bytes | None, compress: str, progress: Callable[[int], None] | None, bs: int) -> tuple[int, int]:
    """Write one compressed batch's data and descriptors; returns the new data and descriptor positions."""
    descs = bytearray()
    blob = bytearray()
    flag = COMPRESS_FLAGS[compress]
    for comp in packed:
        if comp is None:
            assert zero_desc is not None
            descs += zero_desc
            continue
        descs += PAGE_DESC.pack(offset=pos + len(blob), size=len(comp), flags=flag if len(comp) < bs else 0)
        blob += comp
    w.write_at(pos, blob)
    w.write_at(desc_off + desc_i * PAGE_DESC.size, descs)
    if progress:
        progress(npages * bs)
    return pos + len(blob), desc_i + npages


# ------------------------------------------------------------------------------------------------ registry


def probe(head: bytes) -> bool:
    """True for a kdump-compressed file (``KDUMP   ``/``DISKDUMP``) or a makedumpfile flattened stream."""
    return head[:8] in (SIGNATURE, b"DISKDUMP") or head.startswith(FLAT_SIGNATURE + b"\0")


def open(path: str | os.PathLike[str]) -> KdumpSource:  # noqa: A001 - the registry's name for "open this format"
    """The kdump reader for ``path``."""
    return KdumpSource(path)
