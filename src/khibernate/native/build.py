"""cffi API-mode builder of ``khibernate.native._pages`` (run by setup.py at install time; no import of khibernate)."""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

LAYOUT = """
struct kh_layout {
    int64_t size, off_flags, off_mapping, off_mapcount, off_private, off_compound_head;
    int64_t pg_lru, pg_private, pg_swapcache, pg_swapbacked, pg_slab, pg_hwpoison, pg_hugetlb;
    int64_t buddy, slab, hugetlb, offline, unaccepted;
    int32_t has_buddy, has_slab, has_hugetlb, has_offline, has_unaccepted, has_head_mask;
    int64_t pg_head_mask, dtor_offset, hugetlb_dtor, max_order;
};
"""

CDEF = LAYOUT + """
size_t kh_classify(const uint8_t *sp, size_t n, const struct kh_layout *lay, uint64_t chunk_va, uint8_t *cls,
                   uint8_t *scratch, uint64_t *carry, uint32_t *far_idx, uint64_t *far_head);
size_t kh_zero_pages(const uint8_t *buf, size_t npages, size_t ps, uint8_t *out);
size_t kh_gather(const uint8_t *src, size_t npages, size_t ps, int drop_zero, uint8_t *dst, size_t room,
                 uint8_t *stored, uint8_t *zero, size_t *consumed);
void kh_pack_bits(const uint8_t *mask, size_t n, uint8_t *bits);
void kh_unpack_bits(const uint8_t *bits, uint64_t first, size_t n, uint8_t *mask);
size_t kh_bits_to_pfns(const uint8_t *bits, uint64_t lo, uint64_t hi, uint64_t *out, size_t cap);
uint64_t kh_popcount(const uint8_t *bits, size_t nbytes);
void kh_histogram(const uint8_t *v, size_t n, uint64_t *counts);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("khibernate.native._pages", LAYOUT + (Path(__file__).with_name("pages.c")).read_text(),
                      extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-fno-strict-aliasing"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
