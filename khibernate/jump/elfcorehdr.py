"""The ELF64 core header a kdump / jump target finds at ``elfcorehdr=`` and turns into /proc/vmcore.

Layout as fs/proc/vmcore.c expects it: ELF header, all PT_NOTE headers first (per-cpu crash_notes, then VMCOREINFO,
whose p_offset is a physical address), then one PT_LOAD per range of the first kernel's RAM
(p_offset = p_paddr = physical address, p_vaddr in the direct map).  Pure: ``build`` returns bytes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from khibernate.elfcore import (
    EHDR64,
    ELFCLASS64,
    EM_X86_64,
    ET_CORE,
    EV_CURRENT,
    PF_R,
    PF_W,
    PF_X,
    PHDR64,
    PT_LOAD,
    PT_NOTE,
)
from khibernate.elfcore import ident as elf_ident
from khibernate.jump.errors import MemoryMapError
from khibernate.ranges import Range

EHDR, PHDR = EHDR64, PHDR64  # the layouts of khibernate/elfcore.py, shared with the image readers
PAGE_OFFSET = 0xFFFF888000000000  # x86_64 direct map base without KASLR (VMCOREINFO has the real one)


@dataclasses.dataclass(frozen=True)
class Note:
    """A note buffer in the old kernel's memory: physical address and size."""

    paddr: int
    size: int
    what: str


def build(ram: list[Range], notes: list[Note], page_offset: int = PAGE_OFFSET,
          moved: dict[int, int] | None = None) -> bytes:
    """ELF64 ET_CORE header bytes: notes first (in the order given), then one PT_LOAD per RAM range.

    ``moved`` maps a RAM range's start to where its bytes are now (p_offset): a crash image's backup of the low
    memory its kernel reuses (p_paddr stays the original address)."""
    if not ram:
        raise MemoryMapError("no RAM ranges of the first kernel to describe in the ELF core header")
    phnum = len(notes) + len(ram)
    out = bytearray(EHDR.pack(e_ident=elf_ident(ELFCLASS64), e_type=ET_CORE, e_machine=EM_X86_64,
                              e_version=EV_CURRENT, e_phoff=EHDR.size, e_ehsize=EHDR.size, e_phentsize=PHDR.size,
                              e_phnum=phnum))
    for n in notes:
        out += PHDR.pack(p_type=PT_NOTE, p_offset=n.paddr, p_paddr=n.paddr, p_filesz=n.size, p_memsz=n.size)
    for r in ram:
        at = (moved or {}).get(r.start, r.start)
        out += PHDR.pack(p_type=PT_LOAD, p_flags=PF_R | PF_W | PF_X, p_offset=at, p_vaddr=page_offset + r.start,
                         p_paddr=r.start, p_filesz=r.size, p_memsz=r.size)
    return bytes(out)


def parse(data: bytes) -> tuple[list[Note], list[Range]]:
    """(notes, RAM ranges) of a header made by ``build`` (tests, --dry-run)."""
    e = EHDR.unpack(data, error=MemoryMapError, what="ELF core header")
    if e["e_ident"][:4] != b"\x7fELF" or e["e_type"] != ET_CORE or e["e_machine"] != EM_X86_64:
        raise MemoryMapError("not an x86_64 ELF core header")
    notes, ram = [], []
    for i in range(e["e_phnum"]):
        p = PHDR.unpack(data, e["e_phoff"] + i * e["e_phentsize"], error=MemoryMapError, what="program header")
        if p["p_type"] == PT_NOTE:
            notes.append(Note(p["p_offset"], p["p_filesz"], "note"))
        elif p["p_type"] == PT_LOAD:
            ram.append(Range(p["p_paddr"], p["p_paddr"] + p["p_filesz"]))
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
