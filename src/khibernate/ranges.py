"""Physical memory ranges, the one vocabulary every part of khibernate uses for them.

A :class:`Range` is half-open, ``[start, end)``, everywhere in khibernate; formats that print inclusive ends
(/proc/iomem, /sys/firmware/memmap, kexec-tools' --mem-max) are converted where they are parsed
(:meth:`Range.inclusive`) and printed back with :attr:`Range.last`. ``type`` is the x86 e820 type of the range
(RAM by default); code that does not care about it (the image side) leaves it at the default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_PMEM = 7
E820_PRAM = 12
E820_SOFT_RESERVED = 0xEFFFFFFF
E820_NONE = 0  # not an e820 type: a /proc/iomem resource such as "PCI Bus 0000:00"

# /proc/iomem and /sys/firmware/memmap names of the e820 types (arch/x86/kernel/e820.c, e820_type_to_string)
E820_NAMES = {
    "System RAM": E820_RAM,
    "Reserved": E820_RESERVED,
    "reserved": E820_RESERVED,
    "ACPI Tables": E820_ACPI,
    "ACPI Non-volatile Storage": E820_NVS,
    "Unusable memory": E820_UNUSABLE,
    "Persistent Memory (legacy)": E820_PRAM,
    "Persistent Memory": E820_PMEM,
    "Soft Reserved": E820_SOFT_RESERVED,
}


@dataclasses.dataclass(frozen=True, order=True)
class Range:
    """Physical memory [start, end) with an e820 type (RAM unless said otherwise)."""

    start: int
    end: int
    type: int = E820_RAM

    @classmethod
    def inclusive(cls, start: int, last: int, type: int = E820_RAM) -> Range:
        """The range from ``start`` to ``last`` inclusive (the /proc/iomem and kexec-tools convention)."""
        return cls(start, last + 1, type)

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.end - self.start

    @property
    def last(self) -> int:
        """The last byte's address (inclusive end)."""
        return self.end - 1

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.start <= addr < self.end

    def overlaps(self, other: Range) -> bool:
        """True if the two ranges share at least one byte."""
        return self.start < other.end and other.start < self.end

    def covers(self, other: Range) -> bool:
        """True if ``other`` lies entirely inside this range."""
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"[{self.start:#x}-{self.last:#x}]"


def merge(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sorted, coalesced ranges: overlapping or touching ranges of the same type become one; empty ones vanish."""
    out: list[Range] = []
    for r in sorted(x for x in ranges if x.end > x.start):
        if out and r.start <= out[-1].end and r.type == out[-1].type:
            out[-1] = Range(out[-1].start, max(out[-1].end, r.end), r.type)
        else:
            out.append(r)
    return tuple(out)


def subtract(ranges: Iterable[Range], holes: Iterable[Range]) -> list[Range]:
    """Ranges with every hole cut out (types kept), sorted."""
    out = sorted(ranges)
    for h in holes:
        nxt = []
        for r in out:
            if not r.overlaps(h):
                nxt.append(r)
                continue
            if r.start < h.start:
                nxt.append(Range(r.start, h.start, r.type))
            if h.end < r.end:
                nxt.append(Range(h.end, r.end, r.type))
        out = nxt
    return sorted(out)
