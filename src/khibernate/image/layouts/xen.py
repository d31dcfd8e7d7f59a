"""The notes a Xen hypervisor leaves in a host's vmcore (xen/include/xen/elfcore.h, x86-64), byte by byte.  Pure; the
reader is ``khibernate/image/sources/xen.py``."""

from __future__ import annotations

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
