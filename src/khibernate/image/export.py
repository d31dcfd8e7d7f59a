"""Export any source as an ELF vmcore or a makedumpfile-compatible kdump file (what gdb, crash, drgn open)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import BinaryIO

from khibernate import native
from khibernate.elfcore import LoadSpec
from khibernate.image.atomic import atomic_output
from khibernate.image.errors import AddressError, ImageError, UsageErrorImage
from khibernate.image.pagefilter import PageFilter
from khibernate.image.plan import and_masks, check_source_level, default_notes, plan, ram_mask, read_kept
from khibernate.image.sources.base import MemorySource, MemRange
from khibernate.image.sources.elf import write_elf
from khibernate.image.sources.kdump import write_kdump
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.image.x86_64 import X86_64

ELF_GAP_PAGES = 16  # excluded gaps shorter than this are written as zeros instead of splitting the PT_LOAD


def utsname(source: MemorySource, vmci: Vmcoreinfo | None) -> list[str]:
    """The six utsname strings of the dumped kernel (init_uts_ns), or what VMCOREINFO tells."""
    fallback = ["Linux", "", vmci.osrelease if vmci else "", "", "x86_64", ""]
    if vmci is None or not vmci.has("SYMBOL(init_uts_ns)"):
        return fallback
    try:
        kx = X86_64(source, vmci)
        raw = kx.read(vmci.symbol("init_uts_ns") + (vmci.offset_or("uts_namespace.name", 0) or 0), 6 * 65)
    except ImageError:
        return fallback
    return [raw[i * 65:(i + 1) * 65].split(b"\0")[0].decode("ascii", "replace") for i in range(6)]


def page_offset(source: MemorySource, vmci: Vmcoreinfo | None) -> int:
    """Direct-map base for PT_LOAD p_vaddr (0 when unknown)."""
    if vmci is None:
        return 0
    try:
        return X86_64(source, vmci).page_offset() or 0
    except ImageError:
        return 0


def kernel_text_load(source: MemorySource, vmci: Vmcoreinfo | None) -> LoadSpec | None:
    """PT_LOAD for the kernel image mapping (_stext up to the end of what the page tables map), like the one
    /proc/vmcore has: gdb reads kernel symbols through it."""
    if vmci is None or not vmci.has("SYMBOL(_stext)"):
        return None
    start = va = vmci.symbol("_stext")
    try:
        kx = X86_64(source, vmci)
        pa0 = kx.walk(start)[0]
        while va < start + kx.kernel_image_size:
            pa, left = kx.walk(va)
            if pa - pa0 != va - start:
                break
            va += left
    except ImageError:
        if va == start:
            return None
    return LoadSpec(pa0, va - start, start) if va > start else None


def kernel_memmap(source: MemorySource, vmci: Vmcoreinfo | None) -> bytearray | None:
    """Per pfn 1 where the kernel has a struct page (its memory), 0 elsewhere; None if that cannot be told."""
    if vmci is None:
        return None
    try:
        sections = PageFilter(source, vmci).sections
    except ImageError:
        return None
    ps = source.page_size
    cov = ram_mask([MemRange(s.start_pfn * ps, (s.start_pfn + s.nr_pages) * ps) for s in sections], 0,
                   source.max_pfn, ps)
    return cov if 1 in cov else None


def keep_arrays(source: MemorySource, vmci: Vmcoreinfo | None, level: int) -> tuple[bytearray, bytearray]:
    """(RAM, keep) masks, one byte per pfn; memory the kernel has no struct page for (QEMU's BIOS ROM, VRAM) is
    left out, as makedumpfile does, so max_mapnr (their length) ends with the kernel's memory."""
    ram = bytearray(source.max_pfn)
    keep = bytearray(source.max_pfn)
    with memoryview(ram) as r, memoryview(keep) as k:  # memoryviews: a chunk cannot resize the masks
        for ch in plan(source, vmci, level):
            r[ch.pfn:ch.pfn + len(ch.ram)] = memoryview(ch.ram).cast("B")
            k[ch.pfn:ch.pfn + len(ch.keep)] = memoryview(ch.keep).cast("B")
    cov = kernel_memmap(source, vmci)
    if cov is not None:
        ram, keep = and_masks(ram, cov), and_masks(keep, cov)
    end = ram.rfind(1) + 1
    del ram[end:], keep[end:]
    return ram, keep


def elf_loads(keep: bytearray, page_size: int, vaddr_base: int) -> list[LoadSpec]:
    """PT_LOADs over kept pages (a 0/1 byte per pfn), bridging short excluded gaps."""
    loads: list[LoadSpec] = []
    for a, b in native.runs(keep):
        if loads and a * page_size - (loads[-1].paddr + loads[-1].size) < ELF_GAP_PAGES * page_size:
            last = loads.pop()
            loads.append(LoadSpec(last.paddr, b * page_size - last.paddr, last.vaddr))
        else:
            loads.append(LoadSpec(a * page_size, (b - a) * page_size, vaddr_base + a * page_size if vaddr_base else 0))
    return loads


def export(source: MemorySource, dest: str, *, fmt: str, compress: str = "zstd", flat: bool = False,
           elf32: bool = False, level: int = 0, vmci: Vmcoreinfo | None = None, threads: int = 2,
           sync: bool = True, progress: Callable[[int], None] | None = None) -> int:
    """Write ``source`` to ``dest`` ('-' = stdout) as ELF or kdump; a file goes to a temporary beside DEST, is
    fsync'd (unless ``sync`` is False) and renamed, and the directory fsync'd."""
    eff = check_source_level(source, level, False)
    ram, keep = keep_arrays(source, vmci, level)
    ps = source.page_size

    def run(out: BinaryIO) -> int:
        if fmt == "kdump":
            return write_kdump(out, source, keep, ram, notes=default_notes(source, vmci), utsname=utsname(source, vmci),
                               dump_level=eff, phys_base=(vmci.number_or("phys_base", 0) or 0) if vmci else 0,
                               crashtime=vmci.crashtime if vmci else 0, compress=compress, flat=flat,
                               threads=threads, progress=progress)
        if fmt != "elf":
            raise UsageErrorImage(f"unknown export format {fmt!r}; use elf or kdump")
        loads = elf_loads(keep, ps, page_offset(source, vmci))
        text = kernel_text_load(source, vmci) if not elf32 else None
        if text is not None:
            loads.insert(0, text)

        def read(paddr: int, n: int) -> bytes:
            pfn = paddr // ps
            try:
                want = keep[pfn:pfn + -(-n // ps)]
                want += bytes(-(-n // ps) - len(want))
                return read_kept(source, pfn, want)[:n]
            except AddressError as e:
                raise AddressError(f"{e} while exporting") from None

        return write_elf(out, loads, default_notes(source, vmci), read, elf32=elf32, progress=progress)

    if dest == "-":
        if sys.stdout.isatty():
            raise UsageErrorImage("refusing to write a dump to a terminal; redirect stdout or give a file name")
        return run(sys.stdout.buffer)
    with atomic_output(dest, sync=sync) as f:
        return run(f)
