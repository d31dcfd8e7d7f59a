"""The store's superblock: layout, packing and parsing (pure; no I/O).

A store is a raw device: two 4 KiB superblock copies at offsets 0 and 4096, then equal slots from 1 MiB on, each
holding at most one ``.khi`` image.  Every update writes a whole superblock with ``generation + 1`` into the copy
that is *not* the newest, so a torn write damages only the older copy; readers take the valid copy with the highest
generation.  Each copy carries a CRC32 over its 4 KiB.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid as uuidlib
import zlib

from khibernate.layout import Layout
from khibernate.store.errors import NotAStoreError, SlotError, StoreCorruptError, StoreError

MAGIC = b"KHSTORE\0"
VERSION = 1
BLOCK = 4096
COPY_OFFSETS = (0, BLOCK)
DATA_OFFSET = 1 << 20
SLOT_ALIGN = 1 << 20
MAX_SLOTS = 16
MIN_SLOT_BYTES = 4 << 20

HEADER = Layout("superblock header", "<", [
    ("magic", "8s"), ("version", "I"), ("copy_index", "I"), ("generation", "Q"), ("uuid", "16s"),
    ("created_ns", "Q"), ("device_bytes", "Q"), ("data_offset", "Q"), ("slot_bytes", "Q"), ("nr_slots", "I"),
    ("slot_size", "I"),
    # the resume attempt (khibernate.restore.attempt): slot, token (zeros: none), start, flags
    ("attempt_slot", "I"), ("attempt_token", "16s"), ("attempt_started_ns", "Q"), ("attempt_flags", "I"),
    ("flags", "I"),  # the store's: STORE_SEALED / STORE_UNSEALED
    ("reserved", "12s")])
SLOT = Layout("slot record", "<", [
    ("state", "I"), ("dump_level", "I"), ("seq", "Q"), ("offset", "Q"), ("capacity", "Q"), ("length", "Q"),
    ("crc32", "I"),  # of the image bytes
    ("flags", "I"), ("image_uuid", "16s"), ("created_ns", "Q"), ("pages_stored", "Q"), ("pages_excluded", "Q"),
    ("boot_id", "16s"),  # of the kernel saved
    ("osrelease", "64s")])
CRC = Layout("superblock crc", "<", [("crc32", "I")])
assert HEADER.size == 128 and SLOT.size == 168
assert HEADER.size + MAX_SLOTS * SLOT.size + CRC.size <= BLOCK


# SlotRecord.flags
FLAG_HIBERNATE = 1  # written by `khibernate hibernate`: the image `khibernate resume` takes (newest first)
# Superblock.flags: what `target init` was told about sealing (docs/sealed.md)
STORE_SEALED = 1  # made with a key: its key slots are at KEYRING_OFFSETS, its images must be sealed
STORE_UNSEALED = 2  # made saying unauthenticated images are allowed (`target init --unsealed`, today's default)
KEYRING_OFFSETS = (2 * BLOCK, 3 * BLOCK)  # two copies of the store's key slots, between superblocks and slots
# ResumeAttempt flags
ATTEMPT_CONTINUED = 1  # a re-entered boot has continued the attempt (`resume --attempt`): never again


class SlotState(enum.IntEnum):
    """What a slot holds: nothing, an image being written, a good image, an image already resumed, a failed one."""

    FREE = 0
    WRITING = 1
    COMPLETE = 2
    RESUMED = 3
    BAD = 4
    TRIED = 5  # a hibernation image a boot found: out of the resume path from then on (swsusp's rule), kept for
    # analysis and export; only `resume --again` or the attempt's one continuation (`--attempt`) takes it


HOLDS_IMAGE = (SlotState.COMPLETE, SlotState.RESUMED, SlotState.TRIED)  # a complete image is in the slot


@dataclasses.dataclass(frozen=True)
class SlotRecord:
    """One slot's entry in the slot table."""

    index: int
    offset: int
    capacity: int
    state: SlotState = SlotState.FREE
    seq: int = 0
    length: int = 0
    crc32: int = 0
    dump_level: int = 0
    flags: int = 0
    image_uuid: bytes = bytes(16)
    created_ns: int = 0
    pages_stored: int = 0
    pages_excluded: int = 0
    boot_id: bytes = bytes(16)
    osrelease: str = ""

    def pack(self) -> bytes:
        """The record's SLOT.size bytes."""
        return SLOT.pack(state=int(self.state), dump_level=self.dump_level, seq=self.seq, offset=self.offset,
                         capacity=self.capacity, length=self.length, crc32=self.crc32, flags=self.flags,
                         image_uuid=self.image_uuid, created_ns=self.created_ns, pages_stored=self.pages_stored,
                         pages_excluded=self.pages_excluded, boot_id=self.boot_id,
                         osrelease=self.osrelease.encode()[:64])

    @classmethod
    def unpack(cls, index: int, data: bytes) -> SlotRecord:
        """Record ``index`` from its SLOT.size bytes; StoreCorruptError for an unknown state."""
        f = SLOT.unpack(data, error=StoreCorruptError, what=f"slot {index}'s record")
        try:
            state = SlotState(f["state"])
        except ValueError:
            raise StoreCorruptError(f"slot {index} has unknown state {f['state']}; the superblock is corrupt") from None
        return cls(index=index, state=state, dump_level=f["dump_level"], seq=f["seq"], offset=f["offset"],
                   capacity=f["capacity"], length=f["length"], crc32=f["crc32"], flags=f["flags"],
                   image_uuid=f["image_uuid"], created_ns=f["created_ns"], pages_stored=f["pages_stored"],
                   pages_excluded=f["pages_excluded"], boot_id=f["boot_id"],
                   osrelease=f["osrelease"].rstrip(b"\0").decode(errors="replace"))

    @property
    def holds_image(self) -> bool:
        """Whether the slot holds a whole, verified image: complete, or complete once and tried or resumed since."""
        return self.state in HOLDS_IMAGE

    def describe(self) -> str:
        """One line for `target list`."""
        if self.state == SlotState.FREE:
            return f"slot {self.index}: free ({self.capacity / 2**20:.0f} MiB)"
        kind = " hibernation" if self.flags & FLAG_HIBERNATE else ""
        return (f"slot {self.index}: {self.state.name.lower():8s} #{self.seq} {self.length / 1e6:8.1f} MB "
                f"of {self.capacity / 2**20:.0f} MiB, {self.osrelease or '?'} -d {self.dump_level},{kind} "
                f"image {uuidlib.UUID(bytes=self.image_uuid)}")


