"""VMCOREINFO: parse the kernel's ``KEY=value`` note, from a source's note, /sys/kernel/vmcoreinfo or a file."""

from __future__ import annotations

import dataclasses
import os
import re

from khibernate.elfcore import VMCOREINFO_NOTE, parse_notes
from khibernate.image.errors import ELF_ERRORS, CorruptImageError, MissingVmcoreinfoError, NotAVmcoreError
from khibernate.image.sources.base import MemorySource

_KEYED = re.compile(r"(SYMBOL|SIZE|OFFSET|LENGTH|NUMBER)\((.+)\)")

Bounds = tuple[int, int]  # (lowest, highest) value an entry may have, inclusive
ADDRESS: Bounds = (0, (1 << 64) - 1)
ANY_WORD: Bounds = (-(1 << 63), (1 << 64) - 1)  # NUMBER() is printed signed (%ld) or unsigned (%lu, 0x%lx)
MAX_STRUCT_BYTES = 1 << 24  # no struct VMCOREINFO describes comes near 16 MiB (pglist_data, 1024 nodes: ~200 KiB)
# what any entry of each kind can be, before its user checks the tighter bounds of the field it reads
KIND_BOUNDS: dict[str, Bounds] = {
    "SYMBOL": ADDRESS,
    "SIZE": (1, MAX_STRUCT_BYTES),
    "OFFSET": (0, MAX_STRUCT_BYTES - 1),
    "LENGTH": (0, 1 << 32),
    "NUMBER": ANY_WORD,
}


def _span(lo: int, hi: int) -> str:
    """``lo..hi`` for a message (hex beyond 32 bits)."""
    return "..".join(str(v) if abs(v) < 1 << 32 else hex(v) for v in (lo, hi))


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

    def _int(self, key: str, value: str, base: int = 0, within: Bounds | None = None) -> int:
        """``value`` of ``key`` as an integer inside ``within`` (default: what any kernel's entry of that kind can
        hold); CorruptImageError naming the key when it is not a number or out of bounds."""
        try:
            v = int(value, base)
        except ValueError:
            raise CorruptImageError(f"VMCOREINFO {key}={value[:40]!r} is not a number; the dump's VMCOREINFO is "
                                    "corrupt - give a good copy with --vmcoreinfo FILE") from None
        lo, hi = within if within is not None else KIND_BOUNDS.get(key.partition("(")[0], ANY_WORD)
        if not lo <= v <= hi:
            raise CorruptImageError(f"VMCOREINFO {key}={value[:40]} is outside {_span(lo, hi)}, what a kernel can "
                                    "have; the dump's VMCOREINFO is corrupt - give a good copy with --vmcoreinfo FILE")
        return v

    def has(self, key: str) -> bool:
        """True if ``key`` is present."""
        return key in self.entries

    def symbol(self, name: str) -> int:
        """``SYMBOL(name)`` (hex address)."""
        return self._int(f"SYMBOL({name})", self._need(f"SYMBOL({name})"), 16)

    def size(self, name: str, within: Bounds | None = None) -> int:
        """``SIZE(name)``, inside ``within`` when given."""
        return self._int(f"SIZE({name})", self._need(f"SIZE({name})"), 0, within)

    def offset(self, member: str, within: Bounds | None = None) -> int:
        """``OFFSET(struct.member)``, inside ``within`` when given."""
        return self._int(f"OFFSET({member})", self._need(f"OFFSET({member})"), 0, within)

    def length(self, name: str, within: Bounds | None = None) -> int:
        """``LENGTH(name)``, inside ``within`` when given."""
        return self._int(f"LENGTH({name})", self._need(f"LENGTH({name})"), 0, within)

    def number(self, name: str, within: Bounds | None = None) -> int:
        """``NUMBER(name)`` (decimal, or hex with 0x), inside ``within`` when given."""
        return self._int(f"NUMBER({name})", self._need(f"NUMBER({name})"), 0, within)

    def number_or(self, name: str, default: int | None, within: Bounds | None = None) -> int | None:
        """``NUMBER(name)`` (inside ``within`` when given) or ``default``."""
        v = self.entries.get(f"NUMBER({name})")
        return self._int(f"NUMBER({name})", v, 0, within) if v is not None else default

    def offset_or(self, member: str, default: int | None, within: Bounds | None = None) -> int | None:
        """``OFFSET(member)`` (inside ``within`` when given) or ``default``."""
        v = self.entries.get(f"OFFSET({member})")
        return self._int(f"OFFSET({member})", v, 0, within) if v is not None else default

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
        v = self._int("PAGESIZE", self.entries.get("PAGESIZE", "4096"), 10, (512, 1 << 20))
        if v & (v - 1):
            raise CorruptImageError(f"VMCOREINFO PAGESIZE={v} is not a page size; the VMCOREINFO is corrupt")
        return v

    @property
    def kerneloffset(self) -> int:
        """KASLR offset of the kernel image (0 when not randomised)."""
        return self._int("KERNELOFFSET", self.entries.get("KERNELOFFSET", "0"), 16, ADDRESS)

    @property
    def crashtime(self) -> int:
        """CRASHTIME (seconds since the epoch) or 0."""
        return self._int("CRASHTIME", self.entries.get("CRASHTIME", "0"), 10, (0, (1 << 63) - 1))


def from_source(source: MemorySource) -> Vmcoreinfo:
    """VMCOREINFO carried by the source's notes; MissingVmcoreinfoError if there is none."""
    text = source.vmcoreinfo_text
    if text is None:
        raise MissingVmcoreinfoError(
            "the dump has no VMCOREINFO note; for QEMU dumps run the guest with -device vmcoreinfo, "
            "for kexec-jump dumps pass --vmcoreinfo FILE (or the paddr from /sys/kernel/vmcoreinfo)"
        )
    return Vmcoreinfo.parse(text)


def find_in_source(source: MemorySource) -> Vmcoreinfo | None:
    """The source's own VMCOREINFO note, or None when it has none (a malformed note still raises)."""
    try:
        return from_source(source)
    except MissingVmcoreinfoError:
        return None


def from_memory(source: MemorySource, paddr: int, size: int) -> Vmcoreinfo:
    """VMCOREINFO from the ELF note at ``paddr`` in the source's memory (what /sys/kernel/vmcoreinfo points at)."""
    for n in parse_notes(source.read(paddr, size), errors=ELF_ERRORS):
        if n.name == VMCOREINFO_NOTE:
            return Vmcoreinfo.parse(n.desc.rstrip(b"\0").decode("ascii", "replace"))
    raise MissingVmcoreinfoError(f"no VMCOREINFO note at physical {paddr:#x}; check the address and size given")


def from_file(path: str | os.PathLike[str]) -> Vmcoreinfo:
    """VMCOREINFO from a text file (``makedumpfile -g`` output or a copy of the note)."""
    from khibernate.image.inputfile import open_input

    fd = open_input(path)
    try:
        data = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    if data.startswith(b"\x7fELF") or data[:4] == bytes(4):
        raise NotAVmcoreError(f"{os.fspath(path)}: expected VMCOREINFO text, got binary data")
    return Vmcoreinfo.parse(data.decode("ascii", "replace"))
