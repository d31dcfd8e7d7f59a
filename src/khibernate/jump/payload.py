"""The kernel inside a bzImage: its compressed payload decompressed, and what that vmlinux carries — the embedded
kernel config (CONFIG_IKCONFIG) and the GNU build id.

Where the payload is: the setup header's payload_offset and payload_length (boot protocol 2.08+).  Its format is
told by its magic, as the kernel's scripts/extract-vmlinux and scripts/extract-ikconfig tell it: gzip, xz, lzma,
zstd, bzip2 (Python's own codecs and python-zstandard) and lz4 (the kernel's legacy lz4 framing, decoded here); lzo
is not supported.  The decompressed x86 payload is the vmlinux ELF (``objcopy -S``): its PT_NOTE holds the build
id, and CONFIG_IKCONFIG puts the config gzip-compressed between the markers IKCFG_ST and IKCFG_ED.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

from khibernate.jump.bzimage import MAX_KERNEL_SIZE, setup_header
from khibernate.jump.errors import PayloadError as PayloadError

MAGICS = ((b"\x1f\x8b\x08", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"), (b"\x28\xb5\x2f\xfd", "zstd"),
          (b"\x02\x21\x4c\x18", "lz4"), (b"BZh", "bzip2"), (b"\x89LZO", "lzo"))
IKCFG_ST, IKCFG_ED = b"IKCFG_ST", b"IKCFG_ED"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # every legacy lz4 block decompresses to at most 8 MiB
PT_NOTE = 4


def payload(data: bytes) -> bytes:
    """The compressed kernel inside a bzImage (setup header payload_offset/payload_length); PayloadError if the
    header does not locate one."""
    h = setup_header(data)
    if h is None or h["version"] < 0x208:
        raise PayloadError("not a bzImage with boot protocol 2.08+ (no payload_offset in its setup header)")
    setup = ((h["setup_sects"] or 4) + 1) * 512
    offset: int = h["payload_offset"]
    length: int = h["payload_length"]
    start = setup + offset
    if not length or start + length > len(data):
        raise PayloadError(f"the setup header's payload ({length} bytes at {start:#x}) lies outside the file")
    return data[start:start + length]


def compression(blob: bytes) -> str | None:
    """The payload's compression by its magic, None if unknown."""
    return next((name for magic, name in MAGICS if blob.startswith(magic)), None)


def _lz4_length(src: bytes, i: int, nibble: int) -> tuple[int, int]:
    """A token nibble's length with its extension bytes (15 means: add bytes until one is not 255); returns the
    length and the index after it (IndexError at the end of ``src``, which the caller reports as corrupt)."""
    length = nibble
    if nibble == 15:
        while True:
            b = src[i]
            i += 1
            length += b
            if b != 255:
                break
    return length, i


def _lz4_block(src: bytes, out: bytearray) -> None:
    """Append one LZ4 block's decompressed bytes (the block format: tokens, literals, 16-bit match offsets)."""
    base, i, n = len(out), 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit, i = _lz4_length(src, i, token >> 4)
        out += src[i:i + lit]
        i += lit
        if i >= n:
            break
        off = src[i] | src[i + 1] << 8
        i += 2
        length, i = _lz4_length(src, i, token & 15)
        length += 4
        start = len(out) - off
        if off == 0 or start < base:
            raise PayloadError("lz4: a match reaches before its block; the payload is corrupt")
        if off >= length:
            out += out[start:start + length]
        else:
            out += (bytes(out[start:]) * (length // off + 1))[:length]
        if len(out) > MAX_KERNEL_SIZE:
            raise PayloadError("lz4: the payload decompresses beyond 1 GiB")


def lz4_legacy(blob: bytes) -> bytes:
    """Decompress the kernel's lz4 (``lz4 -l``: magic, then blocks of a 32-bit size and LZ4 data); stops at the
    end, or at a size no block can have (the kernel appends the decompressed size)."""
    out = bytearray()
    i = 4
    bound = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16
    while i + 4 <= len(blob):
        (size,) = struct.unpack_from("<I", blob, i)
        i += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size > bound or i + size > len(blob):
            break
        try:
            _lz4_block(blob[i:i + size], out)
        except IndexError:
            raise PayloadError("lz4: a block ends inside a sequence; the payload is corrupt") from None
        i += size
    return bytes(out)


def decompress(blob: bytes, limit: int = MAX_KERNEL_SIZE) -> bytes:
    """The payload decompressed (at most ``limit`` bytes; trailing bytes after the stream ignored)."""
    kind = compression(blob)
    try:
        if kind == "gzip":
            return zlib.decompressobj(31).decompress(blob, limit)
        if kind in ("xz", "lzma"):
            return lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE).decompress(blob, limit)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(blob, limit)
        if kind == "zstd":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=False) as r:
                return r.read(limit)
        if kind == "lz4":
            return lz4_legacy(blob)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as e:
        raise PayloadError(f"the {kind} payload does not decompress ({e}); the bzImage is corrupt") from None
    if kind == "lzo":
        raise PayloadError("the payload is lzo-compressed, which khibernate cannot decompress")
    raise PayloadError(f"the payload's compression is unknown (magic {blob[:6].hex()})")


def ikconfig(vmlinux: bytes) -> str | None:
    """The embedded .config (CONFIG_IKCONFIG), None when the kernel has none."""
    start = vmlinux.find(IKCFG_ST)
    if start < 0:
        return None
    end = vmlinux.find(IKCFG_ED, start)
    if end < 0:
        return None
    try:
        return gzip.decompress(vmlinux[start + len(IKCFG_ST):end]).decode("utf-8", "replace")
    except (OSError, EOFError, zlib.error):
        return None


def build_id(vmlinux: bytes) -> str:
    """The GNU build id (hex) in the vmlinux ELF's PT_NOTE segments, '' if it has none."""
    from khibernate.elfcore import EHDR64, PHDR64, gnu_build_id

    if vmlinux[:4] != b"\x7fELF" or len(vmlinux) < EHDR64.size or vmlinux[4] != 2:
        return ""
    e = EHDR64.unpack(vmlinux)
    for i in range(e["e_phnum"]):
        off = e["e_phoff"] + i * PHDR64.size
        if off + PHDR64.size > len(vmlinux):
            break
        p = PHDR64.unpack(vmlinux, off)
        if p["p_type"] == PT_NOTE:
            found = gnu_build_id(vmlinux[p["p_offset"]:p["p_offset"] + p["p_filesz"]])
            if found:
                return found
    return ""
