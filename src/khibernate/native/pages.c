/* khibernate's native page kernel: struct page classification, zero-page detection, gathering kept pages into
 * blocks, and bitmap helpers.  Built by cffi's API mode (khibernate/native/build.py); every call releases the GIL.
 * Pure functions over caller-owned buffers: no allocation, no I/O.  The rules are khibernate.image.pagefilter's. */
#include <stdint.h>
#include <string.h>
#include <stddef.h>

enum { CLS_OTHER = 0, CLS_CACHE = 1, CLS_CACHE_PRIVATE = 2, CLS_USER = 3, CLS_FREE = 4, CLS_UNUSABLE = 5 };

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static inline int bit(uint64_t flags, int64_t b) { return b >= 0 && b < 64 && ((flags >> b) & 1); }

/* Page-type test: 6.12+ types are a value in the top byte (low 24 bits free), older ones a whole-word value. */
static inline int is_type(uint32_t mc, int has, int64_t value)
{
    if (!has)
        return 0;
    uint32_t v = (uint32_t)value;
    if ((v & 0xFFFFFFu) == 0 && (v >> 24) != 0xFFu)
        return (mc >> 24) == (v >> 24);
    return mc == v;
}

size_t kh_classify(const uint8_t *sp, size_t n, const struct kh_layout *lay, uint64_t chunk_va, uint8_t *cls,
                   uint8_t *scratch, uint64_t *carry, uint32_t *far_idx, uint64_t *far_head)
{
    const size_t sz = (size_t)lay->size;
    uint64_t cover = *carry; /* pages [0, cover) are inside a free block */
    size_t nfar = 0;
    /* pass 1: own class, free coverage (scratch: own class << 2 | 1 for a tail outside a free block, 2 for a page in one) */
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = sp + i * sz;
        uint64_t flags = ld64(p + lay->off_flags), mapping = ld64(p + lay->off_mapping);
        uint32_t mc = ld32(p + lay->off_mapcount);
        int slab = is_type(mc, lay->has_slab, lay->slab) || bit(flags, lay->pg_slab);
        int buddy = is_type(mc, lay->has_buddy, lay->buddy) && !slab;
        int unaccepted = is_type(mc, lay->has_unaccepted, lay->unaccepted);
        int anon = (mapping & 1) && !slab;
        int hugetlb;
        if (lay->has_hugetlb) {
            hugetlb = is_type(mc, 1, lay->hugetlb);
        } else {
            hugetlb = 0;
            if (lay->has_head_mask && (flags & (uint64_t)lay->pg_head_mask) && i + 1 < n) {
                if (lay->pg_hugetlb >= 0) {
                    hugetlb = bit(ld64(sp + (i + 1) * sz + lay->off_flags), lay->pg_hugetlb);
                } else if (lay->dtor_offset >= 0 && lay->hugetlb_dtor >= 0 && lay->hugetlb_dtor <= 255) {
                    size_t row = i + (size_t)lay->dtor_offset / sz;
                    if (row < n)
                        hugetlb = sp[row * sz + (size_t)lay->dtor_offset % sz] == (uint8_t)lay->hugetlb_dtor;
                }
            }
        }
        int swapcache = bit(flags, lay->pg_swapcache);
        if (lay->pg_swapbacked >= 0)
            swapcache = swapcache && bit(flags, lay->pg_swapbacked);
        int cache = (bit(flags, lay->pg_lru) || swapcache) && !anon && !slab;
        uint8_t c = CLS_OTHER;
        if (cache)
            c = bit(flags, lay->pg_private) ? CLS_CACHE_PRIVATE : CLS_CACHE;
        if (anon || hugetlb)
            c = CLS_USER;
        if (bit(flags, lay->pg_hwpoison) || is_type(mc, lay->has_offline, lay->offline))
            c = CLS_UNUSABLE;
        cls[i] = c;
        uint64_t span = 0;
        if (buddy) {
            uint64_t order = ld64(p + lay->off_private);
            span = order < (uint64_t)lay->max_order ? (uint64_t)1 << order : 1;
        }
        if (unaccepted)
            span = (uint64_t)1 << (lay->max_order - 1);
        if (span && i + span > cover)
            cover = i + span;
        uint8_t mark = i < cover ? 2 : ((ld64(p + lay->off_compound_head) & 1) ? 1 : 0);
        scratch[i] = (uint8_t)(mark | (c << 2));
    }
    *carry = cover > n ? cover - n : 0;
    /* pass 2: tails take their head's own class (scratch keeps every page's own class, so the order of tails does
     * not matter) */
    for (size_t i = 0; i < n; i++) {
        if ((scratch[i] & 3) != 1)
            continue;
        uint64_t head_va = ld64(sp + i * sz + lay->off_compound_head) - 1;
        if (head_va >= chunk_va && head_va < chunk_va + n * sz) {
            cls[i] = scratch[(head_va - chunk_va) / sz] >> 2;
        } else {
            far_idx[nfar] = (uint32_t)i;
            far_head[nfar++] = head_va;
        }
    }
    for (size_t i = 0; i < n; i++)
        if ((scratch[i] & 3) == 2)
            cls[i] = CLS_FREE;
    return nfar;
}

