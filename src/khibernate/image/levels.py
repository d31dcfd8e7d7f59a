"""Dump levels and page classes (kept apart so the CLI imports them without the image code)."""

from __future__ import annotations

import enum

DL_ZERO, DL_CACHE, DL_CACHE_PRI, DL_USER, DL_FREE = 1, 2, 4, 8, 16
MAX_DUMP_LEVEL = 31
RESTORABLE_LEVEL = DL_ZERO | DL_FREE


class PageClass(enum.IntEnum):
    """What a page frame holds, as far as dump levels care (one byte per pfn)."""

    OTHER = 0  # kernel, slab, page tables, reserved ... always kept
    CACHE = 1  # page cache / swap cache without PG_private
    CACHE_PRIVATE = 2  # page cache with PG_private (buffer heads, fs private data)
    USER = 3  # anonymous or hugetlbfs
    FREE = 4  # in a free buddy block or unaccepted
    UNUSABLE = 5  # hwpoison or logically offline (balloon): never read, never kept
    NO_PAGE = 6  # no struct page (memory hole inside a range)
