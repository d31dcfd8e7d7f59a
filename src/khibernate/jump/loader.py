"""Plans for kexec_load: the segments, entry, flags and command line of a kexec, kexec-jump or jump-back image.

``plan_jump`` / ``plan_kexec`` / ``plan_jump_back`` are pure over a ``SystemFacts`` (what the running kernel
reports) and the file contents; ``SystemFacts.read()`` is the only part that reads the live system.  A ``Plan`` is
handed to ``syscalls.kexec_load`` as is; ``Plan.describe()`` is what --dry-run prints.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from khibernate.jump import bootparams, elfcorehdr, purgatory
from khibernate.jump.bzimage import BzImage, parse_bzimage
from khibernate.jump.errors import CommandLineError, JumpBackEntryError, MemoryMapError, PlacementError
from khibernate.jump.kexec_abi import (
    KEXEC_ARCH_X86_64,
    KEXEC_PRESERVE_CONTEXT,
    KEXEC_SEGMENT_MAX,
    describe_kexec_flags,
)
from khibernate.jump.memmap import (
    PAGE,
    Placer,
    e820_from_iomem,
    load_window,
    low_ram,
    page_up,
    read_firmware_memmap,
    read_iomem,
    system_ram,
)
from khibernate.ranges import E820_RAM, Range, subtract
from khibernate.system import IomemRegion, SystemRoot

JUMP_EXTRA_PARAMS = ("nokaslr", "iomem=relaxed")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One kexec segment: destination [mem, mem+memsz), its content (None = zero-filled) and what it holds."""

    mem: int
    memsz: int
    data: bytes | None
    what: str

    @property
    def bufsz(self) -> int:
        """Bytes copied from data (the rest of memsz is zero)."""
        return len(self.data) if self.data else 0

    @property
    def end(self) -> int:
        """First byte after the segment."""
        return self.mem + self.memsz


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything kexec_load needs, plus the command line and e820 the new kernel gets (for --dry-run)."""

    kind: str
    entry: int
    flags: int
    segments: list[Segment]
    cmdline: str = ""
    e820: list[Range] = dataclasses.field(default_factory=list)
    window: Range | None = None

    def describe(self) -> str:
        """The segment table, entry, flags, command line and e820 as text (what --dry-run prints)."""
        lines = [f"{self.kind} image: entry {self.entry:#x}, flags {self.flags:#x} "
                 f"({describe_kexec_flags(self.flags)}), {len(self.segments)} segments"]
        if self.window:
            lines.append(f"load window {self.window} ({self.window.size / 2**20:.0f} MiB)")
        lines.append(f"  {'destination':>37}  {'memsz':>10}  {'bufsz':>10}  holds")
        for s in self.segments:
            lines.append(f"  {s.mem:#018x}-{s.end - 1:#018x}  {s.memsz:#10x}  {s.bufsz:#10x}  {s.what}")
        total = sum(s.memsz for s in self.segments)
        lines.append(f"  total {total / 2**20:.1f} MiB of the current kernel's RAM pinned while loaded")
        if self.cmdline:
            lines.append(f"command line: {self.cmdline}")
        if self.e820:
            lines.append("e820 for the new kernel:")
            types = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable"}
            lines += [f"  {r.start:#018x}-{r.end - 1:#018x} {types.get(r.type, r.type)}" for r in self.e820]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SystemFacts:
    """What the running kernel reports that a plan depends on (read once, passed to the pure planners)."""

    iomem: list[IomemRegion]
    firmware: list[Range]
    notes: list[elfcorehdr.Note] = dataclasses.field(default_factory=list)
    acpi_rsdp: int | None = None
    screen_info: bytes | None = None
    cmdline: str = ""

    @classmethod
    def read(cls, with_notes: bool = True, system: SystemRoot | None = None) -> SystemFacts:
        """Read /proc/iomem, the firmware map, crash notes, VMCOREINFO, ACPI RSDP and screen_info (needs root);
        the command line from ``system`` (the running one if None)."""
        iomem = read_iomem()
        firmware = read_firmware_memmap() or e820_from_iomem(iomem)
        notes = elfcorehdr.read_notes() if with_notes else []
        return cls(iomem, firmware, notes, _read_acpi_rsdp(), _read_screen_info(),
                   (system or SystemRoot()).cmdline())


def _read_acpi_rsdp() -> int | None:
    try:
        return bootparams.parse_efi_systab(Path("/sys/firmware/efi/systab").read_text())
    except OSError:
        pass
    try:
        bp = Path("/sys/kernel/boot_params/data").read_bytes()
        addr = bootparams.acpi_rsdp_of(bp)
        if addr:
            return addr
    except OSError:
        pass
    try:
        with open("/dev/mem", "rb") as f:
            f.seek(0xE0000)
            return bootparams.find_acpi_rsdp(f.read(0x20000))
    except OSError:
        return None


def _read_screen_info() -> bytes | None:
    try:
        return Path("/sys/kernel/boot_params/data").read_bytes()[:bootparams.SCREEN_INFO_SIZE]
    except OSError:
        return None


def build_cmdline(user: str, extra: list[str]) -> str:
    """The user's command line with extra parameters inserted before its first '--' (init's arguments follow it)."""
    user = " ".join(user.split()) if '"' not in user else user.strip()
    m = re.search(r"(?:^|\s)--(?:\s|$)", user)
    head, tail = (user[:m.start()].strip(), user[m.start():].strip()) if m else (user, "")
    return " ".join(w for w in [head, *extra, tail] if w)


def check_segments(segments: list[Segment], total_ram: int | None = None) -> None:
    """Refuse what kexec_load's sanity_check_segment_list() would refuse, naming the segment (raise PlacementError)."""
    if len(segments) > KEXEC_SEGMENT_MAX:
        raise PlacementError(f"{len(segments)} segments, kexec_load takes at most {KEXEC_SEGMENT_MAX}")
    for s in segments:
        if s.mem % PAGE or s.memsz % PAGE or s.memsz == 0:
            raise PlacementError(f"segment '{s.what}' at {s.mem:#x}+{s.memsz:#x} is not whole pages")
        if s.bufsz > s.memsz:
            raise PlacementError(f"segment '{s.what}' has {s.bufsz} bytes of data for {s.memsz} bytes of memory")
    ordered = sorted(segments, key=lambda s: s.mem)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.mem < a.end:
            raise PlacementError(f"segments '{a.what}' and '{b.what}' overlap at {b.mem:#x}")
    if total_ram:
        pages = sum(s.memsz for s in segments) // PAGE
        if pages > total_ram // PAGE // 2:
            raise PlacementError(f"the segments need {pages * PAGE / 2**20:.0f} MiB, more than half of RAM "
                                 f"({total_ram / 2**20:.0f} MiB): kexec_load refuses that")


