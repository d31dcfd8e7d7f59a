"""The native page kernel against the numpy classifier it replaced (tests/image/numpy_reference.py), on random
struct page arrays of every page-type scheme, and its bitmap / zero-page / gather helpers against plain Python."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from khibernate import native
from khibernate.image.pagefilter import PageLayout
from tests.image import numpy_reference as ref
from tests.image.test_fuzz import PROFILE

SIZE = 64
CHUNK_VA = 0xFFFFEA0000000000 + 0x1000 * SIZE
BASE = dict(size=SIZE, off_flags=0, off_mapping=24, off_mapcount=48, off_private=40, off_compound_head=8,
            pg_lru=4, pg_private=13, pg_swapcache=10, pg_swapbacked=19, pg_slab=None, pg_hwpoison=21,
            buddy=None, slab=None, hugetlb=None, offline=None, unaccepted=None, max_order=11)
SCHEMES = {
    # 6.12+: page types in the top byte of _mapcount
    "6.12": dict(BASE, buddy=0xF0000000,
                 slab=0xF5000000, hugetlb=0xF4000000, offline=0xF2000000, unaccepted=0xF7000000),
    # 6.9-6.11: whole-word types with bits cleared
    "6.9": dict(BASE, buddy=-129, slab=-4097, hugetlb=-2049, offline=-257, unaccepted=None),
    # 6.6-6.8: PG_hugetlb in the first tail, PG_slab flag
    "6.6": dict(BASE, buddy=-129, pg_slab=9, offline=-257, pg_head_mask=1 << 6, pg_hugetlb=8),
    # 6.3-6.5: folio dtor byte
    "6.3": dict(BASE, buddy=-129, pg_slab=9, offline=-257, pg_head_mask=1 << 6, folio_dtor=SIZE + 50,
                hugetlb_dtor=2),
    # before 6.3: page.compound_dtor of the first tail
    "6.1": dict(BASE, buddy=-129, pg_slab=9, offline=-257, pg_head_mask=1 << 6, compound_dtor=50, hugetlb_dtor=2),
}


def layout(scheme: str, **extra: int | None) -> PageLayout:
    return PageLayout(**{**SCHEMES[scheme], **extra})  # type: ignore[arg-type]


def page_strategy(lay: PageLayout, n: int) -> st.SearchStrategy[bytes]:
    types = [v for v in (lay.buddy, lay.slab, lay.hugetlb, lay.offline, lay.unaccepted) if v is not None]
    mapcounts = st.one_of(st.sampled_from([-1, 0, 1, 5, *types, *(t | 0x123 for t in types)]),
                          st.integers(-(1 << 31), (1 << 31) - 1))
    flag_bits = [b for b in (lay.pg_lru, lay.pg_private, lay.pg_swapcache, lay.pg_swapbacked, lay.pg_slab,
                             lay.pg_hwpoison, lay.pg_hugetlb, 6) if b is not None]
    flags = st.lists(st.sampled_from(flag_bits), max_size=4).map(lambda bs: sum({1 << b for b in bs}))
    heads = st.one_of(st.just(0), st.integers(0, n + 3).map(lambda k: CHUNK_VA + k * SIZE + 1),
                      st.integers(0, 1 << 64 - 1).map(lambda v: v | 1))

    @st.composite
    def one(draw: st.DrawFn) -> bytes:
        raw = bytearray(SIZE)
        struct.pack_into("<Q", raw, lay.off_flags, draw(flags))
        struct.pack_into("<Q", raw, lay.off_mapping, draw(st.sampled_from([0, 1, 0xFFFF888000001000, 0x1235])))
        struct.pack_into("<I", raw, lay.off_mapcount, draw(mapcounts) & 0xFFFFFFFF)
        struct.pack_into("<Q", raw, lay.off_private, draw(st.one_of(st.integers(0, 12), st.integers(0, 1 << 63))))
        struct.pack_into("<Q", raw, lay.off_compound_head, draw(heads))
        raw[50] = draw(st.sampled_from([0, 1, 2, 3]))
        return bytes(raw)

    return st.lists(one(), min_size=n, max_size=n).map(b"".join)


@st.composite
def cases(draw: st.DrawFn) -> tuple[PageLayout, bytes, int]:
    lay = layout(draw(st.sampled_from(sorted(SCHEMES))))
    n = draw(st.integers(1, 160))
    return lay, draw(page_strategy(lay, n)), draw(st.integers(0, 2048))


# 120 examples where scripts/test.sh runs (the CI profile), 30 in a plain run
@settings(max_examples=120 if PROFILE == "ci" else 30, deadline=None)
@given(cases())
def test_native_classify_matches_the_numpy_reference(case: tuple[PageLayout, bytes, int]) -> None:
    lay, raw, carry = case
    n = len(raw) // SIZE
    want, want_carry, want_far = ref.chunk_classes(raw, lay, CHUNK_VA, carry)
    c = native.Classifier(lay.native(), 512)
    got, got_carry, far = c.classify(raw, n, CHUNK_VA, carry)
    assert [i for i, _ in far] == want_far
    assert (got_carry, bytes(got)) == (want_carry, bytes(want.astype(np.uint8)))


def test_buddy_block_carries_into_the_next_chunk() -> None:
    lay = layout("6.12")
    raw = bytearray(10 * SIZE)
    for i in range(10):
        struct.pack_into("<i", raw, i * SIZE + lay.off_mapcount, -1)
    struct.pack_into("<I", raw, 8 * SIZE + lay.off_mapcount, 0xF0000000)
    struct.pack_into("<Q", raw, 8 * SIZE + lay.off_private, 2)  # order 2: pfns 8..11
    got, carry, _ = native.Classifier(lay.native(), 16).classify(bytes(raw), 10, CHUNK_VA, 3)
    assert list(got) == [4] * 3 + [0] * 5 + [4] * 2 and carry == 2


def test_a_head_mask_in_bit_63_reaches_the_classifier() -> None:
    """A VMCOREINFO PG_head_mask of 1 << 63 (corrupt, yet a valid u64) is handed to the int64 field, not an
    OverflowError; a page with that bit is a head exactly as the reference says."""
    lay = layout("6.6", pg_head_mask=1 << 63)
    raw = bytearray(3 * SIZE)
    struct.pack_into("<Q", raw, lay.off_flags, (1 << 63) | (1 << lay.pg_lru))  # type: ignore[operator]
    for i in range(3):
        struct.pack_into("<i", raw, i * SIZE + lay.off_mapcount, -1)
    want, want_carry, _ = ref.chunk_classes(bytes(raw), lay, CHUNK_VA, 0)
    got, carry, _ = native.Classifier(lay.native(), 16).classify(bytes(raw), 3, CHUNK_VA, 0)
    assert (carry, bytes(got)) == (want_carry, bytes(want.astype(np.uint8)))


@given(st.binary(max_size=300), st.integers(0, 64), st.integers(0, 2500))
def test_bitmap_helpers_match_python(mask_src: bytes, first: int, n: int) -> None:
    mask = bytes(b & 1 for b in mask_src)
    bits = native.pack_bits(mask)
    ints = int.from_bytes(bits, "little")
    assert all((ints >> i) & 1 == mask[i] for i in range(len(mask))) and len(bits) == -(-len(mask) // 8)
    assert native.popcount(bits) == sum(mask)
    assert bytes(native.unpack_bits(bits, first, n)) == bytes(
        (ints >> (first + i)) & 1 if first + i < len(bits) * 8 else 0 for i in range(n))
    assert native.bits_to_pfns(bits, first, first + n) == [i for i in range(first, min(first + n, len(bits) * 8))
                                                           if (ints >> i) & 1]
    want_runs = []
    i = 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            want_runs.append((i, j))
            i = j
        else:
            i += 1
    assert native.runs(bytearray(mask)) == want_runs
    assert native.histogram(mask_src)[:256] == [mask_src.count(bytes([v])) for v in range(256)]


@given(st.lists(st.sampled_from(["zero", "data", "last"]), max_size=40), st.integers(1, 40), st.booleans())
def test_gather_and_zero_pages(kinds: list[str], room: int, drop_zero: bool) -> None:
    ps = 512
    pages = [bytes(ps) if k == "zero" else (bytes(ps - 1) + b"\1" if k == "last" else bytes([7]) * ps)
             for k in kinds]
    src = b"".join(pages)
    assert bytes(native.zero_pages(src, ps)) == bytes(int(k == "zero") for k in kinds)
    dst = bytearray(room * ps + ps)
    stored, zero = bytearray(len(kinds)), bytearray(len(kinds))
    got, used = native.gather(src, len(kinds), ps, drop_zero, dst, 1, room, stored, zero)
    keep = [i for i in range(used) if not (drop_zero and kinds[i] == "zero")]
    assert got == len(keep) <= room and (used == len(kinds) or got == room)
    assert bytes(dst[ps:ps + got * ps]) == b"".join(pages[i] for i in keep)
    assert [i for i in range(len(kinds)) if stored[i]] == keep
    assert [i for i in range(len(kinds)) if zero[i]] == [i for i in range(used) if drop_zero and kinds[i] == "zero"]


