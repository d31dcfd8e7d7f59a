"""khibernate/layout.py and khibernate/elfcore.py: fields by name, one bounds check, one ELF vocabulary for all."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest

from khibernate import elfcore
from khibernate.image.errors import ELF_ERRORS, NotAVmcoreError
from khibernate.jump import elfcorehdr
from khibernate.jump.memmap import Range
from khibernate.layout import Layout, LayoutError


def test_pack_unpack_by_name() -> None:
    lay = Layout("t", "<", [("a", "I"), ("pad", "2x"), ("b", "Q"), ("s", "4s")])
    raw = lay.pack(b=7, s=b"ab")
    assert lay.size == 18 and lay.offsets == {"a": 0, "pad": 4, "b": 6, "s": 14}
    assert lay.unpack(raw) == {"a": 0, "b": 7, "s": b"ab\0\0"}
    assert raw == struct.pack("<I2xQ4s", 0, 7, b"ab")
    with pytest.raises(LayoutError, match="cut short"):
        lay.unpack(raw[:-1])
    with pytest.raises(ValueError):
        lay.unpack(raw, 1, error=ValueError)
    with pytest.raises(TypeError, match="no field"):
        lay.pack(c=1)


ELF_VOCABULARY = {"EHDR64", "EHDR32", "PHDR64", "PHDR32", "NHDR", "Note", "Phdr", "ElfHeaders", "LoadSpec",
                  "pack_note", "pack_notes", "parse_notes", "parse_headers", "core_header",
                  "parse_elfcorehdr", "VMCOREINFO_NOTE", "gnu_build_id"}
# jump/elfcorehdr.py builds the elfcorehdr= header on elfcore's layouts; its Note is where a note buffer lies in
# memory (paddr, size), the builder's input, not a parsed note
ELSEWHERE = {"jump/elfcorehdr.py": {"Note"}}


def module_level_names(path: Path) -> set[str]:
    """Classes, functions and assigned names a module defines at its top level."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def test_one_elf_vocabulary() -> None:
    """The ELF-core vocabulary (layouts, notes, program headers, the elfcorehdr parser) is defined in
    khibernate/elfcore.py and nowhere else in the package; the header jump/ builds is what the image side parses."""
    pkg = Path(elfcore.__file__).parent
    defined = {str(p.relative_to(pkg)): module_level_names(p) & ELF_VOCABULARY for p in sorted(pkg.rglob("*.py"))}
    assert {f: names for f, names in defined.items() if names and f != "elfcore.py"} == ELSEWHERE
    assert defined["elfcore.py"] == ELF_VOCABULARY
    assert elfcorehdr.EHDR is elfcore.EHDR64 and elfcorehdr.PHDR is elfcore.PHDR64
    hdr = elfcorehdr.build([Range(0x100000, 0x200000)], [elfcorehdr.Note(0x1000, 64, "x")])
    h = elfcore.parse_headers(hdr, errors=ELF_ERRORS)
    assert [(p.type, p.paddr) for p in h.phdrs] == [(elfcore.PT_NOTE, 0x1000), (elfcore.PT_LOAD, 0x100000)]
    assert elfcore.parse_elfcorehdr(hdr) == ([Range(0x1000, 0x1040)], [Range(0x100000, 0x200000)])
    notes = [elfcore.Note("CORE", 1, b"\1" * 5), elfcore.Note("VMCOREINFO", 0, b"OSRELEASE=x\n")]
    assert elfcore.parse_notes(elfcore.pack_notes(notes)) == notes
    program = elfcore.EHDR64.pack(e_ident=elfcore.ident(elfcore.ELFCLASS64), e_type=2)  # ET_EXEC
    with pytest.raises(NotAVmcoreError):  # the image side reports bad input in its own classes
        elfcore.parse_headers(program, errors=ELF_ERRORS)


def test_records_index_like_the_struct_they_replaced() -> None:
    raw = elfcore.EHDR64.pack(e_phoff=64, e_phnum=3)
    rec = elfcore.EHDR64.unpack(raw)
    assert rec["e_phoff"] == rec[5] == 64 and rec[10] == rec["e_phnum"] == 3


def test_a_value_that_does_not_fit_names_its_field() -> None:
    lay = Layout("rec", "<", [("a", "I"), ("b", "Q"), ("c", "2H")])
    with pytest.raises(LayoutError, match=r"rec\.b = -1 does not fit its field \(Q"):
        lay.pack(a=1, b=-1)
    with pytest.raises(LayoutError, match=r"rec\.c = \(1, 65536\)"):
        lay.pack(c=(1, 65536))


@pytest.mark.parametrize("phys_base", [0, 0x2B000000, -0x1C000000, -(1 << 63), (1 << 63) - 1])
def test_kdump_phys_base_keeps_its_sign(phys_base: int) -> None:
    """A randomised kernel below its link address has a negative phys_base (VMCOREINFO prints it with %ld): the
    kdump sub-header stores its 8 bytes and reads the same number back."""
    from khibernate.image.layouts.kdump import pack_headers, parse_header

    head, sub = pack_headers(block_size=4096, max_mapnr=1 << 18, note_blob=b"", utsname=["Linux", "h", "6.12"],
                             status=0, dump_level=31, phys_base=phys_base, crashtime=1)
    data = head + sub
    hdr = parse_header(lambda off, n: data[off:off + n])
    assert hdr.phys_base == phys_base
    assert int.from_bytes(sub[:8], "little") == phys_base & ((1 << 64) - 1)
