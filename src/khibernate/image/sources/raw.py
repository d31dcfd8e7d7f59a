"""Raw physical memory: a file or device whose offset is the physical address (``/dev/mem`` in a capture kernel,
``/dev/oldmem``, a flat RAM file).  It has no magic to probe: the RAM ranges and the notes come from an elfcorehdr
(kexec-tools' or ours) or are given (``open_source(path, ranges=...)`` / ``elfcorehdr=...``).  Two ways in:

- :class:`RawSource` reads by pread (and, on request, through one mapping of the whole file): files, /dev/oldmem;
- :class:`DevMemSource` maps page-aligned windows of ``/dev/mem``: ``read()`` of /dev/mem stops at the running
  kernel's own end of RAM (x86 ``valid_phys_addr_range``: high_memory), and a capture kernel's RAM is the small
  crash region, so most of the first kernel lies above it; ``mmap`` has no such limit
  (``valid_mmap_phys_addr_range``).  Each window stays inside one RAM range of the elfcorehdr (rounded out to whole
  pages), so a mapping never covers a page the running kernel owns (STRICT_DEVMEM refuses those) or another memory
  type.  Mappings are write-back, not ``O_SYNC``: this is RAM, as /proc/vmcore maps it.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
from collections.abc import Callable, Sequence

from khibernate.elfcore import EHDR64, PHDR64, Note, parse_elfcorehdr, parse_headers, parse_notes
from khibernate.image.errors import (
    ELF_ERRORS,
    AddressError,
    CorruptImageError,
    FileAccessError,
    MappingRefusedError,
    UsageErrorImage,
)
from khibernate.image.layouts import MAX_PHYS_ADDR
from khibernate.image.sources.base import (
    FileSegment,
    MemRange,
    SegmentedFile,
    SegmentedFileSource,
    StoredSource,
    merge_ranges,
)
from khibernate.ranges import Range

MAX_NOTES = 1 << 24  # a PT_NOTE bigger than this is not the kernel's


def ranges_from_elfcorehdr(blob: bytes) -> tuple[tuple[MemRange, ...], list[Range]]:
    """(RAM ranges, where the note buffers lie) an elfcorehdr describes; its PT_NOTE p_offset is a physical
    address."""
    h = parse_elfcorehdr(blob, errors=ELF_ERRORS, limit=MAX_PHYS_ADDR)
    return merge_ranges(h.ram), h.notes


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


def read_notes(path: str, read: Callable[[int, int], bytes], buffers: Sequence[Range]) -> tuple[Note, ...]:
    """The notes in the old kernel's note buffers, read with ``read(paddr, size)``."""
    notes: list[Note] = []
    for b in buffers:
        if b.size > MAX_NOTES:
            raise CorruptImageError(f"{path}: a {b.size}-byte note buffer is not a note; the elfcorehdr is corrupt")
        notes += parse_notes(read(b.start, b.size), errors=ELF_ERRORS)
    return tuple(notes)


class RawSource(SegmentedFileSource):
    """Memory read from a raw physical-memory file at offset == paddr (pread; ``use_mmap`` maps the file)."""

    format_name = "raw"

    def __init__(self, path: str | os.PathLike[str], ranges: Sequence[MemRange], *,
                 note_locations: Sequence[Range] = (), use_mmap: bool = False):
        self.path = os.fspath(path)
        self._ranges = merge_ranges(ranges)
        segs = [FileSegment(r.start, r.size, r.start, r.size) for r in self._ranges]
        self.file = SegmentedFile(self.path, segs, use_mmap=use_mmap)
        try:
            self._notes = read_notes(self.path, self.file.read, note_locations)
        except BaseException:
            self.file.close()
            raise

    @classmethod
    def with_elfcorehdr(cls, path: str | os.PathLike[str], elfcorehdr: bytes) -> RawSource:
        """Raw memory + the elfcorehdr that describes it."""
        ranges, notes = ranges_from_elfcorehdr(elfcorehdr)
        return cls(path, ranges, note_locations=notes)


# ------------------------------------------------------------------------------------------------ /dev/mem


PAGE = mmap.PAGESIZE
WINDOW = 4 << 20  # bytes mapped at once (at most; clipped to the range): bounded address space, few mmap calls


def _down(x: int) -> int:
    return x - x % PAGE


