"""Errors of the jump package: one class per kind of failure, each message says what to do."""

from __future__ import annotations

from khibernate.errors import KhibernateError


class NotABzImage(KhibernateError):
    """The kernel file is not an x86 bzImage this loader can boot (wrong magic, too old, not 64-bit)."""


class PlacementError(KhibernateError):
    """The segments do not fit in the load window (crash region or --mem-min/--mem-max)."""


class NoCrashRegion(KhibernateError):
    """No 'Crash kernel' region in /proc/iomem and no --mem-min/--mem-max given."""


class MemoryMapError(KhibernateError):
    """/proc/iomem or /sys/firmware/memmap could not be read or makes no sense."""


class CommandLineError(KhibernateError):
    """The kernel command line is too long or malformed."""


class JumpBackEntryError(KhibernateError):
    """No usable kexec_jump_back_entry (not given, not in /proc/cmdline, or unreadable peer page)."""


class KexecSyscallError(KhibernateError):
    """A kexec_load, kexec_file_load or reboot(KEXEC) call was refused; the message says why and what to do."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno


class NotRoot(KexecSyscallError):
    """The caller lacks CAP_SYS_BOOT (or root for /dev/mem, /proc/iomem)."""


class NotXenDom0(KhibernateError):
    """A Xen hypercall was needed but this is not a Xen dom0 with /dev/xen/privcmd (xen-privcmd loaded)."""


class XenHypercallError(KexecSyscallError):
    """Xen refused a kexec_op or memory_op hypercall; the message says why and what to do."""


class NotOnXen(KhibernateError):
    """What was asked cannot work on a Xen host (e.g. a preserve-context jump: Xen's kexec has none)."""


class PayloadError(KhibernateError):
    """The bzImage's payload cannot be found or decompressed."""


class NotMultiboot(KhibernateError):
    """The hypervisor image has no multiboot header, or is not a 32-bit ELF it can be loaded from."""
