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
from khibernate.image.errors import MissingVmcoreinfoError, UsageErrorImage
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
        """Layout from VMCOREINFO; MissingVmcoreinfoError when a field the filter needs is absent."""
        ch = v.offset_or("page.compound_head", None)
        if ch is None:
            ch = v.offset("page.lru")  # compound_head is the first word of the lru union
        buddy = v.number_or("PAGE_BUDDY_MAPCOUNT_VALUE", None)
        if buddy is None and v.number_or("PG_buddy", None) is None:
            buddy = -128  # makedumpfile's fallback for 2.6.39+ kernels without the export
        return cls(
            size=v.size("page"),
            off_flags=v.offset("page.flags"),
            off_mapping=v.offset("page.mapping"),
            off_mapcount=v.offset("page._mapcount"),
            off_private=v.offset("page.private"),
            off_compound_head=ch,
            pg_lru=v.number_or("PG_lru", None),
            pg_private=v.number_or("PG_private", None),
            pg_swapcache=v.number_or("PG_swapcache", None),
            pg_swapbacked=v.number_or("PG_swapbacked", None),
            pg_slab=v.number_or("PG_slab", None),
            pg_hwpoison=v.number_or("PG_hwpoison", None),
            buddy=buddy,
            slab=v.number_or("PAGE_SLAB_MAPCOUNT_VALUE", None),
            hugetlb=v.number_or("PAGE_HUGETLB_MAPCOUNT_VALUE", None),
            offline=v.number_or("PAGE_OFFLINE_MAPCOUNT_VALUE", None),
            unaccepted=v.number_or("PAGE_UNACCEPTED_MAPCOUNT_VALUE", None),
            max_order=(v.length("zone.free_area") if v.has("LENGTH(zone.free_area)") else 11),
            pg_head_mask=v.number_or("PG_head_mask", None),
            pg_hugetlb=v.number_or("PG_hugetlb", None),
            folio_dtor=v.offset_or("folio._folio_dtor", None),
            compound_dtor=v.offset_or("page.compound_dtor", None),
            hugetlb_dtor=v.number_or("HUGETLB_PAGE_DTOR", None),
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
            has_head_mask=int(self.pg_head_mask is not None), pg_head_mask=self.pg_head_mask or 0,
            dtor_offset=opt(dtor), hugetlb_dtor=opt(self.hugetlb_dtor), max_order=self.max_order)


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
        section_bits = v.number("SECTION_SIZE_BITS")
        per_section = 1 << (section_bits - self.page_size.bit_length() + 1)
        nr_mem_sections = 1 << (v.number("MAX_PHYSMEM_BITS") - section_bits)
        ms_size, ms_off = v.size("mem_section"), v.offset("mem_section.section_mem_map")
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

