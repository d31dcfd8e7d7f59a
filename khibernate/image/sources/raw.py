"""Raw physical memory (``/dev/mem`` in the jumped-to kernel, ``/dev/oldmem``, a flat RAM file): file offset ==
physical address; the RAM ranges and the notes come from an elfcorehdr (kexec-tools' or ours) or are given."""

from __future__ import annotations

import os
from collections.abc import Sequence

from khibernate.image.elf import parse_headers, parse_notes
from khibernate.image.errors import NotAVmcoreError
from khibernate.image.sources.base import FileSegment, MemRange, Note, SegmentedFile, SegmentedFileSource, merge_ranges


def ranges_from_elfcorehdr(blob: bytes) -> tuple[tuple[MemRange, ...], list[tuple[int, int]]]:
    """(RAM ranges, [(note paddr, size)]) described by an elfcorehdr; its PT_NOTE p_offset is a physical address."""
    h = parse_headers(blob)
    ranges = merge_ranges([MemRange(p.paddr, p.paddr + p.memsz) for p in h.loads])
    if not ranges:
        raise NotAVmcoreError("the elfcorehdr has no PT_LOAD: it describes no memory")
    return ranges, [(p.offset, p.filesz) for p in h.note_phdrs]


def parse_ranges(text: str) -> tuple[MemRange, ...]:
    """Ranges from ``START-END[,START-END...]`` (hex, END exclusive)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if part:
            a, _, b = part.partition("-")
            out.append(MemRange(int(a, 16), int(b, 16)))
    return merge_ranges(out)


class RawSource(SegmentedFileSource):
    """Memory read from a raw physical-memory file at offset == paddr."""

    def __init__(self, path: str | os.PathLike[str], ranges: Sequence[MemRange], *,
                 note_locations: Sequence[tuple[int, int]] = (), use_mmap: bool = False):
        self.path = os.fspath(path)
        self._ranges = merge_ranges(ranges)
        segs = [FileSegment(r.start, r.size, r.start, r.size) for r in self._ranges]
        self.file = SegmentedFile(self.path, segs, use_mmap=use_mmap)
        notes: list[Note] = []
        for paddr, size in note_locations:
            notes += parse_notes(self.file.read(paddr, size))
        self._notes = tuple(notes)

    @classmethod
    def with_elfcorehdr(cls, path: str | os.PathLike[str], elfcorehdr: bytes) -> RawSource:
        """Raw memory + the elfcorehdr that describes it."""
        ranges, notes = ranges_from_elfcorehdr(elfcorehdr)
        return cls(path, ranges, note_locations=notes)

