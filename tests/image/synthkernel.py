"""A synthetic x86_64 kernel memory image, built in-process, with known page classes (like drgn's elfwriter).

It has real 4-level page tables (1 GiB direct-map pages, 2 MiB kernel-text pages, 4 KiB vmemmap pages), KASLR-like
randomised bases, a non-zero phys_base, SPARSEMEM_EXTREME mem_section with two sections, and struct pages in
6.12 layout for every class the filter knows.  ``expected`` holds the class of every pfn.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct

import numpy as np

from khibernate.elfcore import VMCOREINFO_NOTE, LoadSpec, Note
from khibernate.image.pagefilter import PageClass
from khibernate.image.sources.elf import write_elf

PS = 4096
MEM = 32 << 20
HOLE = (0x9F000, 0x100000)
START_KERNEL_MAP = 0xFFFFFFFF80000000
PAGE_OFFSET = 0xFFFF888000000000 + 5 * (1 << 30)  # "randomised" direct map base
VMEMMAP = 0xFFFFEA0000000000 + 3 * (1 << 30)
PAGE_OFFSET_L5 = 0xFF11000000000000 + 7 * (1 << 30)
VMEMMAP_L5 = 0xFFD4000000000000 + 2 * (1 << 30)
PHYS_BASE = 0x400000
KTEXT_VA = 0xFFFFFFFF81000000
SECTION_BITS = 24
THP_PFN, FOLIO_PFN, HUGETLB_PFN = 2048, 2560, 1536  # compound pages, clear of the kernel's own structures
PG = {"lru": 5, "head": 6, "swapcache": 10, "reserved": 12, "private": 13, "swapbacked": 19, "hwpoison": 22}
TYPE = {"buddy": 0xF0, "offline": 0xF1, "hugetlb": 0xF4, "slab": 0xF5, "unaccepted": 0xF7}
PAGE = struct.Struct("<QQQQQQiiQ")  # flags, lru.next(compound_head), lru.prev, mapping, index, private, mapcount,
# refcount, memcg


def _signed32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


@dataclasses.dataclass
class SynthKernel:
    """Physical memory bytes, RAM ranges, VMCOREINFO text and the expected class of each pfn."""

    mem: bytearray
    ranges: list[tuple[int, int]]
    vmcoreinfo: str
    expected: np.ndarray
    zero: np.ndarray
    page_offset: int = PAGE_OFFSET

    @property
    def notes(self) -> list[Note]:
        prstatus = Note("CORE", 1, bytes(336))
        return [prstatus, Note(VMCOREINFO_NOTE, 0, self.vmcoreinfo.encode())]

    def write_elf(self, path: str | os.PathLike[str], *, elf32: bool = False, qemu: bool = False,
                  kernel_alias: bool = True) -> None:
        """Write as an ELF core (QEMU style: all vaddr 0; kernel_alias: extra PT_LOAD for kernel text)."""
        loads = [LoadSpec(a, b - a, 0 if qemu or elf32 else self.page_offset + a) for a, b in self.ranges]
        if kernel_alias and not qemu and not elf32:
            loads.insert(0, LoadSpec(PHYS_BASE + 0x1000000, 0x200000, KTEXT_VA))
        with open(path, "wb") as f:
            write_elf(f, loads, self.notes, lambda pa, n: self.mem[pa:pa + n], elf32=elf32)


class _Alloc:
    def __init__(self, mem: bytearray, start: int):
        self.mem, self.next = mem, start

    def page(self) -> int:
        pa = self.next
        self.next += PS
        self.mem[pa:pa + PS] = bytes(PS)
        return pa


def _map(mem: bytearray, alloc: _Alloc, pgd: int, va: int, pa: int, level_size: int, l5: bool = False) -> None:
    """Map one page of ``level_size`` (4K, 2M or 1G) at va -> pa in 4- or 5-level tables rooted at pgd."""
    table = pgd
    for shift in (48, 39, 30, 21, 12) if l5 else (39, 30, 21, 12):
        idx = (va >> shift) & 0x1FF
        slot = table + idx * 8
        if 1 << shift == level_size:
            flags = 0x3 | (0x80 if shift in (30, 21) else 0)
            struct.pack_into("<Q", mem, slot, pa | flags)
            return
        (entry,) = struct.unpack_from("<Q", mem, slot)
        if not entry & 1:
            new = alloc.page()
            struct.pack_into("<Q", mem, slot, new | 0x3)
            entry = new | 0x3
        table = entry & 0x000FFFFFFFFFF000


OLD_TYPES = {"buddy": -129, "offline": -257}  # before 6.12 page types were bits cleared in _mapcount
PG_SLAB_OLD, PG_HUGETLB_66, HUGETLB_PAGE_DTOR = 9, 23, 2


def build(seed: int = 1, *, l5: bool = False, extreme: bool = True, variant: str = "6.12") -> SynthKernel:
    """Build the synthetic kernel memory (``l5``: 5-level paging; ``extreme``: SPARSEMEM_EXTREME; ``variant``:
    how the kernel marks page types - "6.12" (type byte), "6.6" (PG_hugetlb), "6.3" (folio dtor), "6.1"
    (compound_dtor, PG_slab, bit-cleared buddy/offline values))."""
    old = variant != "6.12"

    def mc(kind: str) -> int:
        if variant == "6.1" and kind in OLD_TYPES:
            return OLD_TYPES[kind]
        if old and kind in ("slab", "hugetlb") and (variant == "6.1" or kind == "hugetlb"):
            return -1  # these kernels mark them elsewhere
        return _signed32(TYPE[kind] << 24)

    page_offset = PAGE_OFFSET_L5 if l5 else PAGE_OFFSET
    vmemmap = VMEMMAP_L5 if l5 else VMEMMAP
    physmem_bits = 52 if l5 else 46
    rnd = random.Random(seed)
    mem = bytearray(MEM)
    npfn = MEM // PS
    # every page gets some non-zero content by default
    filler = bytes(rnd.getrandbits(8) for _ in range(PS))
    for pfn in range(npfn):
        mem[pfn * PS:(pfn + 1) * PS] = filler[pfn % 97:] + filler[:pfn % 97]
    mem[HOLE[0]:HOLE[1]] = bytes(HOLE[1] - HOLE[0])
    ktext_pa = PHYS_BASE + 0x1000000  # 0x1400000: kernel image, 2 MiB
    pgd = ktext_pa  # init_top_pgt at the start of the "kernel image"
    mem[pgd:pgd + PS] = bytes(PS)
    alloc = _Alloc(mem, 0x1600000)  # page-table pool
    _map(mem, alloc, pgd, KTEXT_VA, ktext_pa, 1 << 21, l5)
    _map(mem, alloc, pgd, page_offset, 0, 1 << 30, l5)
    memmap_pa = 0x1700000  # struct page array: npfn * 64 = 512 KiB
    for i in range(npfn * 64 // PS):
        _map(mem, alloc, pgd, vmemmap + i * PS, memmap_pa + i * PS, PS, l5)
    # mem_section (EXTREME): root pointer array + one root page
    roots_pa, root_pa = 0x1800000, 0x1801000
    mem[roots_pa:roots_pa + 2 * PS] = bytes(2 * PS)
    struct.pack_into("<Q", mem, roots_pa, page_offset + root_pa)
    per_section = 1 << (SECTION_BITS - 12)
    table = root_pa if extreme else roots_pa  # non-EXTREME: mem_section is a static array of sections
    for nr in range(npfn // per_section):
        coded = vmemmap  # mem_map VA minus section start pfn * sizeof(struct page)
        struct.pack_into("<QQ", mem, table + nr * 16, coded | 0x7, 0)

    expected = np.full(npfn, PageClass.OTHER, dtype=np.uint8)
    zero = np.zeros(npfn, dtype=bool)
    pages = [[1 << PG["reserved"], 0, 0, 0, 0, 0, -1, 1, 0] for _ in range(npfn)]

    def normal(pfn: int, flags: int = 0, mapping: int = 0, private: int = 0, mapcount: int = -1) -> None:
        pages[pfn] = [flags, 0, 0, mapping, 0, private, mapcount, 1, 0]

    def buddy(pfn: int, order: int) -> None:
        pages[pfn] = [0, 0, 0, 0, 0, order, mc("buddy"), 0, 0]
        for p in range(pfn + 1, pfn + (1 << order)):
            pages[p] = [0, 0, 0, 0, 0, 0, -1, 0, 0]
        expected[pfn:pfn + (1 << order)] = PageClass.FREE

    def compound(pfn: int, order: int, cls: PageClass, **head: int) -> None:
        normal(pfn, flags=head.get("flags", 0) | 1 << PG["head"], mapping=head.get("mapping", 0),
               mapcount=head.get("mapcount", -1))
        for p in range(pfn + 1, pfn + (1 << order)):
            pages[p] = [order if p == pfn + 1 else 0, vmemmap + pfn * 64 + 1, 0, 0, 0, 0, -1, 0, 0]
        expected[pfn:pfn + (1 << order)] = cls

    anon_map = page_offset + 0x1900001  # anon_vma | PAGE_MAPPING_ANON
    file_map = page_offset + 0x1900100
    # buddy blocks, one crossing the section boundary region and chunk boundaries
    buddy(3072, 10)  # 3072..4095, ends at the section boundary
    buddy(4096, 9)
    buddy(4608, 3)
    buddy(4616, 0)
    buddy(300, 2)
    buddy(HOLE[1] // PS, 8)  # 256..511, right after the hole
    # anonymous pages, some zero-filled
    for pfn in range(1000, 1200):
        normal(pfn, flags=1 << PG["lru"] | 1 << PG["swapbacked"], mapping=anon_map)
        expected[pfn] = PageClass.USER
        if pfn % 3 == 0:
            mem[pfn * PS:(pfn + 1) * PS] = bytes(PS)
    # page cache without / with private; swap cache (anon) counts as user
    for pfn in range(1200, 1400):
        normal(pfn, flags=1 << PG["lru"], mapping=file_map)
        expected[pfn] = PageClass.CACHE
    for pfn in range(1400, 1450):
        normal(pfn, flags=1 << PG["lru"] | 1 << PG["private"], mapping=file_map, private=page_offset + 0x1234)
        expected[pfn] = PageClass.CACHE_PRIVATE
    for pfn in range(1450, 1460):  # swap cache, not on LRU, not anon-mapped
        normal(pfn, flags=1 << PG["swapcache"] | 1 << PG["swapbacked"], mapping=0)
        expected[pfn] = PageClass.CACHE
    # slab with an odd 'mapping' alias must not count as anon (the 6.2 regression)
    for pfn in range(1460, 1470):
        normal(pfn, mapping=0x11, mapcount=mc("slab"), flags=(1 << PG_SLAB_OLD) if variant == "6.1" else 0)
    # THP (anon, order 9), page-cache large folio (order 2), hugetlb (order 9): away from the kernel image, page
    # tables, memmap and mem_section (pfns 5120..6145), which a filtered dump must keep
    compound(THP_PFN, 9, PageClass.USER, flags=1 << PG["lru"], mapping=anon_map)
    compound(FOLIO_PFN, 2, PageClass.CACHE, flags=1 << PG["lru"], mapping=file_map)
    compound(HUGETLB_PFN, 9, PageClass.USER, mapcount=mc("hugetlb"), mapping=file_map)
    if variant == "6.6":
        pages[HUGETLB_PFN + 1][0] |= 1 << PG_HUGETLB_66
    elif old:
        pages[HUGETLB_PFN + 1][2] = HUGETLB_PAGE_DTOR  # byte 16 of the first tail: folio._folio_dtor
    # hwpoison and offline
    normal(7000, flags=1 << PG["hwpoison"])
    expected[7000] = PageClass.UNUSABLE
    normal(7001, mapcount=mc("offline"))
    expected[7001] = PageClass.UNUSABLE
    # free pages on per-cpu lists: refcount 0, no type -> not free (like /proc/kpageflags)
    normal(7002)
    # zero-filled kernel pages
    for pfn in range(7100, 7164):
        mem[pfn * PS:(pfn + 1) * PS] = bytes(PS)
    kernel_pages = {pgd // PS, *range(0x1600000 // PS, alloc.next // PS), *range(memmap_pa // PS, (memmap_pa + npfn
                    * 64) // PS), roots_pa // PS, root_pa // PS}
    wrong = sorted(p for p in kernel_pages if expected[p] != PageClass.OTHER)
    assert not wrong, f"synthetic kernel structures lie in pages classed as droppable: pfns {wrong[:8]}"
    for pfn, f in enumerate(pages):
        PAGE.pack_into(mem, memmap_pa + pfn * 64, *[x & ((1 << 64) - 1) if i != 6 and i != 7 else x
                                                       for i, x in enumerate(f)])
    ranges = [(0, HOLE[0]), (HOLE[1], MEM)]
    ram = np.zeros(npfn, dtype=bool)
    for a, b in ranges:
        ram[a // PS:b // PS] = True
    expected[~ram] = PageClass.NO_PAGE
    for pfn in range(npfn):
        if ram[pfn] and not any(mem[pfn * PS:(pfn + 1) * PS]):
            zero[pfn] = True
    mapcount = {k: mc(k) for k in TYPE if not (old and k == "hugetlb") and not (variant == "6.1" and k == "slab")}
    extra = {"6.6": [f"NUMBER(PG_hugetlb)={PG_HUGETLB_66}"],
             "6.3": ["OFFSET(folio._folio_dtor)=80", f"NUMBER(HUGETLB_PAGE_DTOR)={HUGETLB_PAGE_DTOR}"],
             "6.1": ["OFFSET(page.compound_dtor)=16", f"NUMBER(HUGETLB_PAGE_DTOR)={HUGETLB_PAGE_DTOR}",
                     f"NUMBER(PG_slab)={PG_SLAB_OLD}"]}.get(variant, [])
    lines = [
        "OSRELEASE=6.12.0-synth", "BUILD-ID=0123456789abcdef0123456789abcdef01234567", "PAGESIZE=4096",
        f"SYMBOL(init_top_pgt)={KTEXT_VA:x}",
        f"SYMBOL(mem_section)={(page_offset + roots_pa) if extreme else (KTEXT_VA + roots_pa - ktext_pa):x}",
        f"LENGTH(mem_section)={(1 << (physmem_bits - SECTION_BITS)) // ((PS // 16) if extreme else 1)}",
        "SIZE(mem_section)=16",
        "OFFSET(mem_section.section_mem_map)=0", f"NUMBER(SECTION_SIZE_BITS)={SECTION_BITS}",
        f"NUMBER(MAX_PHYSMEM_BITS)={physmem_bits}", "SIZE(page)=64", "OFFSET(page.flags)=0",
        "OFFSET(page._refcount)=52",
        "OFFSET(page.mapping)=24", "OFFSET(page.lru)=8", "OFFSET(page._mapcount)=48", "OFFSET(page.private)=40",
        "OFFSET(page.compound_head)=8", "LENGTH(zone.free_area)=11",
        *(f"NUMBER(PG_{k})={v}" for k, v in PG.items() if k != "head"),
        f"NUMBER(PG_head_mask)={1 << PG['head']}",
        *(f"NUMBER(PAGE_{k.upper()}_MAPCOUNT_VALUE)={v}" for k, v in mapcount.items()), *extra,
        f"NUMBER(phys_base)={PHYS_BASE}", f"NUMBER(pgtable_l5_enabled)={int(l5)}", "KERNELOFFSET=0",
        "NUMBER(KERNEL_IMAGE_SIZE)=1073741824", "CRASHTIME=1795318107",
    ]
    return SynthKernel(mem, ranges, "\n".join(lines) + "\n", expected, zero, page_offset)
