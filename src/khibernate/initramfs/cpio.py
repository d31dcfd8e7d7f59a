"""The newc ("070701") cpio format the Linux initramfs unpacker reads: writer and reader side by side.

An archive is a list of ``Entry`` objects.  ``write`` is deterministic: entries sorted by path, every missing parent
directory added, inode numbers assigned in that order, mtime 0, uid/gid 0.  ``compress`` / ``decompress`` handle
the gzip and zstd framings the test kernel can unpack (``CONFIG_RD_GZIP``, ``CONFIG_RD_ZSTD``); ``read`` also walks
concatenated segments (the kernel unpacks ``cpio + compressed(cpio) + ...`` in order, later entries winning).
"""

from __future__ import annotations

import dataclasses
import gzip
import stat
import zlib
from collections.abc import Iterable, Iterator

from khibernate.initramfs.errors import CpioError as CpioError

MAGIC = b"070701"
HEADER_LEN = 110
TRAILER = "TRAILER!!!"
FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
          "rdevmajor", "rdevminor", "namesize", "check")

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESSIONS = ("none", "gzip", "zstd")
# The kernel's unzstd (lib/decompress_unzstd.c) refuses frames whose window exceeds 128 MiB; stay far below.
ZSTD_WINDOW_LOG = 23


@dataclasses.dataclass(frozen=True)
class Entry:
    """One archive member.  ``path`` is relative ("bin/sh"); ``data`` is file content or the symlink target."""

    path: str
    kind: str  # "dir" | "file" | "symlink" | "chardev"
    perm: int = 0o755
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.kind not in _KIND_BITS:
            raise CpioError(f"unknown entry kind {self.kind!r} for {self.path!r}")
        if not self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise CpioError(f"entry path must be relative and normalised, got {self.path!r}")

    @property
    def mode(self) -> int:
        return _KIND_BITS[self.kind] | (self.perm & 0o7777)


_KIND_BITS = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "chardev": stat.S_IFCHR}
_BITS_KIND = {v: k for k, v in _KIND_BITS.items()}


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(ino: int, mode: int, nlink: int, filesize: int, rdev: tuple[int, int], namesize: int) -> bytes:
    values = (ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev[0], rdev[1], namesize, 0)
    return MAGIC + b"".join(b"%08X" % v for v in values)


