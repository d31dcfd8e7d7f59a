"""Where a re-entered resident capture kernel finds the first kernel's pages that its own jump-back image swapped.

``relocate_kernel`` swaps each destination page of a loaded kexec image with its source page on the way out and
again on the way back in.  The capture kernel's jump-back image has a segment over the first kernel's control page,
so while a *re-entered* capture kernel runs, that page of the first kernel holds the copy of the previous exit and
the first kernel's live page sits in the segment's source page, in the capture kernel's own RAM (docs/resident.md).
:func:`page_locations` says, from the capture kernel's own kimage entry list (``view.frozen.kimage_swaps``), where
each such page really is; :class:`RelocatedSource` reads them from there and everything else from ``/proc/vmcore``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence

from khibernate.capture.errors import JobError
from khibernate.image.sources.adapters import WrappedSource
from khibernate.image.sources.base import MemorySource
from khibernate.ranges import Range

PAGE = 4096


class RelocationError(JobError):
    """The capture kernel's own kexec image does not say plainly where the first kernel's pages are."""


def page_locations(swaps: Mapping[int, int], first_ram: Sequence[Range], own_ram: Sequence[Range]) -> dict[int, int]:
    """{first kernel's page: where its live content is} for every destination of this kernel's loaded kexec image
    (``swaps``: destination -> source) that is the first kernel's RAM (``first_ram``: the /proc/vmcore ranges).
    RelocationError when such a source page is not this kernel's own RAM (``own_ram``) or a page is unaligned —
    the image would then be saved with a page of unknown content."""
    out: dict[int, int] = {}
    for dest, src in sorted(swaps.items()):
        if dest % PAGE or src % PAGE:
            raise RelocationError(f"kexec page {dest:#x} <- {src:#x} is not page aligned; the entry list is corrupt")
        if not any(r.start <= dest and dest + PAGE <= r.end for r in first_ram):
            continue  # this kernel's own memory (or a hole): not part of the first kernel's image
        if not any(r.start <= src and src + PAGE <= r.end for r in own_ram):
            raise RelocationError(f"the first kernel's page {dest:#x} is parked at {src:#x}, which is not this capture "
                                  "kernel's RAM: nothing can read it from here")
        out[dest] = src
    return out


class RelocatedSource(WrappedSource):
    """``inner`` (the first kernel's memory through /proc/vmcore) with the pages of ``locations`` read from where
    they really are (``read_page(paddr)``: 4 KiB of this kernel's own RAM, through /proc/kcore)."""

    def __init__(self, inner: MemorySource, locations: Mapping[int, int], read_page: Callable[[int], bytes]):
        super().__init__(inner)
        self.locations = dict(locations)
        self._dests = sorted(self.locations)
        self._read_page = read_page

    def _hits(self, paddr: int, size: int) -> list[int]:
        i = bisect.bisect_left(self._dests, paddr - PAGE + 1)
        j = bisect.bisect_left(self._dests, paddr + size)
        return self._dests[i:j]

    def _patch(self, paddr: int, buf: memoryview | bytearray, hits: list[int]) -> None:
        for dest in hits:
            page = self._read_page(self.locations[dest])
            if len(page) != PAGE:
                raise RelocationError(f"reading the parked page {self.locations[dest]:#x} gave {len(page)} bytes")
            lo, hi = max(dest, paddr), min(dest + PAGE, paddr + len(buf))
            buf[lo - paddr:hi - paddr] = page[lo - dest:hi - dest]

    def read(self, paddr: int, size: int) -> bytes:
        hits = self._hits(paddr, size)
        if not hits:
            return self.inner.read(paddr, size)
        out = bytearray(self.inner.read(paddr, size))
        self._patch(paddr, out, hits)
        return bytes(out)

    def view(self, paddr: int, size: int) -> memoryview:
        if not self._hits(paddr, size):
            return self.inner.view(paddr, size)
        return memoryview(self.read(paddr, size))

    def readinto(self, paddr: int, buf: memoryview) -> None:
        self.inner.readinto(paddr, buf)
        hits = self._hits(paddr, len(buf))
        if hits:
            self._patch(paddr, buf, hits)

    def mapped_view(self, paddr: int, size: int) -> memoryview | None:
        return None if self._hits(paddr, size) else self.inner.mapped_view(paddr, size)
