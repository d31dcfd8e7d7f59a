"""khibernate's own image (``.khi``), byte by byte: every struct declared once by field name, and the records read
from and written to them (header, block index entry, trailer) with their checks.  Pure: no file I/O; the reader
and writer are ``khibernate/image/sources/khi.py``, ``docs/image-format.md`` describes every byte.

Layout (little-endian): a header (magic, version, page size, dump level, OSRELEASE, BUILD-ID, UUID, time, memory
ranges, ELF notes incl. VMCOREINFO) padded to 4 KiB; zstd blocks of up to ``block_pages`` kept pages each, in pfn
order; the stored-page and zero-page bitmaps; the block index; a 128-byte trailer written last.  A file without a
valid trailer is an interrupted save and is refused.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

from khibernate.elfcore import Note, pack_notes, parse_notes
from khibernate.image.errors import (
    ELF_ERRORS,
    CorruptImageError,
    IncompleteImageError,
    NotAVmcoreError,
    TruncatedError,
    UnsupportedError,
)
from khibernate.image.layouts import MAX_PHYS_ADDR
from khibernate.layout import Layout, Record
from khibernate.ranges import Range

CIPHER_CHACHA20_POLY1305 = 1  # khibernate.seal.cipher's one cipher
MAGIC = b"KHIMG\x00\r\n"
TRAILER_MAGIC = b"KHIEND\x00\x00"
VERSION = 2  # 2: each block's CRC is seeded with its index fields (binds a frame to its pfn range)
SEALED_VERSION = 3  # 3: sealed (ChaCha20-Poly1305 per block, header/tables/trailer authenticated); unsealed stays 2
READ_VERSIONS = (1, 2, 3)
FLAG_RESTORABLE = 1
FLAG_SEALED = 2
NO_SLOT = 0xFFFFFFFF  # a sealed image saved to a file, not into a store slot
SEAL_MAGIC = b"KHISEAL\0"
COMPRESS_ZSTD = 1
HEADER_ALIGN = 4096

HEADER = Layout("khi_header", "<", [
    ("magic", "8s"), ("version", "I"), ("header_size", "I"), ("page_size", "I"), ("dump_level", "I"), ("flags", "I"),
    ("block_pages", "I"), ("uuid", "16s"), ("created_ns", "Q"), ("max_pfn", "Q"), ("nr_ranges", "I"),
    ("notes_size", "I"), ("osrelease", "65s"), ("build_id", "65s"), ("pad", "2x"), ("compression", "I"),
    ("compression_level", "i"), ("cipher", "I"), ("slot", "I"), ("key_id", "16s"), ("keyring_offset", "I"),
    ("keyring_size", "I"), ("reserved", "8s"), ("header_crc32", "I")])
RANGE = Layout("khi_range", "<", [("start", "Q"), ("end", "Q")])
INDEX = Layout("khi_index_entry", "<", [("first_pfn", "Q"), ("end_pfn", "Q"), ("offset", "Q"), ("csize", "I"),
                                        ("usize", "I"), ("npages", "I"), ("crc32", "I")])
TRAILER = Layout("khi_trailer", "<", [
    ("magic", "8s"), ("stored_bitmap_offset", "Q"), ("zero_bitmap_offset", "Q"), ("bitmap_size", "Q"),
    ("index_offset", "Q"), ("index_count", "Q"), ("pages_stored", "Q"), ("pages_zero", "Q"), ("class_counts", "7Q"),
    ("tables_crc32", "I"), ("trailer_crc32", "I")])
# version 3: between the block index and the trailer, the tag over header, bitmaps, index and trailer
SEAL = Layout("khi_seal", "<", [("magic", "8s"), ("tables_tag", "16s"), ("reserved", "8s")])
# version 3: the associated data of block ``number``: the image, the slot, the block's place and its index entry
BLOCK_AD = Layout("khi_block_ad", "<", [("uuid", "16s"), ("slot", "I"), ("number", "Q"), ("first_pfn", "Q"),
                                         ("end_pfn", "Q"), ("usize", "I"), ("npages", "I")])
BLOCK_BIND = Layout("khi_block_bind", "<", [("first_pfn", "Q"), ("end_pfn", "Q"), ("usize", "I"), ("npages", "I")])
HEADER_CRC_OFFSET = HEADER.offsets["header_crc32"]
assert HEADER.size == 256 and TRAILER.size == 128 and INDEX.size == 40 and SEAL.size == 32


def seal_record_authenticated(record: bytes) -> bytes:
    """The seal record as the tables tag authenticates it: every byte (magic, reserved) but the tag's own 16, which
    read as zeros - so no byte of a sealed image is outside a tag."""
    tag = SEAL.offsets["tables_tag"]
    return record[:tag] + bytes(16) + record[tag + 16:SEAL.size]
MAX_BLOCK_PAGES = 1 << 16


def block_crc(version: int, first_pfn: int, end_pfn: int, usize: int, npages: int, frame: bytes) -> int:
    """The CRC-32 an index entry stores: of the frame alone (v1), or seeded with the entry's pfn range (v2)."""
    if version < 2:
        return zlib.crc32(frame)
    return zlib.crc32(frame, zlib.crc32(BLOCK_BIND.pack(first_pfn=first_pfn, end_pfn=end_pfn, usize=usize,
                                                        npages=npages)))