def place_kernel_initrd(placer: Placer, kernel: BzImage, initrd: bytes | None) -> tuple[int, int | None]:
    """(kernel address, initrd address or None) placed bottom-up in the placer's window by the boot protocol's rules."""
    align = max(kernel.kernel_alignment, PAGE)
    kaddr = placer.place(kernel.memsz, align, "kernel (init_size)", min_addr=kernel.pref_address)
    iaddr = None
    if initrd:
        max_end = None if kernel.can_load_above_4g else kernel.initrd_addr_max + 1
        iaddr = placer.place(len(initrd), PAGE, "initrd", max_end=max_end)
    return kaddr, iaddr


def zero_page_segment(kernel: BzImage, bp_addr: int, cmdline: str, e820: list[Range],
                       initrd: tuple[int, int] | None, facts: SystemFacts) -> tuple[bytes, int]:
    raw = cmdline.encode()
    if kernel.cmdline_size and len(raw) > kernel.cmdline_size:
        raise CommandLineError(f"command line is {len(raw)} bytes, the kernel takes at most {kernel.cmdline_size}: "
                               f"{cmdline!r}")
    cmd_addr = bp_addr + bootparams.ZERO_PAGE_SIZE
    zp = bootparams.build_boot_params(kernel, cmd_addr, len(raw), e820, initrd, facts.acpi_rsdp, facts.screen_info)
    return zp + raw + b"\0", cmd_addr


def first_kernel_ram(iomem: list[IomemRegion], window: Range, low: Range) -> list[Range]:
    """The first kernel's RAM that a jump's elfcorehdr describes: System RAM outside the load window and the low
    RAM the second kernel borrows (what a snapshot saves and a restore writes back)."""
    ram = system_ram(iomem)
    if not ram:
        raise MemoryMapError("no 'System RAM' in /proc/iomem: run as root")
    return subtract(ram, [window, low])


def jump_ram(facts: SystemFacts, mem_min: int | None = None, mem_max: int | None = None) -> list[Range]:
    """first_kernel_ram for the window and low RAM that plan_jump would use on this system."""
    low = low_ram(facts.firmware)
    if low is None:
        raise MemoryMapError("no usable RAM below 640 KiB in the firmware memory map")
    return first_kernel_ram(facts.iomem, load_window(facts.iomem, mem_min, mem_max), low)


