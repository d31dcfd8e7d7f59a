"""VMCOREINFO: parse the kernel's ``KEY=value`` note, from a source's note, /sys/kernel/vmcoreinfo or a file."""

from __future__ import annotations

import dataclasses
import os
import re

from khibernate.image.errors import MissingVmcoreinfoError, NotAVmcoreError
from khibernate.image.sources.base import VMCOREINFO_NOTE, MemorySource

_KEYED = re.compile(r"(SYMBOL|SIZE|OFFSET|LENGTH|NUMBER)\((.+)\)")


@dataclasses.dataclass(frozen=True)
class Vmcoreinfo:
    """Parsed VMCOREINFO; typed getters raise MissingVmcoreinfoError naming the absent key."""

    text: str
    entries: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Vmcoreinfo:
        """Parse VMCOREINFO text (``KEY=value`` lines; later duplicates win)."""
        entries: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                entries[key] = value
        if "OSRELEASE" not in entries and "PAGESIZE" not in entries:
            raise NotAVmcoreError("this is not VMCOREINFO text (no OSRELEASE or PAGESIZE line)")
        return cls(text, entries)

    def get(self, key: str) -> str | None:
        """Raw value of ``key`` (e.g. ``OSRELEASE``, ``SYMBOL(prb)``) or None."""
        return self.entries.get(key)

    def _need(self, key: str) -> str:
        """Value of ``key``; MissingVmcoreinfoError naming it when absent."""
        v = self.entries.get(key)
        if v is None:
            raise MissingVmcoreinfoError(
                f"VMCOREINFO has no {key}; this kernel does not export it - give a VMCOREINFO file with -i "
                "or use a lower dump level"
            )
        return v

    def has(self, key: str) -> bool:
        """True if ``key`` is present."""
        return key in self.entries

    def symbol(self, name: str) -> int:
        """``SYMBOL(name)`` (hex address)."""
        return int(self._need(f"SYMBOL({name})"), 16)

    def size(self, name: str) -> int:
        """``SIZE(name)``."""
        return int(self._need(f"SIZE({name})"), 0)

    def offset(self, member: str) -> int:
        """``OFFSET(struct.member)``."""
        return int(self._need(f"OFFSET({member})"), 0)

    def length(self, name: str) -> int:
        """``LENGTH(name)``."""
        return int(self._need(f"LENGTH({name})"), 0)

    def number(self, name: str) -> int:
        """``NUMBER(name)`` (decimal, or hex with 0x)."""
        return int(self._need(f"NUMBER({name})"), 0)

    def number_or(self, name: str, default: int | None) -> int | None:
        """``NUMBER(name)`` or ``default``."""
        v = self.entries.get(f"NUMBER({name})")
        return int(v, 0) if v is not None else default

    def offset_or(self, member: str, default: int | None) -> int | None:
        """``OFFSET(member)`` or ``default``."""
        v = self.entries.get(f"OFFSET({member})")
        return int(v, 0) if v is not None else default

    @property
    def osrelease(self) -> str:
        """Kernel release (``uname -r``)."""
        return self.entries.get("OSRELEASE", "")

    @property
    def build_id(self) -> str:
        """Kernel BUILD-ID (hex), empty if absent."""
        return self.entries.get("BUILD-ID", "")

    @property
    def page_size(self) -> int:
        """Kernel page size."""
        return int(self.entries.get("PAGESIZE", "4096"))

    @property
    def kerneloffset(self) -> int:
        """KASLR offset of the kernel image (0 when not randomised)."""
        return int(self.entries.get("KERNELOFFSET", "0"), 16)

    @property
    def crashtime(self) -> int:
        """CRASHTIME (seconds since the epoch) or 0."""
        return int(self.entries.get("CRASHTIME", "0"))


def from_source(source: MemorySource) -> Vmcoreinfo:
    """VMCOREINFO carried by the source's notes; MissingVmcoreinfoError if there is none."""
    text = source.vmcoreinfo_text
    if text is None:
        raise MissingVmcoreinfoError(
            "the dump has no VMCOREINFO note; for QEMU dumps run the guest with -device vmcoreinfo, "
            "for kexec-jump dumps pass --vmcoreinfo FILE (or the paddr from /sys/kernel/vmcoreinfo)"
        )
    return Vmcoreinfo.parse(text)


def from_memory(source: MemorySource, paddr: int, size: int) -> Vmcoreinfo:
    """VMCOREINFO from the ELF note at ``paddr`` in the source's memory (what /sys/kernel/vmcoreinfo points at)."""
    from khibernate.image.elf import parse_notes

    for n in parse_notes(source.read(paddr, size)):
        if n.name == VMCOREINFO_NOTE:
            return Vmcoreinfo.parse(n.desc.rstrip(b"\0").decode("ascii", "replace"))
    raise MissingVmcoreinfoError(f"no VMCOREINFO note at physical {paddr:#x}; check the address and size given")


def sysfs_location(path: str = "/sys/kernel/vmcoreinfo") -> tuple[int, int]:
    """(paddr, size) of the running kernel's VMCOREINFO note, as /sys/kernel/vmcoreinfo prints them (hex)."""
    try:
        with open(path) as f:
            a, b = f.read().split()[:2]
    except OSError as e:
        raise MissingVmcoreinfoError(f"cannot read {path} ({e.strerror}); is CONFIG_VMCORE_INFO set?") from None
    return int(a, 16), int(b, 16)


def from_file(path: str | os.PathLike[str]) -> Vmcoreinfo:
    """VMCOREINFO from a text file (``makedumpfile -g`` output or a copy of the note)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\x7fELF") or data[:4] == bytes(4):
        raise NotAVmcoreError(f"{os.fspath(path)}: expected VMCOREINFO text, got binary data")
    return Vmcoreinfo.parse(data.decode("ascii", "replace"))