@dataclasses.dataclass(frozen=True)
class ResumeAttempt:
    """The store's current resume attempt: the slot a boot marked tried, and the token with which a re-entered boot
    may continue that same attempt once (khibernate.restore.attempt).  A token of zeros means no attempt."""

    slot: int
    token: bytes
    started_ns: int
    flags: int = 0

    @property
    def continued(self) -> bool:
        return bool(self.flags & ATTEMPT_CONTINUED)


@dataclasses.dataclass(frozen=True)
class Superblock:
    """The whole superblock: store identity, geometry and the slot table."""

    uuid: bytes
    generation: int
    created_ns: int
    device_bytes: int
    slot_bytes: int
    slots: tuple[SlotRecord, ...]
    copy_index: int = 0
    data_offset: int = DATA_OFFSET
    version: int = VERSION
    attempt: ResumeAttempt | None = None
    flags: int = 0  # STORE_SEALED / STORE_UNSEALED; 0: made before sealing existed

    def pack(self, copy_index: int) -> bytes:
        """BLOCK bytes for superblock copy ``copy_index`` (0 or 1), CRC last."""
        a = self.attempt or ResumeAttempt(0, bytes(16), 0)
        head = HEADER.pack(magic=MAGIC, version=self.version, copy_index=copy_index, generation=self.generation,
                           uuid=self.uuid, created_ns=self.created_ns, device_bytes=self.device_bytes,
                           data_offset=self.data_offset, slot_bytes=self.slot_bytes, nr_slots=len(self.slots),
                           slot_size=SLOT.size, attempt_slot=a.slot, attempt_token=a.token,
                           attempt_started_ns=a.started_ns, attempt_flags=a.flags,
                           flags=self.flags)
        body = head + b"".join(s.pack() for s in self.slots)
        body += bytes(BLOCK - CRC.size - len(body))
        return body + CRC.pack(crc32=zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes) -> Superblock:
        """Parse one copy; NotAStoreError without the magic, StoreCorruptError for a bad checksum or geometry."""
        if len(data) < BLOCK or data[:8] != MAGIC:
            raise NotAStoreError("no khibernate superblock (bad magic)")
        if CRC.unpack(data, BLOCK - CRC.size)["crc32"] != zlib.crc32(data[:BLOCK - CRC.size]):
            raise StoreCorruptError("superblock checksum mismatch")
        f = HEADER.unpack(data, error=StoreCorruptError)
        if f["version"] != VERSION:
            raise StoreError(f"store version {f['version']} is not supported (this khibernate knows version "
                             f"{VERSION})")
        nr, recsize = f["nr_slots"], f["slot_size"]
        if recsize != SLOT.size or not 1 <= nr <= MAX_SLOTS:
            raise StoreCorruptError(f"superblock has {nr} slots of {recsize} bytes; it is corrupt")
        has_attempt = any(f["attempt_token"])
        if has_attempt and f["attempt_slot"] >= nr:
            raise StoreCorruptError(f"the resume attempt names slot {f['attempt_slot']} of {nr}; the superblock is "
                                    "corrupt")
        slots = tuple(SlotRecord.unpack(i, data[HEADER.size + i * SLOT.size:HEADER.size + (i + 1) * SLOT.size])
                      for i in range(nr))
        attempt = ResumeAttempt(f["attempt_slot"], f["attempt_token"], f["attempt_started_ns"],
                                f["attempt_flags"]) if has_attempt else None
        sb = cls(uuid=f["uuid"], generation=f["generation"], created_ns=f["created_ns"],
                 device_bytes=f["device_bytes"], slot_bytes=f["slot_bytes"], slots=slots, copy_index=f["copy_index"],
                 data_offset=f["data_offset"], version=f["version"], attempt=attempt,
                 flags=f["flags"])
        for s in slots:
            if s.offset < sb.data_offset or s.offset + s.capacity > sb.device_bytes or s.length > s.capacity:
                raise StoreCorruptError(f"slot {s.index} lies outside the device; the superblock is corrupt")
        return sb

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))

    def slot(self, index: int) -> SlotRecord:
        """Slot ``index``; SlotError naming the valid range otherwise."""
        if not 0 <= index < len(self.slots):
            raise SlotError(f"no slot {index}: this store has slots 0..{len(self.slots) - 1} (`khibernate target "
                            "list`)")
        return self.slots[index]

    def with_slot(self, rec: SlotRecord) -> Superblock:
        """The next generation of this superblock with ``rec`` replacing its slot."""
        slots = tuple(rec if s.index == rec.index else s for s in self.slots)
        return dataclasses.replace(self, slots=slots, generation=self.generation + 1)

    def with_flags(self, flags: int) -> Superblock:
        """The next generation with the store flags ``flags`` (STORE_SEALED / STORE_UNSEALED)."""
        return dataclasses.replace(self, flags=flags, generation=self.generation + 1)

    def with_attempt(self, rec: SlotRecord, attempt: ResumeAttempt) -> Superblock:
        """The next generation with ``rec`` replacing its slot and ``attempt`` as the store's resume attempt."""
        return dataclasses.replace(self.with_slot(rec), attempt=attempt)

    def next_seq(self) -> int:
        """Sequence number for the next image (larger than any in the table)."""
        return max((s.seq for s in self.slots), default=0) + 1

    def describe(self) -> str:
        """The store and its slot table, for `target list`."""
        lines = [f"store {self.uuid_str}: {self.device_bytes / 2**20:.0f} MiB, {len(self.slots)} slots of "
                 f"{self.slot_bytes / 2**20:.0f} MiB, generation {self.generation}"]
        lines += [s.describe() for s in self.slots]
        return "\n".join(lines)


