"""Which pages to keep: makedumpfile's dump levels, decided from ``struct page`` read out of the image itself.

Dump level bits (makedumpfile's): 1 zero, 2 cache without private, 4 cache with private, 8 user, 16 free.
Pages are classified by the native kernel (khibernate/native/pages.c) over whole chunks of ``struct page``, using
only VMCOREINFO offsets and page-type values, so no vmlinux is needed and no per-page Python runs.  Zero pages are
found later, from page contents, by the writers (``native.zero_pages``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from khibernate import native
from khibernate.image.errors import CorruptImageError, MissingVmcoreinfoError, UsageErrorImage
from khibernate.image.levels import DL_CACHE as DL_CACHE
from khibernate.image.levels import DL_CACHE_PRI as DL_CACHE_PRI
from khibernate.image.levels import DL_FREE as DL_FREE
from khibernate.image.levels import DL_USER as DL_USER
from khibernate.image.levels import DL_ZERO as DL_ZERO
from khibernate.image.levels import MAX_DUMP_LEVEL as MAX_DUMP_LEVEL
from khibernate.image.levels import RESTORABLE_LEVEL as RESTORABLE_LEVEL
from khibernate.image.levels import PageClass as PageClass
from khibernate.image.sources.base import MemorySource
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.image.x86_64 import X86_64

SECTION_MAP_MASK = ~((1 << 5) - 1)  # makedumpfile's SECTION_MAP_LAST_BIT (4.13+)
SECTION_MARKED_PRESENT, SECTION_HAS_MEM_MAP = 1 << 0, 1 << 1
U64 = (1 << 64) - 1

# What a kernel can have, for the VMCOREINFO numbers the filter reads (CorruptImageError naming the field otherwise)
STRUCT_PAGE_BYTES = (32, 256)  # x86_64: 64 (80 with KMSAN); no configuration comes near 256
FLAG_BIT = (0, 63)  # PG_* are bit numbers in page->flags, an unsigned long
MAPCOUNT = (-(1 << 31), (1 << 32) - 1)  # page types live in the 32-bit _mapcount / page_type
PAGE_ORDERS = (1, 32)  # LENGTH(zone.free_area) = NR_PAGE_ORDERS: 11 on x86_64, at most ~16 anywhere
SECTION_BITS_MAX = 32  # SECTION_SIZE_BITS: 27 on x86_64, 30 the most any architecture used
PHYSMEM_BITS = (32, 64)  # MAX_PHYSMEM_BITS: 32 (arm, i386) .. 52 today, bounded by the 64-bit physical address
MEM_SECTION_BYTES = (8, 256)  # struct mem_section: 16, 32 with page_ext


# Which dump-level bits drop which class; UNUSABLE goes whenever struct pages are read (level > 1), as in makedumpfile.
CLASS_LEVEL_BITS = {
    PageClass.CACHE: DL_CACHE | DL_CACHE_PRI,
    PageClass.CACHE_PRIVATE: DL_CACHE_PRI,
    PageClass.USER: DL_USER,
    PageClass.FREE: DL_FREE,
    PageClass.UNUSABLE: MAX_DUMP_LEVEL & ~DL_ZERO,
}


def check_level(level: int, restorable: bool) -> int:
    """Validated dump level; ``restorable`` allows only zero|free (what a resumed kernel can live without)."""
    if not 0 <= level <= MAX_DUMP_LEVEL:
        raise UsageErrorImage(f"dump level {level} is out of range; use 0..31 (makedumpfile's -d)")
    if restorable and level & ~RESTORABLE_LEVEL:
        raise UsageErrorImage(f"dump level {level} drops cache or user pages, which a restored kernel needs; "
                              f"with --restorable use at most {RESTORABLE_LEVEL} (zero + free)")
    return level


def excluded_classes(level: int) -> bytes:
    """Lookup table class -> 1 if ``level`` drops that class (indexed by PageClass, 256 entries: bytes.translate)."""
    table = bytearray(256)
    if level:
        for cls, bits in CLASS_LEVEL_BITS.items():
            table[cls] = 1 if level & bits else 0
    return bytes(table)


def needs_struct_page(level: int) -> bool:
    """True if ``level`` needs page classes (anything beyond zero pages)."""
    return bool(level & ~DL_ZERO)


@dataclasses.dataclass(frozen=True)
class Section:
    """One present SPARSEMEM section: its first pfn, page count and the VA of its struct page array."""

    start_pfn: int
    nr_pages: int
    mem_map: int


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """Where the filter's fields live in ``struct page`` and which values mean what, from VMCOREINFO."""

    size: int
    off_flags: int
    off_mapping: int
    off_mapcount: int
    off_private: int
    off_compound_head: int
    pg_lru: int | None
    pg_private: int | None
    pg_swapcache: int | None
    pg_swapbacked: int | None
    pg_slab: int | None
    pg_hwpoison: int | None
    buddy: int | None
    slab: int | None
    hugetlb: int | None
    offline: int | None
    unaccepted: int | None
    max_order: int
    pg_head_mask: int | None = None
    pg_hugetlb: int | None = None  # 6.6-6.8: flag in the first tail page's flags
    folio_dtor: int | None = None  # 6.3-6.5: offset of folio._folio_dtor from the head struct page
    compound_dtor: int | None = None  # before 6.3: offset of page.compound_dtor in the first tail page
    hugetlb_dtor: int | None = None  # NUMBER(HUGETLB_PAGE_DTOR)

    @classmethod
    def from_vmcoreinfo(cls, v: Vmcoreinfo) -> PageLayout:
        """Layout from VMCOREINFO; MissingVmcoreinfoError when a field the filter needs is absent,
        CorruptImageError naming a field outside what a kernel can have (the classifier reads struct pages at these
        offsets: every one must lie inside the struct)."""
        size = v.size("page", STRUCT_PAGE_BYTES)
        if size % 8:
            raise CorruptImageError(f"VMCOREINFO SIZE(page)={size} is not a multiple of 8 (struct page holds longs); "
                                    "the dump's VMCOREINFO is corrupt - give a good copy with --vmcoreinfo FILE")
        word, half = (0, size - 8), (0, size - 4)
        ch = v.offset_or("page.compound_head", None, word)
        if ch is None:
            ch = v.offset("page.lru", word)  # compound_head is the first word of the lru union
        buddy = v.number_or("PAGE_BUDDY_MAPCOUNT_VALUE", None, MAPCOUNT)
        if buddy is None and v.number_or("PG_buddy", None, FLAG_BIT) is None:
            buddy = -128  # makedumpfile's fallback for 2.6.39+ kernels without the export

        def flag(name: str) -> int | None:
            return v.number_or(name, None, FLAG_BIT)

        def mapcount(name: str) -> int | None:
            return v.number_or(name, None, MAPCOUNT)

        return cls(
            size=size,
            off_flags=v.offset("page.flags", word),
            off_mapping=v.offset("page.mapping", word),
            off_mapcount=v.offset("page._mapcount", half),
            off_private=v.offset("page.private", word),
            off_compound_head=ch,
            pg_lru=flag("PG_lru"),
            pg_private=flag("PG_private"),
            pg_swapcache=flag("PG_swapcache"),
            pg_swapbacked=flag("PG_swapbacked"),
            pg_slab=flag("PG_slab"),
            pg_hwpoison=flag("PG_hwpoison"),
            buddy=buddy,
            slab=mapcount("PAGE_SLAB_MAPCOUNT_VALUE"),
            hugetlb=mapcount("PAGE_HUGETLB_MAPCOUNT_VALUE"),
            offline=mapcount("PAGE_OFFLINE_MAPCOUNT_VALUE"),
            unaccepted=mapcount("PAGE_UNACCEPTED_MAPCOUNT_VALUE"),
            max_order=(v.length("zone.free_area", PAGE_ORDERS) if v.has("LENGTH(zone.free_area)") else 11),
            pg_head_mask=v.number_or("PG_head_mask", None, (1, (1 << 64) - 1)),
            pg_hugetlb=flag("PG_hugetlb"),
            folio_dtor=v.offset_or("folio._folio_dtor", None, (0, 4 * size - 1)),
            compound_dtor=v.offset_or("page.compound_dtor", None, (0, size - 1)),
            hugetlb_dtor=v.number_or("HUGETLB_PAGE_DTOR", None, (0, 255)),
        )

    def native(self) -> object:
        """The ``struct kh_layout`` the native classifier reads (absent numbers as -1 / has_* = 0)."""

        def opt(v: int | None) -> int:
            return -1 if v is None else v

        dtor = self.folio_dtor if self.folio_dtor is not None else (
            self.size + self.compound_dtor if self.compound_dtor is not None else None)
        return native.layout(
            size=self.size, off_flags=self.off_flags, off_mapping=self.off_mapping, off_mapcount=self.off_mapcount,
            off_private=self.off_private, off_compound_head=self.off_compound_head, pg_lru=opt(self.pg_lru),
            pg_private=opt(self.pg_private), pg_swapcache=opt(self.pg_swapcache),
            pg_swapbacked=opt(self.pg_swapbacked), pg_slab=opt(self.pg_slab), pg_hwpoison=opt(self.pg_hwpoison),
            pg_hugetlb=opt(self.pg_hugetlb), buddy=self.buddy or 0, slab=self.slab or 0, hugetlb=self.hugetlb or 0,
            offline=self.offline or 0, unaccepted=self.unaccepted or 0, has_buddy=int(self.buddy is not None),
            has_slab=int(self.slab is not None), has_hugetlb=int(self.hugetlb is not None),
            has_offline=int(self.offline is not None), has_unaccepted=int(self.unaccepted is not None),
            has_head_mask=int(self.pg_head_mask is not None), pg_head_mask=_as_int64(self.pg_head_mask or 0),
            dtor_offset=opt(dtor), hugetlb_dtor=opt(self.hugetlb_dtor), max_order=self.max_order)


