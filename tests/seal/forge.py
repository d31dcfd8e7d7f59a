"""An attacker who knows the .khi format: change bytes of an image, then make every CRC agree again (header, block
CRCs, tables, trailer), so only authentication can tell the image was changed."""

from __future__ import annotations

import struct
import zlib

from khibernate.image.layouts.khi import HEADER, HEADER_CRC_OFFSET, INDEX, SEAL, TRAILER, BlockEntry, block_crc


def parts(data: bytes) -> dict[str, int]:
    """Offsets of a sealed or unsealed image: header size, tables, index, index count, trailer, seal record."""
    h = HEADER.unpack(data)
    t = TRAILER.unpack(data, len(data) - TRAILER.size)
    return {"header_size": h["header_size"], "version": h["version"], "stored": t["stored_bitmap_offset"],
            "zero": t["zero_bitmap_offset"], "index": t["index_offset"], "count": t["index_count"],
            "trailer": len(data) - TRAILER.size, "seal": len(data) - TRAILER.size - SEAL.size}


def entries(data: bytes) -> list[BlockEntry]:
    p = parts(data)
    return [BlockEntry.unpack(data, p["index"] + i * INDEX.size) for i in range(p["count"])]


def rechecksum(image: bytes) -> bytes:
    """``image`` with every CRC recomputed over its current bytes."""
    out = bytearray(image)
    p = parts(image)
    h = HEADER.unpack(image)
    ko, ks = h["keyring_offset"], h["keyring_size"]
    if ks:  # the key slots' own CRC, last 4 bytes
        struct.pack_into("<I", out, ko + ks - 4, zlib.crc32(out[ko:ko + ks - 4]))
    struct.pack_into("<I", out, HEADER_CRC_OFFSET, 0)
    struct.pack_into("<I", out, HEADER_CRC_OFFSET, zlib.crc32(out[:p["header_size"]]))
    for i, e in enumerate(entries(bytes(out))):
        frame = bytes(out[e.offset:e.offset + e.csize])
        crc = block_crc(p["version"], e.first_pfn, e.end_pfn, e.usize, e.npages, frame)
        struct.pack_into("<I", out, p["index"] + i * INDEX.size + INDEX.offsets["crc32"], crc)
    tables_end = p["index"] + p["count"] * INDEX.size
    struct.pack_into("<I", out, p["trailer"] + TRAILER.offsets["tables_crc32"], zlib.crc32(out[p["stored"]:tables_end]))
    crc_at = p["trailer"] + TRAILER.offsets["trailer_crc32"]
    struct.pack_into("<I", out, crc_at, zlib.crc32(out[p["trailer"]:crc_at]))
    return bytes(out)


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x40
    return bytes(out)
