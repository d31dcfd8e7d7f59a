"""Fixtures for the jump tests: a QEMU-like 1 GiB memory map and real bzImages."""

from __future__ import annotations

import pytest

from khibernate.jump.elfcorehdr import Note
from khibernate.jump.loader import SystemFacts
from khibernate.jump.memmap import e820_from_iomem
from khibernate.system import parse_iomem
from tests.tiers import debian_vmlinuz, kernel_bzimage

QEMU_1G_IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
000c0000-000c99ff : Video ROM
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-3ffdffff : System RAM
  01000000-01bfffff : Kernel code
  2f000000-3effffff : Crash kernel
3ffe0000-3fffffff : Reserved
fd000000-fdffffff : PCI Bus 0000:00
feffc000-feffffff : Reserved
fffc0000-ffffffff : Reserved
"""

@pytest.fixture
def qemu_iomem():
    return parse_iomem(QEMU_1G_IOMEM)


@pytest.fixture
def facts(qemu_iomem):
    notes = [Note(0x3fc1a000 + i * 0x1000, 0x150, f"crash_notes cpu{i}") for i in range(2)]
    notes.append(Note(0x1e3c000, 0x1024, "VMCOREINFO"))
    return SystemFacts(qemu_iomem, e820_from_iomem(qemu_iomem), notes, acpi_rsdp=0xF59D0, screen_info=None,
                       cmdline="console=ttyS0 crashkernel=256M")


@pytest.fixture(scope="session")
def debian_bzimage() -> bytes:
    """A Debian distribution kernel: /boot/vmlinuz-*, else the one scripts/setup.sh cached (skip/fail if neither)."""
    return debian_vmlinuz().read_bytes()


@pytest.fixture(scope="session")
def test_bzimage() -> bytes:
    """The project's test kernel (built by scripts/setup.sh or `python3 -m vmtest.kernel`)."""
    return kernel_bzimage("6.12").read_bytes()
