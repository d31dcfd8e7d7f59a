"""What `khibernate target` and `snapshot` call: read → plan → check → write, superblock written last."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid as uuidlib
import zlib
from pathlib import Path
from typing import Any

from khibernate.store import device
from khibernate.store.errors import SlotError, StoreCorruptError, StoreError
from khibernate.store.superblock import HOLDS_IMAGE, SlotRecord, SlotState, Superblock, new_superblock, newest

HEAD_READ = 1 << 16


def mounted(path: str, mounts_text: str) -> bool:
    """Whether ``path`` (or what it resolves to) is mounted or used as swap according to /proc/mounts-like text."""
    real = os.path.realpath(path)
    return any(line.split()[0] in (path, real) for line in mounts_text.splitlines() if line.split())


def _check_unused(path: str) -> None:
    text = ""
    for f in ("/proc/mounts", "/proc/swaps"):
        try:
            text += Path(f).read_text()
        except OSError:
            pass
    if mounted(path, text):
        raise StoreError(f"{path} is mounted or in use as swap: a store needs a device nothing else uses")


def init(path: str, nr_slots: int = 2, force: bool = False) -> Superblock:
    """Create a store on ``path`` (erasing what the superblock area held); refuses to replace a store unless force."""
    _check_unused(path)
    device.check_writable(path)
    fd = device.open_device(path, write=True)
    try:
        if not force:
            try:
                old = newest([os.pread(fd, 4096, off) for off in (0, 4096)])
            except StoreError:
                old = None
            if old is not None:
                raise StoreError(f"{path} already holds store {old.uuid_str} with "
                                 f"{sum(s.state == SlotState.COMPLETE for s in old.slots)} complete image(s); "
                                 "`target init --force` erases them")
        sb = new_superblock(device.size(fd), nr_slots, uuidlib.uuid4().bytes, time.time_ns())
        device.write_both(fd, sb)
        return sb
    finally:
        os.close(fd)


def read(path: str) -> Superblock:
    """The store's newest superblock."""
    fd = device.open_device(path)
    try:
        return device.read_superblock(fd)
    finally:
        os.close(fd)


def update(path: str, change: Any) -> Superblock:
    """Read the superblock, apply ``change(sb) -> sb``, write the result to the other copy; returns it."""
    fd = device.open_device(path, write=True)
    try:
        cur = device.read_superblock(fd)
        return device.write_superblock(fd, cur, change(cur))
    finally:
        os.close(fd)


def set_slot(path: str, rec: SlotRecord, expect_uuid: bytes | None = None) -> Superblock:
    """Write ``rec`` into the slot table (checking the store is still the one expected)."""
    def change(sb: Superblock) -> Superblock:
        if expect_uuid is not None and sb.uuid != expect_uuid:
            raise StoreError(f"{path} now holds another store ({sb.uuid_str}); nothing written")
        return sb.with_slot(rec)
    return update(path, change)


def drop(path: str, index: int) -> SlotRecord:
    """Mark slot ``index`` free; returns its old record."""
    sb = read(path)
    rec = sb.slot(index)
    if rec.state == SlotState.FREE:
        raise SlotError(f"slot {index} is already free")
    set_slot(path, dataclasses.replace(rec, state=SlotState.FREE), sb.uuid)
    return rec


@dataclasses.dataclass(frozen=True)
class SlotCheck:
    """What reading a slot back found."""

    length: int
    crc32: int
    pages_stored: int
    pages_zero: int
    osrelease: str
    dump_level: int
    image_uuid: bytes
    created_ns: int


def verify_bytes(path: str, rec: SlotRecord, length: int, crc32: int) -> SlotCheck:
    """Read ``length`` bytes of the slot back (cache dropped) and check their CRC and the image's header, trailer
    and tables checksums; StoreCorruptError when anything disagrees."""
    from khibernate.image.errors import ImageError
    from khibernate.image.format import HEADER, TRAILER, Header, Trailer

    if not HEADER.size + TRAILER.size <= length <= rec.capacity:
        raise StoreCorruptError(f"slot {rec.index}: reported image length {length} does not fit the slot")
    fd = device.open_device(path)
    try:
        device.drop_cache(fd)
        crc = 0
        head = b""
        for chunk in device.read_region(fd, rec.offset, length):
            crc = zlib.crc32(chunk, crc)
            if len(head) < HEAD_READ:
                head += chunk[:HEAD_READ - len(head)]
        if crc != crc32:
            raise StoreCorruptError(f"slot {rec.index}: the device holds other bytes than the capture kernel wrote "
                                    f"(crc32 {crc:#010x}, expected {crc32:#010x}); the image is bad")
        try:
            header, _ = Header.unpack(head)
            trailer = Trailer.unpack(os.pread(fd, TRAILER.size, rec.offset + length - TRAILER.size))
            tables = b"".join(device.read_region(fd, rec.offset + trailer.stored_bitmap_offset,
                                                 length - TRAILER.size - trailer.stored_bitmap_offset))
        except ImageError as e:
            raise StoreCorruptError(f"slot {rec.index}: {e}") from None
        if zlib.crc32(tables) != trailer.tables_crc:
            raise StoreCorruptError(f"slot {rec.index}: bitmap/index checksum mismatch; the image is bad")
        return SlotCheck(length, crc, trailer.pages_stored, trailer.pages_zero, header.osrelease, header.dump_level,
                         header.uuid, header.created_ns)
    finally:
        os.close(fd)


