"""The first kernel's physical memory, writable from the capture kernel: ``/dev/oldmem`` or ``mmap`` of ``/dev/mem``.

``/dev/oldmem`` (removed from Linux in 3.x) took pread/pwrite at physical offsets.  Today the only way in is
``/dev/mem``, and only through ``mmap``: its read()/write() stop at the running (capture) kernel's own highest RAM,
while mmap checks only the CPU's physical address width.  The capture kernel needs ``iomem=relaxed`` (khibernate's
jump load adds it) because, with CONFIG_IO_STRICT_DEVMEM, RAM above its region lies in a busy "RAM buffer"
resource.  Every access is confined to ``allowed`` (the image's RAM ranges, which exclude the capture kernel's own
memory); an address outside raises before anything is mapped.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Sequence

from khibernate.ranges import Range
from khibernate.restore.errors import OldMemoryError as OldMemoryError

PAGE = 4096
WINDOW = 64 << 20  # bytes mapped at a time


class OldMemory:
    """Read/write access to physical memory inside ``allowed`` ranges; windows of WINDOW bytes mapped on demand."""

    def __init__(self, allowed: Sequence[Range], path: str | None = None, write: bool = True):
        self.allowed = sorted(Range(r.start, r.end) for r in allowed)
        self._starts = [r.start for r in self.allowed]
        if path is None:
            path = "/dev/oldmem" if os.path.exists("/dev/oldmem") else "/dev/mem"
        self.path = path
        self.pwrite_device = path.endswith("oldmem")
        try:
            self.fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_SYNC | os.O_CLOEXEC)
        except OSError as e:
            raise OldMemoryError(f"cannot open {path}: {e.strerror} (needs root and CONFIG_DEVMEM in the capture "
                                 "kernel)") from e
        self.write_access = write
        self._win: tuple[int, int, mmap.mmap] | None = None
        self.bytes_written = 0
        self.bytes_read = 0

    def _range_of(self, paddr: int, size: int) -> Range:
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i < 0 or not (self.allowed[i].start <= paddr and paddr + size <= self.allowed[i].end):
            raise OldMemoryError(f"{paddr:#x}+{size:#x} is outside the first kernel's RAM ranges that may be "
                                 "written; nothing written there")
        return self.allowed[i]

    def _view(self, paddr: int, size: int) -> memoryview:
        """A writable view of [paddr, paddr+size), which must lie in one allowed range (mapped window)."""
        r = self._range_of(paddr, size)
        w = self._win
        if w is None or not (w[0] <= paddr and paddr + size <= w[1]):
            if w is not None:
                w[2].close()
                self._win = None
            start = max(paddr & ~(PAGE - 1), r.start & ~(PAGE - 1))
            end = min(max(start + WINDOW, (paddr + size + PAGE - 1) & ~(PAGE - 1)), (r.end + PAGE - 1) & ~(PAGE - 1))
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.write_access else 0)
            try:
                m = mmap.mmap(self.fd, end - start, mmap.MAP_SHARED, prot, offset=start)
            except OSError as e:
                raise OldMemoryError(
                    f"cannot map {start:#x}-{end:#x} of {self.path}: {e.strerror}. The capture kernel must not own "
                    "that memory and needs iomem=relaxed with CONFIG_IO_STRICT_DEVMEM") from e
            self._win = w = (start, end, m)
        return memoryview(w[2])[paddr - w[0]:paddr - w[0] + size]

    def write(self, paddr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``paddr`` (split across windows as needed)."""
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            n = min(len(mv) - done, WINDOW - ((paddr + done) % WINDOW) or WINDOW)
            self._range_of(paddr + done, n)
            if self.pwrite_device:
                if os.pwrite(self.fd, mv[done:done + n], paddr + done) != n:
                    raise OldMemoryError(f"short write to {self.path} at {paddr + done:#x}")
            else:
                v = self._view(paddr + done, n)
                v[:] = mv[done:done + n]
                v.release()
            done += n
        self.bytes_written += len(mv)

    def read(self, paddr: int, size: int) -> bytes:
        """``size`` bytes at ``paddr``."""
        out = bytearray()
        while len(out) < size:
            n = min(size - len(out), WINDOW - ((paddr + len(out)) % WINDOW) or WINDOW)
            a = paddr + len(out)
            self._range_of(a, n)
            if self.pwrite_device:
                out += os.pread(self.fd, n, a)
            else:
                v = self._view(a, n)
                out += v
                v.release()
        self.bytes_read += size
        return bytes(out)

    def crc32(self, paddr: int, size: int, crc: int = 0) -> int:
        """zlib.crc32 of ``size`` bytes at ``paddr`` (continuing ``crc``), read in place without copying them."""
        import zlib

        done = 0
        while done < size:
            a = paddr + done
            n = min(size - done, WINDOW - (a % WINDOW) or WINDOW)
            self._range_of(a, n)
            if self.pwrite_device:
                crc = zlib.crc32(os.pread(self.fd, n, a), crc)
            else:
                v = self._view(a, n)
                crc = zlib.crc32(v, crc)
                v.release()
            done += n
        self.bytes_read += size
        return crc

    def close(self) -> None:
        if self._win is not None:
            self._win[2].close()
            self._win = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OldMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
