"""Facts about the running Linux system that kexec, kdump and kexec jump depend on.

Everything is read through a ``SystemRoot`` (``/`` by default) so the readers can be pointed at a copied
tree in tests.  Nothing here writes anything.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class IomemRegion:
    """One line of /proc/iomem: [start, end] inclusive, its name and nesting depth."""

    start: int
    end: int
    name: str
    depth: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def parse_iomem(text: str) -> list[IomemRegion]:
    """Parse /proc/iomem text; addresses are all zero when read without CAP_SYS_ADMIN."""
    regions = []
    for line in text.splitlines():
        m = re.fullmatch(r"( *)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)", line.rstrip())
        if m:
            regions.append(IomemRegion(int(m.group(2), 16), int(m.group(3), 16), m.group(4), len(m.group(1)) // 2))
    return regions


def parse_kernel_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value ('y', 'm', a string or number); options that are not set are absent."""
    config = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        if m:
            config[m.group(1)] = m.group(2).strip('"')
    return config


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

    def read_int(self, rel: str) -> int | None:
        text = self.read(rel)
        try:
            return int(text.strip(), 0) if text is not None else None
        except ValueError:
            return None

    def release(self) -> str:
        text = self.read("/proc/sys/kernel/osrelease")
        return text.strip() if text else os.uname().release

    def iomem(self) -> list[IomemRegion]:
        return parse_iomem(self.read("/proc/iomem") or "")

    def cmdline(self) -> str:
        return (self.read("/proc/cmdline") or "").strip()

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

    def lockdown(self) -> str | None:
        text = self.read("/sys/kernel/security/lockdown")
        return parse_lockdown(text) if text is not None else None


def crash_regions(regions: list[IomemRegion]) -> list[IomemRegion]:
    """The 'Crash kernel' regions reserved by crashkernel= (may be several, e.g. ,high and ,low)."""
    return [r for r in regions if r.name == "Crash kernel"]
