"""ELF core files (vmcores): reader (:class:`ElfSource`) and writers side by side, over the layouts and codecs of
:mod:`khibernate.elfcore`.

Reads ELF64 and ELF32 cores (``/proc/vmcore``, kexec-tools ``--elf32-core-headers``, QEMU ``dump-guest-memory``
with all ``p_vaddr`` 0) by mmap/pread, never loading the file.  Writes ELF64 (or ELF32 below 4 GiB) cores that
gdb, makedumpfile and drgn open: streamed (:func:`write_elf`, for ``image export``) or served on demand
(:class:`VmcoreLayout`: the header built once, file offsets mapped to physical addresses, for a view's ``vmcore``).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import BinaryIO

from khibernate.elfcore import (
    ELFCLASS64,
    ELFMAG,
    EM_386,
    EM_X86_64,
    LoadSpec,
    Note,
    Phdr,
    core_header,
    pack_notes,
    parse_headers,
    parse_notes,
)
from khibernate.image.errors import ELF_ERRORS, CorruptImageError, NotAVmcoreError, UnsupportedError
from khibernate.image.inputfile import check_span, input_size, open_input, pread_exact
from khibernate.image.layouts import MAX_PHYS_ADDR
from khibernate.image.sources.base import FileSegment, MemRange, SegmentedFile, SegmentedFileSource, merge_ranges

# ------------------------------------------------------------------------------------------------ reader


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

            self.headers = parse_headers(head, read_at, errors=ELF_ERRORS)
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
            self._notes = tuple(n for b in blobs for n in parse_notes(b, errors=ELF_ERRORS))
        finally:
            os.close(fd)
        self.file = SegmentedFile(self.path, ram_segments(self.headers.loads), use_mmap=True)
        self._ranges = merge_ranges([MemRange(s.paddr, s.paddr + s.memsz) for s in self.file.segments])


# ------------------------------------------------------------------------------------------------ writers


def write_elf(out: BinaryIO, loads: Sequence[LoadSpec], notes: Sequence[Note],
              read: Callable[[int, int], bytes | memoryview], *, elf32: bool = False,
              chunk: int = 4 << 20, progress: Callable[[int], None] | None = None) -> int:
    """Stream an ELF core: headers, then each load's bytes from ``read(paddr, n)``; returns bytes written."""
    head, _ = core_header(loads, pack_notes(notes), elf32=elf32, errors=ELF_ERRORS)
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


@dataclasses.dataclass(frozen=True, order=True)
class Segment:
    """File bytes [offset, offset+size) hold physical [paddr, paddr+size)."""

    offset: int
    paddr: int
    size: int


def loads_for(ranges: Sequence[MemRange], *, page_offset: int = 0,
              kernel_text: LoadSpec | None = None) -> list[LoadSpec]:
    """PT_LOADs for ``ranges``: the kernel text alias first (if given), then one per range."""
    loads = [kernel_text] if kernel_text is not None else []
    loads += [LoadSpec(r.start, r.size, page_offset + r.start if page_offset else 0) for r in ranges if r.size]
    return loads


class VmcoreLayout:
    """An ELF core over ``loads`` whose bytes are made on demand: the header once, then the offset → physical
    address map (what /proc/vmcore looks like: ELF header, one PT_NOTE, an optional PT_LOAD aliasing the kernel
    image at its virtual address, then one PT_LOAD per RAM range with p_vaddr in the direct map)."""

    def __init__(self, loads: Sequence[LoadSpec], notes: Sequence[Note]):
        self.header, offsets = core_header(list(loads), pack_notes(notes), errors=ELF_ERRORS)
        self.segments = tuple(Segment(o, ld.paddr, ld.size) for ld, o in zip(loads, offsets, strict=True))
        self._starts = [s.offset for s in self.segments]
        last = self.segments[-1] if self.segments else None
        self.size = last.offset + last.size if last else len(self.header)

    def pieces(self, offset: int, size: int) -> list[tuple[int, int, int | None]]:
        """(file offset, length, paddr or None for header bytes) covering [offset, offset+size) clipped at EOF."""
        end = min(offset + size, self.size)
        out: list[tuple[int, int, int | None]] = []
        pos = max(offset, 0)
        while pos < end:
            if pos < len(self.header):
                n = min(end, len(self.header)) - pos
                out.append((pos, n, None))
            else:
                i = bisect.bisect_right(self._starts, pos) - 1
                s = self.segments[i]
                n = min(end, s.offset + s.size) - pos
                out.append((pos, n, s.paddr + pos - s.offset))
            pos += n
        return out

    def read(self, offset: int, size: int, read_phys: Callable[[int, int], bytes]) -> bytes:
        """File bytes at [offset, offset+size) (short at EOF); data bytes come from ``read_phys(paddr, n)``."""
        parts = [self.header[o:o + n] if pa is None else read_phys(pa, n) for o, n, pa in self.pieces(offset, size)]
        return b"".join(parts)


# ------------------------------------------------------------------------------------------------ registry


def probe(head: bytes) -> bool:
    """True if the file's first bytes are an ELF file (the reader then checks it is a core)."""
    return head.startswith(ELFMAG)


def open(path: str | os.PathLike[str]) -> ElfSource:  # noqa: A001 - the registry's name for "open this format"
    """The ELF reader for ``path``."""
    return ElfSource(path)
