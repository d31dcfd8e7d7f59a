"""What of a source goes into an output (an image, an export, a view): its present pages, optionally filtered again
at a dump level; the dump level the output records; the notes it carries."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from khibernate import native
from khibernate.elfcore import VMCOREINFO_NOTE, Note
from khibernate.image.errors import MissingVmcoreinfoError, UsageErrorImage
from khibernate.image.levels import RESTORABLE_LEVEL
from khibernate.image.pagefilter import PageClass, PageFilter, check_level, excluded_classes, needs_struct_page
from khibernate.image.sources.base import MemorySource, MemRange
from khibernate.image.vmcoreinfo import Vmcoreinfo


@dataclasses.dataclass(frozen=True)
class Chunk:
    """pfns [pfn, pfn+len(keep)): RAM mask, class per pfn, and which pages the output keeps (0/1 bytes each)."""

    pfn: int
    ram: bytearray
    classes: bytearray
    keep: bytearray


def ram_mask(ranges: Sequence[MemRange], pfn: int, n: int, page_size: int) -> bytearray:
    """Per pfn of pfn..pfn+n: 1 where the page overlaps one of ``ranges`` (sorted or not), else 0."""
    mask = bytearray(n)
    lo, hi = pfn * page_size, (pfn + n) * page_size
    for r in ranges:
        if r.end <= lo or r.start >= hi:
            continue
        a = max(r.start, lo) // page_size - pfn
        b = -(-min(r.end, hi) // page_size) - pfn
        mask[a:b] = b"\1" * (b - a)
    return mask


def and_masks(a: bytearray, b: bytes | bytearray) -> bytearray:
    """Bytewise AND of two 0/1 masks of equal length."""
    n = len(a)
    return bytearray((int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(n, "little"))


def where(mask: bytes | bytearray, a: bytes | bytearray, fill: int) -> bytearray:
    """Per byte: ``a`` where the 0/1 ``mask`` is 1, else ``fill`` (bytes of equal length; big-int ops, no loop)."""
    n = len(a)
    m = int.from_bytes(mask, "little") * 0xFF
    f = int.from_bytes(bytes([fill]) * n, "little")
    return bytearray(((int.from_bytes(a, "little") & m) | (f & ~m)).to_bytes(n, "little"))


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
    kept = bytes(1 - d for d in excluded_classes(level))  # class -> 1 if kept
    ps = source.page_size

    def chunks() -> Iterator[tuple[int, bytearray]]:
        if pfilter is not None:
            yield from pfilter.classes(chunk)
            return
        for pfn in range(0, source.max_pfn, chunk):
            yield pfn, bytearray(min(chunk, source.max_pfn - pfn))

    for pfn, cls in chunks():
        n = len(cls)
        ram = ram_mask(source.ranges, pfn, n, ps)
        present = source.page_present_mask(pfn, n)
        if present is not None:
            ram = and_masks(ram, present)
        if ram.count(1) != n:  # pages outside RAM are NO_PAGE whatever their struct page says
            cls = where(ram, cls, PageClass.NO_PAGE)
        yield Chunk(pfn, ram, cls, and_masks(ram, cls.translate(kept)))


def read_kept(source: MemorySource, pfn: int, keep: bytes | bytearray) -> bytes:
    """Pages pfn..pfn+len(keep): kept pages' data, zeros for the others."""
    ps = source.page_size
    if keep.count(1) == len(keep):
        return bytes(source.view(pfn * ps, len(keep) * ps))
    out = bytearray(len(keep) * ps)
    for a, b in native.runs(keep):
        out[a * ps:b * ps] = source.view((pfn + a) * ps, (b - a) * ps)
    return bytes(out)


def check_source_level(source: MemorySource, level: int, restorable: bool) -> int:
    """The dump level an output of ``source`` filtered at ``level`` has (the source's own level included);
    UsageErrorImage when ``restorable`` is asked of a source that already lost more than zero and free pages."""
    eff = level | source.dump_level
    if restorable and eff & ~RESTORABLE_LEVEL:
        raise UsageErrorImage(f"the source was already filtered at dump level {source.dump_level}, which drops "
                              "cache or user pages: no image of it can be restored; pass -d "
                              f"{eff} to save it anyway (not restorable)")
    return eff


def default_notes(source: MemorySource, vmci: Vmcoreinfo | None) -> tuple[Note, ...]:
    """The notes an output of ``source`` carries: the source's, plus a VMCOREINFO note when it came from elsewhere
    (-i FILE, sysfs)."""
    notes = tuple(source.notes)
    if vmci is not None and not any(n.name == VMCOREINFO_NOTE for n in notes):
        notes += (Note(VMCOREINFO_NOTE, 0, vmci.text.encode()),)
    return notes
