"""Raw physical memory (/dev/mem-style file) with ranges and notes from an elfcorehdr, or given explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.elfcore import EHDR64, ELFCLASS64, ELFDATA2LSB, ELFMAG, ET_CORE, PHDR64, PT_LOAD, PT_NOTE, pack_notes
from khibernate.image import vmcoreinfo
from khibernate.image.pagefilter import PageClass, PageFilter
from khibernate.image.sources import MemRange, open_source
from khibernate.image.sources.raw import DevMemSource, RawSource, parse_ranges
from tests.image import synthkernel as sk

NOTE_PA = 0x1A00000


def _raw(synth: sk.SynthKernel, tmp_path: Path) -> tuple[Path, Path, int]:
    mem = bytearray(synth.mem)
    notes = pack_notes(synth.notes)
    mem[NOTE_PA:NOTE_PA + len(notes)] = notes
    raw = tmp_path / "mem"
    raw.write_bytes(bytes(mem))
    phdrs = [(PT_NOTE, 0, NOTE_PA, 0, NOTE_PA, len(notes), len(notes), 0)]
    phdrs += [(PT_LOAD, 7, a, sk.PAGE_OFFSET + a, a, b - a, b - a, 0) for a, b in synth.ranges]
    ident = ELFMAG + bytes([ELFCLASS64, ELFDATA2LSB, 1]) + bytes(9)
    hdr = EHDR64.pack(ident, ET_CORE, 62, 1, 0, EHDR64.size, 0, 0, EHDR64.size, PHDR64.size, len(phdrs), 0, 0, 0)
    hdr += b"".join(PHDR64.pack(*p) for p in phdrs)
    blob = tmp_path / "elfcorehdr"
    blob.write_bytes(hdr)
    return raw, blob, len(notes)


def test_raw_with_elfcorehdr(synth: sk.SynthKernel, tmp_path: Path) -> None:
    raw, blob, _ = _raw(synth, tmp_path)
    with RawSource.with_elfcorehdr(raw, blob.read_bytes()) as src:
        assert [(r.start, r.end) for r in src.ranges] == synth.ranges
        v = vmcoreinfo.from_source(src)
        got = np.concatenate([c for _, c in PageFilter(src, v).classes()])
    ram = synth.expected != PageClass.NO_PAGE
    assert np.array_equal(got[ram], synth.expected[ram])


def test_cli_raw_ranges_and_vmcoreinfo_at(synth: sk.SynthKernel, tmp_path: Path) -> None:
    raw, blob, size = _raw(synth, tmp_path)
    ranges = ",".join(f"{a:x}-{b:x}" for a, b in synth.ranges)
    assert [(r.start, r.end) for r in parse_ranges(ranges)] == synth.ranges
    runner = CliRunner()
    r = runner.invoke(cli, ["image", "save", str(raw), str(tmp_path / "a.khi"), "--ranges", ranges,
                            "--vmcoreinfo-at", f"{NOTE_PA:#x}:{size:#x}", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["classes"]["free"] == int((synth.expected == PageClass.FREE).sum())
    r = runner.invoke(cli, ["image", "save", str(raw), str(tmp_path / "b.khi"), "--elfcorehdr", str(blob),
                            "-d", "31", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["image", "info", str(tmp_path / "b.khi"), "--json"])
    assert json.loads(r.stdout)["osrelease"] == "6.12.0-synth"


def test_raw_memory_opens_through_the_registry(synth: sk.SynthKernel, tmp_path: Path) -> None:
    """Raw memory has no magic: open_source takes it when told what it holds, by pread for a file and by mmap
    windows for a memory device (a character device, like /dev/mem, whose read() stops at high_memory)."""
    raw, blob, _ = _raw(synth, tmp_path)
    with open_source(raw, elfcorehdr=blob.read_bytes()) as src:
        assert isinstance(src, RawSource) and [(r.start, r.end) for r in src.ranges] == synth.ranges
        assert vmcoreinfo.from_source(src).osrelease == "6.12.0-synth"
    with open_source(raw, ranges=parse_ranges("1000-3000")) as src:
        assert isinstance(src, RawSource) and src.read(0x1000, 16) == synth.mem[0x1000:0x1010]
    with open_source("/dev/zero", ranges=[MemRange(0x10000, 0x30000)]) as src:  # a character device
        assert isinstance(src, DevMemSource) and src.read(0x2F000, 0x1000) == bytes(0x1000)
