"""Plans for kexec through the Xen hypervisor, from dom0: Xen→Linux, a crash kernel for the whole host, Xen→Xen.

On a Xen host dom0's kernel does not own the machine: Xen does. Images are handed to Xen (``xen_hypercalls``), which
knows two kinds only, a default image (executed on request) and a crash image (executed when dom0 or Xen itself
crashes); there is no preserve-context image, so nothing can jump back to a Xen host. The planners here are pure
over ``XenFacts`` (the machine's e820 from Xen, Xen's crash region and crash notes, the VMCOREINFO notes):

- ``plan_kexec``: a Linux bzImage booted natively with the machine's whole e820 (segments anywhere in RAM; Xen
  copies them into place at kexec time);
- ``plan_crash``: a capture kernel inside Xen's crash region, whose elfcorehdr describes all machine RAM outside
  it, with Xen's per-CPU crash notes, Xen's VMCOREINFO_XEN and dom0's VMCOREINFO; the purgatory first backs up
  the low memory the capture kernel reuses (the elfcorehdr points there), as kexec-tools does;
- ``plan_multiboot``: a multiboot hypervisor (Xen) with dom0's kernel and initrd as modules, entered in 32-bit
  protected mode by a stub that hands it the multiboot information.

As kexec-tools does, every plan also asks Xen to identity-map what the segments leave free of [0, 1 MiB): a Linux
decompressor (and the backup copy) touch low memory before they build their own page tables.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from khibernate.jump import bootparams, elfcorehdr, loader, multiboot, purgatory
from khibernate.jump.bzimage import parse_bzimage
from khibernate.jump.elfcorehdr import Note
from khibernate.jump.errors import CommandLineError, NoCrashRegion, PlacementError
from khibernate.jump.kexec_abi import KEXEC_SEGMENT_MAX
from khibernate.jump.loader import Plan, Segment, SystemFacts, build_cmdline, check_segments
from khibernate.jump.memmap import LOW_MEMORY_END, PAGE, Placer, low_ram, page_down, page_up
from khibernate.jump.xen_abi import EM_386, EM_X86_64, KEXEC_TYPE_CRASH, KEXEC_TYPE_DEFAULT, KEXEC_TYPE_NAMES
from khibernate.jump.xen_hypercalls import XenSegment
from khibernate.ranges import E820_RAM, Range, subtract
from khibernate.system import IomemRegion

IDENTITY_END = 0x100000  # kexec-tools' IDENTMAP_1MiB
PAGE_OFFSET = elfcorehdr.PAGE_OFFSET


@dataclasses.dataclass(frozen=True)
class XenFacts:
    """What Xen reports that a plan depends on (read once in dom0 by ``read``, passed to the pure planners)."""

    machine_map: list[Range]
    crash: Range | None
    cpu_notes: list[Note] = dataclasses.field(default_factory=list)
    xen_vmcoreinfo: Note | None = None
    dom0_vmcoreinfo: Note | None = None

    @property
    def ram(self) -> list[Range]:
        """The machine's RAM (e820 type 1)."""
        return sorted(Range(r.start, r.end) for r in self.machine_map if r.type == E820_RAM)

    @classmethod
    def read(cls) -> XenFacts:
        """Ask Xen for the machine map, crash region, per-CPU crash notes and VMCOREINFO_XEN (root in dom0)."""
        from khibernate.jump import xen_hypercalls as xh
        from khibernate.jump.xen_abi import KEXEC_RANGE_MA_CPU, KEXEC_RANGE_MA_CRASH, KEXEC_RANGE_MA_VMCOREINFO

        e820 = sorted(Range(a, a + s, t) for a, s, t in xh.machine_memory_map() if s)
        crash = xh.kexec_get_range(KEXEC_RANGE_MA_CRASH)
        notes = []
        for cpu in range(4096):
            r = xh.kexec_get_range(KEXEC_RANGE_MA_CPU, cpu)
            if r is None:
                break
            notes.append(Note(r[0], r[1], f"Xen crash note cpu{cpu}"))
        vmci = xh.kexec_get_range(KEXEC_RANGE_MA_VMCOREINFO)
        return cls(e820, Range(crash[0], crash[0] + crash[1]) if crash else None, notes,
                   Note(vmci[0], vmci[1], "VMCOREINFO_XEN") if vmci else None, _dom0_vmcoreinfo())


