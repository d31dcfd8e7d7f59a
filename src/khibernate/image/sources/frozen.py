"""The frozen jump target's memory, read from the first kernel after a jump back (the seed's ``/proc/kimgcore``):
a live source, not a file format.

Its RAM is the crash region plus every destination page of the loaded kexec-jump image (``khibernate/view/frozen.py``
finds both).  The crash region is read through ``/proc/kcore`` (the direct map, an ELF core read with the ELF
reader's segments); the pages the image's segments cover were swapped back into the first kernel's source pages on
the return, so for those the swap map says where they sit now.  VMCOREINFO is found by scanning that memory for the
note whose kernel lies inside it (the target's /proc/vmcore buffers also hold a copy of the first kernel's).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from khibernate.elfcore import NHDR, PT_LOAD, VMCOREINFO_NOTE, Note, align4, parse_headers
from khibernate.image.errors import ELF_ERRORS, AddressError
from khibernate.image.sources.base import MemRange, SegmentedFile, StoredSource, merge_ranges
from khibernate.image.sources.elf import ram_segments

PAGE = 4096
MASK = ~(PAGE - 1)
START_KERNEL_MAP = 0xFFFFFFFF80000000
_NAME = VMCOREINFO_NOTE.encode() + b"\0"  # what a VMCOREINFO note's name field holds


class Kcore:
    """Reads of the running kernel's memory through /proc/kcore, by virtual or physical address."""

    def __init__(self, path: str = "/proc/kcore"):
        with open(path, "rb") as f:
            head = f.read(65536)

            def read_at(off: int, n: int) -> bytes:
                f.seek(off)
                return f.read(n)

            loads = [p for p in parse_headers(head, read_at, errors=ELF_ERRORS).phdrs if p.type == PT_LOAD]
        self.virt = sorted((p.vaddr, p.memsz, p.offset) for p in loads)
        phys = [p for p in loads if p.paddr != (1 << 64) - 1 and p.paddr < 1 << 52]
        self.phys = SegmentedFile(path, ram_segments(phys))

    def read_virt(self, va: int, n: int) -> bytes:
        """Bytes at kernel virtual ``va``."""
        for start, size, off in self.virt:
            if start <= va and va + n <= start + size:
                return os.pread(self.phys.fd, n, off + va - start)
        raise AddressError(f"kernel address {va:#x} is not in /proc/kcore")

    def read_phys(self, pa: int, n: int) -> bytes:
        """Bytes at physical ``pa`` (direct-mapped RAM only)."""
        return self.phys.read(pa, n)

    def close(self) -> None:
        """Close /proc/kcore."""
        self.phys.close()


def pick_vmcoreinfo(candidates: Iterable[str], ranges: tuple[MemRange, ...]) -> str | None:
    """The VMCOREINFO text whose kernel (_stext at phys_base) lies inside ``ranges``."""
    for text in candidates:
        m = re.search(r"^SYMBOL\(_stext\)=([0-9a-f]+)$", text, re.M)
        pb = re.search(r"^NUMBER\(phys_base\)=(-?\d+)$", text, re.M)
        if m and pb:
            pa = int(m.group(1), 16) - START_KERNEL_MAP + int(pb.group(1))
            if any(r.start <= pa < r.end for r in ranges):
                return text
    return None


class FrozenSource(StoredSource):
    """The jump target's memory as it was when it jumped back, read from the first kernel."""

    format_name = "frozen"

    def __init__(self, kcore: Kcore, crash: list[MemRange], swaps: dict[int, int]):
        self.kcore = kcore
        self.swaps = swaps
        self._ranges = merge_ranges([*crash, *(MemRange(d, d + PAGE) for d in swaps)])
        self._notes = ()
        text = pick_vmcoreinfo(self._scan_vmcoreinfo(), self._ranges)
        if text is not None:
            self._notes = (Note(VMCOREINFO_NOTE, 0, text.encode()),)

    def read(self, paddr: int, size: int) -> bytes:
        if not self.present(paddr, size):
            raise AddressError(f"physical address {paddr:#x} is not in the jump target's memory")
        out = bytearray()
        pos, end = paddr, paddr + size
        while pos < end:
            page = pos & MASK
            n = min(page + PAGE, end) - pos
            src = self.swaps.get(page, page)
            out += self.kcore.read_phys(src + pos - page, n)
            pos += n
        return bytes(out)

    def describe(self) -> dict[str, object]:
        """How the view was put together: the crash region and the pages the jump image swapped back."""
        return {"swapped_pages": len(self.swaps), "moved_pages": sum(1 for d, s in self.swaps.items() if d != s)}

    def _scan_vmcoreinfo(self) -> list[str]:
        """Every VMCOREINFO note text in the target's memory."""
        found = []
        for r in self._ranges:
            for a in range(r.start, r.end, 1 << 22):
                n = min(1 << 22, r.end - a)
                try:
                    chunk = self.read(a, n)
                except (AddressError, OSError):
                    continue
                pos = chunk.find(_NAME)
                while pos >= 0:
                    text = self._note_at(a + pos - NHDR.size) if pos >= NHDR.size else None
                    if text is not None:
                        found.append(text)
                    pos = chunk.find(_NAME, pos + 1)
        return found

    def _note_at(self, paddr: int) -> str | None:
        """The VMCOREINFO text of a note header at ``paddr``, or None if what is there is not such a note."""
        try:
            h = NHDR.unpack(self.read(paddr, NHDR.size))
            namesz, descsz = h["n_namesz"], h["n_descsz"]
            if namesz != len(_NAME) or not 0 < descsz <= 1 << 14:
                return None
            desc = self.read(paddr + NHDR.size + align4(namesz), descsz).rstrip(b"\0")
        except (AddressError, OSError):
            return None
        if not desc.startswith(b"OSRELEASE=") or not desc.isascii():
            return None
        return desc.decode("ascii")

    def close(self) -> None:
        self.kcore.close()


