"""ELF core files byte by byte: the one module of the ELF-core vocabulary that jump/, image/ and view/ share.

Layouts and constants, notes, program headers, the header of a vmcore file khibernate writes (notes inline, one
PT_LOAD per memory range at its file offset: :func:`core_header`) and what an ``elfcorehdr=`` describes (notes and
RAM by physical address: :func:`parse_elfcorehdr`).  Pure: bytes in, records or bytes out.  The file readers and
writers are in ``khibernate/image/sources/elf.py``; ``khibernate/jump/elfcorehdr.py`` builds the elfcorehdr a
capture kernel turns into /proc/vmcore on these layouts.  It imports neither image/ nor jump/.

A parser says what is wrong with its input through the caller's own error classes (:class:`ElfErrors`): the image
readers report NotAVmcoreError/UnsupportedError/TruncatedError/CorruptImageError, a caller that names none gets
:class:`ElfCoreError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from khibernate.errors import KhibernateError
from khibernate.layout import Layout
from khibernate.ranges import Range

ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF
NT_PRSTATUS = 1
NT_GNU_BUILD_ID = 3
VMCOREINFO_NOTE = "VMCOREINFO"

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


class ElfCoreError(KhibernateError):
    """An ELF core header or note that is not what it must be (for callers that name no error classes)."""


class ElfErrors(NamedTuple):
    """The exception each kind of bad input raises: the caller's own classes."""

    not_core: type[Exception] = ElfCoreError  # not an ELF core at all, or one that describes nothing
    unsupported: type[Exception] = ElfCoreError  # a valid core this code does not handle (big-endian, PN_XNUM)
    truncated: type[Exception] = ElfCoreError  # headers or notes cut short
    corrupt: type[Exception] = ElfCoreError  # a value no real core has


DEFAULT_ERRORS = ElfErrors()


def ident(elfclass: int) -> bytes:
    """e_ident of a little-endian core of ``elfclass``."""
    return ELFMAG + bytes([elfclass, ELFDATA2LSB, EV_CURRENT]) + bytes(9)


def align4(n: int) -> int:
    """``n`` rounded up to a multiple of 4 (ELF note padding)."""
    return (n + 3) & ~3


# ------------------------------------------------------------------------------------------------ notes


@dataclasses.dataclass(frozen=True)
class Note:
    """One ELF note: owner name (without NUL), type and descriptor bytes."""

    name: str
    type: int
    desc: bytes


def pack_note(name: str, ntype: int, desc: bytes) -> bytes:
    """One note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    n = name.encode("ascii", "replace") + b"\0"
    return (NHDR.pack(n_namesz=len(n), n_descsz=len(desc), n_type=ntype) + n.ljust(align4(len(n)), b"\0")
            + desc.ljust(align4(len(desc)), b"\0"))


def pack_notes(notes: Iterable[Note]) -> bytes:
    """PT_NOTE bytes for ``notes`` (inverse of :func:`parse_notes`)."""
    return b"".join(pack_note(n.name, n.type, n.desc) for n in notes)


def parse_notes(data: bytes, *, errors: ElfErrors = DEFAULT_ERRORS) -> list[Note]:
    """Notes of a PT_NOTE blob (4-byte aligned names and descriptors), stopping at a zero header or the end;
    ``errors.truncated`` when one runs past the blob."""
    out: list[Note] = []
    off = 0
    while off + NHDR.size <= len(data):
        h = NHDR.unpack(data, off)
        namesz, descsz = h["n_namesz"], h["n_descsz"]
        if namesz == 0 and descsz == 0:
            break
        off += NHDR.size
        if off + namesz > len(data):
            raise errors.truncated(f"ELF note name ({namesz} bytes) runs past its PT_NOTE; the file is corrupt")
        name = data[off:off + namesz].rstrip(b"\0")
        off += align4(namesz)
        if off + descsz > len(data):
            raise errors.truncated(f"ELF note {name!r} cut short; the file is truncated or corrupt")
        out.append(Note(name.decode("ascii", "replace"), h["n_type"], bytes(data[off:off + descsz])))
        off += align4(descsz)
    return out


def gnu_build_id(data: bytes) -> str:
    """The GNU build id (hex) in a PT_NOTE blob such as /sys/kernel/notes or a vmlinux's, '' if absent or
    unreadable."""
    try:
        notes = parse_notes(data)
    except ElfCoreError:
        return ""
    return next((n.desc.hex() for n in notes if n.name == "GNU" and n.type == NT_GNU_BUILD_ID), "")


# ------------------------------------------------------------------------------------------------ headers


@dataclasses.dataclass(frozen=True)
class Phdr:
    """A program header, class-independent."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int = 0


