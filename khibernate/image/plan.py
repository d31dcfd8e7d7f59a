"""Which pages of a source go into an output: present pages, optionally filtered again at a dump level."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from khibernate.image.errors import MissingVmcoreinfoError
from khibernate.image.pagefilter import PageClass, PageFilter, check_level, excluded_classes, needs_struct_page
from khibernate.image.sources.base import MemorySource, MemRange
from khibernate.image.vmcoreinfo import Vmcoreinfo


@dataclasses.dataclass(frozen=True)
class Chunk:
    """pfns [pfn, pfn+len(keep)): RAM mask, class per pfn, and which pages the output keeps."""

    pfn: int
    ram: np.ndarray
    classes: np.ndarray
    keep: np.ndarray


def ram_mask(ranges: tuple[MemRange, ...], pfn: int, n: int, page_size: int) -> np.ndarray:
    """Per-pfn True where the page overlaps a RAM range."""
    mask = np.zeros(n, dtype=bool)
    lo, hi = pfn * page_size, (pfn + n) * page_size
    for r in ranges:
        if r.end <= lo or r.start >= hi:
            continue
        a = max(r.start, lo) // page_size - pfn
        b = -(-min(r.end, hi) // page_size) - pfn
        mask[a:b] = True
    return mask


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in ``mask``."""
    d = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def plan(source: MemorySource, vmci: Vmcoreinfo | None, level: int, *, restorable: bool = False,
         chunk: int = 1 << 15) -> Iterator[Chunk]:
    """Chunks covering pfn 0..max_pfn: RAM present in the source, classes (if level needs them), kept pages."""
    check_level(level, restorable)
    pfilter = None
    if needs_struct_page(level):
        if vmci is None:
            raise MissingVmcoreinfoError(f"dump level {level} needs VMCOREINFO to read struct page; the source has "
                                         "none - give --vmcoreinfo FILE or use -d 1 / -d 0")
        pfilter = PageFilter(source, vmci)
    dropped = excluded_classes(level)
    ps = source.page_size

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        if pfilter is not None:
            yield from pfilter.classes(chunk)
            return
        for pfn in range(0, source.max_pfn, chunk):
            yield pfn, np.zeros(min(chunk, source.max_pfn - pfn), dtype=np.uint8)

    for pfn, cls in chunks():
        n = len(cls)
        ram = ram_mask(source.ranges, pfn, n, ps)
        present = source.page_present_mask(pfn, n)
        if present is not None:
            ram &= np.frombuffer(present, dtype=bool)  # bridge: readers return 0/1 bytearrays now
        cls = np.where(ram, cls, PageClass.NO_PAGE).astype(np.uint8)
        yield Chunk(pfn, ram, cls, ram & ~dropped[cls])


def read_kept(source: MemorySource, pfn: int, keep: np.ndarray) -> bytes:
    """Pages pfn..pfn+len(keep): kept pages' data, zeros for the others."""
    ps = source.page_size
    if keep.all():
        return bytes(source.view(pfn * ps, len(keep) * ps))
    out = bytearray(len(keep) * ps)
    for a, b in runs(keep):
        out[a * ps:b * ps] = source.view((pfn + a) * ps, (b - a) * ps)
    return bytes(out)
