"""Finding the previous kernel: command-line parsing, the jump-target side, files and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from khibernate.image.errors import NotAVmcoreError
from khibernate.jump import elfcorehdr as ech
from khibernate.jump.memmap import Range
from khibernate.view import NoPreviousKernelError, boot_side, open_previous
from khibernate.view.previous import open_running_side


@pytest.mark.parametrize("cmdline,hdr,jump", [
    ("console=ttyS0 root=/dev/vda", None, None),
    ("elfcorehdr=0x7f000000 nr_cpus=1", 0x7F000000, None),
    ("elfcorehdr=64K@0x7f000000 irqpoll", 0x7F000000, None),
    ("elfcorehdr=2130706432", 0x7F000000, None),
    ("elfcorehdr=2080768K", 2080768 << 10, None),
    ("a elfcorehdr=0x1000 kexec_jump_back_entry=0x0000000012345678 elfcorehdr=0x2000", 0x2000, 0x12345678),
    ("xelfcorehdr=0x1000", None, None),
])
def test_boot_side(cmdline: str, hdr: int | None, jump: int | None) -> None:
    side = boot_side(cmdline)
    assert (side.elfcorehdr, side.jump_back_entry) == (hdr, jump)
    assert side.is_capture_kernel == (hdr is not None)


def test_first_kernel_without_jump_refuses_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from khibernate.view import frozen

    def nothing_loaded() -> None:
        raise NoPreviousKernelError("no kexec jump image is loaded")

    monkeypatch.setattr(frozen, "open_frozen", nothing_loaded)
    (tmp_path / "cmdline").write_text("console=ttyS0 root=/dev/vda\n")
    with pytest.raises(NoPreviousKernelError, match="no elfcorehdr=.*no kexec jump image is loaded.*give SOURCE"):
        open_running_side(str(tmp_path / "cmdline"), str(tmp_path / "vmcore"), str(tmp_path / "mem"))


def test_capture_kernel_without_proc_vmcore_reads_dev_mem_through_the_elfcorehdr(tmp_path: Path) -> None:
    """A fake /dev/mem: RAM at 0x1000-0x40000, the elfcorehdr at 0x20000, a VMCOREINFO note at 0x30000."""
    from khibernate.elfcore import Note, pack_notes

    mem = bytearray((i * 7) & 0xFF for i in range(0x40000))
    note = pack_notes([Note("VMCOREINFO", 0, b"OSRELEASE=9.9.9\nPAGESIZE=4096\n")])
    mem[0x30000:0x30000 + len(note)] = note
    hdr = ech.build([Range(0x1000, 0x40000)], [ech.Note(0x30000, len(note), "vmcoreinfo")])
    mem[0x20000:0x20000 + len(hdr)] = hdr
    (tmp_path / "mem").write_bytes(bytes(mem))
    (tmp_path / "cmdline").write_text("elfcorehdr=0x20000 kexec_jump_back_entry=0x1000\n")
    with open_running_side(str(tmp_path / "cmdline"), str(tmp_path / "none"), str(tmp_path / "mem")) as src:
        assert [(r.start, r.end) for r in src.ranges] == [(0x1000, 0x40000)]
        assert src.read(0x2345, 64) == bytes(mem[0x2345:0x2345 + 64])
        assert src.vmcoreinfo_text is not None and "OSRELEASE=9.9.9" in src.vmcoreinfo_text


def test_capture_kernel_with_bad_elfcorehdr_says_so(tmp_path: Path) -> None:
    (tmp_path / "mem").write_bytes(bytes(0x10000))
    (tmp_path / "cmdline").write_text("elfcorehdr=0x2000\n")
    with pytest.raises(NoPreviousKernelError, match="elfcorehdr at 0x2000"):
        open_running_side(str(tmp_path / "cmdline"), str(tmp_path / "none"), str(tmp_path / "mem"))


def test_path_goes_through_image_detection(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"hello world, not a dump" * 10)
    with pytest.raises(NotAVmcoreError, match="not a vmcore"):
        open_previous(tmp_path / "junk")
