"""The native page kernel (``_pages``, C via cffi's API mode): thin typed wrappers over caller-owned buffers.

Per-pfn masks and class arrays are ``bytearray``s of one byte per pfn (0/1 for masks, a PageClass for classes);
bitmaps are little-endian bit order, as the .khi and kdump formats store them.  Every C call releases the GIL.
"""

from __future__ import annotations

import mmap

Buffer = bytes | bytearray | memoryview | mmap.mmap  # collections.abc.Buffer is 3.12+

try:
    from khibernate.native._pages import ffi, lib
except ImportError as e:  # pragma: no cover - an install without a compiler
    raise ImportError("khibernate's native page kernel is not built: reinstall with `pip install -e .` (needs a C "
                      f"compiler and python3-dev; scripts/setup.sh installs both): {e}") from None

LAYOUT_FIELDS = ("size", "off_flags", "off_mapping", "off_mapcount", "off_private", "off_compound_head",
                 "pg_lru", "pg_private", "pg_swapcache", "pg_swapbacked", "pg_slab", "pg_hwpoison", "pg_hugetlb",
                 "buddy", "slab", "hugetlb", "offline", "unaccepted", "has_buddy", "has_slab", "has_hugetlb",
                 "has_offline", "has_unaccepted", "has_head_mask", "pg_head_mask", "dtor_offset", "hugetlb_dtor",
                 "max_order")


def layout(**fields: int) -> object:
    """A ``struct kh_layout`` (keep it alive while classify() uses it); every field of LAYOUT_FIELDS is required."""
    missing = set(LAYOUT_FIELDS) - set(fields)
    if missing:
        raise TypeError(f"kh_layout needs {sorted(missing)}")
    lay = ffi.new("struct kh_layout *")
    for k, v in fields.items():
        setattr(lay, k, v)
    return lay


def _rw(buf: bytearray | memoryview) -> object:
    return ffi.from_buffer(buf, require_writable=True)


class Classifier:
    """Reusable output and scratch buffers for classify() of chunks up to ``chunk`` pages."""

    def __init__(self, lay: object, chunk: int):
        self.lay = lay
        self.chunk = chunk
        self.scratch = bytearray(chunk)
        self.far_idx = ffi.new("uint32_t[]", chunk)
        self.far_head = ffi.new("uint64_t[]", chunk)
        self.carry = ffi.new("uint64_t *")

    def classify(self, struct_pages: Buffer, n: int, chunk_va: int, carry: int) -> tuple[bytearray, int,
                                                                                           list[tuple[int, int]]]:
        """(class per page, free-block pages carried past the chunk, [(index, head VA)] of tails whose head lies
        outside the chunk) for ``n`` struct pages starting at VA ``chunk_va``; ``carry`` from the chunk before."""
        if n > self.chunk or len(memoryview(struct_pages)) < n * self.lay.size:  # type: ignore[attr-defined]
            raise ValueError("classify: chunk larger than the classifier or struct page data cut short")
        cls = bytearray(n)
        self.carry[0] = carry
        nfar = lib.kh_classify(ffi.from_buffer(struct_pages), n, self.lay, chunk_va, ffi.from_buffer(cls),
                               ffi.from_buffer(self.scratch), self.carry, self.far_idx, self.far_head)
        far = [(self.far_idx[i], self.far_head[i]) for i in range(nfar)]
        return cls, int(self.carry[0]), far

    def own_class(self, i: int) -> int:
        """Page ``i`` of the last classify(): its class from its own struct page (before tails and free blocks)."""
        return self.scratch[i] >> 2

    def in_free_block(self, i: int) -> bool:
        """Page ``i`` of the last classify() lies in a free buddy block (or an unaccepted one)."""
        return self.scratch[i] & 3 == 2


def zero_pages(data: Buffer, page_size: int = 4096) -> bytearray:
    """Per page 1 where the page is all zero bytes (``data`` is a whole number of pages)."""
    m = memoryview(data).cast("B")
    n = len(m) // page_size
    out = bytearray(n)
    lib.kh_zero_pages(ffi.from_buffer(m), n, page_size, ffi.from_buffer(out))
    return out


def gather(src: Buffer, npages: int, page_size: int, drop_zero: bool, dst: bytearray | memoryview, at: int,
           room: int, stored: bytearray | memoryview, zero: bytearray | memoryview) -> tuple[int, int]:
    """Copy pages of ``src`` (``npages`` of them) into ``dst`` from page ``at`` on, at most ``room`` pages, leaving
    out zero pages when ``drop_zero``; sets stored[i]/zero[i] per source page.  Returns (pages copied, source pages
    consumed)."""
    consumed = ffi.new("size_t *")
    d = ffi.from_buffer(dst, require_writable=True) + at * page_size
    got = lib.kh_gather(ffi.from_buffer(src), npages, page_size, int(drop_zero), d, room, _rw(stored), _rw(zero),
                        consumed)
    return int(got), int(consumed[0])


def pack_bits(mask: Buffer) -> bytes:
    """Little-endian bitmap of a 0/1 byte mask."""
    m = memoryview(mask).cast("B")
    out = bytearray(-(-len(m) // 8))
    lib.kh_pack_bits(ffi.from_buffer(m), len(m), ffi.from_buffer(out))
    return bytes(out)


def unpack_bits(bits: Buffer, first: int, n: int) -> bytearray:
    """Bits first..first+n of a little-endian bitmap as a 0/1 byte mask (bits beyond the bitmap read 0)."""
    b = memoryview(bits).cast("B")
    out = bytearray(n)
    have = max(0, min(n, len(b) * 8 - first))
    if have:
        lib.kh_unpack_bits(ffi.from_buffer(b), first, have, ffi.from_buffer(out))
    return out


def bits_to_pfns(bits: Buffer, lo: int, hi: int) -> list[int]:
    """Positions of the set bits in [lo, hi) of a little-endian bitmap, ascending."""
    b = memoryview(bits).cast("B")
    hi = min(hi, len(b) * 8)
    if hi <= lo:
        return []
    out = ffi.new("uint64_t[]", hi - lo)
    k = lib.kh_bits_to_pfns(ffi.from_buffer(b), lo, hi, out, hi - lo)
    return list(ffi.unpack(out, k))


def popcount(bits: Buffer) -> int:
    """Number of set bits."""
    b = memoryview(bits).cast("B")
    return int(lib.kh_popcount(ffi.from_buffer(b), len(b))) if len(b) else 0


def histogram(values: Buffer) -> list[int]:
    """Count of each byte value 0..255."""
    v = memoryview(values).cast("B")
    counts = ffi.new("uint64_t[256]")
    if len(v):
        lib.kh_histogram(ffi.from_buffer(v), len(v), counts)
    return list(counts)


def runs(mask: Buffer) -> list[tuple[int, int]]:
    """(start, stop) of each run of 1 bytes in a 0/1 byte mask."""
    m = bytes(mask) if not isinstance(mask, bytes | bytearray) else mask
    out = []
    i = m.find(1)
    while i >= 0:
        j = m.find(0, i)
        if j < 0:
            j = len(m)
        out.append((i, j))
        i = m.find(1, j)
    return out