static inline int page_is_zero(const uint8_t *p, size_t ps)
{
    uint64_t acc = 0;
    for (size_t o = 0; o < ps; o += 64) {
        for (size_t k = 0; k < 64; k += 8)
            acc |= ld64(p + o + k);
        if (acc)
            return 0;
    }
    return 1;
}

size_t kh_zero_pages(const uint8_t *buf, size_t npages, size_t ps, uint8_t *out)
{
    size_t nz = 0;
    for (size_t i = 0; i < npages; i++) {
        out[i] = (uint8_t)page_is_zero(buf + i * ps, ps);
        nz += out[i];
    }
    return nz;
}

size_t kh_gather(const uint8_t *src, size_t npages, size_t ps, int drop_zero, uint8_t *dst, size_t room,
                 uint8_t *stored, uint8_t *zero, size_t *consumed)
{
    size_t got = 0, i = 0;
    for (; i < npages && got < room; i++) {
        const uint8_t *p = src + i * ps;
        if (drop_zero && page_is_zero(p, ps)) {
            zero[i] = 1;
            continue;
        }
        if (dst + got * ps != p)
            memcpy(dst + got * ps, p, ps);
        stored[i] = 1;
        got++;
    }
    *consumed = i;
    return got;
}

void kh_pack_bits(const uint8_t *mask, size_t n, uint8_t *bits)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint8_t b = 0;
        for (int k = 0; k < 8; k++)
            b |= (uint8_t)((mask[i + k] != 0) << k);
        bits[i >> 3] = b;
    }
    if (i < n) {
        uint8_t b = 0;
        for (int k = 0; i + (size_t)k < n; k++)
            b |= (uint8_t)((mask[i + k] != 0) << k);
        bits[i >> 3] = b;
    }
}

void kh_unpack_bits(const uint8_t *bits, uint64_t first, size_t n, uint8_t *mask)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t b = first + i;
        mask[i] = (bits[b >> 3] >> (b & 7)) & 1;
    }
}

size_t kh_bits_to_pfns(const uint8_t *bits, uint64_t lo, uint64_t hi, uint64_t *out, size_t cap)
{
    size_t k = 0;
    uint64_t b = lo;
    while (b < hi && k < cap) {
        if ((b & 7) == 0 && b + 8 <= hi && bits[b >> 3] == 0) {
            b += 8;
            continue;
        }
        if ((bits[b >> 3] >> (b & 7)) & 1)
            out[k++] = b;
        b++;
    }
    return k;
}

uint64_t kh_popcount(const uint8_t *bits, size_t nbytes)
{
    uint64_t c = 0;
    size_t i = 0;
    for (; i + 8 <= nbytes; i += 8)
        c += (uint64_t)__builtin_popcountll(ld64(bits + i));
    for (; i < nbytes; i++)
        c += (uint64_t)__builtin_popcount(bits[i]);
    return c;
}

void kh_histogram(const uint8_t *v, size_t n, uint64_t *counts)
{
    for (size_t i = 0; i < n; i++)
        counts[v[i]]++;
}
