"""The /dev/mem fallback reads by mmap windows, never by read(): a regular file stands in for /dev/mem, with
os.pread/os.read/os.preadv made to fail as /dev/mem's read() does above the running kernel's high_memory (EFAULT)."""

from __future__ import annotations

import errno
import mmap
from pathlib import Path

import pytest

from khibernate.elfcore import Note, pack_notes
from khibernate.image.errors import AddressError, MappingRefusedError
from khibernate.image.sources import raw as devmem
from khibernate.image.sources.base import MemRange
from khibernate.jump import elfcorehdr as ech
from khibernate.jump.memmap import Range
from khibernate.view import NoPreviousKernelError
from khibernate.view.previous import open_running_side

PAGE = mmap.PAGESIZE
RAM = [(0x1000, 0x9FC00), (0x100000, 0x180000), (0x200000, 0x400000)]  # a partial page at 0x9fc00, like e820
HDR_AT, NOTE_AT = 0x180000, 0x170000


@pytest.fixture
def fake_mem(tmp_path: Path) -> tuple[Path, bytes]:
    mem = bytearray((i * 7 + (i >> 12)) & 0xFF for i in range(0x400000))
    note = pack_notes([Note("VMCOREINFO", 0, b"OSRELEASE=9.9.9\nPAGESIZE=4096\n")])
    mem[NOTE_AT:NOTE_AT + len(note)] = note
    hdr = ech.build([Range(a, b) for a, b in RAM], [ech.Note(NOTE_AT, len(note), "vmcoreinfo")])
    mem[HDR_AT:HDR_AT + len(hdr)] = hdr
    (tmp_path / "mem").write_bytes(bytes(mem))
    (tmp_path / "cmdline").write_text(f"elfcorehdr={HDR_AT:#x} kexec_jump_back_entry=0x1000\n")
    return tmp_path, bytes(mem)


@pytest.fixture
def no_read(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """read()-family calls fail like /dev/mem above high_memory; returns the (offset, length) of every mmap."""
    import os

    def efault(*_: object) -> bytes:
        raise OSError(errno.EFAULT, "Bad address")

    for name in ("pread", "read", "preadv"):
        monkeypatch.setattr(os, name, efault)
    maps: list[tuple[int, int]] = []
    real = mmap.mmap

    def spy(fd: int, length: int, *args: object, offset: int = 0, **kw: object) -> mmap.mmap:
        maps.append((offset, length))
        return real(fd, length, *args, offset=offset, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(devmem.mmap, "mmap", spy)
    return maps


def test_fallback_reads_everything_by_mmap_windows_inside_the_ranges(fake_mem: tuple[Path, bytes],
                                                                     no_read: list[tuple[int, int]],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d, mem = fake_mem
    monkeypatch.setattr(devmem, "WINDOW", 0x10000)  # small windows: reads below cross several
    with open_running_side(str(d / "cmdline"), str(d / "none"), str(d / "mem")) as src:
        assert isinstance(src, devmem.DevMemSource)
        assert [(r.start, r.end) for r in src.ranges] == RAM
        assert src.vmcoreinfo_text is not None and "OSRELEASE=9.9.9" in src.vmcoreinfo_text
        for a, n in [(0x2345, 64), (0x1000, 0x9EC00), (0x9F000, 0xC00), (0x10FFF0, 0x20), (0x200000, 0x200000),
                     (0x3FF000, 0x1000)]:
            assert src.read(a, n) == mem[a:a + n], hex(a)
        for a, n in [(0x0, 16), (0x9FC00, 1), (0x17FFF0, 0x20), (0x400000, 1)]:
            with pytest.raises(AddressError):
                src.read(a, n)
        assert src.verify()["pages_read"] > 0
    assert len(no_read) > 3
    covers = [(a - a % PAGE, -(-b // PAGE) * PAGE) for a, b in RAM]
    pages = {(HDR_AT - HDR_AT % PAGE, HDR_AT - HDR_AT % PAGE + PAGE)}  # the header's own page(s)
    for off, length in no_read:
        assert off % PAGE == 0 and length % PAGE == 0 and 0 < length <= 0x10000
        assert any(a <= off and off + length <= b for a, b in covers + list(pages)), (hex(off), hex(length))


def test_window_cache_maps_sequential_reads_once(fake_mem: tuple[Path, bytes], no_read: list[tuple[int, int]]) -> None:
    d, mem = fake_mem
    with devmem.DevMemSource(d / "mem", [MemRange(0x200000, 0x400000)], window=0x80000) as src:
        got = b"".join(src.read(a, PAGE) for a in range(0x200000, 0x400000, PAGE))
    assert got == mem[0x200000:0x400000]
    assert no_read == [(0x200000 + i * 0x80000, 0x80000) for i in range(4)]


def test_refused_mapping_is_one_clear_error(fake_mem: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = fake_mem

    def refused(*_: object, **__: object) -> mmap.mmap:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(devmem.mmap, "mmap", refused)
    with pytest.raises(NoPreviousKernelError, match=r"refuses the elfcorehdr page at 0x180000 .*STRICT_DEVMEM"):
        open_running_side(str(d / "cmdline"), str(d / "none"), str(d / "mem"))
    with pytest.raises(MappingRefusedError, match="mmap of .* at 0x200000") as e:
        devmem.PhysWindows(d / "mem").read(0x200000, 16)
    assert e.value.errno == errno.EPERM
