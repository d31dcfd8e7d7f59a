"""A Xen host's vmcore: the hypervisor's notes next to dom0's VMCOREINFO.

A capture kernel booted by Xen's kexec (``khibernate kdump load`` or ``kexec -p`` on a Xen dom0) sees the whole
machine: /proc/vmcore has, per physical CPU, ``CORE`` NT_PRSTATUS and ``Xen`` XEN_ELFNOTE_CRASH_REGS (cr0, cr2,
cr3, cr4), one ``Xen`` XEN_ELFNOTE_CRASH_INFO (version, the physical addresses of Xen's version strings,
``xen_phys_start``, dom0's p2m frame list list), ``VMCOREINFO_XEN`` (the hypervisor's symbols and struct sizes), and
with khibernate's loader dom0's own ``VMCOREINFO``. Read here over any MemorySource (it is an ELF vmcore: nothing to
probe): the hypervisor's notes (:func:`read`), Xen's frame table (:func:`frame_filter`) and the dump seen through it
(:class:`XenFilteredSource`); the note layouts are in ``khibernate/image/layouts/xen.py``.

dom0 is a PV guest: its ``struct page`` array is indexed by pseudo-physical frames, while the dump's addresses are
machine frames, so Linux page classes (dump levels 2-16) cannot be read from a Xen host dump without walking dom0's
p2m: ``check_level`` refuses them, and only zero pages (-d 1) are dropped.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from khibernate.image.errors import ImageError, UsageErrorImage
from khibernate.image.layouts.xen import (
    CRASH_INFO,
    CRASH_REGS,
    VMCOREINFO_XEN_NOTE,
    XEN_ELFNOTE_CRASH_INFO,
    XEN_ELFNOTE_CRASH_REGS,
    XEN_NOTE,
)
from khibernate.image.sources.adapters import WrappedSource
from khibernate.image.sources.base import MemorySource
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.image.x86_64 import X86_64

XEN_DUMP_LEVELS = (0, 1)


@dataclasses.dataclass(frozen=True)
class XenDump:
    """What the hypervisor left in a host vmcore."""

    version: str
    xen_phys_start: int
    dom0_p2m_frame_list_list: int
    cpus: int
    cr3: tuple[int, ...]
    vmcoreinfo: Vmcoreinfo | None

    def describe(self) -> dict[str, Any]:
        """Facts for `image info`."""
        d: dict[str, Any] = {"xen_version": self.version, "xen_phys_start": hex(self.xen_phys_start),
                             "xen_dom0_p2m_frame_list_list": hex(self.dom0_p2m_frame_list_list),
                             "xen_cpus": self.cpus, "xen_cr3": [hex(c) for c in self.cr3]}
        if self.vmcoreinfo is not None:
            d["xen_vmcoreinfo"] = {k: v for k, v in self.vmcoreinfo.entries.items()
                                   if k.startswith(("SYMBOL(", "SIZE(", "OFFSET(", "PAGESIZE"))}
        return d


def is_xen_dump(src: MemorySource) -> bool:
    """True when the source carries the hypervisor's crash info or VMCOREINFO_XEN (a Xen host's vmcore)."""
    return any(n.name == VMCOREINFO_XEN_NOTE or (n.name == XEN_NOTE and n.type == XEN_ELFNOTE_CRASH_INFO)
               for n in src.notes)


def _cstring(src: MemorySource, paddr: int, limit: int = 64) -> str:
    """A NUL-terminated string at a physical address of the dump ('' when it is not in the dump)."""
    try:
        raw = src.read(paddr, limit)
    except Exception:  # an address outside the dump's RAM: the field stays empty
        return ""
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def read(src: MemorySource) -> XenDump | None:
    """The hypervisor's notes of a Xen host dump, or None for any other source."""
    if not is_xen_dump(src):
        return None
    info = next((n for n in src.notes if n.name == XEN_NOTE and n.type == XEN_ELFNOTE_CRASH_INFO), None)
    regs = [n for n in src.notes if n.name == XEN_NOTE and n.type == XEN_ELFNOTE_CRASH_REGS]
    vmci_note = next((n for n in src.notes if n.name == VMCOREINFO_XEN_NOTE), None)
    vmci = Vmcoreinfo.parse(vmci_note.desc.rstrip(b"\0").decode("ascii", "replace")) if vmci_note else None
    version, phys_start, p2m = "", 0, 0
    if info is not None and len(info.desc) >= CRASH_INFO.size:
        f = CRASH_INFO.unpack(info.desc)
        version = f"{f['xen_major_version']}.{f['xen_minor_version']}{_cstring(src, f['xen_extra_version'])}"
        phys_start, p2m = f["xen_phys_start"], f["dom0_pfn_to_mfn_frame_list_list"]
    cr3 = tuple(CRASH_REGS.unpack(n.desc)["cr3"] for n in regs if len(n.desc) >= CRASH_REGS.size)
    return XenDump(version, phys_start, p2m, len(regs), cr3, vmci)


