"""The MemorySource interface: physical ranges, ``read(paddr, n)``, VMCOREINFO and ELF notes."""

from __future__ import annotations

import bisect
import dataclasses
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

from khibernate.elfcore import VMCOREINFO_NOTE, Note
from khibernate.image.errors import AddressError, TruncatedError
from khibernate.ranges import Range, merge

PAGE_SIZE = 4096


# The image side's name for khibernate's one Range type (half-open, e820 type left at RAM).
MemRange = Range


def merge_ranges(ranges: Sequence[MemRange]) -> tuple[MemRange, ...]:
    """Sorted, coalesced ranges (overlapping or touching ranges become one): :func:`khibernate.ranges.merge`."""
    return merge(ranges)


class MemorySource(ABC):
    """Read-only view of a physical address space; subclasses supply ranges and ``read``."""

    page_size: int = PAGE_SIZE
    format_name: str = "memory"  # what ``image info`` calls the format

    @property
    def dump_level(self) -> int:
        """makedumpfile dump level already applied to this source (0: nothing was filtered out)."""
        return 0

    def describe(self) -> dict[str, object]:
        """Format-specific facts for ``image info`` (header fields, counts); empty by default."""
        return {}

    def verify(self, progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Read every page the source holds (excluded pages skipped); raises the reader's error on the first bad one."""
        from khibernate import native  # not at module level: the CLI starts without loading the C kernel

        chunk = 1024
        pages = 0
        for r in self.ranges:
            lo, hi = r.start // self.page_size, -(-r.end // self.page_size)
            for pfn in range(lo, hi, chunk):
                n = min(chunk, hi - pfn)
                mask = self.page_present_mask(pfn, n)
                start, end = max(r.start, pfn * self.page_size), min(r.end, (pfn + n) * self.page_size)
                if mask is None:
                    self.read(start, end - start)
                    pages += n
                else:
                    for i, j in native.runs(mask):  # page by page: reading a whole run copies more
                        for p in range(pfn + i, pfn + j):
                            a = max(start, p * self.page_size)
                            self.read(a, min(end, (p + 1) * self.page_size) - a)
                    pages += mask.count(1)
                if progress:
                    progress(end - start)
        return {"pages_read": pages}

    @property
    @abstractmethod
    def ranges(self) -> tuple[MemRange, ...]:
        """RAM ranges, sorted and non-overlapping."""

    @abstractmethod
    def read(self, paddr: int, size: int) -> bytes:
        """Bytes at [paddr, paddr+size); AddressError if any byte is outside ``ranges`` or excluded."""

    @property
    def notes(self) -> tuple[Note, ...]:
        """ELF notes of the source (NT_PRSTATUS, VMCOREINFO, ...), possibly empty."""
        return ()

    @property
    def vmcoreinfo_text(self) -> str | None:
        """Raw VMCOREINFO text if the source carries it."""
        for n in self.notes:
            if n.name == VMCOREINFO_NOTE:
                return n.desc.rstrip(b"\0").decode("ascii", "replace")
        return None

    @property
    def max_pfn(self) -> int:
        """One past the highest RAM pfn."""
        return -(-self.ranges[-1].end // self.page_size) if self.ranges else 0

    def view(self, paddr: int, size: int) -> memoryview:
        """Like read() but zero-copy where the reader can (mmap)."""
        return memoryview(self.read(paddr, size))

    def readinto(self, paddr: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``paddr`` (no allocation where the reader can avoid it)."""
        buf[:] = self.view(paddr, len(buf))

    def mapped_view(self, paddr: int, size: int) -> memoryview | None:
        """A zero-copy view of [paddr, paddr+size) straight from a mapping of the source, or None where the
        reader has none for that range (then use readinto); give it back with :meth:`release` once copied."""
        return None

    def release(self, paddr: int, size: int) -> None:
        """Done with [paddr, paddr+size) of a mapped_view(): drop those pages from this process (RSS stays flat)."""
        return None

    def present(self, paddr: int, size: int) -> bool:
        """True if [paddr, paddr+size) holds data (inside ranges and not excluded)."""
        i = bisect.bisect_right([r.start for r in self.ranges], paddr) - 1
        return i >= 0 and self.ranges[i].end >= paddr + size

    def read_filled(self, paddr: int, size: int) -> bytes:
        """Bytes of [paddr, paddr+size) that never fail inside the address space: the source's bytes where it has
        them, zeros for holes and excluded pages (what a view's ``oldmem`` and ``vmcore`` data return; a reader
        that wants to know asks :meth:`present` / :meth:`page_present_mask`)."""
        if size <= 0:
            return b""
        try:
            return self.read(paddr, size)
        except AddressError:
            pass
        ps = self.page_size
        out = bytearray(size)
        pos = paddr
        end = paddr + size
        while pos < end:
            n = min(ps - pos % ps, end - pos)
            if self.present(pos, n):
                try:
                    out[pos - paddr:pos - paddr + n] = self.read(pos, n)
                except AddressError:
                    pass  # excluded by the filter: stays zero
            pos += n
        return bytes(out)

    def page_present_mask(self, pfn: int, count: int) -> bytearray | None:
        """Per pfn of pfn..pfn+count one byte, 1 where it holds data, 0 where not; None means 'all inside ranges'."""
        return None

    def close(self) -> None:
        """Release files and mappings (nothing to release by default)."""
        return None

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True, order=True)
class FileSegment:
    """Physical [paddr, paddr+memsz) whose first ``filesz`` bytes are at file offset ``offset``; the rest reads 0."""

    paddr: int
    memsz: int
    offset: int
    filesz: int


class SegmentedFile:
    """Physical reads over a file made of segments (ELF cores, /dev/mem) by pread (bounded RSS); mmap on request."""

    def __init__(self, path: str | os.PathLike[str], segments: Sequence[FileSegment], *, use_mmap: bool = False):
        from khibernate.image.inputfile import input_size, open_input

        self.fd = open_input(path)
        try:
            self.size = input_size(self.fd)
            self.segments = sorted(segments)
            self._starts = [s.paddr for s in self.segments]
            self.mm: mmap.mmap | None = None
            self._release = True  # MADV_DONTNEED works on this mapping (see release)
            for s in self.segments:
                if s.offset < 0 or s.filesz < 0 or (self.size and s.offset + s.filesz > self.size):
                    raise TruncatedError(
                        f"{os.fspath(path)}: segment at paddr {s.paddr:#x} needs file bytes up to "
                        f"{s.offset + s.filesz}, file has {self.size}; the dump was cut short, take it again"
                    )
            if use_mmap and self.size > 0:
                try:
                    self.mm = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
                    self.mm.madvise(mmap.MADV_SEQUENTIAL)
                except (OSError, ValueError):
                    self.mm = None
        except BaseException:
            os.close(self.fd)
            raise

    def file_backed(self) -> Iterator[tuple[int, int]]:
        """(paddr, length) of every piece whose bytes come from the file (zero fill left out)."""
        for s in self.segments:
            if s.filesz:
                yield s.paddr, min(s.filesz, s.memsz)

    def chunks(self, paddr: int, size: int) -> Iterator[tuple[int, int, int | None]]:
        """(paddr, length, file offset or None for zero fill) pieces covering the request; AddressError on holes."""
        if paddr < 0 or size < 0:
            raise AddressError(f"physical address {paddr:#x} size {size} is negative")
        end = paddr + size
        while paddr < end:
            i = bisect.bisect_right(self._starts, paddr) - 1
            if i < 0 or paddr >= self.segments[i].paddr + self.segments[i].memsz:
                raise AddressError(f"physical address {paddr:#x} is not in the dump")
            s = self.segments[i]
            n = min(end, s.paddr + s.memsz) - paddr
            rel = paddr - s.paddr
            if rel < s.filesz:
                n = min(n, s.filesz - rel)
                yield paddr, n, s.offset + rel
            else:
                yield paddr, n, None
            paddr += n

    def read(self, paddr: int, size: int) -> bytes:
        """Bytes of [paddr, paddr+size) by pread (never through the mapping: its pages would stay in this process's
        RSS; a bulk reader uses mapped_view + release)."""
        parts = []
        for _, n, off in self.chunks(paddr, size):
            if off is None:
                parts.append(bytes(n))
            else:
                data = os.pread(self.fd, n, off)
                if len(data) != n:
                    raise TruncatedError(f"short read at file offset {off}; the dump is truncated")
                parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, paddr: int, buf: memoryview) -> None:
        """Fill ``buf`` from [paddr, paddr+len(buf)) with preadv, no intermediate copies."""
        pos = 0
        for _, n, off in self.chunks(paddr, len(buf)):
            if off is None:
                buf[pos:pos + n] = bytes(n)
            else:
                done = 0
                while done < n:
                    got = os.preadv(self.fd, [buf[pos + done:pos + n]], off + done)
                    if got <= 0:
                        raise TruncatedError(f"short read at file offset {off + done}; the dump is truncated")
                    done += got
            pos += n

    def mapped_view(self, paddr: int, size: int) -> memoryview | None:
        """A view into the mapping when the request lies in one file-backed segment, else None."""
        if self.mm is not None:
            pieces = list(self.chunks(paddr, size))
            if len(pieces) == 1 and pieces[0][2] is not None:
                off = pieces[0][2]
                return memoryview(self.mm)[off:off + size]
        return None

    def release(self, paddr: int, size: int) -> None:
        """MADV_DONTNEED over the whole mapped pages of [paddr, paddr+size): they leave this process's RSS (the page
        cache keeps them); a later access faults them back in.  A mapping that refuses it (``/proc/vmcore``'s old
        memory is VM_PFNMAP: EINVAL, and such pages never count in RSS) is not asked again."""
        if self.mm is None or not self._release:
            return
        for _, n, off in self.chunks(paddr, size):
            if off is None:
                continue
            lo = -(-off // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = (off + n) // mmap.PAGESIZE * mmap.PAGESIZE
            if hi > lo:
                try:
                    self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                except OSError:
                    self._release = False
                    return

    def close(self) -> None:
        """Unmap and close."""
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with the object
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StoredSource(MemorySource):
    """A MemorySource whose ranges and notes were read once at open: subclasses set ``_ranges`` and ``_notes``."""

    _ranges: tuple[MemRange, ...]
    _notes: tuple[Note, ...]

    @property
    def ranges(self) -> tuple[MemRange, ...]:
        return self._ranges

    @property
    def notes(self) -> tuple[Note, ...]:
        return self._notes


class SegmentedFileSource(StoredSource):
    """A MemorySource whose memory is a SegmentedFile: subclasses set ``file``, ``_ranges`` and ``_notes``."""

    file: SegmentedFile

    def read(self, paddr: int, size: int) -> bytes:
        return self.file.read(paddr, size)

    def mapped_view(self, paddr: int, size: int) -> memoryview | None:
        return self.file.mapped_view(paddr, size)

    def release(self, paddr: int, size: int) -> None:
        self.file.release(paddr, size)

    def readinto(self, paddr: int, buf: memoryview) -> None:
        self.file.readinto(paddr, buf)

    def close(self) -> None:
        self.file.close()

    def verify(self, progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Read every byte the file holds (zero-filled tails need no reading, so a huge p_memsz cannot hang)."""
        nbytes = 0
        for paddr, n in self.file.file_backed():
            for a in range(paddr, paddr + n, 4 << 20):
                m = min(4 << 20, paddr + n - a)
                self.file.read(a, m)
                nbytes += m
                if progress:
                    progress(m)
        return {"bytes_read": nbytes}


class PagedSource(MemorySource):
    """A MemorySource that stores whole pages: subclasses give ``page_size`` and ``read_page(pfn)``."""

    page_size: int

    @abstractmethod
    def read_page(self, pfn: int) -> bytes:
        """The page's bytes; raises AddressError when the page is not in the source."""

    def read(self, paddr: int, size: int) -> bytes:
        if paddr < 0 or size < 0:
            raise AddressError(f"physical address {paddr:#x} size {size} is negative")
        ps = self.page_size
        out = bytearray()
        end = paddr + size
        while paddr < end:
            pfn, off = divmod(paddr, ps)
            n = min(ps - off, end - paddr)
            out += self.read_page(pfn)[off:off + n]
            paddr += n
        return bytes(out)
