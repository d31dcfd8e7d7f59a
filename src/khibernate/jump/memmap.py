"""Physical memory maps: the firmware map, /proc/iomem System RAM, the crash region, and segment placement.

Pure functions over text and numbers; the ``read_*`` helpers are the only ones that open files.
Ranges are khibernate.ranges.Range, half-open ``[start, end)`` (/proc/iomem's inclusive ends are converted by
khibernate.system.parse_iomem).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from khibernate.jump.errors import MemoryMapError, NoCrashRegion, PlacementError
from khibernate.ranges import E820_NAMES, E820_NONE, E820_RAM, E820_RESERVED, Range
from khibernate.system import IomemRegion, addresses_hidden, parse_iomem
from khibernate.system import system_ram as system_ram

PAGE = 0x1000
LOW_MEMORY_END = 0xA0000  # 640 KiB: conventional memory the real-mode trampoline must live in

def page_up(x: int) -> int:
    """Round up to a 4 KiB page."""
    return (x + PAGE - 1) & ~(PAGE - 1)


def page_down(x: int) -> int:
    """Round down to a 4 KiB page."""
    return x & ~(PAGE - 1)


def align_up(x: int, a: int) -> int:
    """Round x up to a multiple of a (a power of two)."""
    return (x + a - 1) & ~(a - 1)


def parse_firmware_memmap(entries: list[tuple[str, str, str]]) -> list[Range]:
    """Ranges from /sys/firmware/memmap/N/{start,end,type} texts (end inclusive there), sorted."""
    out = []
    for start, end, typ in entries:
        name = typ.strip()
        out.append(Range.inclusive(int(start, 16), int(end, 16), E820_NAMES.get(name, E820_RESERVED)))
    return sorted(out)


def e820_from_iomem(regions: list[IomemRegion]) -> list[Range]:
    """The e820-like map from the top level of /proc/iomem (fallback when /sys/firmware/memmap is absent)."""
    out = [Range(r.start, r.end, r.type) for r in regions if r.depth == 0 and r.type != E820_NONE]
    if addresses_hidden(out):
        raise MemoryMapError("/proc/iomem shows only zero addresses: run as root (CAP_SYS_ADMIN)")
    return sorted(out)


def crash_region(regions: list[IomemRegion]) -> Range | None:
    """The largest 'Crash kernel' region of /proc/iomem, or None when crashkernel= reserved nothing."""
    crash = [r for r in regions if r.name == "Crash kernel"]
    if not crash:
        return None
    r = max(crash, key=lambda r: r.size)
    if addresses_hidden([r]):
        raise MemoryMapError("/proc/iomem shows zero addresses: run as root (CAP_SYS_ADMIN)")
    return Range(r.start, r.end)


def low_ram(e820: list[Range]) -> Range | None:
    """The page-aligned usable RAM below 640 KiB, without page 0 (BIOS data area), for a second kernel."""
    for r in e820:
        if r.type == E820_RAM and r.start < LOW_MEMORY_END:
            start = max(page_up(r.start), PAGE)
            end = page_down(min(r.end, LOW_MEMORY_END))
            if end > start:
                return Range(start, end)
    return None


def load_window(regions: list[IomemRegion], mem_min: int | None, mem_max: int | None) -> Range:
    """[mem_min, mem_max] (inclusive, as in kexec-tools) or the crash region; raise when neither exists."""
    if mem_min is not None or mem_max is not None:
        if mem_min is None or mem_max is None:
            raise NoCrashRegion("give both --mem-min and --mem-max (or neither, to use the crashkernel= region)")
        if mem_max <= mem_min:
            raise PlacementError(f"--mem-max {mem_max:#x} is not above --mem-min {mem_min:#x}")
        start, end = page_up(mem_min), page_down(Range.inclusive(mem_min, mem_max).end)
        if end <= start:
            raise PlacementError(f"[{mem_min:#x}, {mem_max:#x}] holds no whole page")
        return Range(start, end)
    crash = crash_region(regions)
    if crash is None:
        raise NoCrashRegion("no 'Crash kernel' region in /proc/iomem: boot the first kernel with crashkernel=256M "
                            "(or give --mem-min/--mem-max for memory the first kernel does not use)")
    return crash


@dataclasses.dataclass
class Placer:
    """Bottom-up placement of page-aligned blocks inside a window, refusing what does not fit."""

    window: Range
    cursor: int = -1

    def __post_init__(self) -> None:
        if self.cursor < 0:
            self.cursor = self.window.start

    def place(self, size: int, align: int = PAGE, what: str = "segment", min_addr: int = 0,
              max_end: int | None = None) -> int:
        """The address of the next free, aligned block of size bytes; raise PlacementError if it does not fit."""
        addr = align_up(max(self.cursor, min_addr), max(align, PAGE))
        end = addr + page_up(size)
        limit = self.window.end if max_end is None else min(self.window.end, max_end)
        if end > limit:
            raise PlacementError(
                f"{what} ({page_up(size) / 2**20:.1f} MiB, alignment {align:#x}) does not fit in the load window "
                f"{self.window} ({addr:#x}-{end - 1:#x} needed, window ends {limit - 1:#x}): use a larger "
                "crashkernel= / --mem-min..--mem-max window or a smaller initrd")
        self.cursor = end
        return addr


def read_firmware_memmap(root: Path = Path("/sys/firmware/memmap")) -> list[Range] | None:
    """/sys/firmware/memmap as ranges, or None when the kernel has no CONFIG_FIRMWARE_MEMMAP."""
    if not root.is_dir():
        return None
    entries = []
    for d in root.iterdir():
        try:
            entries.append(((d / "start").read_text(), (d / "end").read_text(), (d / "type").read_text()))
        except OSError as e:
            raise MemoryMapError(f"cannot read {d}: {e}") from e
    return parse_firmware_memmap(entries) or None


def read_iomem(path: Path = Path("/proc/iomem")) -> list[IomemRegion]:
    """Parsed /proc/iomem; raise MemoryMapError (run as root) when unreadable or zeroed."""
    try:
        regions = parse_iomem(path.read_text())
    except OSError as e:
        raise MemoryMapError(f"cannot read {path}: {e}") from e
    if addresses_hidden(regions):
        raise MemoryMapError(f"{path} shows only zero addresses: run as root")
    return regions
