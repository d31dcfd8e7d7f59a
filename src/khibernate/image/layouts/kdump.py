"""makedumpfile's kdump-compressed file (header_version 6) and its flattened stream, byte by byte: every struct
declared once by field name, the headers read and made.  Pure: no file I/O; the reader and writer are
``khibernate/image/sources/kdump.py``, ``docs/image-format.md`` cites the fields.

Native (little-endian, LP64) structs as makedumpfile 1.7.2 writes them; the flattened framing is big-endian.  A
file: the disk_dump_header block, the kdump_sub_header blocks (ELF notes after the sub-header), two bitmaps (RAM,
then dumpable pages; one bit per pfn, whole blocks each), one page_desc per dumpable page, the page data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from khibernate.elfcore import NHDR, NT_PRSTATUS, VMCOREINFO_NOTE, align4, parse_notes
from khibernate.image.errors import CorruptImageError, NotAVmcoreError, TruncatedError, UnsupportedError
from khibernate.image.layouts import MAX_PHYS_ADDR
from khibernate.layout import Layout

SIGNATURE = b"KDUMP   "
HEADER_VERSION = 6
# struct disk_dump_header (makedumpfile diskdump_mod.h), 464 bytes
DISK_DUMP_HEADER = Layout("disk_dump_header", "<", [
    ("signature", "8s"), ("header_version", "i"), ("utsname", "390s"), ("pad", "6x"), ("timestamp_sec", "q"),
    ("timestamp_usec", "q"), ("status", "I"), ("block_size", "i"), ("sub_hdr_size", "i"), ("bitmap_blocks", "I"),
    ("max_mapnr", "I"), ("total_ram_blocks", "I"), ("device_blocks", "I"), ("written_blocks", "I"),
    ("current_cpu", "I"), ("nr_cpus", "i")])
# struct kdump_sub_header, 104 bytes (fields after "split" exist from header_version 3, 4 and 6 on).  phys_base is an
# unsigned long in makedumpfile, the kernel's own phys_base, which VMCOREINFO prints with %ld: a randomised kernel
# placed lower than its link address makes it negative, so it is declared signed (the same 8 bytes)
SUB_HEADER = Layout("kdump_sub_header", "<", [
    ("phys_base", "q"), ("dump_level", "i"), ("split", "i"), ("start_pfn", "Q"), ("end_pfn", "Q"),
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


def utsname_bytes(fields: Sequence[str]) -> bytes:
    """struct new_utsname: six NUL-padded char[65]."""
    return b"".join(s.encode()[:64].ljust(65, b"\0") for s in (list(fields) + [""] * 6)[:6])


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


def pack_headers(*, block_size: int, max_mapnr: int, note_blob: bytes, utsname: Sequence[str], status: int,
                 dump_level: int, phys_base: int, crashtime: int) -> tuple[bytes, bytes]:
    """The disk_dump_header block and the kdump_sub_header blocks (the ELF notes ``note_blob`` after the
    sub-header, VMCOREINFO's descriptor located for readers that predate notes) of a file whose two bitmaps of
    ``max_mapnr`` pfns follow them."""
    bs = block_size
    notes = parse_notes(note_blob)
    vmci_off = vmci_size = pos = 0
    for n in notes:
        hdr = NHDR.size + align4(len(n.name.encode()) + 1)
        if n.name == VMCOREINFO_NOTE:
            vmci_off, vmci_size = bs + SUB_HEADER.size + pos + hdr, len(n.desc)
        pos += hdr + align4(len(n.desc))
    sub_hdr_size = -(-(SUB_HEADER.size + len(note_blob)) // bs)
    head = DISK_DUMP_HEADER.pack(signature=SIGNATURE, header_version=HEADER_VERSION, utsname=utsname_bytes(utsname),
                                 timestamp_sec=crashtime, status=status, block_size=bs, sub_hdr_size=sub_hdr_size,
                                 bitmap_blocks=2 * bitmap_bytes(max_mapnr, bs) // bs,
                                 max_mapnr=min(max_mapnr, 0xFFFFFFFF),
                                 nr_cpus=sum(1 for n in notes if n.name == "CORE" and n.type == NT_PRSTATUS))
    sub = SUB_HEADER.pack(phys_base=phys_base, dump_level=dump_level, offset_vmcoreinfo=vmci_off,
                          size_vmcoreinfo=vmci_size, offset_note=bs + SUB_HEADER.size, size_note=len(note_blob),
                          max_mapnr_64=max_mapnr)
    return head.ljust(bs, b"\0"), (sub + note_blob).ljust(sub_hdr_size * bs, b"\0")
