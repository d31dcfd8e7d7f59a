"""A re-entered resident capture kernel's page-location map: from its own kimage entry list (as the kernel lays out
a one-segment jump-back image) to the first kernel's live control page, read from where the swap parked it."""

from __future__ import annotations

import pytest

from khibernate.capture.relocated import PAGE, RelocatedSource, RelocationError, page_locations
from khibernate.elfcore import Note
from khibernate.image.sources.base import MemorySource, MemRange
from khibernate.ranges import Range
from khibernate.view.frozen import IND_DESTINATION, IND_DONE, IND_INDIRECTION, IND_SOURCE, kimage_swaps

FIRST_RAM = [Range(0x100000, 0x2F000000), Range(0x3F000000, 0x40000000)]  # /proc/vmcore's ranges
OWN_RAM = [Range(0x1000, 0x9F000), Range(0x2F000000, 0x3F000000)]  # the capture kernel: low RAM + crash region
CONTROL = 0x1A2B000  # the first kernel's control page (kexec_jump_back_entry & ~0xfff)
PARKED = 0x3E7F0000  # the jump-back segment's source page, in the capture kernel's RAM


class Pages(MemorySource):
    """The first kernel's memory as /proc/vmcore shows it: each page filled with a byte of its pfn."""

    @property
    def ranges(self) -> tuple[MemRange, ...]:
        return tuple(FIRST_RAM)

    @property
    def notes(self) -> tuple[Note, ...]:
        return ()

    def read(self, paddr: int, size: int) -> bytes:
        return bytes(((paddr + i) // PAGE) & 0xFF for i in range(size))

    def mapped_view(self, paddr: int, size: int) -> memoryview | None:
        return memoryview(self.read(paddr, size))


def jump_back_image() -> dict[int, int]:
    """The entry list the kernel builds for the jump-back image: an indirection page holding DESTINATION, SOURCE,
    DONE (kimage_add_entry / kimage_terminate)."""
    mem = {0x2F100000: [CONTROL | IND_DESTINATION, PARKED | IND_SOURCE, IND_DONE]}

    def read(pa: int) -> int:
        page, off = pa & ~0xFFF, pa & 0xFFF
        words = mem.get(page, [])
        return words[off // 8] if off // 8 < len(words) else 0

    return kimage_swaps(0x2F100000 | IND_INDIRECTION, read)


def test_the_control_page_is_read_from_its_parked_copy() -> None:
    locs = page_locations(jump_back_image(), FIRST_RAM, OWN_RAM)
    assert locs == {CONTROL: PARKED}
    live = b"LIVE" * 1024
    reads: list[int] = []

    def read_page(pa: int) -> bytes:
        reads.append(pa)
        return live

    src = RelocatedSource(Pages(), locs, read_page)
    stale = Pages().read(CONTROL, PAGE)
    assert src.read(CONTROL, PAGE) == live != stale
    # a read across the page's edges: only the page itself comes from the parked copy
    got = src.read(CONTROL - 100, PAGE + 200)
    assert got[:100] == Pages().read(CONTROL - 100, 100) and got[100:100 + PAGE] == live
    assert got[-100:] == Pages().read(CONTROL + PAGE, 100)
    assert src.mapped_view(CONTROL - PAGE, 2 * PAGE) is None  # the savers then read through readinto
    buf = bytearray(3 * PAGE)
    src.readinto(CONTROL - PAGE, memoryview(buf))
    assert bytes(buf[PAGE:2 * PAGE]) == live and bytes(buf[:PAGE]) == Pages().read(CONTROL - PAGE, PAGE)
    assert bytes(src.view(CONTROL + 8, 8)) == live[8:16]
    # pages elsewhere: straight from /proc/vmcore, zero-copy, the parked page never read
    n = len(reads)
    assert src.mapped_view(CONTROL + PAGE, PAGE) is not None
    assert src.read(CONTROL + PAGE, PAGE) == Pages().read(CONTROL + PAGE, PAGE)
    assert len(reads) == n


def test_own_memory_is_not_the_first_kernels() -> None:
    """A destination in the capture kernel's own region (not in /proc/vmcore) is not part of the image."""
    assert page_locations({0x2F200000: 0x2F300000, CONTROL: PARKED}, FIRST_RAM, OWN_RAM) == {CONTROL: PARKED}
    assert page_locations({}, FIRST_RAM, OWN_RAM) == {}  # first entry: no jump-back image loaded yet


def test_refused_when_the_parked_page_is_not_reachable() -> None:
    with pytest.raises(RelocationError, match="not this capture kernel's RAM"):
        page_locations({CONTROL: 0x200000}, FIRST_RAM, OWN_RAM)  # a source in the first kernel's RAM
    with pytest.raises(RelocationError, match="aligned"):
        page_locations({CONTROL + 8: PARKED}, FIRST_RAM, OWN_RAM)


def test_a_short_read_of_the_parked_page_is_an_error() -> None:
    src = RelocatedSource(Pages(), {CONTROL: PARKED}, lambda pa: b"x")
    with pytest.raises(RelocationError, match="gave 1 bytes"):
        src.read(CONTROL, PAGE)
