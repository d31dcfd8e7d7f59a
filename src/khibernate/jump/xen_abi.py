"""Xen's public hypercall ABI that kexec through the hypervisor uses (xen/include/public/{xen,kexec,memory}.h and
Linux's include/uapi/xen/privcmd.h, x86-64), declared once for the planner (xen.py) and the hypercall layer
(xen_hypercalls.py).
"""

from __future__ import annotations

from khibernate.jump import bootparams
from khibernate.layout import Layout

# hypercall numbers (public/xen.h)
HYPERVISOR_MEMORY_OP = 12
HYPERVISOR_KEXEC_OP = 37

# kexec_op commands and image types (public/kexec.h, the v2 interface of Xen >= 4.4)
KEXEC_CMD_KEXEC = 0
KEXEC_CMD_GET_RANGE = 3
KEXEC_CMD_LOAD = 4
KEXEC_CMD_UNLOAD = 5
KEXEC_CMD_STATUS = 6
KEXEC_TYPE_DEFAULT = 0
KEXEC_TYPE_CRASH = 1
KEXEC_TYPE_NAMES = {KEXEC_TYPE_DEFAULT: "default", KEXEC_TYPE_CRASH: "crash"}

KEXEC_RANGE_MA_CRASH = 0
KEXEC_RANGE_MA_XEN = 1
KEXEC_RANGE_MA_CPU = 2
KEXEC_RANGE_MA_VMCOREINFO = 6

# the image's machine type: Xen enters EM_X86_64 images in long mode on identity-mapped segments, EM_386 images in
# 32-bit protected mode with paging off (xen/arch/x86/x86_64/kexec_reloc.S)
EM_386 = 3
EM_X86_64 = 62

XENMEM_MACHINE_MEMORY_MAP = 10
E820_MAX_XEN = 128

# struct privcmd_hypercall { __u64 op; __u64 arg[5]; };  IOCTL_PRIVCMD_HYPERCALL = _IOC(_IOC_NONE, 'P', 0, 48)
PRIVCMD_HYPERCALL = Layout("privcmd_hypercall", "<", [("op", "Q"), ("arg", "5Q")])
IOCTL_PRIVCMD_HYPERCALL = (PRIVCMD_HYPERCALL.size << 16) | (ord("P") << 8)

KEXEC_RANGE = Layout("xen_kexec_range", "<", [("range", "i"), ("nr", "i"), ("size", "Q"), ("start", "Q")])
KEXEC_SEGMENT = Layout("xen_kexec_segment", "<", [("buf", "Q"), ("buf_size", "Q"), ("dest_maddr", "Q"),
                                                   ("dest_size", "Q")])
KEXEC_LOAD = Layout("xen_kexec_load", "<", [("type", "B"), ("_pad", "x"), ("arch", "H"), ("nr_segments", "I"),
                                             ("segments", "Q"), ("entry_maddr", "Q")])
KEXEC_EXEC = Layout("xen_kexec_exec", "<", [("type", "i")])
KEXEC_UNLOAD = Layout("xen_kexec_unload", "<", [("type", "B")])  # also xen_kexec_status
MEMORY_MAP = Layout("xen_memory_map", "<", [("nr_entries", "I"), ("_pad", "4x"), ("buffer", "Q")])
E820_ENTRY = bootparams.E820_ENTRY  # struct e820entry: packed, 20 bytes (the zero page's)
