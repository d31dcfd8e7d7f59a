"""Where the running kernel's crash notes lie, from sysfs: the per-cpu ``crash_notes`` and VMCOREINFO buffers an
elfcorehdr points at (``khibernate.elfcore.build_elfcorehdr`` turns them into the header)."""

from __future__ import annotations

from pathlib import Path

from khibernate.elfcore import NoteBuffer
from khibernate.jump.errors import MemoryMapError


def parse_vmcoreinfo_sysfs(text: str) -> NoteBuffer:
    """/sys/kernel/vmcoreinfo ('0x<paddr> <size hex>') as a NoteBuffer."""
    try:
        addr, size = text.split()
        return NoteBuffer(int(addr, 16), int(size, 16), "VMCOREINFO")
    except ValueError as e:
        raise MemoryMapError(f"cannot parse /sys/kernel/vmcoreinfo {text!r}") from e


def read_notes(sys: Path = Path("/sys")) -> list[NoteBuffer]:
    """Per-cpu crash_notes (possible CPUs) then VMCOREINFO, from sysfs of the running kernel."""
    notes = []
    cpus = sorted((p for p in (sys / "devices/system/cpu").glob("cpu[0-9]*")), key=lambda p: int(p.name[3:]))
    for cpu in cpus:
        try:
            addr = int((cpu / "crash_notes").read_text(), 16)
            size = int((cpu / "crash_notes_size").read_text())
        except (OSError, ValueError):
            continue
        notes.append(NoteBuffer(addr, size, f"crash_notes {cpu.name}"))
    try:
        notes.append(parse_vmcoreinfo_sysfs((sys / "kernel/vmcoreinfo").read_text()))
    except OSError as e:
        raise MemoryMapError(f"cannot read {sys}/kernel/vmcoreinfo ({e}): the kernel needs CONFIG_CRASH_DUMP "
                             "(VMCOREINFO) for a jump target's /proc/vmcore") from e
    return notes
