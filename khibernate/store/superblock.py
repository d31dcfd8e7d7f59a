"""The store's superblock: layout, packing and parsing (pure; no I/O).

A store is a raw device: two 4 KiB superblock copies at offsets 0 and 4096, then equal slots from 1 MiB on, each
holding at most one ``.khi`` image.  Every update writes a whole superblock with ``generation + 1`` into the copy
that is *not* the newest, so a torn write damages only the older copy; readers take the valid copy with the highest
generation.  Each copy carries a CRC32 over its 4 KiB.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import uuid as uuidlib
import zlib

from khibernate.store.errors import NotAStoreError, SlotError, StoreCorruptError, StoreError

MAGIC = b"KHSTORE\0"
VERSION = 1
BLOCK = 4096
COPY_OFFSETS = (0, BLOCK)
DATA_OFFSET = 1 << 20
SLOT_ALIGN = 1 << 20
MAX_SLOTS = 16
MIN_SLOT_BYTES = 4 << 20

# magic, version, copy_index, generation, store uuid, created_ns, device_bytes, data_offset, slot_bytes, nr_slots,
# slot record size, the resume attempt (slot, token, started_ns, flags), store flags, reserved
HEADER = struct.Struct("<8sIIQ16sQQQQIII16sQII12s")
# state, dump_level, seq, offset, capacity, length, crc32 (of the image bytes), flags, image uuid, created_ns,
# pages_stored, pages_excluded, boot_id (of the kernel saved), osrelease
SLOT = struct.Struct("<IIQQQQII16sQQQ16s64s")
CRC = struct.Struct("<I")
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
        return SLOT.pack(int(self.state), self.dump_level, self.seq, self.offset, self.capacity, self.length,
                         self.crc32, self.flags, self.image_uuid, self.created_ns, self.pages_stored,
                         self.pages_excluded, self.boot_id, self.osrelease.encode()[:64])

    @classmethod
    def unpack(cls, index: int, data: bytes) -> SlotRecord:
        """Record ``index`` from its SLOT.size bytes; StoreCorruptError for an unknown state."""
        f = SLOT.unpack(data)
        try:
            state = SlotState(f[0])
        except ValueError:
            raise StoreCorruptError(f"slot {index} has unknown state {f[0]}; the superblock is corrupt") from None
        return cls(index=index, state=state, dump_level=f[1], seq=f[2], offset=f[3], capacity=f[4], length=f[5],
                   crc32=f[6], flags=f[7], image_uuid=f[8], created_ns=f[9], pages_stored=f[10],
                   pages_excluded=f[11], boot_id=f[12], osrelease=f[13].rstrip(b"\0").decode(errors="replace"))

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
        head = HEADER.pack(MAGIC, self.version, copy_index, self.generation, self.uuid, self.created_ns,
                           self.device_bytes, self.data_offset, self.slot_bytes, len(self.slots), SLOT.size,
                           a.slot, a.token, a.started_ns, a.flags, self.flags, b"")
        body = head + b"".join(s.pack() for s in self.slots)
        body += bytes(BLOCK - CRC.size - len(body))
        return body + CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes) -> Superblock:
        """Parse one copy; NotAStoreError without the magic, StoreCorruptError for a bad checksum or geometry."""
        if len(data) < BLOCK or data[:8] != MAGIC:
            raise NotAStoreError("no khibernate superblock (bad magic)")
        if CRC.unpack_from(data, BLOCK - CRC.size)[0] != zlib.crc32(data[:BLOCK - CRC.size]):
            raise StoreCorruptError("superblock checksum mismatch")
        f = HEADER.unpack_from(data)
        if f[1] != VERSION:
            raise StoreError(f"store version {f[1]} is not supported (this khibernate knows version {VERSION})")
        nr, recsize = f[9], f[10]
        if recsize != SLOT.size or not 1 <= nr <= MAX_SLOTS:
            raise StoreCorruptError(f"superblock has {nr} slots of {recsize} bytes; it is corrupt")
        if any(f[12]) and f[11] >= nr:
            raise StoreCorruptError(f"the resume attempt names slot {f[11]} of {nr}; the superblock is corrupt")
        slots = tuple(SlotRecord.unpack(i, data[HEADER.size + i * SLOT.size:HEADER.size + (i + 1) * SLOT.size])
                      for i in range(nr))
        attempt = ResumeAttempt(f[11], f[12], f[13], f[14]) if any(f[12]) else None
        sb = cls(uuid=f[4], generation=f[3], created_ns=f[5], device_bytes=f[6], slot_bytes=f[8], slots=slots,
                 copy_index=f[2], data_offset=f[7], version=f[1], attempt=attempt, flags=f[15])
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