def _dom0_vmcoreinfo(path: Path = Path("/sys/kernel/vmcoreinfo")) -> Note | None:
    """dom0's VMCOREINFO note (a PV kernel reports its machine address), cut at its page's end: the note's next
    page need not be machine-contiguous, and the text fits in the first."""
    try:
        note = elfcorehdr.parse_vmcoreinfo_sysfs(path.read_text())
    except (OSError, Exception):
        return None
    return Note(note.paddr, min(note.size, PAGE - (note.paddr & (PAGE - 1))), "VMCOREINFO (dom0)")


@dataclasses.dataclass(frozen=True)
class XenPlan:
    """An image for Xen: type (default/crash), machine type of its entry, segments, and the low memory Xen must
    identity-map for it; the command line and e820 the new kernel gets are kept for --dry-run."""

    kind: str
    image_type: int
    arch: int
    entry: int
    segments: list[Segment]
    identity: list[Range]
    cmdline: str = ""
    e820: list[Range] = dataclasses.field(default_factory=list)
    window: Range | None = None

    def xen_segments(self) -> list[XenSegment]:
        """The segment table for KEXEC_CMD_kexec_load, in address order, map-only ranges included; Xen takes at
        most 16 (PlacementError)."""
        out = [XenSegment(s.mem, s.memsz, s.data) for s in self.segments]
        out += [XenSegment(r.start, r.size, None, map_only=True) for r in self.identity]
        if len(out) > KEXEC_SEGMENT_MAX:
            raise PlacementError(f"{len(out)} segments with the identity-mapped low memory; Xen takes at most "
                                 f"{KEXEC_SEGMENT_MAX}")
        return sorted(out, key=lambda s: s.mem)

    def describe(self) -> str:
        """What --dry-run prints: the native plan's table plus Xen's image type, machine type and mapped ranges."""
        base = Plan(self.kind, self.entry, 0, self.segments, self.cmdline, self.e820, self.window).describe()
        head, _, rest = base.partition("\n")
        head = (f"{self.kind} image for Xen ({KEXEC_TYPE_NAMES[self.image_type]} image, "
                f"{'EM_386, entered in 32-bit protected mode' if self.arch == EM_386 else 'EM_X86_64'}): entry "
                f"{self.entry:#x}, {len(self.segments)} segments")
        ident = [f"identity-mapped for the image, nothing loaded: {r.start:#x}-{r.last:#x}" for r in self.identity]
        return "\n".join([head, rest, *ident])


def low_identity(segments: list[Segment]) -> list[Range]:
    """[0, 1 MiB) without the segments: what Xen identity-maps for the image besides them."""
    return subtract([Range(0, IDENTITY_END)], [Range(s.mem, s.end) for s in segments])


def _as_system_facts(facts: XenFacts) -> SystemFacts:
    """The native planner's view of the machine: RAM as System RAM, the e820 as the firmware map."""
    iomem = [IomemRegion(r.start, r.end, E820_RAM, "System RAM", 0) for r in facts.ram]
    return SystemFacts(iomem, facts.machine_map)


def plan_kexec(kernel_data: bytes, initrd: bytes | None, cmdline: str, facts: XenFacts,
               kernel_name: str = "kernel") -> XenPlan:
    """A Linux kernel for Xen to boot natively (Xen→Linux): the native kexec plan over the machine's memory map."""
    p = loader.plan_kexec(kernel_data, initrd, cmdline, _as_system_facts(facts), kernel_name)
    return XenPlan("kexec through Xen", KEXEC_TYPE_DEFAULT, EM_X86_64, p.entry, p.segments,
                   low_identity(p.segments), p.cmdline, p.e820, p.window)