def block_ad(uuid: bytes, slot: int, number: int, first_pfn: int, end_pfn: int, usize: int, npages: int) -> bytes:
    """The associated data sealing block ``number`` of image ``uuid`` in ``slot`` with its index entry's fields."""
    return BLOCK_AD.pack(uuid=uuid, slot=slot, number=number, first_pfn=first_pfn, end_pfn=end_pfn, usize=usize,
                         npages=npages)


@dataclasses.dataclass(frozen=True)
class SealInfo:
    """What a sealed (version 3) header adds: the cipher, the slot it was sealed for (NO_SLOT: a file), the id of
    the store key and the keyring (the store key wrapped by each key source, khibernate.seal.keyring)."""

    cipher: int
    slot: int
    key_id: bytes
    keyring: bytes


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
    ranges: tuple[Range, ...]
    notes: tuple[Note, ...]
    osrelease: str
    build_id: str
    compression: int = COMPRESS_ZSTD
    compression_level: int = 1
    version: int = VERSION
    seal: SealInfo | None = None

    def pack(self) -> bytes:
        """Header bytes, padded to HEADER_ALIGN, with its CRC filled in."""
        notes = pack_notes(self.notes)
        body = b"".join(RANGE.pack(start=r.start, end=r.end) for r in self.ranges) + notes
        s = self.seal or SealInfo(0, 0, bytes(16), b"")
        keyring_offset = HEADER.size + len(body) if self.seal else 0
        body += s.keyring
        size = -(-(HEADER.size + len(body)) // HEADER_ALIGN) * HEADER_ALIGN
        fixed = HEADER.pack(magic=MAGIC, version=self.version, header_size=size, page_size=self.page_size,
                            dump_level=self.dump_level, flags=self.flags, block_pages=self.block_pages,
                            uuid=self.uuid, created_ns=self.created_ns, max_pfn=self.max_pfn,
                            nr_ranges=len(self.ranges), notes_size=len(notes), osrelease=_ascii(self.osrelease),
                            build_id=_ascii(self.build_id), compression=self.compression,
                            compression_level=self.compression_level, cipher=s.cipher, slot=s.slot,
                            key_id=s.key_id, keyring_offset=keyring_offset, keyring_size=len(s.keyring))
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
        else:
            bad = _seal_problem(f, size)
        if bad:
            raise CorruptImageError(f"khibernate image header: {bad}; the file is corrupt")
        off = HEADER.size
        ranges = tuple(Range(**RANGE.unpack(data, off + i * RANGE.size)) for i in range(nr_ranges))
        prev = 0
        for r in ranges:
            if r.start >= r.end or r.start < prev or -(-r.end // page_size) > max_pfn:
                raise CorruptImageError(f"khibernate image range {r.start:#x}-{r.end:#x} is empty, unsorted or "
                                        "beyond max_pfn; the file is corrupt")
            prev = r.end
        off += nr_ranges * RANGE.size
        notes = tuple(parse_notes(bytes(data[off:off + notes_size]), errors=ELF_ERRORS))
        seal = None
        if version >= SEALED_VERSION:
            ko = f["keyring_offset"]
            seal = SealInfo(f["cipher"], f["slot"], f["key_id"], bytes(data[ko:ko + f["keyring_size"]]))
        return cls(page_size=page_size, dump_level=f["dump_level"], flags=f["flags"], block_pages=block_pages,
                   uuid=f["uuid"], created_ns=f["created_ns"], max_pfn=max_pfn, ranges=ranges, notes=notes,
                   osrelease=_text(f["osrelease"]), build_id=_text(f["build_id"]), compression=compression,
                   compression_level=f["compression_level"], version=version, seal=seal), size


def _seal_problem(f: Record, size: int) -> str:
    """What is wrong with a header's sealing fields ("" if nothing): version 3 is sealed, 1 and 2 are not."""
    sealed = f["version"] >= SEALED_VERSION
    if bool(f["flags"] & FLAG_SEALED) != sealed:
        return f"flags {f['flags']:#x} disagree with version {f['version']} (3 and only 3 is sealed)"
    if not sealed:
        return ""
    end = HEADER.size + f["nr_ranges"] * RANGE.size + f["notes_size"]
    if f["cipher"] != CIPHER_CHACHA20_POLY1305:
        return f"cipher id {f['cipher']} is unknown (1 = ChaCha20-Poly1305)"
    if f["keyring_offset"] != end or not 0 < f["keyring_size"] <= size - end:
        return f"the key slots ({f['keyring_size']} bytes at {f['keyring_offset']}) do not follow the notes"
    return ""


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

    def pack(self) -> bytes:
        """The index entry's bytes."""
        return INDEX.pack(first_pfn=self.first_pfn, end_pfn=self.end_pfn, offset=self.offset, csize=self.csize,
                          usize=self.usize, npages=self.npages, crc32=self.crc32)

    @classmethod
    def unpack(cls, data: bytes, offset: int) -> BlockEntry:
        """The index entry at ``offset`` of ``data`` (the caller checks it lies inside)."""
        return cls(**INDEX.unpack(data, offset))


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
