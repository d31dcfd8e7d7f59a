"""The ELF64 core header a kdump / jump target finds at ``elfcorehdr=`` and turns into /proc/vmcore.

Layout as fs/proc/vmcore.c expects it: ELF header, all PT_NOTE headers first (per-cpu crash_notes, then VMCOREINFO,
whose p_offset is a physical address), then one PT_LOAD per range of the first kernel's RAM
(p_offset = p_paddr = physical address, p_vaddr in the direct map).  Pure: ``build`` returns bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

from khibernate.jump.errors import MemoryMapError
from khibernate.jump.memmap import Range

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
ET_CORE = 4
EM_X86_64 = 62
EV_CURRENT = 1
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
PAGE_OFFSET = 0xFFFF888000000000  # x86_64 direct map base without KASLR (VMCOREINFO has the real one)


@dataclasses.dataclass(frozen=True)
class Note:
    """A note buffer in the old kernel's memory: physical address and size."""

    paddr: int
    size: int
    what: str


def build(ram: list[Range], notes: list[Note], page_offset: int = PAGE_OFFSET) -> bytes:
    """ELF64 ET_CORE header bytes: notes first (in the order given), then one PT_LOAD per RAM range."""
    if not ram:
        raise MemoryMapError("no RAM ranges of the first kernel to describe in the ELF core header")
    phnum = len(notes) + len(ram)
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT, 0]) + bytes(8)
    out = bytearray(EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, EHDR.size, 0, 0, EHDR.size, PHDR.size,
                              phnum, 0, 0, 0))
    for n in notes:
        out += PHDR.pack(PT_NOTE, 0, n.paddr, 0, n.paddr, n.size, n.size, 0)
    for r in ram:
        out += PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, r.start, page_offset + r.start, r.start, r.size, r.size, 0)
    return bytes(out)


def parse(data: bytes) -> tuple[list[Note], list[Range]]:
    """(notes, RAM ranges) of a header made by ``build`` (tests, --dry-run)."""
    ident, etype, machine, _, _, phoff, _, _, _, phentsize, phnum, _, _, _ = EHDR.unpack_from(data, 0)
    if ident[:4] != b"\x7fELF" or etype != ET_CORE or machine != EM_X86_64:
        raise MemoryMapError("not an x86_64 ELF core header")
    notes, ram = [], []
    for i in range(phnum):
        ptype, _, off, _, paddr, filesz, _, _ = PHDR.unpack_from(data, phoff + i * phentsize)
        if ptype == PT_NOTE:
            notes.append(Note(off, filesz, "note"))
        elif ptype == PT_LOAD:
            ram.append(Range(paddr, paddr + filesz))
    return notes, ram


def parse_vmcoreinfo_sysfs(text: str) -> Note:
    """/sys/kernel/vmcoreinfo ('0x<paddr> <size hex>') as a Note."""
    try:
        addr, size = text.split()
        return Note(int(addr, 16), int(size, 16), "VMCOREINFO")
    except ValueError as e:
        raise MemoryMapError(f"cannot parse /sys/kernel/vmcoreinfo {text!r}") from e


def read_notes(sys: Path = Path("/sys")) -> list[Note]:
    """Per-cpu crash_notes (possible CPUs) then VMCOREINFO, from sysfs of the running kernel."""
    notes = []
    cpus = sorted((p for p in (sys / "devices/system/cpu").glob("cpu[0-9]*")), key=lambda p: int(p.name[3:]))
    for cpu in cpus:
        try:
            addr = int((cpu / "crash_notes").read_text(), 16)
            size = int((cpu / "crash_notes_size").read_text())
        except (OSError, ValueError):
            continue
        notes.append(Note(addr, size, f"crash_notes {cpu.name}"))
    try:
        notes.append(parse_vmcoreinfo_sysfs((sys / "kernel/vmcoreinfo").read_text()))
    except OSError as e:
        raise MemoryMapError(f"cannot read {sys}/kernel/vmcoreinfo ({e}): the kernel needs CONFIG_CRASH_DUMP "
                             "(VMCOREINFO) for a jump target's /proc/vmcore") from e
    return notes
