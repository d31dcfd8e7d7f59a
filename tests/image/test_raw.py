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
from khibernate.image.sources.raw import RawSource, parse_ranges
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
