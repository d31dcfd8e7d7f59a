"""An open store: ``with Store.open(path, write=True) as st:`` holds the target's descriptor, the writer lock and the
current superblock, so one command opens the device once and every read-modify-write of the superblock happens
under the lock.

One writer at a time: a write handle takes an exclusive flock on the target's own node (for a block device the
kernel's /dev/NAME, whatever name was given; for a file the file) before it opens the target for writing, and keeps
it until closed.  The lock is on the device rather than a lock file keyed by the store UUID because `target init`
writes where no store (or another store) is yet, the UUID changes on `init --force`, and the device node needs no
writable /run: it works on a file target, in the first kernel and in the capture kernel.  flock() is released by the
kernel when its holder dies, so it never goes stale.  Readers take no lock: the superblock's two copies are written
alternately, so a read during a write sees the older valid copy.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from khibernate import lock
from khibernate.progress import Reporter, Say
from khibernate.store import device, usage
from khibernate.store.errors import (
    ForeignDataError,
    NotAStoreError,
    SlotError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
)
from khibernate.store.superblock import SlotRecord, SlotState, Superblock, new_superblock

if TYPE_CHECKING:
    from khibernate.image.sources.khi import KhiSource
    from khibernate.seal.keysource import KeySource
    from khibernate.seal.sealing import HandedKey

LOCK_WAIT = 30.0  # seconds a writer waits for another one (store updates take milliseconds)
HEAD_READ = 1 << 16


_say = Reporter("khibernate", "line").say  # waiting for the lock: said on stderr unless the caller says it


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


@dataclasses.dataclass(frozen=True)
class RawWindow:
    """Where a store file's first MiB (its superblock copies) lies on the device under it: ``device`` at byte
    ``offset``.  A write handle on a store file whose filesystem is mounted read-only writes its superblock there
    (filetarget.raw_window proves the file's extent map first)."""

    device: str
    offset: int


class Store:
    """The open target: ``fd``, the writer lock (``write``), the superblock ``sb`` as last read or written.
    The superblock is read and written at ``sb_base`` of ``sb_fd``: ``fd`` and 0, except through a RawWindow."""

    def __init__(self, path: str, fd: int, lock_fd: int | None, sb: Superblock | None,
                 window: tuple[int, int] | None = None):
        self.path, self.fd, self._lock_fd = path, fd, lock_fd
        self._sb = sb
        self.sb_fd, self.sb_base = window if window is not None else (fd, 0)

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def open(cls, path: str, *, write: bool = False, wait: float = LOCK_WAIT, say: Say = _say,
             window: RawWindow | None = None) -> Store:
        """The store on ``path`` with its newest superblock (NotAStoreError / StoreCorruptError otherwise); with
        ``write`` the writer lock is taken first (StoreBusyError after ``wait`` seconds, naming the holder) and the
        target is checked writable and unused (device.open_device).  With a ``window`` (a store file on a read-only
        mount) the file is opened for reading and the superblock is read and written through the window."""
        st = cls._open(path, write, wait, say, window)
        try:
            st._sb = device.read_superblock(st.sb_fd, st.sb_base)
        except BaseException:
            st.close()
            raise
        return st

    @classmethod
    def _open(cls, path: str, write: bool, wait: float, say: Say, window: RawWindow | None = None) -> Store:
        if not write:
            return cls(path, device.open_device(path), None, None)
        lock_fd = cls._lock(path, wait, say)
        try:
            if window is not None:
                win_fd = device.open_window(window.device)
                try:
                    return cls(path, device.open_device(path), lock_fd, None, (win_fd, window.offset))
                except BaseException:
                    os.close(win_fd)
                    raise
            device.check_read_only(lock_fd, path)  # refused before anything is written
            return cls(path, device.open_device(path, write=True), lock_fd, None)
        except BaseException:
            os.close(lock_fd)
            raise

    @staticmethod
    def _lock(path: str, wait: float, say: Say) -> int:
        """An fd (read-only) on the target's own node holding the exclusive writer lock."""
        device.target_mode(path)  # a missing target or a wrong kind of file is said first
        try:
            fd = os.open(usage.canonical_node(path), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot open target {path}: {e.strerror} (run as root?)") from None
        if lock.acquire(fd, wait, lambda who: say(f"waiting up to {wait:g} s for {who}, which is writing the "
                                                   f"store on {path}")):
            return fd
        who = lock.describe_holders(fd)
        os.close(fd)
        raise StoreBusyError(f"{who} still holds the store on {path} after {wait:g} s (one writer at a time); "
                             "run again when it is done")

    @classmethod
    def create(cls, path: str, nr_slots: int = 2, *, force: bool = False, wait: float = LOCK_WAIT,
               say: Say = _say) -> Store:
        """Make a new store on ``path``: refused when the target is in use (always) or holds a store or a foreign
        signature - filesystem, swap, LVM/RAID/LUKS, partition table - unless ``force``; then its first and last
        MiB are zeroed and both superblock copies written.  Returns the write handle of the new store."""
        st = cls._open(path, True, wait, say)
        try:
            if not force:
                st._refuse_to_erase()
            sb = new_superblock(device.size(st.fd), nr_slots, uuidlib.uuid4().bytes, time.time_ns())
            device.erase_signatures(st.fd)  # what blkid, udev or mdadm would still take the device for
            device.write_both(st.fd, sb)
            st._sb = sb
            return st
        except BaseException:
            st.close()
            raise

    def _refuse_to_erase(self) -> None:
        """StoreError if the target holds a store, ForeignDataError if it holds anything blkid knows."""
        try:
            old: Superblock | None = device.read_superblock(self.fd)
        except StoreError:
            old = None
        if old is not None:
            raise StoreError(f"{self.path} already holds store {old.uuid_str} with "
                             f"{sum(s.holds_image for s in old.slots)} complete image(s); "
                             "`target init --force` erases them")
        found = usage.signatures(self.path)
        if found:
            raise ForeignDataError(f"{self.path} holds {'; '.join(found)}: `target init` would destroy it; "
                                   "give --force to erase it (wipefs shows what is there)")

    def close(self) -> None:
        """Close the target and release the writer lock (idempotent)."""
        if self.sb_fd not in (self.fd, -1):
            os.close(self.sb_fd)
        self.sb_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ the superblock

    @property
    def sb(self) -> Superblock:
        """The superblock as last read or written by this handle."""
        if self._sb is None:
            raise NotAStoreError(f"no khibernate store on {self.path}")
        return self._sb

    @property
    def write(self) -> bool:
        return self._lock_fd is not None

    def refresh(self) -> Superblock:
        """Read the superblock again (cache dropped): another kernel may have written it since."""
        self._sb = device.read_superblock(self.sb_fd, self.sb_base)
        return self._sb

    def update(self, change: Callable[[Superblock], Superblock]) -> Superblock:
        """Read the current superblock, apply ``change(sb) -> sb``, write it to the other copy; under the writer
        lock, so no other writer's update is lost in between."""
        if not self.write:
            raise StoreError(f"{self.path} was opened for reading; nothing written")
        cur = self.refresh()
        self._sb = device.write_superblock(self.sb_fd, cur, change(cur), self.sb_base)
        if self.sb_fd != self.fd:  # written through a RawWindow: the file's cached blocks are stale now
            device.drop_cache(self.fd)
        return self._sb

    def set_slot(self, rec: SlotRecord, expect_uuid: bytes | None = None) -> Superblock:
        """Write ``rec`` into the slot table (checking the store is still the one expected)."""
        def change(sb: Superblock) -> Superblock:
            if expect_uuid is not None and sb.uuid != expect_uuid:
                raise StoreError(f"{self.path} now holds another store ({sb.uuid_str}); nothing written")
            return sb.with_slot(rec)
        return self.update(change)

    def drop(self, index: int) -> SlotRecord:
        """Mark slot ``index`` free; returns its old record."""
        rec = self.refresh().slot(index)
        if rec.state == SlotState.FREE:
            raise SlotError(f"slot {index} is already free")
        self.set_slot(dataclasses.replace(rec, state=SlotState.FREE), self.sb.uuid)
        return rec

    # ------------------------------------------------------------------ slots

    def verify(self, rec: SlotRecord, length: int, crc32: int) -> SlotCheck:
        """Read ``length`` bytes of the slot back (cache dropped) and check their CRC and the image's header,
        trailer and tables checksums; StoreCorruptError when anything disagrees."""
        from khibernate.image.errors import ImageError
        from khibernate.image.layouts.khi import HEADER, INDEX, TRAILER, Header, Trailer

        if not HEADER.size + TRAILER.size <= length <= rec.capacity:
            raise StoreCorruptError(f"slot {rec.index}: reported image length {length} does not fit the slot")
        device.drop_cache(self.fd)
        crc = 0
        head = b""
        for chunk in device.read_region(self.fd, rec.offset, length):
            crc = zlib.crc32(chunk, crc)
            if len(head) < HEAD_READ:
                head += chunk[:HEAD_READ - len(head)]
        if crc != crc32:
            raise StoreCorruptError(f"slot {rec.index}: the device holds other bytes than the capture kernel wrote "
                                    f"(crc32 {crc:#010x}, expected {crc32:#010x}); the image is bad")
        try:
            header, _ = Header.unpack(head)
            trailer = Trailer.unpack(os.pread(self.fd, TRAILER.size, rec.offset + length - TRAILER.size))
            tables_end = trailer.index_offset + trailer.index_count * INDEX.size  # a sealed image's seal record follows
            if not trailer.stored_bitmap_offset <= tables_end <= length - TRAILER.size:
                raise StoreCorruptError(f"slot {rec.index}: the trailer places the tables outside the image")
            tables = b"".join(device.read_region(self.fd, rec.offset + trailer.stored_bitmap_offset,
                                                 tables_end - trailer.stored_bitmap_offset))
        except ImageError as e:
            raise StoreCorruptError(f"slot {rec.index}: {e}") from None
        if zlib.crc32(tables) != trailer.tables_crc:
            raise StoreCorruptError(f"slot {rec.index}: bitmap/index checksum mismatch; the image is bad")
        return SlotCheck(length, crc, trailer.pages_stored, trailer.pages_zero, header.osrelease, header.dump_level,
                         header.uuid, header.created_ns)

    def image_slot(self, index: int) -> SlotRecord:
        """Slot ``index`` (superblock read again) when it holds a complete image; SlotError otherwise."""
        rec = self.refresh().slot(index)
        if not rec.holds_image:
            raise SlotError(f"slot {index} is {rec.state.name.lower()}, it holds no complete image (`target list`)")
        return rec

    def verify_slot(self, index: int) -> SlotCheck:
        """verify() of a complete slot against the length and CRC its record holds."""
        rec = self.image_slot(index)
        return self.verify(rec, rec.length, rec.crc32)

    def complete(self, reserved: SlotRecord, length: int, crc32: int, *, pages_stored: int, pages_excluded: int,
                 flags: int = 0, keep: int | None = None, expect_uuid: bytes | None = None
                 ) -> tuple[SlotRecord, SlotCheck, list[int]]:
        """Read a freshly written slot back (verify), then mark it complete in one superblock write (older slots
        beyond ``keep`` freed); returns (record, check, freed slots).  The device must still hold the store
        ``expect_uuid`` (default: the one this handle last read) with the slot reserved for this image."""
        from khibernate.store import plan as splan

        chk = self.verify(reserved, length, crc32)
        done = dataclasses.replace(reserved, state=SlotState.COMPLETE, length=chk.length, crc32=chk.crc32,
                                   pages_stored=pages_stored, pages_excluded=pages_excluded, flags=flags)
        freed: list[int] = []
        store_uuid = self.sb.uuid if expect_uuid is None else expect_uuid

        def switch(cur: Superblock) -> Superblock:
            nonlocal freed
            if cur.uuid != store_uuid or cur.slot(reserved.index).image_uuid != reserved.image_uuid:
                raise StoreError(f"{self.path} no longer holds the slot reserved for this image; nothing written")
            new, freed = splan.retire(cur.with_slot(done), keep, protect=done.index)
            return new

        self.update(switch)
        return done, chk, freed

    def open_slot(self, rec: SlotRecord, key: KeySource | HandedKey | None = None) -> KhiSource:
        """The slot's image as a KhiSource reading the device in place (header, trailer and tables checked; a
        sealed one unsealed with ``key`` — a key source, or the image key a resume handed over — and refused unless
        sealed for this slot)."""
        from khibernate.image.errors import ImageError
        from khibernate.image.sources.khi import KhiSource
        from khibernate.seal.errors import SealError

        if not rec.holds_image or rec.length == 0:
            raise SlotError(f"slot {rec.index} is {rec.state.name.lower()}, it holds no complete image")
        try:
            return KhiSource(self.path, base=rec.offset, length=rec.length, key=key, slot=rec.index)
        except SealError:
            raise  # its own class: a key to give, or an image that is not what was sealed
        except ImageError as e:
            raise StoreCorruptError(f"slot {rec.index}: {e}") from None

    def export(self, index: int, dest: str, fmt: str = "khi", key: KeySource | None = None) -> int:
        """Write slot ``index``'s image to ``dest`` as khi (a copy: a sealed image stays sealed) or through the image
        exporters (elf, kdump; a sealed image needs ``key``); checked first.  SIGTERM on the way leaves no
        temporary file behind."""
        from khibernate.image.atomic import atomic_output, sigterm_exits

        rec = self.image_slot(index)
        self.verify(rec, rec.length, rec.crc32)
        khi = dest if fmt == "khi" else dest + ".khi.partial-src"
        with sigterm_exits(dest):
            with atomic_output(khi, sync=True) as out:
                for chunk in device.read_region(self.fd, rec.offset, rec.length):
                    out.write(chunk)
            if fmt == "khi":
                return rec.length
            try:
                return _export_khi(khi, dest, fmt, key)
            finally:
                os.unlink(khi)

    def show(self, index: int) -> dict[str, Any]:
        """A slot's record as a dict (for `target show`)."""
        rec = self.sb.slot(index)
        return {"store": self.sb.uuid_str, "slot": rec.index, "state": rec.state.name.lower(), "seq": rec.seq,
                "offset": rec.offset, "capacity": rec.capacity, "length": rec.length, "crc32": f"{rec.crc32:#010x}",
                "dump_level": rec.dump_level, "image_uuid": str(uuidlib.UUID(bytes=rec.image_uuid)),
                "created_ns": rec.created_ns, "pages_stored": rec.pages_stored, "pages_excluded": rec.pages_excluded,
                "boot_id": str(uuidlib.UUID(bytes=rec.boot_id)), "osrelease": rec.osrelease}


def _export_khi(khi: str, dest: str, fmt: str, key: KeySource | None = None) -> int:
    """Export the .khi file ``khi`` to ``dest`` as kdump or elf (``key``: for a sealed one)."""
    from khibernate.image.export import export as image_export
    from khibernate.image.sources.khi import KhiSource
    from khibernate.image.vmcoreinfo import from_source

    src = KhiSource(khi, key=key)
    try:
        return image_export(src, dest, fmt=fmt, vmci=from_source(src))
    finally:
        src.close()