def geometry(device_bytes: int, nr_slots: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(slot_bytes, ((offset, capacity) per slot)) for a device; StoreError when it cannot hold them."""
    if not 2 <= nr_slots <= MAX_SLOTS:
        raise StoreError(f"--slots must be 2..{MAX_SLOTS}: with one slot a new image would overwrite the last good one")
    usable = device_bytes - DATA_OFFSET
    slot_bytes = (usable // nr_slots) // SLOT_ALIGN * SLOT_ALIGN
    if slot_bytes < MIN_SLOT_BYTES:
        raise StoreError(f"the device ({device_bytes / 2**20:.0f} MiB) is too small for {nr_slots} slots of at least "
                         f"{MIN_SLOT_BYTES >> 20} MiB; use fewer slots or a bigger device")
    return slot_bytes, tuple((DATA_OFFSET + i * slot_bytes, slot_bytes) for i in range(nr_slots))


def new_superblock(device_bytes: int, nr_slots: int, store_uuid: bytes, created_ns: int,
                   flags: int = STORE_UNSEALED) -> Superblock:
    """A fresh superblock (generation 1, every slot free); unsealed unless ``flags`` say otherwise (the capture
    kernel cannot seal yet: docs/sealed.md, "The store's flag")."""
    slot_bytes, geo = geometry(device_bytes, nr_slots)
    slots = tuple(SlotRecord(index=i, offset=off, capacity=cap) for i, (off, cap) in enumerate(geo))
    return Superblock(uuid=store_uuid, generation=1, created_ns=created_ns, device_bytes=device_bytes,
                      slot_bytes=slot_bytes, slots=slots, flags=flags)


def newest(copies: list[bytes]) -> Superblock:
    """The valid copy with the highest generation; NotAStoreError / StoreCorruptError when there is none."""
    good: list[Superblock] = []
    errors: list[StoreError] = []
    for data in copies:
        try:
            good.append(Superblock.unpack(data))
        except StoreError as e:
            errors.append(e)
    if good:
        return max(good, key=lambda s: s.generation)
    if all(isinstance(e, NotAStoreError) for e in errors):
        raise NotAStoreError("no khibernate store on this device: create one with `khibernate target init DEV` "
                             "(it erases the device)")
    raise StoreCorruptError("both superblock copies are damaged (" + "; ".join(str(e) for e in errors) + "); the "
                            "images cannot be located — `target init --force` starts over")


def copy_to_write(current: Superblock) -> int:
    """Which copy the next generation goes to: the one that does not hold ``current``."""
    return 1 - current.copy_index
