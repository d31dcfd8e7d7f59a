"""Which pages to keep: makedumpfile's dump levels, decided from ``struct page`` read out of the image itself.

Dump level bits (makedumpfile's): 1 zero, 2 cache without private, 4 cache with private, 8 user, 16 free.
Pages are classified in vectorised passes (numpy) over whole sections of ``struct page``, using only VMCOREINFO
offsets and page-type values, so no vmlinux is needed and no per-page Python runs.  Zero pages are found later,
from page contents, by the writer (:func:`zero_pages`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

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


def excluded_classes(level: int) -> np.ndarray:
    """Lookup table class -> 1 if ``level`` drops that class (indexed by PageClass)."""
    table = np.zeros(256, dtype=bool)
    if level:
        for cls, bits in CLASS_LEVEL_BITS.items():
            table[cls] = bool(level & bits)
    return table


def needs_struct_page(level: int) -> bool:
    """True if ``level`` needs page classes (anything beyond zero pages)."""
    return bool(level & ~DL_ZERO)


def zero_pages(data: bytes | memoryview | np.ndarray, page_size: int = 4096) -> np.ndarray:
    """Per-page bool: True where the page is all zero bytes (``data`` is a whole number of pages)."""
    a = np.frombuffer(data, dtype=np.uint64).reshape(-1, page_size // 8)
    return np.asarray(~a.any(axis=1))


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

    def dtype(self) -> np.dtype:
        """numpy dtype viewing one ``struct page``."""
        return np.dtype({
            "names": ["flags", "mapping", "mapcount", "private", "compound_head"],
            "formats": ["<u8", "<u8", "<i4", "<u8", "<u8"],
            "offsets": [self.off_flags, self.off_mapping, self.off_mapcount, self.off_private,
                        self.off_compound_head],
            "itemsize": self.size,
        })


def _bit(flags: np.ndarray, bit: int | None) -> np.ndarray:
    """Per-page bool: bit ``bit`` of ``flags`` (all False when the kernel does not export it)."""
    if bit is None:
        return np.zeros(flags.shape, dtype=bool)
    return ((flags >> np.uint64(bit)) & np.uint64(1)).astype(bool)


def _is_type(mapcount: np.ndarray, value: int | None) -> np.ndarray:
    """Page-type test: 6.12+ types are a value in the top byte (low 24 bits free), older ones a whole-word value."""
    if value is None:
        return np.zeros(mapcount.shape, dtype=bool)
    v = value & 0xFFFFFFFF
    if v & 0xFFFFFF == 0 and v >> 24 != 0xFF:
        return np.asarray((mapcount.view(np.uint32) >> np.uint32(24)) == np.uint32(v >> 24))
    return np.asarray(mapcount.view(np.uint32) == np.uint32(v))


def _old_hugetlb(pages: np.ndarray, lay: PageLayout) -> np.ndarray:
    """hugetlb heads on kernels before 6.9 (no page type): PG_hugetlb in the first tail's flags (6.6-6.8), the
    folio destructor byte (6.3-6.5) or page.compound_dtor of the first tail (older)."""
    out = np.zeros(len(pages), dtype=bool)
    if lay.pg_head_mask is None:
        return out
    heads = np.flatnonzero((pages["flags"] & np.uint64(lay.pg_head_mask)) != 0)
    heads = heads[heads + 1 < len(pages)]
    if not len(heads):
        return out
    if lay.pg_hugetlb is not None:
        out[heads] = _bit(pages["flags"][heads + 1], lay.pg_hugetlb)
        return out
    off = lay.folio_dtor if lay.folio_dtor is not None else (
        lay.size + lay.compound_dtor if lay.compound_dtor is not None else None)
    if off is None or lay.hugetlb_dtor is None:
        return out
    raw = pages.view(np.uint8).reshape(len(pages), lay.size)
    rows = heads + off // lay.size
    ok = rows < len(pages)
    out[heads[ok]] = raw[rows[ok], off % lay.size] == lay.hugetlb_dtor
    return out


def classify(pages: np.ndarray, lay: PageLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class per page, free-block page counts at buddy heads (0 elsewhere), tail mask) for a struct page array."""
    flags, mapping, mc = pages["flags"], pages["mapping"], pages["mapcount"]
    slab = _is_type(mc, lay.slab) | _bit(flags, lay.pg_slab)
    buddy = _is_type(mc, lay.buddy) & ~slab
    unaccepted = _is_type(mc, lay.unaccepted)
    anon = ((mapping & np.uint64(1)) != 0) & ~slab
    hugetlb = _is_type(mc, lay.hugetlb) if lay.hugetlb is not None else _old_hugetlb(pages, lay)
    lru = _bit(flags, lay.pg_lru)
    swapcache = _bit(flags, lay.pg_swapcache)
    if lay.pg_swapbacked is not None:
        swapcache &= _bit(flags, lay.pg_swapbacked)
    cache = (lru | swapcache) & ~anon & ~slab
    private = _bit(flags, lay.pg_private)
    cls = np.zeros(len(pages), dtype=np.uint8)
    cls[cache & ~private] = PageClass.CACHE
    cls[cache & private] = PageClass.CACHE_PRIVATE
    cls[anon | hugetlb] = PageClass.USER
    cls[_bit(flags, lay.pg_hwpoison) | _is_type(mc, lay.offline)] = PageClass.UNUSABLE
    order = pages["private"]
    span = np.zeros(len(pages), dtype=np.int64)
    ok = buddy & (order < np.uint64(lay.max_order))
    span[ok] = np.left_shift(1, order[ok].astype(np.int64))
    span[buddy & ~ok] = 1
    span[unaccepted] = 1 << (lay.max_order - 1)
    tail = (pages["compound_head"] & np.uint64(1)) != 0
    return cls, span, tail


