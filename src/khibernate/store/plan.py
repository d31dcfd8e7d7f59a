"""Decisions about slots, without I/O: where a new image goes, which old ones retire, whether it will fit."""

from __future__ import annotations

import dataclasses

from khibernate.store.errors import NoSpaceError
from khibernate.store.superblock import SlotRecord, SlotState, Superblock

# compressed/uncompressed ratio assumed for the first image of a store (zstd -1 on a busy kernel's kept pages
# measured 0.3-0.6; below this a slot is "clearly too small")
DEFAULT_RATIO = 0.25
REUSABLE = (SlotState.FREE, SlotState.BAD, SlotState.RESUMED, SlotState.TRIED, SlotState.WRITING)


def complete_slots(sb: Superblock) -> list[SlotRecord]:
    """Complete slots, newest first."""
    return sorted((s for s in sb.slots if s.state == SlotState.COMPLETE), key=lambda s: s.seq, reverse=True)


def choose_slot(sb: Superblock) -> SlotRecord:
    """The slot a new image goes to: a free (or bad/resumed/interrupted) one, else the oldest complete one that is
    not the newest; NoSpaceError if the only slot left holds the last good image."""
    reusable = sorted((s for s in sb.slots if s.state in REUSABLE), key=lambda s: (s.state != SlotState.FREE, s.seq))
    if reusable:
        return reusable[0]
    done = complete_slots(sb)
    if len(done) >= 2:
        return done[-1]
    raise NoSpaceError("no slot is free and the only one holds the last good image: `khibernate target drop SLOT` "
                       "or re-create the store with more slots")


def retire(sb: Superblock, keep: int | None, *, protect: int | None = None) -> tuple[Superblock, list[int]]:
    """(superblock, freed slot indexes) keeping only the ``keep`` newest complete images (None keeps all)."""
    if keep is None:
        return sb, []
    if keep < 1:
        raise NoSpaceError("--keep must be at least 1: the newest image is always kept")
    freed: list[int] = []
    for s in complete_slots(sb)[keep:]:
        if s.index == protect:
            continue
        sb = sb.with_slot(dataclasses.replace(s, state=SlotState.FREE))
        freed.append(s.index)
    return sb, freed


def observed_ratio(sb: Superblock, page_size: int = 4096) -> float | None:
    """Largest bytes-per-stored-page / page_size of this store's complete images (the real compression ratio)."""
    ratios = [s.length / (s.pages_stored * page_size) for s in sb.slots
              if s.holds_image and s.pages_stored]
    return max(ratios) if ratios else None


@dataclasses.dataclass(frozen=True)
class SizeEstimate:
    """How big the image of this machine is expected to be."""

    kept_bytes: int
    ratio: float
    ratio_observed: bool

    @property
    def image_bytes(self) -> int:
        return int(self.kept_bytes * self.ratio) + (1 << 20)

    def describe(self) -> str:
        how = "observed in earlier images" if self.ratio_observed else "assumed, no earlier image"
        return (f"~{self.kept_bytes / 2**20:.0f} MiB of RAM kept at the restorable level, ratio {self.ratio:.2f} "
                f"({how}) -> ~{self.image_bytes / 2**20:.0f} MiB")


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per key."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def estimate(sb: Superblock, meminfo: dict[str, int]) -> SizeEstimate:
    """Expected image size: RAM minus what the restorable level drops (free pages), times the compression ratio."""
    kept = max(0, meminfo.get("MemTotal", 0) - meminfo.get("MemFree", 0))
    ratio = observed_ratio(sb)
    return SizeEstimate(kept, ratio if ratio is not None else DEFAULT_RATIO, ratio is not None)


def check_fits(slot: SlotRecord, est: SizeEstimate) -> None:
    """NoSpaceError when the slot is clearly too small for the expected image."""
    if est.image_bytes > slot.capacity:
        raise NoSpaceError(f"slot {slot.index} holds {slot.capacity / 2**20:.0f} MiB but the image needs "
                           f"{est.describe()}: use a bigger target (fewer slots: `target init --slots 2`)")
