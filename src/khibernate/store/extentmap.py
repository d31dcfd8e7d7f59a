"""The extent map of a file target, kept inside the file (reader and writer side by side; pure, no I/O).

A store in a file has its superblock copies at file offsets 0 and 4096 like any store; the map of where the file's
bytes lie on its block device follows at ``MAP_OFFSET`` (inside the store's first MiB, which holds no slot).  Boot
code that has no filesystem mounted finds the store by device + offset (the device offset of the file's first byte,
like swsusp's ``resume_offset=``), reads this map there, and from then on addresses the file only through it.

    header (EXTMAP)  magic "KHXMAP\\0\\0", version, count, block, store uuid, file bytes, device bytes, crc32
    count entries    (logical, physical, length), u64 each, sorted by logical, covering [0, file bytes)

The CRC32 covers the header (with crc32 = 0) and the entries.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

from khibernate.layout import Layout
from khibernate.store.errors import FileTargetError, StoreCorruptError, StoreError
from khibernate.store.fiemap import Extent

MAGIC = b"KHXMAP\0\0"
VERSION = 1
MAP_OFFSET = 8192  # after the two superblock copies
MAX_EXTENTS = 4096
SECTOR = 512
EXTMAP = Layout("extent map header", "<", [("magic", "8s"), ("version", "I"), ("count", "I"), ("block", "I"),
                                           ("reserved", "4x"), ("store_uuid", "16s"), ("file_bytes", "Q"),
                                           ("device_bytes", "Q"), ("crc32", "I"), ("pad", "4x")])
ENTRY = Layout("extent map entry", "<", [("logical", "Q"), ("physical", "Q"), ("length", "Q")])
MAP_BYTES_MAX = EXTMAP.size + MAX_EXTENTS * ENTRY.size
assert EXTMAP.size == 64 and MAP_OFFSET + MAP_BYTES_MAX <= 1 << 20


@dataclasses.dataclass(frozen=True)
class ExtentMap:
    """Where a store file's bytes lie on its device (``extents`` merged, sorted, covering the whole file)."""

    store_uuid: bytes
    file_bytes: int
    device_bytes: int
    extents: tuple[Extent, ...]
    block: int = 4096

    @property
    def resume_offset(self) -> int:
        """Device offset of the file's first byte: where the store's superblock is found without a filesystem."""
        return self.extents[0].physical

    def pack(self) -> bytes:
        """The map's bytes (header + entries), CRC filled in."""
        if not 0 < len(self.extents) <= MAX_EXTENTS:
            raise FileTargetError(f"the file is in {len(self.extents)} pieces; at most {MAX_EXTENTS} are kept: "
                                  "create it on a less fragmented filesystem")
        entries = b"".join(ENTRY.pack(logical=e.logical, physical=e.physical, length=e.length) for e in self.extents)
        fields = dict(magic=MAGIC, version=VERSION, count=len(self.extents), block=self.block,
                      store_uuid=self.store_uuid, file_bytes=self.file_bytes, device_bytes=self.device_bytes)
        crc = zlib.crc32(EXTMAP.pack(**fields, crc32=0) + entries)
        return EXTMAP.pack(**fields, crc32=crc) + entries

    def check_fits(self) -> None:
        """FileTargetError unless the store's first MiB (superblocks + this map) is one piece on the device, so
        boot code can read it at ``resume_offset`` before it knows the map."""
        first = self.extents[0]
        if first.logical != 0 or first.length < MAP_OFFSET + len(self.pack()):
            raise FileTargetError("the file's first bytes are split on the device: the store header and its map "
                                  "must be one piece; recreate the file (`target init FILE --size S --force`)")

    def to_device(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The (device offset, length) pieces of the file's bytes [offset, offset + length); StoreError outside."""
        if offset < 0 or length < 0 or offset + length > self.file_bytes:
            raise StoreError(f"bytes {offset:#x}+{length:#x} lie outside the {self.file_bytes}-byte store file")
        out = []
        for e in self.extents:
            lo, hi = max(offset, e.logical), min(offset + length, e.logical + e.length)
            if lo < hi:
                out.append((e.physical + lo - e.logical, hi - lo))
        return out

    def dm_table(self, device: str) -> str:
        """A device-mapper ``linear`` table presenting the file's bytes in order as one block device over
        ``device`` (the only writes it can make are inside the extents)."""
        return "".join(f"{e.logical // SECTOR} {e.length // SECTOR} linear {device} {e.physical // SECTOR}\n"
                       for e in self.extents)


def parse(data: bytes) -> ExtentMap:
    """The map at the start of ``data``; StoreCorruptError when it is missing, damaged or inconsistent."""
    h = EXTMAP.unpack(data, 0, error=StoreCorruptError, what="extent map header")
    if h["magic"] != MAGIC:
        raise StoreCorruptError("no extent map where the file target keeps it: not a khibernate store file")
    if h["version"] != VERSION:
        raise StoreError(f"extent map version {h['version']} is not supported (this khibernate knows {VERSION})")
    count = h["count"]
    if not 0 < count <= MAX_EXTENTS:
        raise StoreCorruptError(f"extent map claims {count} extents; it is corrupt")
    end = EXTMAP.size + count * ENTRY.size
    if len(data) < end:
        raise StoreCorruptError(f"extent map cut short: {end} bytes needed, {len(data)} there")
    fields = {k: h[k] for k in EXTMAP.names if k != "crc32"}
    if zlib.crc32(EXTMAP.pack(**fields, crc32=0) + data[EXTMAP.size:end]) != h["crc32"]:
        raise StoreCorruptError("extent map checksum mismatch: the store file's header is damaged")
    extents = tuple(Extent(e["logical"], e["physical"], e["length"])
                    for e in (ENTRY.unpack(data, EXTMAP.size + i * ENTRY.size) for i in range(count)))
    m = ExtentMap(h["store_uuid"], h["file_bytes"], h["device_bytes"], extents, h["block"])
    check_consistent(m)
    return m


def check_consistent(m: ExtentMap) -> None:
    """StoreCorruptError unless the extents are aligned, cover [0, file_bytes) in order and lie on the device."""
    pos = 0
    if m.block <= 0 or m.block % SECTOR:
        raise StoreCorruptError(f"extent map block size {m.block} is not a multiple of {SECTOR}")
    for e in m.extents:
        if e.logical != pos or e.length <= 0 or (e.physical | e.length) % m.block:
            raise StoreCorruptError(f"extent map entry at {e.logical:#x} does not continue the file at {pos:#x} "
                                    "or is unaligned; the map is corrupt")
        if e.physical + e.length > m.device_bytes:
            raise StoreCorruptError(f"extent at {e.logical:#x} ends past the device ({m.device_bytes} bytes)")
        pos += e.length
    if pos != m.file_bytes:
        raise StoreCorruptError(f"extent map covers {pos} bytes of a {m.file_bytes}-byte file; it is corrupt")


def same_place(recorded: ExtentMap, now: Sequence[Extent]) -> None:
    """FileTargetError unless the file still lies exactly where ``target init`` recorded it (a defragmenter, a
    copy or a filesystem resize moved it: raw writes there would land in someone else's blocks)."""
    if tuple((e.logical, e.physical, e.length) for e in now) != \
            tuple((e.logical, e.physical, e.length) for e in recorded.extents):
        raise FileTargetError("the store file has moved on the device since `target init` (defragmented, copied "
                              "or restored from a backup): writing by the recorded map would overwrite other data. "
                              "Recreate it: `khibernate target init FILE --size S --force`")