@dataclasses.dataclass(frozen=True)
class ElfHeaders:
    """What an ELF core's headers say: class, machine and program headers."""

    elfclass: int
    machine: int
    phdrs: tuple[Phdr, ...]
    flags: int = 0

    @property
    def loads(self) -> list[Phdr]:
        """PT_LOAD headers."""
        return [p for p in self.phdrs if p.type == PT_LOAD]

    @property
    def note_phdrs(self) -> list[Phdr]:
        """PT_NOTE headers."""
        return [p for p in self.phdrs if p.type == PT_NOTE]


def parse_headers(head: bytes, read_at: Callable[[int, int], bytes] | None = None, *,
                  errors: ElfErrors = DEFAULT_ERRORS) -> ElfHeaders:
    """An ELF core's file header and program headers; ``read_at(off, n)`` fetches phdrs beyond ``head``."""
    if len(head) < 16 or head[:4] != ELFMAG:
        raise errors.not_core("not an ELF file (no \\x7fELF magic); give a vmcore, a QEMU dump or a kdump file")
    cls, data = head[4], head[5]
    if data != ELFDATA2LSB:
        raise errors.unsupported("big-endian ELF cores are not supported; convert on the producing machine")
    if cls == ELFCLASS64:
        ehdr, phdr_l = EHDR64, PHDR64
    elif cls == ELFCLASS32:
        ehdr, phdr_l = EHDR32, PHDR32
    else:
        raise errors.not_core(f"unknown ELF class {cls}; the file is corrupt")
    e = ehdr.unpack(head, error=errors.truncated, what="ELF header")
    if e["e_type"] != ET_CORE:
        raise errors.not_core(f"ELF type {e['e_type']} is not a core file (ET_CORE); give a vmcore, not a program")
    if e["e_phentsize"] != phdr_l.size:
        raise errors.not_core(f"ELF program header size {e['e_phentsize']} != {phdr_l.size}; the file is corrupt")
    e_phoff, e_phnum = e["e_phoff"], e["e_phnum"]
    if e_phnum == PN_XNUM:
        raise errors.unsupported("ELF core with more than 65534 program headers (PN_XNUM) is not supported")
    need = e_phoff + e_phnum * phdr_l.size
    if e_phoff < ehdr.size and e_phnum:
        raise errors.not_core(f"ELF e_phoff {e_phoff} points into the ELF header; the file is corrupt")
    table = head[e_phoff:need] if len(head) >= need else (read_at(e_phoff, need - e_phoff) if read_at else b"")
    if len(table) != need - e_phoff:
        raise errors.truncated("ELF program headers cut short; the file is truncated")
    phdrs = []
    for i in range(e_phnum):
        p = phdr_l.unpack(table, i * phdr_l.size)
        phdrs.append(Phdr(p["p_type"], p["p_flags"], p["p_offset"], p["p_vaddr"], p["p_paddr"], p["p_filesz"],
                          p["p_memsz"], p["p_align"]))
    return ElfHeaders(cls, e["e_machine"], tuple(phdrs), e["e_flags"])


