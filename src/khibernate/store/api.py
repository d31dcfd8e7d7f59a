"""The store's operations by path, one call each: thin wrappers opening a Store handle (khibernate.store.handle)
for callers that do one thing; a command doing several holds one handle instead (`with Store.open(...)`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from khibernate.store.handle import SlotCheck as SlotCheck
from khibernate.store.handle import Store
from khibernate.store.superblock import SlotRecord, Superblock

if TYPE_CHECKING:
    from khibernate.image.sources.khi import KhiSource
    from khibernate.seal.keysource import KeySource


def init(path: str, nr_slots: int = 2, force: bool = False) -> Superblock:
    """Create a store on ``path``: refused when it is in use, or holds a store or a foreign signature unless
    ``force`` (Store.create)."""
    with Store.create(path, nr_slots, force=force) as st:
        return st.sb


def read(path: str) -> Superblock:
    """The store's newest superblock."""
    with Store.open(path) as st:
        return st.sb


def update(path: str, change: Callable[[Superblock], Superblock]) -> Superblock:
    """Read the superblock, apply ``change(sb) -> sb``, write the result to the other copy, under the writer lock."""
    with Store.open(path, write=True) as st:
        return st.update(change)


def set_slot(path: str, rec: SlotRecord, expect_uuid: bytes | None = None) -> Superblock:
    """Write ``rec`` into the slot table (checking the store is still the one expected)."""
    with Store.open(path, write=True) as st:
        return st.set_slot(rec, expect_uuid)


def drop(path: str, index: int) -> SlotRecord:
    """Mark slot ``index`` free; returns its old record."""
    with Store.open(path, write=True) as st:
        return st.drop(index)


def verify_bytes(path: str, rec: SlotRecord, length: int, crc32: int) -> SlotCheck:
    """Read ``length`` bytes of the slot back and check them (Store.verify)."""
    with Store.open(path) as st:
        return st.verify(rec, length, crc32)


def complete(path: str, store_uuid: bytes, reserved: SlotRecord, length: int, crc32: int, *, pages_stored: int,
             pages_excluded: int, flags: int = 0, keep: int | None = None) -> tuple[SlotRecord, SlotCheck, list[int]]:
    """Read a freshly written slot back and mark it complete (Store.complete); the device must still hold store
    ``store_uuid`` with the slot reserved for this image."""
    with Store.open(path, write=True) as st:
        return st.complete(reserved, length, crc32, pages_stored=pages_stored, pages_excluded=pages_excluded,
                           flags=flags, keep=keep, expect_uuid=store_uuid)


def verify_slot(path: str, index: int) -> SlotCheck:
    """Store.verify_slot: a complete slot against the length and CRC its record holds."""
    with Store.open(path) as st:
        return st.verify_slot(index)


def open_slot(path: str, rec: SlotRecord, key: KeySource | None = None) -> KhiSource:
    """The slot's image as a KhiSource reading the device in place (Store.open_slot)."""
    with Store.open(path) as st:
        return st.open_slot(rec, key)


def export(path: str, index: int, dest: str, fmt: str = "khi", key: KeySource | None = None) -> int:
    """Write slot ``index``'s image to ``dest`` as khi, elf or kdump (Store.export)."""
    with Store.open(path) as st:
        return st.export(index, dest, fmt, key)


def show(path: str, index: int) -> dict[str, Any]:
    """A slot's record as a dict (for `target show`)."""
    with Store.open(path) as st:
        return st.show(index)