def crash_window(facts: SystemFacts, window: Range) -> Range | None:
    """The crash region holding the whole load window (its memory is reserved: nothing to back up), or None."""
    return next((Range(r.start, r.end) for r in facts.iomem if r.name == "Crash kernel" and r.covers(window)), None)


def swapped_ranges(facts: SystemFacts, mem_min: int | None = None, mem_max: int | None = None) -> list[Range]:
    """The first kernel's memory a jump planned with these arguments swaps out: low RAM, and the load window unless
    it lies in the crash region.  A note buffer in there must travel inside the elfcorehdr (Note.data)."""
    low = low_ram(facts.firmware)
    window = load_window(facts.iomem, mem_min, mem_max)
    return ([low] if low else []) + ([] if crash_window(facts, window) else [window])


def plan_jump(kernel_data: bytes, initrd: bytes | None, append: str, facts: SystemFacts,
              mem_min: int | None = None, mem_max: int | None = None, kernel_name: str = "kernel") -> Plan:
    """A KEXEC_PRESERVE_CONTEXT image: kernel, initrd, zero page + cmdline, purgatory, elfcorehdr, low-RAM swap.

    The new kernel gets an e820 with RAM only in the load window and in low RAM (below 640 KiB, without page 0);
    a zero-filled segment over that low RAM makes relocate_kernel park the first kernel's low memory on the way out
    and bring it back on the way in.  The elfcorehdr describes the first kernel's RAM outside both.  A window
    outside the crash region is the first kernel's own RAM: zero-filled backup segments fill its holes, so the jump
    swaps all of it out (and back on return), and notes in it must carry their bytes (``swapped_ranges``).
    """
    kernel = parse_bzimage(kernel_data, kernel_name)
    window = load_window(facts.iomem, mem_min, mem_max)
    crash = crash_window(facts, window)
    low = low_ram(facts.firmware)
    if low is None:
        raise MemoryMapError("no usable RAM below 640 KiB in the firmware memory map: the new kernel needs some "
                             "for its real-mode trampoline")
    if window.start < 0x100000:
        raise PlacementError(f"load window {window} starts below 1 MiB; give a window above 1 MiB")
    old_ram = first_kernel_ram(facts.iomem, window, low)
    notes = facts.notes
    swapped = swapped_ranges(facts, mem_min, mem_max)
    lost = [n.what for n in notes if n.data is None and any(n.range.overlaps(r) for r in swapped)]
    if lost:
        raise MemoryMapError(f"note(s) {', '.join(lost)} lie in memory the jump swaps out and carry no copy "
                             "(elfcorehdr.read_note_data)")
    hdr_addr = window.end - page_up(len(elfcorehdr.build(old_ram, notes)))
    hdr = elfcorehdr.build(old_ram, notes, base=hdr_addr)
    placer = Placer(Range(window.start, hdr_addr))
    kaddr, iaddr = place_kernel_initrd(placer, kernel, initrd)
    bp_addr = placer.place(2 * PAGE, PAGE, "boot_params + command line")
    pg_addr = placer.place(purgatory.SIZE, PAGE, "purgatory")
    hdr_range = Range(hdr_addr, window.end)
    e820 = bootparams.jump_e820(facts.firmware, low, window, [hdr_range])
    extra = list(JUMP_EXTRA_PARAMS) + [f"elfcorehdr={hdr_addr:#x}", purgatory.JUMP_BACK_PLACEHOLDER]
    cmdline = build_cmdline(append, extra)
    initrd_pair = (iaddr, len(initrd)) if initrd and iaddr is not None else None
    zp, cmd_addr = zero_page_segment(kernel, bp_addr, cmdline, e820, initrd_pair, facts)
    digits = cmd_addr + cmdline.index(purgatory.JUMP_BACK_PLACEHOLDER) + len(purgatory.JUMP_BACK_PARAM)
    pg = purgatory.build(kaddr + kernel.entry64_offset, bp_addr, digits)
    segs = [Segment(low.start, low.size, None, "low RAM swap (first kernel's <640K parked here)"),
            Segment(kaddr, kernel.memsz, kernel.payload, f"kernel {kernel_name} (bzImage {kernel.version_str})")]
    if initrd is not None and initrd_pair is not None:
        segs.append(Segment(initrd_pair[0], page_up(len(initrd)), initrd, "initrd"))
    copied = sum(n.data is not None for n in notes)
    segs += [Segment(bp_addr, page_up(len(zp)), zp, "boot_params + command line"),
             Segment(pg_addr, page_up(purgatory.SIZE), pg, "purgatory"),
             Segment(hdr_addr, page_up(len(hdr)), hdr, f"elfcorehdr ({len(notes)} notes"
                     + (f", {copied} copied into it" if copied else "") + f", {len(old_ram)} RAM ranges)")]
    if crash is None:
        segs += _backup_segments(window, segs)
    segs.sort(key=lambda s: s.mem)
    check_segments(segs)
    return Plan("kexec jump", pg_addr, KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_X86_64, segs, cmdline, e820, window)