def crash_notes(facts: XenFacts) -> list[Note]:
    """The elfcorehdr's notes: Xen's per-CPU crash notes, VMCOREINFO_XEN, then dom0's VMCOREINFO."""
    return facts.cpu_notes + [n for n in (facts.xen_vmcoreinfo, facts.dom0_vmcoreinfo) if n is not None]


def plan_crash(kernel_data: bytes, initrd: bytes | None, append: str, facts: XenFacts,
               kernel_name: str = "kernel") -> XenPlan:
    """A capture kernel for the whole host in Xen's crash region (kdump on a dom0 or hypervisor crash).

    Segments, all in the region: kernel, initrd, boot_params + command line, purgatory, a backup of the low RAM
    (below 640 KiB) the capture kernel may reuse, and the elfcorehdr at the region's end. The capture kernel's
    e820 has RAM in the low range and the region only (the backup and the header reserved); its elfcorehdr
    describes every other RAM range of the machine, the low one read from the backup.
    """
    window = facts.crash
    if window is None:
        raise NoCrashRegion("Xen reserved no crash region: add crashkernel=256M to Xen's command line (not dom0's) "
                            "and reboot")
    kernel = parse_bzimage(kernel_data, kernel_name)
    low = low_ram(facts.machine_map)
    low_src = next((Range(r.start, page_down(min(r.end, LOW_MEMORY_END))) for r in facts.ram
                    if r.start < LOW_MEMORY_END), None)
    if low is None or low_src is None:
        raise PlacementError("the machine has no RAM below 640 KiB for the capture kernel's real-mode trampoline")
    ram = subtract(facts.ram, [window])
    ram = sorted(subtract(ram, [low_src]) + [low_src])
    notes = crash_notes(facts)
    placer = Placer(window)
    kaddr, iaddr = loader.place_kernel_initrd(placer, kernel, initrd)
    bp_addr = placer.place(2 * PAGE, PAGE, "boot_params + command line")
    pg_addr = placer.place(purgatory.SIZE, PAGE, "purgatory")
    backup = placer.place(low_src.size, PAGE, "backup of the low memory")
    hdr = elfcorehdr.build(ram, notes, PAGE_OFFSET, moved={low_src.start: backup})
    hdr_addr = window.end - page_up(len(hdr))
    if hdr_addr < placer.cursor:
        raise PlacementError(f"the crash region {window} is too small for the capture kernel, its initrd and the "
                             "ELF core header: give Xen a larger crashkernel=")
    hdr_range, backup_range = Range(hdr_addr, window.end), Range(backup, backup + low_src.size)
    e820 = bootparams.jump_e820(facts.machine_map, low, window, [backup_range, hdr_range])
    cmdline = build_cmdline(append, [f"elfcorehdr={hdr_addr:#x}"])
    initrd_pair = (iaddr, len(initrd)) if initrd and iaddr is not None else None
    zp, _ = loader.zero_page_segment(kernel, bp_addr, cmdline, e820, initrd_pair, _as_system_facts(facts))
    pg = purgatory.build(kaddr + kernel.entry64_offset, bp_addr, 0, backup=(low_src.start, backup, low_src.size))
    segs = [Segment(kaddr, kernel.memsz, kernel.payload, f"kernel {kernel_name} (bzImage {kernel.version_str})")]
    if initrd is not None and initrd_pair is not None:
        segs.append(Segment(initrd_pair[0], page_up(len(initrd)), initrd, "initrd"))
    segs += [Segment(bp_addr, page_up(len(zp)), zp, "boot_params + command line"),
             Segment(pg_addr, page_up(purgatory.SIZE), pg, "purgatory (backs up low memory first)"),
             Segment(backup, low_src.size, None, f"backup of {low_src.start:#x}-{low_src.last:#x}"),
             Segment(hdr_addr, page_up(len(hdr)), hdr, f"elfcorehdr ({len(notes)} notes, {len(ram)} RAM ranges)")]
    segs.sort(key=lambda s: s.mem)
    check_segments(segs)
    return XenPlan("kdump through Xen", KEXEC_TYPE_CRASH, EM_X86_64, pg_addr, segs, low_identity(segs), cmdline,
                   e820, window)


