"""The frozen jump target, seen from the first kernel after a jump back (the seed's ``/proc/kimgcore``).

Its RAM is the crash region plus every destination page of the loaded kexec-jump image.  The crash region is read
through ``/proc/kcore`` (the direct map); the pages the image's segments cover were swapped back into the first
kernel's source pages on the return, so for those the kimage entry list (``kexec_image->head``: IND_DESTINATION /
IND_INDIRECTION / IND_SOURCE / IND_DONE) says where they sit now.  VMCOREINFO is found by scanning that memory for
the note whose kernel lies inside it (the target's /proc/vmcore buffers also hold a copy of the first kernel's).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterable

from khibernate.elfcore import PT_LOAD, VMCOREINFO_NOTE, Note, parse_headers
from khibernate.image.errors import ELF_ERRORS, AddressError
from khibernate.image.sources.base import MemRange, SegmentedFile, StoredSource, merge_ranges
from khibernate.view.errors import NoPreviousKernelError

PAGE = 4096
MASK = ~(PAGE - 1)
IND_DESTINATION, IND_INDIRECTION, IND_DONE, IND_SOURCE = 1, 2, 4, 8
START_KERNEL_MAP = 0xFFFFFFFF80000000
MAX_ENTRIES = 1 << 22  # 16 GiB of pages: a list longer than this is corrupt


def kimage_swaps(head: int, read_u64: Callable[[int], int]) -> dict[int, int]:
    """{destination paddr: source paddr} of a kimage entry list starting at ``head``; ``read_u64(paddr)``."""
    out: dict[int, int] = {}
    if head and not head & IND_INDIRECTION:
        raise NoPreviousKernelError(f"kexec_image->head {head:#x} is not an indirection entry; not a kimage")
    entry, page, idx, dest = head, 0, 0, 0
    for _ in range(MAX_ENTRIES):
        if entry == 0 or entry & IND_DONE:
            return out
        if entry & IND_DESTINATION:
            dest = entry & MASK
        elif entry & IND_SOURCE:
            out[dest] = entry & MASK
            dest += PAGE
        if entry & IND_INDIRECTION:
            page, idx = entry & MASK, 0
        else:
            idx += 1
            if idx >= PAGE // 8:
                raise NoPreviousKernelError("kimage entry list runs past its indirection page; it is corrupt")
        entry = read_u64(page + 8 * idx)
    raise NoPreviousKernelError("kimage entry list does not end; it is corrupt")


def crash_regions(iomem: str) -> list[MemRange]:
    """'Crash kernel' ranges of /proc/iomem text (END inclusive there, exclusive here)."""
    out = []
    for line in iomem.splitlines():
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : Crash kernel$", line)
        if m:
            out.append(MemRange(int(m.group(1), 16), int(m.group(2), 16) + 1))
    return out


def kallsyms_address(text: str, name: str) -> int | None:
    """Address of symbol ``name`` in /proc/kallsyms text (None if absent or hidden as 0)."""
    m = re.search(rf"^([0-9a-f]+) \w {re.escape(name)}$", text, re.M)
    return int(m.group(1), 16) or None if m else None


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
        from khibernate.image.sources.elf import ram_segments

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
                pos = chunk.find(b"VMCOREINFO\0")
                while pos >= 0:
                    text = self._note_at(a + pos - 12) if pos >= 12 else None
                    if text is not None:
                        found.append(text)
                    pos = chunk.find(b"VMCOREINFO\0", pos + 1)
        return found

    def _note_at(self, paddr: int) -> str | None:
        """The VMCOREINFO text of a note header at ``paddr``, or None if what is there is not such a note."""
        try:
            namesz, descsz, _ = struct.unpack("<III", self.read(paddr, 12))
            if namesz != 11 or not 0 < descsz <= 1 << 14:
                return None
            desc = self.read(paddr + 24, descsz).rstrip(b"\0")
        except (AddressError, OSError):
            return None
        if not desc.startswith(b"OSRELEASE=") or not desc.isascii():
            return None
        return desc.decode("ascii")

    def close(self) -> None:
        self.kcore.close()


def open_frozen(kallsyms: str = "/proc/kallsyms", iomem: str = "/proc/iomem",
                kcore: str = "/proc/kcore") -> FrozenSource:
    """The frozen jump target of the loaded kexec-jump image; NoPreviousKernelError saying why not."""
    with open(kallsyms) as f:
        sym = kallsyms_address(f.read(), "kexec_image")
    if sym is None:
        raise NoPreviousKernelError("no kexec_image address in /proc/kallsyms: run as root (kptr_restrict) on a "
                                    "kernel with CONFIG_KEXEC")
    with open(iomem) as f:
        crash = crash_regions(f.read())
    if not crash:
        raise NoPreviousKernelError("no 'Crash kernel' region in /proc/iomem: boot with crashkernel= and load a "
                                    "jump image (khibernate jump load)")
    try:
        kc = Kcore(kcore)
    except PermissionError:
        raise NoPreviousKernelError(f"{kcore}: permission denied; run as root (lockdown forbids it)") from None
    try:
        image = int.from_bytes(kc.read_virt(sym, 8), "little")
        if image == 0:
            raise NoPreviousKernelError("no kexec jump image is loaded (kexec_image is NULL): nothing frozen to "
                                        "show; give SOURCE")
        head = int.from_bytes(kc.read_virt(image, 8), "little")
        swaps = kimage_swaps(head, lambda pa: int.from_bytes(kc.read_phys(pa, 8), "little"))
        return FrozenSource(kc, crash, swaps)
    except BaseException:
        kc.close()
        raise
