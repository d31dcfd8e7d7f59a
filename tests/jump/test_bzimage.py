import struct

import pytest

from khibernate.jump.bzimage import XLF_KERNEL_64, parse_bzimage
from khibernate.jump.errors import NotABzImage


def test_debian_kernel(debian_bzimage):
    k = parse_bzimage(debian_bzimage, "vmlinuz")
    assert k.version >= 0x020C
    assert k.xloadflags & XLF_KERNEL_64
    assert k.relocatable
    assert k.pref_address == 0x1000000
    assert k.kernel_alignment == 0x200000
    assert k.init_size > len(k.payload)
    assert k.memsz % 4096 == 0 and k.memsz >= k.init_size
    assert k.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    assert len(k.payload) == len(debian_bzimage) - (k.setup_sects + 1) * 512


def test_test_kernel(test_bzimage):
    k = parse_bzimage(test_bzimage)
    assert k.version >= 0x020F and k.relocatable and k.xloadflags & XLF_KERNEL_64
    assert k.cmdline_size >= 2047


def _mutate(data: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_refusals(debian_bzimage):
    with pytest.raises(NotABzImage, match="ELF vmlinux"):
        parse_bzimage(b"\x7fELF" + bytes(0x1000))
    with pytest.raises(NotABzImage, match="too small"):
        parse_bzimage(b"hello")
    with pytest.raises(NotABzImage, match="0xAA55"):
        parse_bzimage(bytes(0x2000))
    with pytest.raises(NotABzImage, match="too old"):
        parse_bzimage(_mutate(debian_bzimage, 0x206, "<H", 0x020A))
    with pytest.raises(NotABzImage, match="XLF_KERNEL_64"):
        parse_bzimage(_mutate(debian_bzimage, 0x236, "<H", 0))
    with pytest.raises(NotABzImage, match="not relocatable"):
        parse_bzimage(_mutate(debian_bzimage, 0x234, "<B", 0))


def test_setup_header_layout_has_boot_rst_offsets() -> None:
    """The setup header is declared once by field name (bzimage.SETUP_HEADER); the zero page embeds the same
    fields at the same place. Offsets from Documentation/arch/x86/boot.rst's table."""
    from khibernate.jump.bootparams import ZERO_PAGE
    from khibernate.jump.bzimage import SETUP_HEADER, SETUP_HEADER_OFFSET

    expected = {"setup_sects": 0x1F1, "boot_flag": 0x1FE, "header": 0x202, "version": 0x206,
                "kernel_version": 0x20E, "type_of_loader": 0x210, "loadflags": 0x211, "ramdisk_image": 0x218,
                "cmd_line_ptr": 0x228, "initrd_addr_max": 0x22C, "kernel_alignment": 0x230,
                "relocatable_kernel": 0x234, "min_alignment": 0x235, "xloadflags": 0x236, "cmdline_size": 0x238,
                "payload_offset": 0x248, "payload_length": 0x24C, "setup_data": 0x250, "pref_address": 0x258,
                "init_size": 0x260, "handover_offset": 0x264, "kernel_info_offset": 0x268}
    for name, off in expected.items():
        assert SETUP_HEADER_OFFSET + SETUP_HEADER.offsets[name] == off, name
        assert ZERO_PAGE.offsets[name] == off, name
    assert ZERO_PAGE.offsets["e820_table"] == 0x2D0
