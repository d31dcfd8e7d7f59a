import struct

import pytest

from khibernate.jump import bootparams
from khibernate.jump.bzimage import parse_bzimage
from khibernate.jump.errors import CommandLineError
from khibernate.jump.memmap import e820_from_iomem
from khibernate.ranges import E820_RAM, E820_RESERVED, Range


def test_jump_e820(qemu_iomem):
    fw = e820_from_iomem(qemu_iomem)
    low = Range(0x1000, 0x9F000)
    region = Range(0x2F000000, 0x3F000000)
    hdr = Range(0x3EFFF000, 0x3F000000)
    e820 = bootparams.jump_e820(fw, low, region, [hdr])
    ram = [r for r in e820 if r.type == E820_RAM]
    assert ram == [low, Range(0x2F000000, 0x3EFFF000)]
    assert Range(0x3EFFF000, 0x3F000000, E820_RESERVED) in e820
    # the first kernel's RAM is a hole: nothing in the table covers it
    assert not any(r.start < 0x2F000000 and r.end > 0x100000 for r in e820)
    assert Range(0x3FFE0000, 0x40000000, E820_RESERVED) in e820
    assert Range(0, 0x1000, E820_RESERVED) in e820


def test_zero_page_layout(debian_bzimage):
    k = parse_bzimage(debian_bzimage)
    e820 = [Range(0x1000, 0x9F000), Range(0x2F000000, 0x3EFFF000), Range(0x3EFFF000, 0x3F000000, 2)]
    bp = bootparams.build_boot_params(k, 0x1_2345_6000, 100, e820, initrd=(0x3000_0000, 0x123456),
                                      acpi_rsdp=0xF59D0, screen_info=b"\x01" * 0x40)
    assert len(bp) == 4096
    assert bp[0x202:0x206] == b"HdrS"
    assert bp[0x1F1:0x1F1 + len(k.setup_header)][:0x10] == k.setup_header[:0x10]
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x2345_6000
    assert struct.unpack_from("<I", bp, 0x0C8)[0] == 0x1
    assert struct.unpack_from("<II", bp, 0x218) == (0x3000_0000, 0x123456)
    assert struct.unpack_from("<Q", bp, 0x070)[0] == 0xF59D0
    assert bp[0x210] == 0xFF and bp[0x1EF] == 0
    assert bp[:0x40] == b"\x01" * 0x40
    assert bp[0x1E8] == 3
    assert bootparams.parse_e820_table(bp) == e820
    assert struct.unpack_from("<QQI", bp, 0x2D0 + 20) == (0x2F000000, 0xFFFF000, 1)


def test_cmdline_too_long(debian_bzimage):
    k = parse_bzimage(debian_bzimage)
    with pytest.raises(CommandLineError, match="at most 2047"):
        bootparams.build_boot_params(k, 0x1000, 5000, [])


def test_rsdp_scan():
    bios = bytearray(0x20000)
    rsdp = bytearray(b"RSD PTR " + bytes(12))
    rsdp[8] = (-sum(rsdp)) & 0xFF
    bios[0x159D0:0x159D0 + 20] = rsdp
    bios[0x100:0x108] = b"RSD PTR "  # bad checksum: skipped
    bios[0x108] = 1
    assert bootparams.find_acpi_rsdp(bytes(bios)) == 0xF59D0
    assert bootparams.parse_efi_systab("ACPI20=0x7ffe014\nSMBIOS=0x7f\n") == 0x7FFE014
