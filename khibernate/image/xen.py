"""A Xen host's vmcore: the hypervisor's notes next to dom0's VMCOREINFO.

A capture kernel booted by Xen's kexec (``khibernate kdump load`` or ``kexec -p`` on a Xen dom0) sees the whole
machine: /proc/vmcore has, per physical CPU, ``CORE`` NT_PRSTATUS and ``Xen`` XEN_ELFNOTE_CRASH_REGS (cr0, cr2,
cr3, cr4), one ``Xen`` XEN_ELFNOTE_CRASH_INFO (version, the physical addresses of Xen's version strings,
``xen_phys_start``, dom0's p2m frame list list), ``VMCOREINFO_XEN`` (the hypervisor's symbols and struct sizes), and
with khibernate's loader dom0's own ``VMCOREINFO``. Pure readers over a MemorySource.

dom0 is a PV guest: its ``struct page`` array is indexed by pseudo-physical frames, while the dump's addresses are
machine frames, so Linux page classes (dump levels 2-16) cannot be read from a Xen host dump without walking dom0's
p2m: ``check_level`` refuses them, and only zero pages (-d 1) are dropped.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from khibernate.image.errors import UsageErrorImage
from khibernate.image.sources.base import MemorySource
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.layout import Layout

XEN_NOTE = "Xen"
VMCOREINFO_XEN_NOTE = "VMCOREINFO_XEN"
XEN_ELFNOTE_CRASH_INFO = 0x1000001
XEN_ELFNOTE_CRASH_REGS = 0x1000002
# crash_xen_info_t (xen/include/xen/elfcore.h), x86-64: version strings are physical addresses
CRASH_INFO = Layout("crash_xen_info", "<", [
    ("xen_major_version", "Q"), ("xen_minor_version", "Q"), ("xen_extra_version", "Q"), ("xen_changeset", "Q"),
    ("xen_compiler", "Q"), ("xen_compile_date", "Q"), ("xen_compile_time", "Q"), ("tainted", "Q"),
    ("xen_phys_start", "Q"), ("dom0_pfn_to_mfn_frame_list_list", "Q")])
CRASH_REGS = Layout("crash_xen_core", "<", [("cr0", "Q"), ("cr2", "Q"), ("cr3", "Q"), ("cr4", "Q")])
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
    cr3 = tuple(struct.unpack_from("<Q", n.desc, CRASH_REGS.offsets["cr3"])[0] for n in regs
                if len(n.desc) >= CRASH_REGS.size)
    return XenDump(version, phys_start, p2m, len(regs), cr3, vmci)


def check_level(src: MemorySource, level: int) -> None:
    """Refuse dump levels that need dom0's Linux page classes on a Xen host dump (see the module docstring)."""
    if level not in XEN_DUMP_LEVELS and is_xen_dump(src):
        raise UsageErrorImage(
            f"dump level {level} needs Linux page classes, but this is a Xen host dump: dom0 is paravirtualised "
            "(its struct pages are indexed by pseudo-physical frames, the dump by machine frames), so only zero "
            "pages can be dropped here: use -d 1 (or 0)")
