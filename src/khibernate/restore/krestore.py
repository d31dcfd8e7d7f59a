"""krestore: write a saved image back into the first kernel's memory, read it back, and enter the saved kernel.

Order, and why: (1) everything is checked with nothing written — the image's tables and every block's checksum,
and that the image belongs to this boot (:mod:`khibernate.restore.checks`); (2) the caller marks the slot resumed
(a stale image is never resumed twice by accident); (3) every stored page is written, every page the image
records as zero is zeroed, dropped free pages are left alone unless the saved kernel zeroes freed memory
(``init_on_free``); each block is read back and compared by CRC; (4) the caller jumps to the saved entry.
After the first write the memory belongs to the saved kernel: any failure from there on must power off, never
return into the kernel whose memory was overwritten.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from khibernate import native
from khibernate.image.plan import ram_mask
from khibernate.ranges import Range
from khibernate.restore.errors import RestoreError as RestoreError
from khibernate.restore.oldmem import OldMemory

if TYPE_CHECKING:
    from khibernate.image.sources.khi import KhiSource

ZERO_CHUNK = 1 << 20
MASK_CHUNK = 1 << 20  # pfns unpacked from a bitmap at a time


@dataclasses.dataclass
class RestoreStats:
    """What a restore wrote and how fast."""

    pages_written: int = 0
    pages_zeroed: int = 0
    pages_free_zeroed: int = 0
    bytes_written: int = 0
    blocks: int = 0
    verify_seconds: float = 0.0
    write_seconds: float = 0.0

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_written / 1e6 / self.write_seconds if self.write_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "throughput_mb_s": round(self.throughput_mb_s, 1)}


def runs(pfns: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(first pfn, page count, index of its first page in ``pfns``) for each run of consecutive pfns; ``pfns``
    strictly ascending (a block's).  pfns[i] - i never decreases and is constant along a run, so each run's end is
    a bisection: O(log n) steps per run, not one per page."""
    n = len(pfns)
    s = 0
    while s < n:
        e = bisect.bisect_right(range(n), pfns[s] - s, lo=s, key=lambda i: pfns[i] - i)
        yield pfns[s], e - s, s
        s = e


def clip(ranges: Sequence[Range], starts: Sequence[int], start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of [start, end) inside ``ranges`` (sorted, disjoint; ``starts`` their start addresses)."""
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(ranges) and ranges[i].start < end:
        a, b = max(start, ranges[i].start), min(end, ranges[i].end)
        if a < b:
            yield a, b
        i += 1


def bitmap_runs(bits: bytes, max_pfn: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pfns of each run of set bits of a little-endian bitmap below ``max_pfn``, unpacked MASK_CHUNK
    pfns at a time (memory stays O(bitmap), not O(pfns)); runs crossing a chunk boundary come out whole."""
    start = stop = 0
    for lo in range(0, max_pfn, MASK_CHUNK):
        for a, b in native.runs(native.unpack_bits(bits, lo, min(MASK_CHUNK, max_pfn - lo))):
            if lo + a != stop:
                if stop > start:
                    yield start, stop
                start = lo + a
            stop = lo + b
    if stop > start:
        yield start, stop


def write_image(src: KhiSource, mem: OldMemory, *, ram: Sequence[Range] | None = None, zero_free: bool = False,
                progress: Callable[[int], None] | None = None, on_first_write: Callable[[], None] | None = None,
                verify: bool = True) -> RestoreStats:
    """Write every stored page of ``src`` (a checked KhiSource) into ``mem``, zero its zero pages (and, with
    ``zero_free``, the pages it dropped as free), nothing outside ``ram`` (default: the image's ranges); each
    block read back and compared.  RestoreError on a mismatch."""
    ps = src.page_size
    ranges = sorted(Range(r.start, r.end) for r in (ram if ram is not None else src.ranges))
    starts = [r.start for r in ranges]
    st = RestoreStats()
    t0 = time.monotonic()
    first = [True]

    def put(addr: int, data: memoryview) -> int:
        """Write data at addr clipped to the RAM ranges; CRC-compare what reads back (in place); bytes written."""
        n = 0
        for a, b in clip(ranges, starts, addr, addr + len(data)):
            if first[0] and on_first_write is not None:
                on_first_write()
            first[0] = False
            part = data[a - addr:b - addr]
            mem.write(a, part)
            if verify and mem.crc32(a, b - a) != zlib.crc32(part):
                raise RestoreError(f"memory at {a:#x}-{b:#x} reads back differently from what was written")
            n += b - a
        return n

    for pfns, data in src.iter_blocks():
        mv = memoryview(data)
        for pfn, count, k in runs(pfns):
            st.bytes_written += put(pfn * ps, mv[k * ps:(k + count) * ps])
        st.pages_written += len(pfns)
        st.blocks += 1
        if progress:
            progress(len(data))
    max_pfn = src.max_pfn
    todo = [(src.zero_bits, "zero")]
    if zero_free:
        # RAM & ~zero & ~stored on the bitmaps as big integers (no per-page loop)
        ram_bits = native.pack_bits(ram_mask(ranges, 0, max_pfn, ps))
        held = int.from_bytes(src.zero_bits, "little") | int.from_bytes(src.stored_bits, "little")
        dropped = int.from_bytes(ram_bits, "little") & ~held
        todo.append((dropped.to_bytes(len(ram_bits), "little"), "free"))
    zeros = memoryview(bytes(ZERO_CHUNK))
    for bits, what in todo:
        npages = 0
        for a, b in bitmap_runs(bits, max_pfn):
            npages += b - a
            addr, end = a * ps, b * ps
            while addr < end:
                n = min(end - addr, ZERO_CHUNK)
                st.bytes_written += put(addr, zeros[:n])
                addr += n
        if what == "zero":
            st.pages_zeroed = npages
        else:
            st.pages_free_zeroed = npages
        if progress:
            progress(npages * ps)
    st.write_seconds = time.monotonic() - t0
    return st