def complete(path: str, store_uuid: bytes, reserved: SlotRecord, length: int, crc32: int, *, pages_stored: int,
             pages_excluded: int, flags: int = 0, keep: int | None = None) -> tuple[SlotRecord, SlotCheck, list[int]]:
    """Read a freshly written slot back (verify_bytes), then mark it complete in one superblock write (older slots
    beyond ``keep`` freed); returns (record, check, freed slots).  The device must still hold store ``store_uuid``
    with the slot reserved for this image."""
    from khibernate.store import plan as splan

    chk = verify_bytes(path, reserved, length, crc32)
    done = dataclasses.replace(reserved, state=SlotState.COMPLETE, length=chk.length, crc32=chk.crc32,
                               pages_stored=pages_stored, pages_excluded=pages_excluded, flags=flags)
    freed: list[int] = []

    def switch(cur: Superblock) -> Superblock:
        nonlocal freed
        if cur.uuid != store_uuid or cur.slot(reserved.index).image_uuid != reserved.image_uuid:
            raise StoreError(f"{path} no longer holds the slot reserved for this image; nothing written")
        new, freed = splan.retire(cur.with_slot(done), keep, protect=done.index)
        return new

    update(path, switch)
    return done, chk, freed


def verify_slot(path: str, index: int) -> SlotCheck:
    """verify_bytes for a complete slot, against the length and CRC its record holds."""
    rec = read(path).slot(index)
    if rec.state not in HOLDS_IMAGE:
        raise SlotError(f"slot {index} is {rec.state.name.lower()}, it holds no complete image")
    return verify_bytes(path, rec, rec.length, rec.crc32)


def open_slot(path: str, rec: SlotRecord) -> Any:
    """The slot's image as a KhiSource reading the device in place (header, trailer and tables checked)."""
    from khibernate.image.errors import ImageError
    from khibernate.image.format import KhiSource

    if rec.state not in HOLDS_IMAGE or rec.length == 0:
        raise SlotError(f"slot {rec.index} is {rec.state.name.lower()}, it holds no complete image")
    try:
        return KhiSource(path, base=rec.offset, length=rec.length)
    except ImageError as e:
        raise StoreCorruptError(f"slot {rec.index}: {e}") from None


def export(path: str, index: int, dest: str, fmt: str = "khi") -> int:
    """Write slot ``index``'s image to ``dest`` as khi (a copy) or through the image exporters (elf, kdump)."""
    from khibernate.image.atomic import atomic_output

    rec = read(path).slot(index)
    if rec.state not in HOLDS_IMAGE:
        raise SlotError(f"slot {index} is {rec.state.name.lower()}: only complete images can be exported "
                        "(`target list`)")
    verify_bytes(path, rec, rec.length, rec.crc32)
    khi = dest if fmt == "khi" else dest + ".khi.partial-src"
    fd = device.open_device(path)
    try:
        with atomic_output(khi, sync=True) as out:
            for chunk in device.read_region(fd, rec.offset, rec.length):
                out.write(chunk)
    finally:
        os.close(fd)
    if fmt == "khi":
        return rec.length
    from khibernate.image.export import export as image_export
    from khibernate.image.format import KhiSource
    from khibernate.image.vmcoreinfo import from_source

    try:
        src = KhiSource(khi)
        try:
            return image_export(src, dest, fmt=fmt, vmci=from_source(src))
        finally:
            src.close()
    finally:
        os.unlink(khi)


def show(path: str, index: int) -> dict[str, Any]:
    """A slot's record as a dict (for `target show`)."""
    sb = read(path)
    rec = sb.slot(index)
    return {"store": sb.uuid_str, "slot": rec.index, "state": rec.state.name.lower(), "seq": rec.seq,
            "offset": rec.offset, "capacity": rec.capacity, "length": rec.length, "crc32": f"{rec.crc32:#010x}",
            "dump_level": rec.dump_level, "image_uuid": str(uuidlib.UUID(bytes=rec.image_uuid)),
            "created_ns": rec.created_ns, "pages_stored": rec.pages_stored, "pages_excluded": rec.pages_excluded,
            "boot_id": str(uuidlib.UUID(bytes=rec.boot_id)), "osrelease": rec.osrelease}
