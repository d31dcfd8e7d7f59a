"""Facts about the running Linux system that kexec, kdump and kexec jump depend on.

Everything is read through a ``SystemRoot`` (``/`` by default) so the readers can be pointed at a copied
tree in tests.  Nothing here writes anything.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from khibernate.ranges import E820_NAMES, E820_NONE, Range


@dataclasses.dataclass(frozen=True, order=True)
class IomemRegion(Range):
    """One line of /proc/iomem: a Range [start, end) (the file prints the inclusive end), its name and depth.

    ``type`` is the e820 type its name stands for, E820_NONE for other resources ("PCI Bus", "Kernel code").
    """

    name: str = ""
    depth: int = 0


def parse_iomem(text: str) -> list[IomemRegion]:
    """Parse /proc/iomem text; addresses are all zero when read without CAP_SYS_ADMIN (see addresses_hidden)."""
    regions = []
    for line in text.splitlines():
        m = re.fullmatch(r"( *)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)", line.rstrip())
        if m:
            name = m.group(4)
            regions.append(IomemRegion(int(m.group(2), 16), int(m.group(3), 16) + 1, E820_NAMES.get(name, E820_NONE),
                                       name, len(m.group(1)) // 2))
    return regions


def system_ram(regions: Sequence[IomemRegion]) -> list[Range]:
    """Top-level 'System RAM' ranges of /proc/iomem."""
    return sorted(Range(r.start, r.end) for r in regions if r.depth == 0 and r.name == "System RAM")


def addresses_hidden(regions: Sequence[Range]) -> bool:
    """True when /proc/iomem was read without CAP_SYS_ADMIN: every line shows 00000000-00000000."""
    return bool(regions) and all(r.start == 0 and r.last == 0 for r in regions)


def parse_kernel_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value ('y', 'm', a string or number); options that are not set are absent."""
    config = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        if m:
            config[m.group(1)] = m.group(2).strip('"')
    return config


INITRD_ROOT_TYPES = ("rootfs", "ramfs", "tmpfs")  # what the kernel unpacks an initramfs into


def root_fstype(mountinfo: str) -> str | None:
    """The filesystem type mounted on "/" in /proc/PID/mountinfo text (the topmost mount there), None if absent."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[4] == "/" and "-" in fields[6:]:
            rest = fields[fields.index("-", 6) + 1:]
            found = rest[0] if rest else found
    return found


def parse_lockdown(text: str) -> str:
    """The active mode of /sys/kernel/security/lockdown ('none [integrity] confidentiality' -> 'integrity')."""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text.strip() or "unknown"


@dataclasses.dataclass(frozen=True)
class SystemRoot:
    """Where /proc, /sys and /boot are (``/`` on a live system)."""

    path: Path = Path("/")

    def _p(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def read(self, rel: str) -> str | None:
        """The file's text, or None if it does not exist or cannot be read."""
        try:
            return self._p(rel).read_text()
        except OSError:
            return None

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None if it does not exist or cannot be read."""
        try:
            return self._p(rel).read_bytes()
        except OSError:
            return None

    def read_int(self, rel: str) -> int | None:
        """The file's text as an integer (0x-hex or decimal), or None if absent, unreadable or not a number."""
        text = self.read(rel)
        try:
            return int(text.strip(), 0) if text is not None else None
        except ValueError:
            return None

    def release(self) -> str:
        """The running kernel's release (uname -r)."""
        text = self.read("/proc/sys/kernel/osrelease")
        return text.strip() if text else os.uname().release

    def iomem(self) -> list[IomemRegion]:
        """Parsed /proc/iomem (empty if unreadable)."""
        return parse_iomem(self.read("/proc/iomem") or "")

    def cmdline(self) -> str:
        """/proc/cmdline without the trailing newline."""
        return (self.read("/proc/cmdline") or "").strip()

    def boot_id(self) -> str:
        """This boot's random id (/proc/sys/kernel/random/boot_id), "" if unreadable."""
        return (self.read("/proc/sys/kernel/random/boot_id") or "").strip()

    @staticmethod
    def uptime() -> float:
        """CLOCK_BOOTTIME of the running kernel in seconds (the time spent in a jumped-to kernel included)."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def system_ram(self) -> list[Range]:
        """This kernel's own System RAM (top-level /proc/iomem ranges; [] if unreadable) — in a capture kernel, the
        crash region and the low RAM it borrowed."""
        return system_ram(self.iomem())

    def kernel_config(self) -> tuple[dict[str, str] | None, str | None]:
        """(config, where it came from), or (None, None) when no config can be found."""
        try:
            raw = gzip.decompress(self._p("/proc/config.gz").read_bytes()).decode()
            return parse_kernel_config(raw), "/proc/config.gz"
        except OSError:
            pass
        for rel in (f"/boot/config-{self.release()}", f"/lib/modules/{self.release()}/build/.config"):
            text = self.read(rel)
            if text is not None:
                return parse_kernel_config(text), rel
        return None, None

    def xen_guest_type(self) -> str | None:
        """'PV', 'HVM' or 'PVH' when this kernel runs on Xen (/sys/hypervisor), None on bare metal or elsewhere."""
        if (self.read("/sys/hypervisor/type") or "").strip() != "xen":
            return None
        return (self.read("/sys/hypervisor/guest_type") or "PV").strip() or "PV"

    def xen_control_domain(self) -> bool | None:
        """True in dom0 ('control_d' in /proc/xen/capabilities), False in another Xen domain, None when unknown
        (xenfs not mounted on /proc/xen)."""
        caps = self.read("/proc/xen/capabilities")
        return None if caps is None else "control_d" in caps

    def in_initrd(self) -> bool:
        """Whether the system still runs from its initramfs — PID 1's root is the rootfs the kernel unpacked it into
        (so also from a chroot that an initramfs script made), or /etc/initrd-release says so (systemd's rule)
        — i.e. no switch to the real root filesystem has happened, and nothing was mounted by the booted system."""
        if self._p("/etc/initrd-release").exists():
            return True
        return root_fstype(self.read("/proc/1/mountinfo") or "") in INITRD_ROOT_TYPES

    def lockdown(self) -> str | None:
        """The active kernel lockdown mode, or None when the kernel has no lockdown LSM."""
        text = self.read("/sys/kernel/security/lockdown")
        return parse_lockdown(text) if text is not None else None


def crash_regions(regions: list[IomemRegion]) -> list[IomemRegion]:
    """The 'Crash kernel' regions reserved by crashkernel= (may be several, e.g. ,high and ,low)."""
    return [r for r in regions if r.name == "Crash kernel"]
