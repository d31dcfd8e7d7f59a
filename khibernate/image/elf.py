"""ELF core files (vmcores): layouts, reader (:class:`ElfSource`) and writer (:func:`write_elf`) side by side.

Reads ELF64 and ELF32 cores (``/proc/vmcore``, kexec-tools ``--elf32-core-headers``, QEMU ``dump-guest-memory``
with all ``p_vaddr`` 0) by mmap/pread, never loading the file.  Writes ELF64 (or ELF32 below 4 GiB) cores that
gdb, makedumpfile and drgn open.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

from khibernate.elfcore import (  # the shared ELF core vocabulary (jump/ uses it too), re-exported
    EHDR32,
    EHDR64,
    ELFCLASS32,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFMAG,
    EM_386,
    EM_X86_64,
    ET_CORE,
    NHDR,
    PF_R,
    PF_W,
    PF_X,
    PHDR32,
    PHDR64,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    ident,
    iter_notes,
    pack_note,
)
from khibernate.errors import KhibernateError
from khibernate.image.errors import CorruptImageError, NotAVmcoreError, TruncatedError, UnsupportedError
from khibernate.image.inputfile import MAX_PHYS_ADDR, check_span, input_size, open_input, pread_exact
from khibernate.image.sources.base import (
    FileSegment,
    MemRange,
    Note,
    SegmentedFile,
    SegmentedFileSource,
    merge_ranges,
)

__all__ = ["EHDR32", "EHDR64", "ELFCLASS32", "ELFCLASS64", "ELFDATA2LSB", "ELFMAG", "EM_386", "EM_X86_64", "ET_CORE",
           "NHDR", "PF_R", "PF_W", "PF_X", "PHDR32", "PHDR64", "PT_LOAD", "PT_NOTE", "ElfSource", "LoadSpec", "Phdr",
           "elf_layout", "gnu_build_id", "pack_notes", "parse_headers", "parse_notes", "write_elf"]


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
    align: int


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


def parse_headers(head: bytes, read_at: Callable[[int, int], bytes] | None = None) -> ElfHeaders:
    """Parse an ELF core's file header and program headers; ``read_at(off, n)`` fetches phdrs beyond ``head``."""
    if len(head) < 16 or head[:4] != ELFMAG:
        raise NotAVmcoreError("not an ELF file (no \\x7fELF magic); give a vmcore, a QEMU dump or a kdump file")
    cls, data = head[4], head[5]
    if data != ELFDATA2LSB:
        raise UnsupportedError("big-endian ELF cores are not supported; convert on the producing machine")
    if cls == ELFCLASS64:
        ehdr, phdr_l = EHDR64, PHDR64
    elif cls == ELFCLASS32:
        ehdr, phdr_l = EHDR32, PHDR32
    else:
        raise NotAVmcoreError(f"unknown ELF class {cls}; the file is corrupt")
    e = ehdr.unpack(head, error=TruncatedError, what="ELF header")
    if e["e_type"] != ET_CORE:
        raise NotAVmcoreError(f"ELF type {e['e_type']} is not a core file (ET_CORE); give a vmcore, not a program")
    if e["e_phentsize"] != phdr_l.size:
        raise NotAVmcoreError(f"ELF program header size {e['e_phentsize']} != {phdr_l.size}; the file is corrupt")
    e_phoff, e_phnum = e["e_phoff"], e["e_phnum"]
    if e_phnum == PN_XNUM:
        raise UnsupportedError("ELF core with more than 65534 program headers (PN_XNUM) is not supported")
    need = e_phoff + e_phnum * phdr_l.size
    if e_phoff < ehdr.size and e_phnum:
        raise NotAVmcoreError(f"ELF e_phoff {e_phoff} points into the ELF header; the file is corrupt")
    table = head[e_phoff:need] if len(head) >= need else (read_at(e_phoff, need - e_phoff) if read_at else b"")
    if len(table) != need - e_phoff:
        raise TruncatedError("ELF program headers cut short; the file is truncated")
    phdrs = []
    for i in range(e_phnum):
        p = phdr_l.unpack(table, i * phdr_l.size)
        phdrs.append(Phdr(p["p_type"], p["p_flags"], p["p_offset"], p["p_vaddr"], p["p_paddr"], p["p_filesz"],
                          p["p_memsz"], p["p_align"]))
    return ElfHeaders(cls, e["e_machine"], tuple(phdrs), e["e_flags"])


