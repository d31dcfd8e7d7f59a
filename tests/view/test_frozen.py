"""The frozen jump target's pure parts: the kimage entry list walk, /proc/iomem and kallsyms parsing, and the
choice of the target's own VMCOREINFO among the copies in its memory."""

from __future__ import annotations

import struct

import pytest

from khibernate.image.sources.base import MemRange
from khibernate.image.sources.frozen import pick_vmcoreinfo
from khibernate.view import NoPreviousKernelError
from khibernate.view.frozen import (
    IND_DESTINATION,
    IND_DONE,
    IND_INDIRECTION,
    IND_SOURCE,
    crash_regions,
    kallsyms_address,
    kimage_swaps,
)


def memory(pages: dict[int, list[int]]):  # noqa: ANN201 - read_u64
    """read_u64 over indirection pages given as {paddr: [entries]}."""
    blobs = {pa: struct.pack(f"<{len(e)}Q", *e) + bytes(4096 - 8 * len(e)) for pa, e in pages.items()}

    def read_u64(pa: int) -> int:
        base = pa & ~4095
        return int.from_bytes(blobs[base][pa - base:pa - base + 8], "little")

    return read_u64


def test_walk_follows_destinations_sources_and_indirections() -> None:
    read = memory({
        0x10000: [0x1000 | IND_DESTINATION, 0x50000 | IND_SOURCE, 0x51000 | IND_SOURCE, 0x20000 | IND_INDIRECTION],
        0x20000: [0x2C000000 | IND_DESTINATION, 0x60000 | IND_SOURCE, IND_DONE],
    })
    assert kimage_swaps(0x10000 | IND_INDIRECTION, read) == {0x1000: 0x50000, 0x2000: 0x51000, 0x2C000000: 0x60000}


def test_empty_and_corrupt_lists() -> None:
    assert kimage_swaps(0, memory({})) == {}
    with pytest.raises(NoPreviousKernelError, match="not an indirection"):
        kimage_swaps(0x1000 | IND_SOURCE, memory({}))
    with pytest.raises(NoPreviousKernelError, match="runs past"):
        kimage_swaps(0x10000 | IND_INDIRECTION, memory({0x10000: [0x1000 | IND_DESTINATION] * 512}))


def test_crash_regions_and_kallsyms() -> None:
    iomem = ("00001000-0009efff : System RAM\n00100000-3ffdffff : System RAM\n"
             "  2c000000-3bffffff : Crash kernel\n")
    assert crash_regions(iomem) == [MemRange(0x2C000000, 0x3C000000)]
    syms = "ffffffff82a1b2c0 B kexec_image\nffffffff82a1b2c8 B kexec_crash_image\n"
    assert kallsyms_address(syms, "kexec_image") == 0xFFFFFFFF82A1B2C0
    assert kallsyms_address("0000000000000000 B kexec_image\n", "kexec_image") is None  # kptr_restrict
    assert kallsyms_address(syms, "nothing") is None


def test_pick_vmcoreinfo_takes_the_note_whose_kernel_is_in_the_target() -> None:
    first = "OSRELEASE=6.12.117\nSYMBOL(_stext)=ffffffff81000000\nNUMBER(phys_base)=0\n"
    target = "OSRELEASE=6.12.117\nSYMBOL(_stext)=ffffffff81000000\nNUMBER(phys_base)=721420288\n"  # 0x2b000000
    ranges = (MemRange(0x1000, 0x9F000), MemRange(0x2C000000, 0x3C000000))
    assert pick_vmcoreinfo([first, target], ranges) == target
    assert pick_vmcoreinfo([first], ranges) is None
