"""kdump-compressed files (makedumpfile's format, header_version 6) and the flattened stream: layouts, reader
(:class:`KdumpSource`) and writer (:func:`write_kdump`) side by side.  ``docs/image-format.md`` cites the fields.

Native (little-endian, LP64) structs as makedumpfile 1.7.2 writes them; the flattened framing is big-endian.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
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
from khibernate.image.inputfile import MAX_PHYS_ADDR, input_size, open_input
from khibernate.image.pagefilter import DL_ZERO
from khibernate.image.pipeline import ZstdPerThread, ordered_map
from khibernate.image.sources.base import MemorySource, MemRange, PagedSource, StoredSource, merge_ranges
from khibernate.layout import Layout

SIGNATURE = b"KDUMP   "
HEADER_VERSION = 6
# struct disk_dump_header (makedumpfile diskdump_mod.h), 464 bytes
DISK_DUMP_HEADER = Layout("disk_dump_header", "<", [
    ("signature", "8s"), ("header_version", "i"), ("utsname", "390s"), ("pad", "6x"), ("timestamp_sec", "q"),
    ("timestamp_usec", "q"), ("status", "I"), ("block_size", "i"), ("sub_hdr_size", "i"), ("bitmap_blocks", "I"),
    ("max_mapnr", "I"), ("total_ram_blocks", "I"), ("device_blocks", "I"), ("written_blocks", "I"),
    ("current_cpu", "I"), ("nr_cpus", "i")])
# struct kdump_sub_header, 104 bytes (fields after "split" exist from header_version 3, 4 and 6 on)
SUB_HEADER = Layout("kdump_sub_header", "<", [
    ("phys_base", "Q"), ("dump_level", "i"), ("split", "i"), ("start_pfn", "Q"), ("end_pfn", "Q"),
    ("offset_vmcoreinfo", "q"), ("size_vmcoreinfo", "Q"), ("offset_note", "q"), ("size_note", "Q"),
    ("offset_eraseinfo", "q"), ("size_eraseinfo", "Q"), ("start_pfn_64", "Q"), ("end_pfn_64", "Q"),
    ("max_mapnr_64", "Q")])
PAGE_DESC = Layout("page_desc", "<", [("offset", "q"), ("size", "I"), ("flags", "I"), ("page_flags", "Q")])
assert DISK_DUMP_HEADER.size == 464 and SUB_HEADER.size == 104 and PAGE_DESC.size == 24

DUMP_DH_COMPRESSED_ZLIB, DUMP_DH_COMPRESSED_LZO, DUMP_DH_COMPRESSED_SNAPPY = 0x1, 0x2, 0x4
DUMP_DH_COMPRESSED_INCOMPLETE, DUMP_DH_EXCLUDED_VMEMMAP, DUMP_DH_COMPRESSED_ZSTD = 0x8, 0x10, 0x20
COMPRESS_FLAGS = {"zlib": DUMP_DH_COMPRESSED_ZLIB, "zstd": DUMP_DH_COMPRESSED_ZSTD, "none": 0}

FLAT_SIGNATURE = b"makedumpfile"
# struct makedumpfile_header (signature NUL padded, type 1, version 1), padded to 4096 bytes; big-endian
FLAT_HEADER = Layout("makedumpfile_header", ">", [("signature", "16s"), ("type", "q"), ("version", "q")])
# struct makedumpfile_data_header: the payload follows; (-1, -1) ends the stream
FLAT_RECORD = Layout("makedumpfile_data_header", ">", [("offset", "q"), ("buf_size", "q")])
FLAT_HEADER_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class KdumpHeader:
    """The parts of disk_dump_header + kdump_sub_header a reader needs."""

    version: int
    utsname: tuple[str, ...]
    timestamp: int
    status: int
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    nr_cpus: int
    phys_base: int
    dump_level: int
    offset_vmcoreinfo: int
    size_vmcoreinfo: int
    offset_note: int
    size_note: int
    max_mapnr: int


def bitmap_bytes(max_mapnr: int, block_size: int) -> int:
    """Size of one bitmap: ceil(max_mapnr / 8) rounded up to whole blocks (what crash requires)."""
    return (max_mapnr + 8 * block_size - 1) // (8 * block_size) * block_size


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


def parse_header(read: Callable[[int, int], bytes]) -> KdumpHeader:
    """Both headers of a kdump-compressed file; errors say what is wrong."""
    f = DISK_DUMP_HEADER.unpack(read(0, DISK_DUMP_HEADER.size), error=TruncatedError, what="kdump header")
    if f["signature"] not in (SIGNATURE, b"DISKDUMP"):
        raise NotAVmcoreError("not a kdump-compressed file (signature is not 'KDUMP   ')")
    version, uts = f["header_version"], f["utsname"]
    if version < 1 or version > HEADER_VERSION:
        raise UnsupportedError(f"kdump header_version {version} is not supported (1..{HEADER_VERSION})")
    block_size = f["block_size"]
    if block_size < 4096 or block_size > 262144 or block_size & (block_size - 1):
        raise CorruptImageError(f"kdump block_size {block_size} is not a page size; the file is corrupt")
    if f["sub_hdr_size"] < 1 or f["bitmap_blocks"] < 1:
        raise CorruptImageError(f"kdump sub_hdr_size {f['sub_hdr_size']} / bitmap_blocks {f['bitmap_blocks']} must "
                                "be at least 1; the file is corrupt")
    sub = SUB_HEADER.unpack(read(block_size, SUB_HEADER.size), error=TruncatedError, what="kdump sub-header")
    if version >= 2 and sub["split"]:
        raise UnsupportedError("this is one file of a makedumpfile --split set; join them first with "
                               "'makedumpfile --reassemble FILE1 FILE2 ... OUT'")
    names = tuple(uts[i * 65:(i + 1) * 65].split(b"\0")[0].decode("ascii", "replace") for i in range(6))
    max_mapnr = sub["max_mapnr_64"] if version >= 6 and sub["max_mapnr_64"] else f["max_mapnr"]
    if max_mapnr < 1 or max_mapnr * block_size > MAX_PHYS_ADDR:
        raise CorruptImageError(f"kdump max_mapnr {max_mapnr} describes no memory or more than "
                                f"{MAX_PHYS_ADDR >> 40} TiB; the file is corrupt")
    v3, v4 = version >= 3, version >= 4
    return KdumpHeader(version, names, f["timestamp_sec"], f["status"], block_size, f["sub_hdr_size"],
                       f["bitmap_blocks"], f["nr_cpus"], sub["phys_base"], sub["dump_level"],
                       sub["offset_vmcoreinfo"] if v3 else 0, sub["size_vmcoreinfo"] if v3 else 0,
                       sub["offset_note"] if v4 else 0, sub["size_note"] if v4 else 0, max_mapnr)


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


def utsname_bytes(fields: Sequence[str]) -> bytes:
    """struct new_utsname: six NUL-padded char[65]."""
    return b"".join(s.encode()[:64].ljust(65, b"\0") for s in (list(fields) + [""] * 6)[:6])


def write_kdump(out: BinaryIO, source: MemorySource, keep: bytes | bytearray, ram: bytes | bytearray, *,
                notes: Iterable[Note], utsname: Sequence[str], dump_level: int, phys_base: int, crashtime: int,
                compress: str = "zstd", flat: bool = False, threads: int = 2,
                progress: Callable[[int], None] | None = None) -> int:
    """Write a makedumpfile-compatible kdump file of the pages in ``keep`` (0/1 byte per pfn); returns its size."""
    bs = source.page_size
    max_mapnr = len(keep)
    note_blob = pack_notes(notes)
    vmci_off = vmci_size = 0
    pos = 0
    for n in parse_notes(note_blob):
        name = n.name.encode() + b"\0"
        hdr = 12 + ((len(name) + 3) & ~3)
        if n.name == VMCOREINFO_NOTE:
            vmci_off, vmci_size = bs + SUB_HEADER.size + pos + hdr, len(n.desc)
        pos += hdr + ((len(n.desc) + 3) & ~3)
    sub_hdr_size = -(-(SUB_HEADER.size + len(note_blob)) // bs)
    per = bitmap_bytes(max_mapnr, bs)
    bitmap_blocks = 2 * per // bs
    desc_off = (1 + sub_hdr_size + bitmap_blocks) * bs
    ndump = keep.count(1)
    data_off = desc_off + ndump * PAGE_DESC.size
    status = COMPRESS_FLAGS[compress]
    nr_cpus = sum(1 for n in parse_notes(note_blob) if n.name == "CORE" and n.type == 1)
    w = _Out(out, flat)
    head = DISK_DUMP_HEADER.pack(signature=SIGNATURE, header_version=HEADER_VERSION, utsname=utsname_bytes(utsname),
                                 timestamp_sec=crashtime, status=status, block_size=bs, sub_hdr_size=sub_hdr_size,
                                 bitmap_blocks=bitmap_blocks, max_mapnr=min(max_mapnr, 0xFFFFFFFF), nr_cpus=nr_cpus)
    w.write_at(0, head.ljust(bs, b"\0"))
    sub = SUB_HEADER.pack(phys_base=phys_base, dump_level=dump_level, offset_vmcoreinfo=vmci_off,
                          size_vmcoreinfo=vmci_size, offset_note=bs + SUB_HEADER.size, size_note=len(note_blob),
                          max_mapnr_64=max_mapnr)
    w.write_at(bs, (sub + note_blob).ljust(sub_hdr_size * bs, b"\0"))
    w.write_at((1 + sub_hdr_size) * bs, native.pack_bits(ram).ljust(per, b"\0"))
    w.write_at((1 + sub_hdr_size) * bs + per, native.pack_bits(keep).ljust(per, b"\0"))
    pos = data_off
    zero_desc = None
    if dump_level & DL_ZERO:
        w.write_at(pos, bytes(bs))
        zero_desc = PAGE_DESC.pack(offset=pos, size=bs)
        pos += bs
    zstd = ZstdPerThread(1)

    def pack_pages(data: bytes) -> list[bytes | None]:
        """Per page: stored bytes, or None for a zero page (when zero pages are shared)."""
        out_pages: list[bytes | None] = []
        zero = native.zero_pages(data, bs) if zero_desc is not None else bytes(len(data) // bs)
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

    def batches(batch: int = 1024) -> Iterator[bytes]:
        """The kept pages' bytes, ``batch`` pages at a time, in pfn order."""
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

    desc_i = 0
    for data, packed in ordered_map(batches(), pack_pages, max(1, threads)):
        pos, desc_i = _emit(w, len(data) // bs, packed, pos, desc_off, desc_i, zero_desc, compress, progress, bs)
    w.end(pos)
    return pos


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