def parse_notes(data: bytes) -> list[Note]:
    """Notes in a PT_NOTE blob (4-byte aligned names and descriptors); stops at a zero terminator or the end."""
    return [Note(n.name.decode("ascii", "replace"), n.type, n.desc) for n in iter_notes(data, error=TruncatedError)]


NT_GNU_BUILD_ID = 3


def gnu_build_id(data: bytes) -> str:
    """The GNU build id (hex) in a PT_NOTE blob such as /sys/kernel/notes, '' if absent or unreadable."""
    try:
        notes = parse_notes(data)
    except KhibernateError:
        return ""
    return next((n.desc.hex() for n in notes if n.name == "GNU" and n.type == NT_GNU_BUILD_ID), "")


def pack_notes(notes: Iterable[Note]) -> bytes:
    """PT_NOTE bytes for ``notes`` (inverse of parse_notes)."""
    return b"".join(pack_note(n.name, n.type, n.desc) for n in notes)


def ram_segments(loads: Sequence[Phdr], page_size: int = 4096) -> list[FileSegment]:
    """PT_LOADs as physical file segments: aliases (kernel text in /proc/vmcore) dropped, overlaps trimmed, and
    partial pages at either end (e820 ranges like 0x1000-0x9fc00) completed with zeros so pages read whole."""
    segs = sorted({FileSegment(p.paddr, p.memsz, p.offset, min(p.filesz, p.memsz)) for p in loads if p.memsz},
                  key=lambda s: (s.paddr, -s.memsz))
    out: list[FileSegment] = []
    for s in segs:
        if out and s.paddr < out[-1].paddr + out[-1].memsz:
            prev_end = out[-1].paddr + out[-1].memsz
            if s.paddr + s.memsz <= prev_end:
                continue  # an alias of memory we already have
            cut = prev_end - s.paddr  # partial overlap: keep the tail only
            s = FileSegment(prev_end, s.memsz - cut, s.offset + cut, max(0, s.filesz - cut))
        out.append(s)
    padded: list[FileSegment] = []
    for i, s in enumerate(out):
        lo = s.paddr - s.paddr % page_size
        prev_end = padded[-1].paddr + padded[-1].memsz if padded else 0
        if lo < s.paddr and lo >= prev_end:
            padded.append(FileSegment(lo, s.paddr - lo, 0, 0))
        end = s.paddr + s.memsz
        hi = -(-end // page_size) * page_size
        if i + 1 < len(out):
            hi = min(hi, out[i + 1].paddr)
        if hi > end and s.filesz == s.memsz:
            s = FileSegment(s.paddr, hi - s.paddr, s.offset, s.filesz)
        padded.append(s)
    return padded


class ElfSource(SegmentedFileSource):
    """A vmcore / QEMU dump / ELF32 core file (or /proc/vmcore) read through mmap."""

    format_name = "elf"

    def describe(self) -> dict[str, object]:
        return {"elf_class": 64 if self.headers.elfclass == ELFCLASS64 else 32, "machine": self.headers.machine,
                "pt_load": len(self.headers.loads)}

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        fd = open_input(self.path)
        try:
            size = input_size(fd)
            head = os.pread(fd, 65536, 0)

            def read_at(off: int, n: int) -> bytes:
                return pread_exact(fd, off, n, size, f"{self.path}: ELF program headers")

            self.headers = parse_headers(head, read_at)
            if not self.headers.loads:
                raise NotAVmcoreError(f"{self.path}: ELF core without PT_LOAD segments holds no memory")
            if self.headers.machine not in (EM_X86_64, EM_386):
                raise UnsupportedError(f"{self.path}: ELF machine {self.headers.machine} is not x86; only x86 is "
                                       "handled")
            for p in self.headers.loads:
                if p.paddr + p.memsz > MAX_PHYS_ADDR:
                    raise CorruptImageError(f"{self.path}: PT_LOAD at paddr {p.paddr:#x} size {p.memsz:#x} reaches "
                                            f"beyond {MAX_PHYS_ADDR >> 40} TiB of physical memory; the file is "
                                            "corrupt")
                check_span(f"{self.path}: PT_LOAD at paddr {p.paddr:#x}", p.offset, min(p.filesz, p.memsz), size)
            blobs = [pread_exact(fd, p.offset, p.filesz, size, f"{self.path}: PT_NOTE")
                     for p in self.headers.note_phdrs]
            self._notes = tuple(n for b in blobs for n in parse_notes(b))
        finally:
            os.close(fd)
        self.file = SegmentedFile(self.path, ram_segments(self.headers.loads), use_mmap=True)
        self._ranges = merge_ranges([MemRange(s.paddr, s.paddr + s.memsz) for s in self.file.segments])


# ------------------------------------------------------------------------------------------------ writer


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """One PT_LOAD to write: physical range, virtual address (0 if unknown) and flags."""

    paddr: int
    size: int
    vaddr: int = 0
    flags: int = PF_R | PF_W | PF_X


def elf_layout(loads: Sequence[LoadSpec], notes: bytes, *, elf32: bool = False) -> tuple[bytes, list[int]]:
    """Headers (ehdr + phdrs + notes, page aligned) and the file offset of each load's data."""
    ehdr, phdr = (EHDR32, PHDR32) if elf32 else (EHDR64, PHDR64)
    phnum = 1 + len(loads)
    note_off = ehdr.size + phnum * phdr.size
    data_off = (note_off + len(notes) + 4095) & ~4095
    offsets = []
    off = data_off
    for ld in loads:
        offsets.append(off)
        off += ld.size
    if elf32 and (off >= 1 << 32 or any(ld.paddr + ld.size > 1 << 32 for ld in loads)):
        raise UnsupportedError("ELF32 cannot describe memory or files above 4 GiB; export as ELF64")
    out = bytearray()
    out += ehdr.pack(e_ident=ident(ELFCLASS32 if elf32 else ELFCLASS64), e_type=ET_CORE,
                     e_machine=EM_386 if elf32 else EM_X86_64, e_version=1, e_phoff=ehdr.size, e_ehsize=ehdr.size,
                     e_phentsize=phdr.size, e_phnum=phnum)
    rows = [(PT_NOTE, 0, note_off, 0, 0, len(notes), len(notes), 0)]
    rows += [(PT_LOAD, ld.flags, o, ld.vaddr, ld.paddr, ld.size, ld.size, 0)
             for ld, o in zip(loads, offsets, strict=True)]
    for t, fl, o, va, pa, fs, ms, al in rows:
        out += phdr.pack(p_type=t, p_flags=fl, p_offset=o, p_vaddr=va & 0xFFFFFFFF if elf32 else va, p_paddr=pa,
                         p_filesz=fs, p_memsz=ms, p_align=al)
    out += notes
    out += bytes(data_off - len(out))
    return bytes(out), offsets


def write_elf(out: BinaryIO, loads: Sequence[LoadSpec], notes: Sequence[Note],
              read: Callable[[int, int], bytes | memoryview], *, elf32: bool = False,
              chunk: int = 4 << 20, progress: Callable[[int], None] | None = None) -> int:
    """Stream an ELF core: headers, then each load's bytes from ``read(paddr, n)``; returns bytes written."""
    head, _ = elf_layout(loads, pack_notes(notes), elf32=elf32)
    out.write(head)
    total = len(head)
    for ld in loads:
        pos = ld.paddr
        while pos < ld.paddr + ld.size:
            n = min(chunk, ld.paddr + ld.size - pos)
            out.write(read(pos, n))
            pos += n
            total += n
            if progress:
                progress(n)
    return total


# ------------------------------------------------------------------------------------------------ registry


def probe(head: bytes) -> bool:
    """True if the file's first bytes are an ELF file (the reader then checks it is a core)."""
    return head.startswith(ELFMAG)


def open(path: str | os.PathLike[str]) -> ElfSource:  # noqa: A001 - the registry's name for "open this format"
    """The ELF reader for ``path``."""
    return ElfSource(path)