def _backup_segments(window: Range, segs: list[Segment]) -> list[Segment]:
    """Zero-filled segments over the window's holes: a window outside the crash region is the first kernel's RAM."""
    holes = subtract([window], [Range(s.mem, s.end) for s in segs])
    return [Segment(h.start, h.size, None, "backup (window is not reserved: first kernel's RAM swapped out)")
            for h in holes]


def plan_kexec(kernel_data: bytes, initrd: bytes | None, cmdline: str, facts: SystemFacts,
               kernel_name: str = "kernel") -> Plan:
    """A plain kexec_load image (the kexec_file_load path needs no plan): the new kernel gets the full e820."""
    kernel = parse_bzimage(kernel_data, kernel_name)
    ram = [r for r in system_ram(facts.iomem) if r.start >= kernel.pref_address or r.end > kernel.pref_address]
    usable = [Range(max(r.start, kernel.pref_address), r.end) for r in ram]
    usable = [r for r in usable if r.end <= (1 << 32) or kernel.can_load_above_4g]
    if not usable:
        raise PlacementError("no System RAM above the kernel's pref_address to load it into")
    window = max(usable, key=lambda r: r.size)
    placer = Placer(Range(page_up(window.start), window.end & ~(PAGE - 1)))
    kaddr, iaddr = place_kernel_initrd(placer, kernel, initrd)
    bp_addr = placer.place(2 * PAGE, PAGE, "boot_params + command line")
    pg_addr = placer.place(purgatory.SIZE, PAGE, "purgatory")
    e820 = facts.firmware
    initrd_pair = (iaddr, len(initrd)) if initrd and iaddr is not None else None
    zp, _ = zero_page_segment(kernel, bp_addr, cmdline, e820, initrd_pair, facts)
    segs = [Segment(kaddr, kernel.memsz, kernel.payload, f"kernel {kernel_name} (bzImage {kernel.version_str})")]
    if initrd is not None and initrd_pair is not None:
        segs.append(Segment(initrd_pair[0], page_up(len(initrd)), initrd, "initrd"))
    segs += [Segment(bp_addr, page_up(len(zp)), zp, "boot_params + command line"),
             Segment(pg_addr, page_up(purgatory.SIZE), purgatory.build(kaddr + kernel.entry64_offset, bp_addr, 0),
                     "purgatory")]
    check_segments(segs)
    return Plan("kexec", pg_addr, KEXEC_ARCH_X86_64, segs, cmdline, e820, window)


def plan_jump_back(entry: int, control_page: bytes) -> Plan:
    """The jump-back image: ONE 4 KiB segment at entry's page holding a copy of that page (the peer's control page).

    Being a segment, the page is in this kernel's kexec identity map; swapping it with an identical copy leaves the
    peer's relocate_kernel code and saved registers intact (unlike kexec-tools' zero-length helper segment).
    """
    if entry <= 0 or entry >= 1 << 52:
        raise JumpBackEntryError(f"jump-back entry {entry:#x} is not a physical address")
    if len(control_page) != PAGE:
        raise JumpBackEntryError(f"need the 4096 bytes of the peer's control page, got {len(control_page)}")
    page = entry & ~(PAGE - 1)
    seg = Segment(page, PAGE, control_page, "copy of the peer's kexec control page (jump-back entry)")
    return Plan("jump back", entry, KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_X86_64, [seg])


def parse_jump_back_entry(cmdline: str) -> int | None:
    """The last kexec_jump_back_entry=0x... of a command line, or None (absent or zero)."""
    found = re.findall(r"(?:^|\s)kexec_jump_back_entry=(0x[0-9a-fA-F]+|\d+)(?=\s|$)", cmdline)
    if not found:
        return None
    value = int(found[-1], 0)
    return value or None


def total_ram_bytes(meminfo: str) -> int | None:
    """MemTotal of /proc/meminfo in bytes."""
    m = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    return int(m.group(1)) * 1024 if m else None


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    """A file's bytes, or a UsageError-like KhibernateError saying which file could not be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        from khibernate.errors import UsageError

        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from e


__all__ = ["Plan", "Segment", "SystemFacts", "plan_jump", "plan_kexec", "plan_jump_back", "E820_RAM"]