def check_level(src: MemorySource, level: int) -> None:
    """Refuse dump levels that need dom0's Linux page classes on a Xen host dump (see the module docstring)."""
    if level not in XEN_DUMP_LEVELS and is_xen_dump(src):
        raise UsageErrorImage(
            f"dump level {level} needs Linux page classes, but this is a Xen host dump: dom0 is paravirtualised "
            "(its struct pages are indexed by pseudo-physical frames, the dump by machine frames), so only zero "
            "pages can be dropped here: use -d 1 (or 0)")


# Xen's x86-64 layout (xen/arch/x86/include/asm/config.h): the hypervisor image lies in a 1 GiB-aligned GiB of
# virtual space, its direct map of all machine memory from DIRECTMAP_VIRT_START; page_info count_info flags
# (asm/mm.h, PG_shift(idx) = 64 - idx), as makedumpfile reads them
XEN_IMAGE_SIZE = 1 << 30
DIRECTMAP_VIRT_START = 0xFFFF830000000000
DIRECTMAP_VIRT_END = 0xFFFF880000000000
PGC_ALLOCATED = 1 << 63
PGC_XEN_HEAP = 1 << 62
XEN_FILTERS = ("dom0", "hypervisor")


@dataclasses.dataclass(frozen=True)
class PgcLayout:
    """Where page_info.count_info keeps 'broken' and the page state {inuse, offlining, offlined, free}: Xen 4.17
    moved them (PGC_broken PG_mask(1, 4), PGC_state PG_mask(3, 6); before: (1, 7) and (3, 9), which makedumpfile
    1.7.2 still assumes — on a 4.17 dump it reads count bits there and keeps every free frame)."""

    broken: int
    state_shift: int

    def state(self, count_info: int) -> int:
        """0 in use, 1 offlining, 2 offlined, 3 free."""
        return (count_info >> self.state_shift) & 3


PGC_SINCE_4_17 = PgcLayout(broken=1 << 60, state_shift=58)
PGC_BEFORE_4_17 = PgcLayout(broken=1 << 57, state_shift=55)
STATE_OFFLINED, STATE_FREE = 2, 3