def _up(x: int) -> int:
    return -(-x // PAGE) * PAGE


class PhysWindows:
    """Physical reads of a /dev/mem-like file (offset == physical address) through mmap windows; the last window
    stays mapped, so sequential reads map each window once. A regular file works the same (the fast tier)."""

    def __init__(self, path: str | os.PathLike[str], window: int | None = None):
        self.path = os.fspath(path)
        self.window = max(PAGE, _down(WINDOW if window is None else window))
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            if e.errno == errno.EACCES:
                raise PermissionError(e.errno, f"{self.path}: {e.strerror}; run as root") from None
            raise FileAccessError(f"cannot open {self.path}: {e.strerror} (the kernel needs CONFIG_DEVMEM)") from None
        size = os.fstat(self.fd).st_size
        self._file_end = _up(size) if size else None  # a regular file: never map past its end (SIGBUS)
        self._map: mmap.mmap | None = None
        self._map_at = 0

    def read(self, paddr: int, size: int, lo: int | None = None, hi: int | None = None) -> bytes:
        """Bytes of [paddr, paddr+size). Windows never map below ``lo`` or at/above ``hi`` (rounded out to pages;
        default: the request itself). MappingRefusedError when the kernel refuses the mapping."""
        if size <= 0:
            return b""
        lo = _down(paddr if lo is None else lo)
        hi = _up(paddr + size if hi is None else hi)
        if self._file_end is not None:
            hi = min(hi, self._file_end)
        if not (lo <= paddr and paddr + size <= hi):
            raise AddressError(f"{self.path}: [{paddr:#x}, {paddr + size:#x}) is outside [{lo:#x}, {hi:#x})")
        parts = []
        pos, end = paddr, paddr + size
        while pos < end:
            m = self._window(pos, lo, hi)
            n = min(end, self._map_at + len(m)) - pos
            parts.append(m[pos - self._map_at:pos - self._map_at + n])
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _window(self, pos: int, lo: int, hi: int) -> mmap.mmap:
        m = self._map
        if m is not None and self._map_at <= pos < self._map_at + len(m):
            return m
        self._unmap()
        start = max(lo, pos - pos % self.window)
        length = min(hi, start + self.window) - start
        try:
            m = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
        except OSError as e:
            raise MappingRefusedError(
                f"mmap of {self.path} at {start:#x}+{length:#x} refused ({e.strerror}): under STRICT_DEVMEM the "
                "running kernel's own RAM cannot be mapped, and under IO_STRICT_DEVMEM a busy (reserved) range only "
                "with iomem=relaxed on its command line", e.errno or 0) from None
        self._map, self._map_at = m, start
        return m

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        """Unmap and close (idempotent)."""
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_elfcorehdr(mem: PhysWindows, paddr: int) -> bytes:
    """The ELF core header at physical ``paddr``: file header plus program headers (CorruptImageError or
    NotAVmcoreError when it is not one)."""
    head = mem.read(paddr, EHDR64.size)
    fields = EHDR64.unpack(head)
    phoff, phnum = fields["e_phoff"], fields["e_phnum"]
    if phoff > 1 << 20 or phnum > 1 << 14:
        parse_headers(head, errors=ELF_ERRORS)  # says what is wrong with a header that is not an ELF core header
        raise CorruptImageError(f"the elfcorehdr at {paddr:#x} has {phnum} program headers at offset {phoff}")
    blob = mem.read(paddr, max(EHDR64.size, phoff + phnum * PHDR64.size))
    parse_headers(blob, errors=ELF_ERRORS)
    return blob


class DevMemSource(StoredSource):
    """The previous kernel's memory read from /dev/mem by mmap, over the RAM ranges and notes of its elfcorehdr."""

    format_name = "raw"

    def __init__(self, path: str | os.PathLike[str], ranges: Sequence[MemRange], *,
                 note_locations: Sequence[Range] = (), window: int | None = None):
        self.path = os.fspath(path)
        self._ranges = merge_ranges(ranges)
        self._starts = [r.start for r in self._ranges]
        self.mem = PhysWindows(self.path, window)
        try:
            self._notes = read_notes(self.path, self.mem.read, note_locations)
        except BaseException:
            self.mem.close()
            raise

    @classmethod
    def with_elfcorehdr(cls, path: str | os.PathLike[str], elfcorehdr: bytes) -> DevMemSource:
        """/dev/mem + the elfcorehdr that describes the previous kernel's memory in it."""
        ranges, notes = ranges_from_elfcorehdr(elfcorehdr)
        return cls(path, ranges, note_locations=notes)

    def read(self, paddr: int, size: int) -> bytes:
        if paddr < 0 or size < 0:
            raise AddressError(f"physical address {paddr:#x} size {size} is negative")
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i < 0 or paddr + size > self._ranges[i].end:
            raise AddressError(f"physical [{paddr:#x}, {paddr + size:#x}) is not in one RAM range of the elfcorehdr")
        r = self._ranges[i]
        return self.mem.read(paddr, size, r.start, r.end)

    def close(self) -> None:
        self.mem.close()
