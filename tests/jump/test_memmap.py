import pytest

from khibernate.jump.errors import NoCrashRegion, PlacementError
from khibernate.jump.memmap import (
    Placer,
    crash_region,
    e820_from_iomem,
    load_window,
    low_ram,
    parse_firmware_memmap,
    system_ram,
)
from khibernate.ranges import E820_ACPI, E820_RAM, E820_RESERVED, Range, subtract
from khibernate.system import parse_iomem


def test_iomem(qemu_iomem):
    assert crash_region(qemu_iomem) == Range(0x2F000000, 0x3F000000)
    assert system_ram(qemu_iomem) == [Range(0x1000, 0x9FC00), Range(0x100000, 0x3FFE0000)]
    e820 = e820_from_iomem(qemu_iomem)
    assert Range(0x3FFE0000, 0x40000000, E820_RESERVED) in e820
    assert all(r.type in (E820_RAM, E820_RESERVED) for r in e820)
    assert low_ram(e820) == Range(0x1000, 0x9F000)


def test_firmware_memmap():
    fw = parse_firmware_memmap([("0x0", "0x9fbff", "System RAM\n"), ("0x100000", "0x3ffdffff", "System RAM"),
                                ("0xf0000", "0xfffff", "Reserved"), ("0x3ffe0000", "0x3fffffff", "ACPI Tables")])
    assert fw[0] == Range(0, 0x9FC00) and fw[-1] == Range(0x3FFE0000, 0x40000000, E820_ACPI)
    assert low_ram(fw) == Range(0x1000, 0x9F000)


def test_no_crash_region():
    regions = parse_iomem("00100000-3ffdffff : System RAM\n")
    assert crash_region(regions) is None
    with pytest.raises(NoCrashRegion, match="crashkernel="):
        load_window(regions, None, None)
    with pytest.raises(NoCrashRegion, match="both"):
        load_window(regions, 0x3C000000, None)
    assert load_window(regions, 0x3C000000, 0x3EFFFFFF) == Range(0x3C000000, 0x3F000000)


def test_subtract():
    assert subtract([Range(0, 100)], [Range(10, 20), Range(50, 200)]) == [Range(0, 10), Range(20, 50)]
    assert subtract([Range(0, 100)], [Range(0, 100)]) == []


def test_placer():
    p = Placer(Range(0x2F000000, 0x30000000))
    assert p.place(0x1001, what="a") == 0x2F000000
    assert p.place(0x10, 0x200000, "b") == 0x2F200000
    assert p.place(0x10, what="c", min_addr=0x2F800000) == 0x2F800000
    with pytest.raises(PlacementError, match="does not fit.*crashkernel"):
        p.place(0x1000000, what="kernel")