def _member(ino: int, name: str, mode: int, nlink: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    bname = name.encode() + b"\0"
    head = _header(ino, mode, nlink, len(data), rdev, len(bname)) + bname
    return head + b"\0" * _pad4(len(head)) + data + b"\0" * _pad4(len(data))


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """The entries plus a 0755 directory for every missing parent, sorted by path; duplicate paths are an error."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        if e.path in by_path and by_path[e.path] != e:
            raise CpioError(f"two different entries for {e.path!r}")
        by_path[e.path] = e
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = Entry(parent, "dir", 0o755)
            elif existing.kind != "dir":
                raise CpioError(f"{parent!r} is a {existing.kind} but {path!r} needs it to be a directory")
    return [by_path[p] for p in sorted(by_path)]


def write(entries: Iterable[Entry]) -> bytes:
    """Serialise entries as one uncompressed newc archive (deterministic, see module docstring)."""
    out = bytearray()
    for ino, e in enumerate(with_parents(entries), start=1):
        nlink = 2 if e.kind == "dir" else 1
        out += _member(ino, e.path, e.mode, nlink, e.data, e.rdev)
    out += _member(0, TRAILER, 0, 1, b"", (0, 0))
    out += b"\0" * _pad4(len(out))
    return bytes(out)


def _parse_one(buf: bytes, pos: int) -> tuple[list[Entry], int]:
    """Parse one uncompressed archive starting at pos; return its entries and the offset after its trailer."""
    entries: list[Entry] = []
    while True:
        if buf[pos:pos + 6] != MAGIC:
            raise CpioError(f"bad cpio magic {buf[pos:pos + 6]!r} at offset {pos} (only newc 070701 is supported)")
        try:
            f = dict(zip(FIELDS, (int(buf[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)), strict=True))
        except ValueError as e:
            raise CpioError(f"corrupt cpio header at offset {pos}: {e}") from e
        npos = pos + HEADER_LEN
        if f["namesize"] < 1 or npos + f["namesize"] > len(buf):
            raise CpioError(f"corrupt cpio header at offset {pos}: name size {f['namesize']} does not fit the archive")
        try:
            name = buf[npos:npos + f["namesize"] - 1].decode()
        except UnicodeDecodeError:
            raise CpioError(f"corrupt cpio member name at offset {pos}: not UTF-8") from None
        dpos = npos + f["namesize"]
        dpos += _pad4(dpos)
        data = bytes(buf[dpos:dpos + f["filesize"]])
        if len(data) != f["filesize"]:
            raise CpioError(f"truncated cpio member {name!r} at offset {pos}")
        pos = dpos + f["filesize"]
        pos += _pad4(pos)
        if name == TRAILER:
            return entries, pos
        kind = _BITS_KIND.get(stat.S_IFMT(f["mode"]))
        if kind is None:
            raise CpioError(f"unsupported file type {oct(f['mode'])} for {name!r}")
        if name in (".", ""):
            continue
        entries.append(Entry(name.lstrip("/").removeprefix("./"), kind, f["mode"] & 0o7777, data,
                             (f["rdevmajor"], f["rdevminor"])))


def compress(data: bytes, method: str, level: int | None = None) -> bytes:
    """Compress one archive as the kernel expects: gzip with mtime 0, or a single zstd frame with content size."""
    if method == "none":
        return data
    if method == "gzip":
        return gzip.compress(data, compresslevel=level or 6, mtime=0)
    if method == "zstd":
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(level or 9, window_log=ZSTD_WINDOW_LOG,
                                                                write_content_size=True, write_checksum=True)
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    raise CpioError(f"unknown compression {method!r}; use one of {', '.join(COMPRESSIONS)}")


def _decompress_segment(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Decompress the gzip member or zstd frame at pos; return (data, offset after it)."""
    if buf[pos:pos + 2] == GZIP_MAGIC:
        d = zlib.decompressobj(wbits=31)
        try:
            data = d.decompress(buf[pos:])
        except zlib.error as e:
            raise CpioError(f"corrupt gzip segment at offset {pos}: {e}") from None
        if not d.eof:
            raise CpioError(f"truncated gzip segment at offset {pos}")
        return data, len(buf) - len(d.unused_data)
    if buf[pos:pos + 4] == ZSTD_MAGIC:
        import zstandard

        zd = zstandard.ZstdDecompressor().decompressobj()
        try:
            data = zd.decompress(buf[pos:])
        except zstandard.ZstdError as e:
            raise CpioError(f"corrupt zstd segment at offset {pos}: {e}") from None
        if not zd.eof:
            raise CpioError(f"truncated zstd segment at offset {pos}")
        return data, len(buf) - len(zd.unused_data)
    raise CpioError(f"unknown data {buf[pos:pos + 8]!r} at offset {pos}: not newc cpio, gzip or zstd")


def segments(buf: bytes) -> Iterator[tuple[str, list[Entry]]]:
    """Yield (compression, entries) for each concatenated segment, as the kernel's unpacker walks them."""
    pos = 0
    while pos < len(buf):
        if buf[pos] == 0:
            pos += 1
            continue
        if buf[pos:pos + 6] == MAGIC:
            entries, pos = _parse_one(buf, pos)
            yield "none", entries
            continue
        method = "gzip" if buf[pos:pos + 2] == GZIP_MAGIC else "zstd"
        data, pos = _decompress_segment(buf, pos)
        inner = 0
        while inner < len(data):
            if data[inner] == 0:
                inner += 1
                continue
            entries, inner = _parse_one(data, inner)
            yield method, entries


def read(buf: bytes) -> list[Entry]:
    """All entries of a (possibly compressed, possibly concatenated) initramfs, later duplicates replacing earlier."""
    merged: dict[str, Entry] = {}
    for _, entries in segments(buf):
        for e in entries:
            merged[e.path] = e
    return list(merged.values())
