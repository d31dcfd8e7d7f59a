"""Fixtures for the jump tests: a QEMU-like 1 GiB memory map and real bzImages."""

from __future__ import annotations

import glob
import subprocess
import tarfile
from pathlib import Path

import pytest

from khibernate.jump.elfcorehdr import Note
from khibernate.jump.loader import SystemFacts
from khibernate.jump.memmap import e820_from_iomem
from khibernate.system import parse_iomem

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

DEBS = Path.home() / ".cache/khibernate/debs"


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
def debian_bzimage(tmp_path_factory) -> bytes:
    """A Debian distribution kernel: /boot/vmlinuz-*, else from the linux-image .deb (apt-get download if needed)."""
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    if found:
        return Path(found[-1]).read_bytes()
    debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    if not debs:
        DEBS.mkdir(parents=True, exist_ok=True)
        dep = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True).stdout
        pkg = next(line.split()[-1] for line in dep.splitlines() if "Depends: linux-image-" in line)
        subprocess.run(["apt-get", "download", pkg], cwd=DEBS, check=True, capture_output=True)
        debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    cached = DEBS / (debs[-1].name + ".vmlinuz")
    if not cached.exists():
        out = tmp_path_factory.mktemp("deb")
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True, check=True).stdout
        (out / "data.tar").write_bytes(tar)
        with tarfile.open(out / "data.tar") as t:
            member = next(m for m in t.getmembers() if m.name.startswith("./boot/vmlinuz-"))
            cached.write_bytes(t.extractfile(member).read())
    return cached.read_bytes()


@pytest.fixture(scope="session")
def test_bzimage() -> bytes:
    """The project's test kernel (built by `python3 -m vmtest.kernel`)."""
    from vmtest.kernel import find_cached

    tk = find_cached("6.12")
    if tk is None:
        pytest.fail("test kernel not built: run `python3 -m vmtest.kernel` (or scripts/setup.sh)")
    return tk.bzimage.read_bytes()