def _as_int64(mask: int) -> int:
    """A 64-bit flag mask as the int64_t field holds it (bit 63 set means negative)."""
    return mask - (1 << 64) if mask >= 1 << 63 else mask


class PageFilter:
    """Classifies every pfn of a source's kernel by reading its ``struct page`` arrays through the image."""

    def __init__(self, source: MemorySource, vmci: Vmcoreinfo):
        self.source = source
        self.vmci = vmci
        self.page_size = vmci.page_size
        self.kx = X86_64(source, vmci)
        self.layout = PageLayout.from_vmcoreinfo(vmci)
        self._layout_c = self.layout.native()
        self._classifier = native.Classifier(self._layout_c, 1 << 15)
        # its own buffers: a head looked up while a chunk's far tails are resolved must not clobber that chunk's
        self._head_classifier = native.Classifier(self._layout_c, 2)
        self.sections = list(self._sections())
        bases = {(s.mem_map - s.start_pfn * self.layout.size) & U64 for s in self.sections}
        self.vmemmap = bases.pop() if len(bases) == 1 else None
        self._head_cache: dict[int, int] = {}

    def _sections(self) -> Iterator[Section]:
        """Present SPARSEMEM sections below max_pfn, from mem_section (EXTREME or static)."""
        v, kx = self.vmci, self.kx
        for key in ("SYMBOL(mem_section)", "SIZE(mem_section)", "OFFSET(mem_section.section_mem_map)"):
            if not v.has(key):
                raise MissingVmcoreinfoError(f"VMCOREINFO has no {key}; only SPARSEMEM kernels can be filtered")
        page_shift = self.page_size.bit_length() - 1
        section_bits = v.number("SECTION_SIZE_BITS", (page_shift + 1, SECTION_BITS_MAX))
        per_section = 1 << (section_bits - page_shift)
        physmem_bits = v.number("MAX_PHYSMEM_BITS", (max(PHYSMEM_BITS[0], section_bits), PHYSMEM_BITS[1]))
        top = self.source.ranges[-1].end - 1 if self.source.ranges else 0
        if top.bit_length() > physmem_bits:
            raise CorruptImageError(f"VMCOREINFO NUMBER(MAX_PHYSMEM_BITS)={physmem_bits} is below the dump's highest "
                                    f"RAM address {top:#x}; the dump's VMCOREINFO is corrupt - give a good copy with "
                                    "--vmcoreinfo FILE")
        nr_mem_sections = 1 << (physmem_bits - section_bits)
        ms_size = v.size("mem_section", (MEM_SECTION_BYTES[0], min(MEM_SECTION_BYTES[1], self.page_size)))
        ms_off = v.offset("mem_section.section_mem_map", (0, ms_size - 8))
        extreme = v.length("mem_section") != nr_mem_sections if v.has("LENGTH(mem_section)") else True
        per_root = self.page_size // ms_size if extreme else 1
        base = v.symbol("mem_section")
        wanted = -(-self.source.max_pfn // per_section)
        root_va = 0
        for nr in range(min(wanted, nr_mem_sections)):
            if nr % per_root == 0:
                root_va = kx.read_u64(base + 8 * (nr // per_root)) if extreme else base + nr * ms_size
                if extreme and root_va == 0:
                    continue
            if extreme and root_va == 0:
                continue
            entry = root_va + (nr % per_root) * ms_size if extreme else root_va
            coded = kx.read_u64(entry + ms_off)
            if coded & (SECTION_MARKED_PRESENT | SECTION_HAS_MEM_MAP) != SECTION_MARKED_PRESENT | SECTION_HAS_MEM_MAP:
                continue
            start = nr * per_section
            yield Section(start, per_section, ((coded & SECTION_MAP_MASK) + start * self.layout.size) & U64)

    def _struct_pages(self, sec: Section, first: int, count: int) -> bytes:
        """Raw struct pages of pfns first..first+count of ``sec``."""
        va = sec.mem_map + (first - sec.start_pfn) * self.layout.size
        return self.kx.read(va, count * self.layout.size)

    def _head_class(self, head_pfn: int) -> int:
        """Class of a compound head outside the current chunk (a large folio crossing a chunk), cached."""
        cls = self._head_cache.get(head_pfn)
        if cls is None:
            for sec in self.sections:
                if sec.start_pfn <= head_pfn < sec.start_pfn + sec.nr_pages:
                    # the head and its first tail: kernels before 6.9 mark hugetlb in the first tail
                    n = min(2, sec.start_pfn + sec.nr_pages - head_pfn)
                    va = sec.mem_map + (head_pfn - sec.start_pfn) * self.layout.size
                    hc = self._head_classifier
                    hc.classify(self._struct_pages(sec, head_pfn, n), n, va, 0)
                    cls = int(PageClass.FREE) if hc.in_free_block(0) else hc.own_class(0)
                    break
            else:
                cls = int(PageClass.OTHER)
            self._head_cache[head_pfn] = cls
        return cls

    def _pfn_of_page_va(self, va: int) -> int:
        """pfn a struct page VA describes (vmemmap base, or a search of the sections); -1 if none."""
        if self.vmemmap is not None:
            return ((va - self.vmemmap) & U64) // self.layout.size
        for sec in self.sections:
            lo, hi = sec.mem_map, sec.mem_map + sec.nr_pages * self.layout.size
            if lo <= va < hi:
                return sec.start_pfn + (va - lo) // self.layout.size
        return -1

    def classes(self, chunk: int = 1 << 15) -> Iterator[tuple[int, bytearray]]:
        """(first pfn, class per pfn) for every pfn below max_pfn, in order; pfns without struct page are NO_PAGE."""
        if chunk > self._classifier.chunk:
            self._classifier = native.Classifier(self._layout_c, chunk)
        max_pfn = self.source.max_pfn
        carry = 0
        pfn = 0
        secs = iter(self.sections)
        sec = next(secs, None)
        while pfn < max_pfn:
            while sec is not None and sec.start_pfn + sec.nr_pages <= pfn:
                sec = next(secs, None)
            if sec is None or sec.start_pfn > pfn:
                stop = min(max_pfn, sec.start_pfn if sec else max_pfn)
                yield pfn, bytearray([PageClass.NO_PAGE]) * (stop - pfn)
                carry = max(0, carry - (stop - pfn))
                pfn = stop
                continue
            n = min(chunk, sec.start_pfn + sec.nr_pages - pfn, max_pfn - pfn)
            va = sec.mem_map + (pfn - sec.start_pfn) * self.layout.size
            cls, carry, far = self._classifier.classify(self._struct_pages(sec, pfn, n), n, va, carry)
            for i, head_va in far:
                h = self._pfn_of_page_va(head_va)
                if pfn <= h < pfn + n:  # inside after all (sections without one vmemmap): the head's own class
                    cls[i] = self._classifier.own_class(h - pfn)
                else:
                    cls[i] = self._head_class(h) if h >= 0 else PageClass.OTHER
            yield pfn, cls
            pfn += n