def split_vmm_cmdline(append: str) -> tuple[str, str]:
    """('XEN_ARGS', 'DOM0_ARGS') of "XEN_ARGS -- DOM0_ARGS" (the first '--' word splits; none: all for Xen)."""
    m = re.search(r"(?:^|\s)--(?:\s|$)", append)
    if m is None:
        return " ".join(append.split()), ""
    return " ".join(append[:m.start()].split()), " ".join(append[m.end():].split())


def plan_multiboot(vmm_data: bytes, kernel_data: bytes, initrd: bytes | None, append: str, facts: XenFacts,
                   vmm_name: str = "xen", kernel_name: str = "vmlinuz", initrd_name: str = "initrd") -> XenPlan:
    """Xen→Xen: the hypervisor's load segments, dom0's kernel and initrd as multiboot modules (below 4 GiB), the
    multiboot information and the entry stub; Xen's command line is XEN_ARGS, dom0's DOM0_ARGS (of --append)."""
    mb = multiboot.parse_kernel(vmm_data, vmm_name)
    parse_bzimage(kernel_data, kernel_name)  # dom0's kernel must be a bzImage Xen can build a dom0 from
    xen_args, dom0_args = split_vmm_cmdline(append)
    segs = [Segment(page_down(s.paddr), page_up(s.paddr - page_down(s.paddr) + s.memsz),
                    bytes(s.paddr - page_down(s.paddr)) + s.data, f"{vmm_name} load segment") for s in mb.segments]
    taken = [Range(s.mem, s.end) for s in segs]
    below4g = subtract([Range(max(r.start, IDENTITY_END), min(r.end, 1 << 32)) for r in facts.ram
                        if r.start < 1 << 32], taken)
    if not below4g:
        raise PlacementError("no RAM below 4 GiB outside the hypervisor's segments for the multiboot modules")
    placer = Placer(max(below4g, key=lambda r: r.size))
    modules = [multiboot.Module(kernel_data, f"{kernel_name} {dom0_args}".strip())]
    if initrd is not None:
        modules.append(multiboot.Module(initrd, initrd_name))
    placed = []
    for m in modules:
        addr = placer.place(len(m.data), PAGE, f"module {m.cmdline.split()[0]}")
        placed.append((addr, addr + len(m.data), m.cmdline))
        segs.append(Segment(addr, page_up(len(m.data)), m.data, f"module {m.cmdline}"))
    xen_cmdline = f"{vmm_name} {xen_args}".strip()
    if len(xen_cmdline) > 1024:
        raise CommandLineError(f"Xen's command line is {len(xen_cmdline)} bytes, Xen takes at most 1024")
    info_addr = placer.place(multiboot.info_size(xen_cmdline, modules, facts.machine_map), PAGE,
                             "multiboot information")
    info = multiboot.build_info(info_addr, xen_cmdline, placed, facts.machine_map)
    stub_addr = placer.place(PAGE, PAGE, "entry stub")
    segs += [Segment(info_addr, page_up(len(info)), info, "multiboot information (command line, modules, e820)"),
             Segment(stub_addr, PAGE, multiboot.entry_stub(info_addr, mb.entry),
                     f"32-bit entry stub: EAX=0x2BADB002 EBX={info_addr:#x}, jump to {mb.entry:#x}")]
    segs.sort(key=lambda s: s.mem)
    check_segments(segs)
    return XenPlan("Xen→Xen (multiboot)", KEXEC_TYPE_DEFAULT, EM_386, stub_addr, segs, low_identity(segs),
                   f"{xen_cmdline} | dom0: {modules[0].cmdline}", facts.machine_map)