def expand_spans(span: np.ndarray, carry: int) -> tuple[np.ndarray, int]:
    """Mask of pages covered by blocks starting at nonzero ``span`` entries (+``carry`` pages from before)."""
    n = len(span)
    diff = np.zeros(n + 1, dtype=np.int32)
    if carry:
        diff[0] += 1
        diff[min(carry, n)] -= 1
    heads = np.flatnonzero(span)
    ends = heads + span[heads]
    np.add.at(diff, heads, 1)
    np.add.at(diff, np.minimum(ends, n), -1)
    rest = max(int(ends.max()) - n if len(ends) else 0, carry - n, 0)
    return np.cumsum(diff[:n]) > 0, rest


class PageFilter:
    """Classifies every pfn of a source's kernel by reading its ``struct page`` arrays through the image."""

    def __init__(self, source: MemorySource, vmci: Vmcoreinfo):
        self.source = source
        self.vmci = vmci
        self.page_size = vmci.page_size
        self.kx = X86_64(source, vmci)
        self.layout = PageLayout.from_vmcoreinfo(vmci)
        self.dtype = self.layout.dtype()
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

    def _struct_pages(self, sec: Section, first: int, count: int) -> np.ndarray:
        """struct pages of pfns first..first+count of ``sec`` as a numpy structured array."""
        va = sec.mem_map + (first - sec.start_pfn) * self.layout.size
        data = self.kx.read(va, count * self.layout.size)
        return np.frombuffer(data, dtype=self.dtype)

    def _head_class(self, head_pfn: int) -> int:
        """Class of a compound head outside the current chunk (a large folio crossing a chunk), cached."""
        cls = self._head_cache.get(head_pfn)
        if cls is None:
            for sec in self.sections:
                if sec.start_pfn <= head_pfn < sec.start_pfn + sec.nr_pages:
                    # the head and its first tail: kernels before 6.9 mark hugetlb in the first tail
                    n = min(2, sec.start_pfn + sec.nr_pages - head_pfn)
                    c, span, _ = classify(self._struct_pages(sec, head_pfn, n), self.layout)
                    cls = int(PageClass.FREE if span[0] else c[0])
                    break
            else:
                cls = int(PageClass.OTHER)
            self._head_cache[head_pfn] = cls
        return cls

    def _pfn_of_page_va(self, va: np.ndarray) -> np.ndarray:
        """pfn described by each struct page VA (vmemmap base, or a search of the sections)."""
        if self.vmemmap is not None:
            return ((va - np.uint64(self.vmemmap)) // np.uint64(self.layout.size)).astype(np.int64)
        out = np.full(len(va), -1, dtype=np.int64)
        for sec in self.sections:
            lo, hi = sec.mem_map, sec.mem_map + sec.nr_pages * self.layout.size
            m = (va >= np.uint64(lo)) & (va < np.uint64(hi))
            out[m] = sec.start_pfn + ((va[m] - np.uint64(lo)) // np.uint64(self.layout.size)).astype(np.int64)
        return out

    def classes(self, chunk: int = 1 << 15) -> Iterator[tuple[int, np.ndarray]]:
        """(first pfn, class per pfn) for every pfn below max_pfn, in order; pfns without struct page are NO_PAGE."""
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
                out = np.full(stop - pfn, PageClass.NO_PAGE, dtype=np.uint8)
                yield pfn, out
                carry = max(0, carry - len(out))
                pfn = stop
                continue
            n = min(chunk, sec.start_pfn + sec.nr_pages - pfn, max_pfn - pfn)
            pages = self._struct_pages(sec, pfn, n)
            cls, span, tail = classify(pages, self.layout)
            free, carry = expand_spans(span, carry)
            tail &= ~free
            if tail.any():
                idx = np.flatnonzero(tail)
                heads = self._pfn_of_page_va(pages["compound_head"][idx] - np.uint64(1))
                inside = (heads >= pfn) & (heads < pfn + n)
                cls[idx[inside]] = cls[heads[inside] - pfn]
                for i, h in zip(idx[~inside], heads[~inside], strict=True):
                    cls[i] = self._head_class(int(h)) if h >= 0 else PageClass.OTHER
            cls[free] = PageClass.FREE
            yield pfn, cls
            pfn += n


def class_counts(classes: np.ndarray) -> dict[str, int]:
    """Number of pages per class name."""
    counts = np.bincount(classes, minlength=len(PageClass))
    return {c.name.lower(): int(counts[c]) for c in PageClass}
