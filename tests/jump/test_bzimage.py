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