def pgc_layout(version: str) -> PgcLayout:
    """The count_info layout of the Xen that wrote a dump ('4.17.7' and later: the new one)."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return PGC_SINCE_4_17
    return PGC_SINCE_4_17 if (major, minor) >= (4, 17) else PGC_BEFORE_4_17


class XenAddressSpace(X86_64):
    """Xen's virtual addresses: its image (from ``SYMBOL(pgd_l4)``'s GiB, at ``xen_phys_start``), everything else
    (direct map, frame table) through its idle page table ``pgd_l4``; 4-level paging."""

    def __init__(self, source: MemorySource, vmci: Vmcoreinfo, xen_phys_start: int):
        self.source = source
        self.vmci = vmci
        self.image_base = vmci.symbol("pgd_l4") & ~(XEN_IMAGE_SIZE - 1)
        self.kernel_image_size = XEN_IMAGE_SIZE
        self.phys_base = xen_phys_start
        self.l5 = False
        self.sme_mask = 0
        self.pgd_paddr = self.kernel_text_to_pa(vmci.symbol("pgd_l4"))
        self._table_cache: dict[int, bytes] = {}

    def walk(self, va: int) -> tuple[int, int]:
        """The direct map is linear (machine address = va - DIRECTMAP_VIRT_START), as makedumpfile reads it; the
        rest through the page tables."""
        if DIRECTMAP_VIRT_START <= va < DIRECTMAP_VIRT_END:
            return va - DIRECTMAP_VIRT_START, 4096 - (va & 0xFFF)
        return super().walk(va)


@dataclasses.dataclass(frozen=True)
class FrameFilter:
    """Which machine frames a Xen host dump keeps, from Xen's frame table (struct page_info per frame).

    ``dom0`` is makedumpfile's ``-X``: the hypervisor's frames (Xen heap, in-use frames no domain owns) and dom0's;
    guests' and free frames are dropped. ``hypervisor`` keeps the hypervisor's frames only (dom_xen's and dom_io's
    included), dropping dom0's too. Frames without a page_info are dropped.
    """

    aspace: XenAddressSpace
    frame_table: int
    entry_size: int
    off_count_info: int
    off_domain: int
    owners: frozenset[int]  # pickled domain pointers (page_info._domain) whose frames are kept
    domains: dict[int, int]  # domain_id -> pickled pointer, for `describe`
    pgc: PgcLayout = PGC_SINCE_4_17

    def keep(self, pfn: int, n: int) -> bytearray:
        """1 per kept frame of pfn..pfn+n."""
        out = bytearray(n)
        per_page = 4096 // self.entry_size
        i = 0
        while i < n:
            first = pfn + i
            k = min(n - i, per_page - first % per_page)
            try:
                raw = self.aspace.read(self.frame_table + first * self.entry_size, k * self.entry_size)
            except ImageError:  # no page_info for these frames (a hole of the frame table)
                i += k
                continue
            for j in range(k):
                base = j * self.entry_size
                (count_info,) = struct.unpack_from("<Q", raw, base + self.off_count_info)
                (owner,) = struct.unpack_from("<I", raw, base + self.off_domain)
                out[i + j] = self._kept(count_info, owner)
            i += k
        return out

    def _kept(self, count_info: int, owner: int) -> int:
        if count_info & PGC_XEN_HEAP:
            return 1
        if self.pgc.state(count_info) in (STATE_FREE, STATE_OFFLINED) or count_info & self.pgc.broken:
            return 0
        if not count_info & PGC_ALLOCATED or owner == 0:
            return 1
        return 1 if owner in self.owners else 0


def _pickled(ptr: int) -> int:
    """page_info._domain of a struct domain at ``ptr`` (a direct-map address as a frame number, Xen >= 3.4)."""
    return ((ptr - DIRECTMAP_VIRT_START) >> 12) & 0xFFFFFFFF


def frame_filter(src: MemorySource, mode: str, pgc: PgcLayout | None = None) -> FrameFilter:
    """The frame filter of a Xen host dump (``mode`` 'dom0' or 'hypervisor'; ``pgc`` defaults to the layout of
    the Xen version in the dump); UsageErrorImage for any other source."""
    dump = read(src)
    if dump is None or dump.vmcoreinfo is None or not dump.xen_phys_start:
        raise UsageErrorImage("--xen filters a Xen host's vmcore (VMCOREINFO_XEN and Xen's crash info notes); this "
                              "source has none")
    if mode not in XEN_FILTERS:
        raise UsageErrorImage(f"--xen takes {' or '.join(XEN_FILTERS)}, not {mode!r}")
    vmci = dump.vmcoreinfo
    aspace = XenAddressSpace(src, vmci, dump.xen_phys_start)
    off_id, off_next = vmci.offset("domain.domain_id"), vmci.offset("domain.next_in_list")
    domains: dict[int, int] = {}
    ptr = aspace.read_u64(vmci.symbol("domain_list"))
    while ptr and len(domains) < 1 << 15:
        domains[struct.unpack("<H", aspace.read(ptr + off_id, 2))[0]] = _pickled(ptr)
        ptr = aspace.read_u64(ptr + off_next)
    if mode == "dom0":
        if 0 not in domains:
            raise UsageErrorImage("Xen's domain list in this dump has no dom0")
        owners = {domains[0]}
    else:
        owners = {_pickled(aspace.read_u64(vmci.symbol(s))) for s in ("dom_xen", "dom_io", "dom_cow")
                  if vmci.has(f"SYMBOL({s})")}
    return FrameFilter(aspace, aspace.read_u64(vmci.symbol("frame_table")), vmci.size("page_info"),
                       vmci.offset("page_info.count_info"), vmci.offset("page_info._domain"), frozenset(owners),
                       domains, pgc or pgc_layout(dump.version))


class XenFilteredSource(WrappedSource):
    """A Xen host dump seen through a FrameFilter: dropped frames are absent (page_present_mask 0)."""

    def __init__(self, inner: MemorySource, frames: FrameFilter):
        super().__init__(inner)
        self.frames = frames

    def page_present_mask(self, pfn: int, count: int) -> bytearray:
        keep = self.frames.keep(pfn, count)
        inner = self.inner.page_present_mask(pfn, count)
        return keep if inner is None else bytearray(a & b for a, b in zip(inner, keep, strict=True))
