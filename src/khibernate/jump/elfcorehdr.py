"""The ELF64 core header a kdump / jump target finds at ``elfcorehdr=`` and turns into /proc/vmcore.

Layout as fs/proc/vmcore.c expects it: ELF header, all PT_NOTE headers first (per-cpu crash_notes, then VMCOREINFO,
whose p_offset is a physical address), then one PT_LOAD per range of the first kernel's RAM
(p_offset = p_paddr = physical address, p_vaddr in the direct map).  Pure: ``build`` returns bytes.

A note whose buffer lies in memory the jump swaps out (a load window in the first kernel's own RAM) would be read
by the second kernel from its own pages: such a note carries a copy of its bytes (``Note.data``, read through
/proc/kcore by ``read_note_data``), which ``build`` appends after the program headers, pointing the PT_NOTE at the
copy (the header's own physical address ``base`` + its offset).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from khibernate.elfcore import (
    EHDR64,
    ELFCLASS64,
    ELFMAG,
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
    """A note buffer in the old kernel's memory: physical address and size; ``data``: a copy of its bytes to carry
    in the header itself (the buffer's memory is swapped out at the jump)."""

    paddr: int
    size: int
    what: str
    data: bytes | None = None

    @property
    def range(self) -> Range:
        return Range(self.paddr, self.paddr + self.size)


def build(ram: list[Range], notes: list[Note], page_offset: int = PAGE_OFFSET,
          moved: dict[int, int] | None = None, base: int = 0) -> bytes:
    """ELF64 ET_CORE header bytes: notes first (in the order given), then one PT_LOAD per RAM range, then the
    copies of the notes that carry ``data`` (their PT_NOTE points there: ``base`` is the header's physical address;
    the length does not depend on it).

    ``moved`` maps a RAM range's start to where its bytes are now (p_offset): a crash image's backup of the low
    memory its kernel reuses (p_paddr stays the original address)."""
    if not ram:
        raise MemoryMapError("no RAM ranges of the first kernel to describe in the ELF core header")
    phnum = len(notes) + len(ram)
    out = bytearray(EHDR.pack(e_ident=elf_ident(ELFCLASS64), e_type=ET_CORE, e_machine=EM_X86_64,
                              e_version=EV_CURRENT, e_phoff=EHDR.size, e_ehsize=EHDR.size, e_phentsize=PHDR.size,
                              e_phnum=phnum))
    copies = bytearray()
    copy_at = EHDR.size + phnum * PHDR.size
    for n in notes:
        where = n.paddr
        if n.data is not None:
            where = base + copy_at + len(copies)
            copies += n.data.ljust(-(-n.size // 8) * 8, b"\0")
        out += PHDR.pack(p_type=PT_NOTE, p_offset=where, p_paddr=where, p_filesz=n.size, p_memsz=n.size)
    for r in ram:
        at = (moved or {}).get(r.start, r.start)
        out += PHDR.pack(p_type=PT_LOAD, p_flags=PF_R | PF_W | PF_X, p_offset=at, p_vaddr=page_offset + r.start,
                         p_paddr=r.start, p_filesz=r.size, p_memsz=r.size)
    return bytes(out + copies)


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


def kcore_offset(header: bytes, paddr: int, size: int) -> int:
    """Where physical ``[paddr, paddr+size)`` is in /proc/kcore, from its ELF headers (the kernel sets p_paddr on
    the direct-map PT_LOADs); MemoryMapError when no PT_LOAD holds it."""
    e = EHDR.unpack(header, error=MemoryMapError, what="/proc/kcore ELF header")
    if e["e_ident"][:4] != ELFMAG:
        raise MemoryMapError("/proc/kcore does not start with an ELF header")
    for i in range(e["e_phnum"]):
        p = PHDR.unpack(header, e["e_phoff"] + i * e["e_phentsize"], error=MemoryMapError,
                        what="/proc/kcore program header")
        if p["p_type"] == PT_LOAD and p["p_paddr"] <= paddr and paddr + size <= p["p_paddr"] + p["p_memsz"]:
            return int(p["p_offset"] + paddr - p["p_paddr"])
    raise MemoryMapError(f"/proc/kcore maps no memory at {paddr:#x}")


def read_note_data(note: Note, kcore: Path = Path("/proc/kcore")) -> Note:
    """The note with a copy of its bytes read from the running kernel's memory through /proc/kcore (root)."""
    try:
        with open(kcore, "rb") as f:
            header = f.read(1 << 16)
            f.seek(kcore_offset(header, note.paddr, note.size))
            data = f.read(note.size)
    except OSError as e:
        raise MemoryMapError(f"cannot copy the {note.what} note at {note.paddr:#x} from {kcore} ({e}): it lies in "
                             "memory the jump swaps out; the kernel needs CONFIG_PROC_KCORE") from e
    if len(data) != note.size:
        raise MemoryMapError(f"{kcore} gave {len(data)} of the {note.size} bytes of the {note.what} note")
    return dataclasses.replace(note, data=data)


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
