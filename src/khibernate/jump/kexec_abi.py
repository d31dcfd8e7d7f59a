"""The kexec ABI numbers (include/uapi/linux/kexec.h, reboot.h; x86-64), declared once for planners and syscalls."""

from __future__ import annotations

SYS_REBOOT = 169
SYS_KEXEC_LOAD = 246
SYS_KEXEC_FILE_LOAD = 320

LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_KEXEC = 0x45584543
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC

KEXEC_SEGMENT_MAX = 16


# kexec_load(2) flags; the architecture sits in the high 16 bits
KEXEC_ON_CRASH = 0x1
KEXEC_PRESERVE_CONTEXT = 0x2
KEXEC_ARCH_X86_64 = 62 << 16
KEXEC_ARCH_MASK = 0xFFFF << 16
KEXEC_FLAG_NAMES = ((KEXEC_ON_CRASH, "KEXEC_ON_CRASH"), (KEXEC_PRESERVE_CONTEXT, "KEXEC_PRESERVE_CONTEXT"))

# kexec_file_load(2) flags
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4


def describe_kexec_flags(flags: int) -> str:
    """kexec_load flags as names joined by ' | ' (e.g. 'KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_X86_64')."""
    names = [name for bit, name in KEXEC_FLAG_NAMES if flags & bit]
    arch = flags & KEXEC_ARCH_MASK
    if arch:
        names.append("KEXEC_ARCH_X86_64" if arch == KEXEC_ARCH_X86_64 else f"arch {arch >> 16}")
    rest = flags & ~KEXEC_ARCH_MASK & ~(KEXEC_ON_CRASH | KEXEC_PRESERVE_CONTEXT)
    return " | ".join(names + ([f"{rest:#x}"] if rest else [])) or "0"
