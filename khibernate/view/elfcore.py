"""The ``vmcore`` file of a view: an ELF64 core whose header is built once and whose data is read on demand.

Layout (what /proc/vmcore looks like): ELF header, one PT_NOTE holding the source's notes (VMCOREINFO included),
an optional PT_LOAD aliasing the kernel image at its virtual address (gdb reads symbols through it), then one
PT_LOAD per RAM range with p_vaddr in the direct map.  File offsets map to physical addresses by segment; no
byte of the image is materialised.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

from khibernate.image.elf import LoadSpec, elf_layout, pack_notes
from khibernate.image.sources.base import MemRange, Note


@dataclasses.dataclass(frozen=True, order=True)
class Segment:
    """File bytes [offset, offset+size) hold physical [paddr, paddr+size)."""

    offset: int
    paddr: int
    size: int


def loads_for(ranges: Sequence[MemRange], *, page_offset: int = 0,
              kernel_text: LoadSpec | None = None) -> list[LoadSpec]:
    """PT_LOADs for ``ranges``: the kernel text alias first (if given), then one per range."""
    loads = [kernel_text] if kernel_text is not None else []
    loads += [LoadSpec(r.start, r.size, page_offset + r.start if page_offset else 0) for r in ranges if r.size]
    return loads


class VmcoreLayout:
    """Header bytes and the offset → physical address map of an ELF core over ``loads``."""

    def __init__(self, loads: Sequence[LoadSpec], notes: Sequence[Note]):
        self.header, offsets = elf_layout(list(loads), pack_notes(notes))
        self.segments = tuple(Segment(o, ld.paddr, ld.size) for ld, o in zip(loads, offsets, strict=True))
        self._starts = [s.offset for s in self.segments]
        last = self.segments[-1] if self.segments else None
        self.size = last.offset + last.size if last else len(self.header)

    def pieces(self, offset: int, size: int) -> list[tuple[int, int, int | None]]:
        """(file offset, length, paddr or None for header bytes) covering [offset, offset+size) clipped at EOF."""
        end = min(offset + size, self.size)
        out: list[tuple[int, int, int | None]] = []
        pos = max(offset, 0)
        while pos < end:
            if pos < len(self.header):
                n = min(end, len(self.header)) - pos
                out.append((pos, n, None))
            else:
                i = bisect.bisect_right(self._starts, pos) - 1
                s = self.segments[i]
                n = min(end, s.offset + s.size) - pos
                out.append((pos, n, s.paddr + pos - s.offset))
            pos += n
        return out

    def read(self, offset: int, size: int, read_phys: Callable[[int, int], bytes]) -> bytes:
        """File bytes at [offset, offset+size) (short at EOF); data bytes come from ``read_phys(paddr, n)``."""
        parts = [self.header[o:o + n] if pa is None else read_phys(pa, n) for o, n, pa in self.pieces(offset, size)]
        return b"".join(parts)
