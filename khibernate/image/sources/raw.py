"""Raw physical memory (``/dev/mem`` in the jumped-to kernel, ``/dev/oldmem``, a flat RAM file): file offset ==
physical address; the RAM ranges and the notes come from an elfcorehdr (kexec-tools' or ours) or are given."""

from __future__ import annotations

import os
from collections.abc import Sequence

from khibernate.elfcore import Note, parse_elfcorehdr, parse_notes
from khibernate.image.errors import ELF_ERRORS, CorruptImageError, UsageErrorImage
from khibernate.image.inputfile import MAX_PHYS_ADDR
from khibernate.image.sources.base import FileSegment, MemRange, SegmentedFile, SegmentedFileSource, merge_ranges


def ranges_from_elfcorehdr(blob: bytes) -> tuple[tuple[MemRange, ...], list[tuple[int, int]]]:
    """(RAM ranges, [(note paddr, size)]) described by an elfcorehdr; its PT_NOTE p_offset is a physical address."""
    h = parse_elfcorehdr(blob, errors=ELF_ERRORS, limit=MAX_PHYS_ADDR)
    return merge_ranges(h.ram), [(n.paddr, n.size) for n in h.notes]


def parse_ranges(text: str) -> tuple[MemRange, ...]:
    """Ranges from ``START-END[,START-END...]`` (hex, END exclusive)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if part:
            a, _, b = part.partition("-")
            try:
                r = MemRange(int(a, 16), int(b, 16))
            except ValueError:
                raise UsageErrorImage(f"--ranges {part!r} is not START-END in hex (e.g. 100000-7fffffff)") from None
            if r.start >= r.end:
                raise UsageErrorImage(f"--ranges {part!r}: END must be above START (END is exclusive)")
            out.append(r)
    return merge_ranges(out)


class RawSource(SegmentedFileSource):
    """Memory read from a raw physical-memory file at offset == paddr."""

    format_name = "raw"

    def __init__(self, path: str | os.PathLike[str], ranges: Sequence[MemRange], *,
                 note_locations: Sequence[tuple[int, int]] = (), use_mmap: bool = False):
        self.path = os.fspath(path)
        self._ranges = merge_ranges(ranges)
        segs = [FileSegment(r.start, r.size, r.start, r.size) for r in self._ranges]
        self.file = SegmentedFile(self.path, segs, use_mmap=use_mmap)
        notes: list[Note] = []
        try:
            for paddr, size in note_locations:
                if size > 1 << 24:
                    raise CorruptImageError(f"{self.path}: a {size}-byte note buffer is not a note; the elfcorehdr "
                                            "is corrupt")
                notes += parse_notes(self.file.read(paddr, size), errors=ELF_ERRORS)
        except BaseException:
            self.file.close()
            raise
        self._notes = tuple(notes)

    @classmethod
    def with_elfcorehdr(cls, path: str | os.PathLike[str], elfcorehdr: bytes) -> RawSource:
        """Raw memory + the elfcorehdr that describes it."""
        ranges, notes = ranges_from_elfcorehdr(elfcorehdr)
        return cls(path, ranges, note_locations=notes)

