"""The numpy page classifier khibernate used before the native kernel: the reference the native one is checked
against (tests only; numpy is a test dependency, not a runtime one)."""

from __future__ import annotations

import numpy as np

from khibernate.image.levels import PageClass
from khibernate.image.pagefilter import PageLayout


def dtype(lay: PageLayout) -> np.dtype:
    """numpy dtype viewing one ``struct page``."""
    return np.dtype({
        "names": ["flags", "mapping", "mapcount", "private", "compound_head"],
        "formats": ["<u8", "<u8", "<i4", "<u8", "<u8"],
        "offsets": [lay.off_flags, lay.off_mapping, lay.off_mapcount, lay.off_private,
                    lay.off_compound_head],
        "itemsize": lay.size,
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


def chunk_classes(raw: bytes, lay: PageLayout, chunk_va: int, carry: int) -> tuple[np.ndarray, int, list[int]]:
    """What PageFilter.classes did for one chunk before the native kernel: (classes, carry out, indices of tails
    whose head lies outside the chunk, left at their own class)."""
    pages = np.frombuffer(raw, dtype=dtype(lay))
    n = len(pages)
    cls, span, tail = classify(pages, lay)
    free, rest = expand_spans(span, carry)
    tail &= ~free
    far: list[int] = []
    if tail.any():
        idx = np.flatnonzero(tail)
        va = pages["compound_head"][idx] - np.uint64(1)
        inside = (va >= np.uint64(chunk_va)) & (va < np.uint64(chunk_va + n * lay.size))
        heads = ((va[inside] - np.uint64(chunk_va)) // np.uint64(lay.size)).astype(np.int64)
        cls[idx[inside]] = cls[heads]
        far = idx[~inside].tolist()
    cls[free] = PageClass.FREE
    return cls, rest, far
