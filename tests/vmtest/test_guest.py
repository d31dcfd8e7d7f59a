"""Pure helpers of the VM harness: /proc/iomem parsing and the jumped-to kernel's command line."""

from __future__ import annotations

import pytest

from vmtest import guest
from vmtest.vm import BASE_APPEND

IOMEM = """00000000-00000fff : Reserved
00001000-0009fbff : System RAM
00100000-3ffdffff : System RAM
  01000000-01c17fff : Kernel code
  2c000000-3bffffff : Crash kernel
fec00000-fec003ff : IOAPIC 0
"""


def test_iomem():
    assert guest.iomem_ranges(IOMEM, "System RAM") == [(0x1000, 0x9FBFF), (0x100000, 0x3FFDFFFF)]
    assert guest.iomem_ranges(IOMEM, "Kernel code") == []
    assert guest.iomem_ranges(IOMEM, "Kernel code", top_level=False) == [(0x1000000, 0x1C17FFF)]
    assert guest.crash_region(IOMEM) == (0x2C000000, 0x3BFFFFFF)
    with pytest.raises(ValueError, match="crashkernel="):
        guest.crash_region("00001000-0009fbff : System RAM\n")


def test_jump_append():
    a = guest.jump_append(0x2C000000, 0x3BFFFFFF, "iomem=relaxed")
    assert a == f"{BASE_APPEND} iomem=relaxed memmap=exactmap memmap=639K@0 memmap=262144K@0x2c000000 --"
    b = guest.jump_append(0x2C000000, 0x3BFFFFFF, elfcorehdr=(0x3BFFC000, 0x3C000000))
    assert b.endswith("memmap=exactmap memmap=639K@0 memmap=262128K@0x2c000000 elfcorehdr=983024K --")
    c = guest.jump_append(0x2C000000, 0x3BFFFFFF, elfcorehdr=(0x30000000, 0x30004000))
    assert "memmap=65536K@0x2c000000 memmap=196592K@0x30004000 elfcorehdr=786432K --" in c


def test_jump_back_entry():
    assert guest.jump_back_entry("a -- elfcorehdr=1K kexec_jump_back_entry=0x00000000021600f2") == 0x21600F2
    assert guest.jump_back_entry("console=ttyS0") is None
