"""ELF core layouts and note packing, declared once for every side: the jump planner's elfcorehdr, the image
readers and the ELF vmcore writer (``jump/`` and ``image/`` both import this; neither imports the other)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from khibernate.layout import Layout

ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF

_EHDR_TAIL = [("e_flags", "I"), ("e_ehsize", "H"), ("e_phentsize", "H"), ("e_phnum", "H"), ("e_shentsize", "H"),
              ("e_shnum", "H"), ("e_shstrndx", "H")]
EHDR64 = Layout("Elf64_Ehdr", "<", [("e_ident", "16s"), ("e_type", "H"), ("e_machine", "H"), ("e_version", "I"),
                                    ("e_entry", "Q"), ("e_phoff", "Q"), ("e_shoff", "Q"), *_EHDR_TAIL])
EHDR32 = Layout("Elf32_Ehdr", "<", [("e_ident", "16s"), ("e_type", "H"), ("e_machine", "H"), ("e_version", "I"),
                                    ("e_entry", "I"), ("e_phoff", "I"), ("e_shoff", "I"), *_EHDR_TAIL])
PHDR64 = Layout("Elf64_Phdr", "<", [("p_type", "I"), ("p_flags", "I"), ("p_offset", "Q"), ("p_vaddr", "Q"),
                                    ("p_paddr", "Q"), ("p_filesz", "Q"), ("p_memsz", "Q"), ("p_align", "Q")])
PHDR32 = Layout("Elf32_Phdr", "<", [("p_type", "I"), ("p_offset", "I"), ("p_vaddr", "I"), ("p_paddr", "I"),
                                    ("p_filesz", "I"), ("p_memsz", "I"), ("p_flags", "I"), ("p_align", "I")])
NHDR = Layout("Elf_Nhdr", "<", [("n_namesz", "I"), ("n_descsz", "I"), ("n_type", "I")])
assert EHDR64.size == 64 and EHDR32.size == 52 and PHDR64.size == 56 and PHDR32.size == 32 and NHDR.size == 12


def ident(elfclass: int) -> bytes:
    """e_ident of a little-endian core of ``elfclass``."""
    return ELFMAG + bytes([elfclass, ELFDATA2LSB, EV_CURRENT]) + bytes(9)


def align4(n: int) -> int:
    """``n`` rounded up to a multiple of 4 (ELF note padding)."""
    return (n + 3) & ~3


class RawNote(NamedTuple):
    """One note as stored: name bytes (NUL stripped), type, descriptor."""

    name: bytes
    type: int
    desc: bytes


def pack_note(name: str, ntype: int, desc: bytes) -> bytes:
    """One note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    n = name.encode("ascii", "replace") + b"\0"
    return (NHDR.pack(n_namesz=len(n), n_descsz=len(desc), n_type=ntype) + n.ljust(align4(len(n)), b"\0")
            + desc.ljust(align4(len(desc)), b"\0"))


def iter_notes(data: bytes, *, error: type[Exception] = ValueError) -> Iterator[RawNote]:
    """Notes of a PT_NOTE blob, stopping at a zero header or the end; ``error`` when one runs past the blob."""
    off = 0
    while off + NHDR.size <= len(data):
        h = NHDR.unpack(data, off)
        namesz, descsz = h["n_namesz"], h["n_descsz"]
        if namesz == 0 and descsz == 0:
            return
        off += NHDR.size
        if off + namesz > len(data):
            raise error(f"ELF note name ({namesz} bytes) runs past its PT_NOTE; the file is corrupt")
        name = data[off:off + namesz].rstrip(b"\0")
        off += align4(namesz)
        if off + descsz > len(data):
            raise error(f"ELF note {name!r} cut short; the file is truncated or corrupt")
        yield RawNote(name, h["n_type"], bytes(data[off:off + descsz]))
        off += align4(descsz)
