"""khibernate/layout.py and khibernate/elfcore.py: fields by name, one bounds check, one ELF vocabulary for all."""

from __future__ import annotations

import struct

import pytest

from khibernate import elfcore
from khibernate.image import elf
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


def test_one_elf_vocabulary() -> None:
    assert elf.EHDR64 is elfcore.EHDR64 and elfcorehdr.EHDR is elfcore.EHDR64 and elf.PHDR64 is elfcorehdr.PHDR
    hdr = elfcorehdr.build([Range(0x100000, 0x200000)], [elfcorehdr.Note(0x1000, 64, "x")])
    h = elf.parse_headers(hdr)
    assert [(p.type, p.paddr) for p in h.phdrs] == [(elfcore.PT_NOTE, 0x1000), (elfcore.PT_LOAD, 0x100000)]
    notes = [elf.Note("CORE", 1, b"\1" * 5), elf.Note("VMCOREINFO", 0, b"OSRELEASE=x\n")]
    assert elf.parse_notes(elf.pack_notes(notes)) == notes


def test_records_index_like_the_struct_they_replaced() -> None:
    raw = elfcore.EHDR64.pack(e_phoff=64, e_phnum=3)
    rec = elfcore.EHDR64.unpack(raw)
    assert rec["e_phoff"] == rec[5] == 64 and rec[10] == rec["e_phnum"] == 3