def pack_headers(phdrs: Sequence[Phdr], *, elf32: bool = False) -> bytes:
    """File header and program header table of an x86 ET_CORE (program headers right after the file header)."""
    ehdr, phdr = (EHDR32, PHDR32) if elf32 else (EHDR64, PHDR64)
    out = bytearray(ehdr.pack(e_ident=ident(ELFCLASS32 if elf32 else ELFCLASS64), e_type=ET_CORE,
                              e_machine=EM_386 if elf32 else EM_X86_64, e_version=EV_CURRENT, e_phoff=ehdr.size,
                              e_ehsize=ehdr.size, e_phentsize=phdr.size, e_phnum=len(phdrs)))
    for p in phdrs:
        out += phdr.pack(p_type=p.type, p_flags=p.flags, p_offset=p.offset, p_vaddr=p.vaddr, p_paddr=p.paddr,
                         p_filesz=p.filesz, p_memsz=p.memsz, p_align=p.align)
    return bytes(out)


# ------------------------------------------------------------------------------------------------ a vmcore file


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """One PT_LOAD to write: physical range, virtual address (0 if unknown) and flags."""

    paddr: int
    size: int
    vaddr: int = 0
    flags: int = PF_R | PF_W | PF_X


def core_header(loads: Sequence[LoadSpec], notes: bytes, *, elf32: bool = False,
                errors: ElfErrors = DEFAULT_ERRORS) -> tuple[bytes, list[int]]:
    """The head of a vmcore file (file header, one PT_NOTE holding ``notes`` inline, one PT_LOAD per load, the
    notes; page aligned) and the file offset of each load's data, which follows in order."""
    ehdr, phdr = (EHDR32, PHDR32) if elf32 else (EHDR64, PHDR64)
    note_off = ehdr.size + (1 + len(loads)) * phdr.size
    data_off = (note_off + len(notes) + 4095) & ~4095
    offsets = []
    off = data_off
    for ld in loads:
        offsets.append(off)
        off += ld.size
    if elf32 and (off >= 1 << 32 or any(ld.paddr + ld.size > 1 << 32 for ld in loads)):
        raise errors.unsupported("ELF32 cannot describe memory or files above 4 GiB; export as ELF64")
    phdrs = [Phdr(PT_NOTE, 0, note_off, 0, 0, len(notes), len(notes))]
    phdrs += [Phdr(PT_LOAD, ld.flags, o, ld.vaddr & 0xFFFFFFFF if elf32 else ld.vaddr, ld.paddr, ld.size, ld.size)
              for ld, o in zip(loads, offsets, strict=True)]
    out = pack_headers(phdrs, elf32=elf32) + notes
    return out + bytes(data_off - len(out)), offsets


# ------------------------------------------------------------------------------------------------ elfcorehdr=


class Elfcorehdr(NamedTuple):
    """What an elfcorehdr describes: where its note buffers lie, then the RAM (one range per PT_LOAD, in header
    order), all by physical address."""

    notes: list[Range]
    ram: list[Range]


def parse_elfcorehdr(blob: bytes, *, errors: ElfErrors = DEFAULT_ERRORS, limit: int = 1 << 64) -> Elfcorehdr:
    """The note buffers and RAM ranges of an elfcorehdr (ours or kexec-tools'); ``errors.corrupt`` when a range
    reaches ``limit``, ``errors.not_core`` when it describes no memory."""
    h = parse_headers(blob, errors=errors)
    if any(p.paddr + p.memsz > limit for p in h.loads):
        raise errors.corrupt(f"the elfcorehdr describes memory beyond {limit >> 40} TiB; it is corrupt")
    ram = [Range(p.paddr, p.paddr + p.memsz) for p in h.loads if p.memsz]
    if not ram:
        raise errors.not_core("the elfcorehdr has no PT_LOAD: it describes no memory")
    return Elfcorehdr([Range(p.offset, p.offset + p.filesz) for p in h.note_phdrs], ram)
