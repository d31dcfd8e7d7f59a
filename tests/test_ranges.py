"""khibernate.ranges: one half-open Range for jump, image and /proc/iomem."""

from __future__ import annotations

from khibernate.ranges import E820_NONE, E820_RAM, E820_RESERVED, Range, merge, subtract
from khibernate.system import addresses_hidden, parse_iomem


def test_half_open_and_inclusive_views() -> None:
    r = Range.inclusive(0x1000, 0x1FFF)
    assert (r.start, r.end, r.last, r.size, r.type) == (0x1000, 0x2000, 0x1FFF, 0x1000, E820_RAM)
    assert 0x1000 in r and 0x1FFF in r and 0x2000 not in r
    assert str(r) == "[0x1000-0x1fff]"
    assert r.overlaps(Range(0x1FFF, 0x3000)) and not r.overlaps(Range(0x2000, 0x3000))
    assert r.covers(Range(0x1000, 0x2000)) and not r.covers(Range(0x1000, 0x2001))


def test_merge_and_subtract() -> None:
    assert merge([Range(0x3000, 0x4000), Range(0, 0x1000), Range(0x1000, 0x2000), Range(5, 5)]) == (
        Range(0, 0x2000), Range(0x3000, 0x4000))
    assert merge([Range(0, 0x1000), Range(0x1000, 0x2000, E820_RESERVED)]) == (
        Range(0, 0x1000), Range(0x1000, 0x2000, E820_RESERVED))
    assert subtract([Range(0, 0x10000, E820_RESERVED)], [Range(0x1000, 0x2000)]) == [
        Range(0, 0x1000, E820_RESERVED), Range(0x2000, 0x10000, E820_RESERVED)]


def test_iomem_regions_are_ranges() -> None:
    regions = parse_iomem("00100000-3ffdffff : System RAM\n  2f000000-3effffff : Crash kernel\n"
                          "fd000000-fdffffff : PCI Bus 0000:00\n")
    ram, crash, pci = regions
    assert (ram.start, ram.end, ram.type, ram.depth) == (0x100000, 0x3FFE0000, E820_RAM, 0)
    assert crash.size == 256 << 20 and crash.last == 0x3EFFFFFF and crash.depth == 1
    assert pci.type == E820_NONE and ram.covers(crash)
    assert not addresses_hidden(regions)
    assert addresses_hidden(parse_iomem("00000000-00000000 : System RAM\n"))
