"""Small real inputs for fuzzing, generated in-process by khibernate's own writers: a tiny ELF core, the .khi,
kdump (zlib/zstd, plain and flattened) and ELF32 files made from it, and a raw memory file with its elfcorehdr."""

from __future__ import annotations

import random
from pathlib import Path

from khibernate.elfcore import VMCOREINFO_NOTE, LoadSpec, Note
from khibernate.image.export import export
from khibernate.image.sources import open_source
from khibernate.image.sources.elf import write_elf
from khibernate.image.sources.khi import save_file
from khibernate.jump import elfcorehdr

PS = 4096
RANGES = [(0x1000, 0x21000), (0x100000, 0x100000 + 40 * PS)]  # 32 + 40 pages
VMCOREINFO = "OSRELEASE=6.12.0-fuzz\nPAGESIZE=4096\nBUILD-ID=00112233\nCRASHTIME=1700000000\n"
NOTE_PA = 0x1000  # the raw file keeps its notes in its first page


def memory(seed: int = 7) -> bytearray:
    """Physical memory up to the last range: random pages, every third one zero."""
    rnd = random.Random(seed)
    end = RANGES[-1][1]
    mem = bytearray(end)
    for a, b in RANGES:
        for pa in range(a, b, PS):
            if (pa // PS) % 3:
                mem[pa:pa + PS] = rnd.randbytes(PS // 4) * 4
    return mem


def notes() -> list[Note]:
    """One CPU's NT_PRSTATUS and VMCOREINFO."""
    return [Note("CORE", 1, bytes(336)), Note(VMCOREINFO_NOTE, 0, VMCOREINFO.encode())]


def build(dest: Path) -> dict[str, Path]:
    """Write every base file into ``dest``; returns {format name: path}."""
    mem = memory()
    out = {"elf64": dest / "core.elf"}
    loads = [LoadSpec(a, b - a, 0xFFFF888000000000 + a) for a, b in RANGES]
    with open(out["elf64"], "wb") as f:
        write_elf(f, loads, notes(), lambda pa, n: mem[pa:pa + n])
    out["khi"] = dest / "img.khi"
    with open_source(out["elf64"]) as src:
        from khibernate.image import vmcoreinfo

        vmci = vmcoreinfo.from_source(src)
        save_file(src, out["khi"], vmci=vmci, level=1, restorable=True, block_pages=8, sync=False)
        for name, kw in {"kdump-zlib": {"compress": "zlib"}, "kdump-zstd": {"compress": "zstd"},
                         "kdump-flat": {"compress": "zlib", "flat": True}, "elf32": {"elf32": True}}.items():
            out[name] = dest / f"{name}.dump"
            fmt = "elf" if name == "elf32" else "kdump"
            export(src, str(out[name]), fmt=fmt, level=1, vmci=vmci, sync=False, **kw)  # type: ignore[arg-type]
    raw = bytearray(mem)
    from khibernate.elfcore import pack_notes

    blob = pack_notes(notes())
    raw[NOTE_PA:NOTE_PA + len(blob)] = blob
    out["raw"] = dest / "mem.raw"
    out["raw"].write_bytes(bytes(raw))
    from khibernate.jump.memmap import Range

    hdr = elfcorehdr.build([Range(a, b) for a, b in RANGES], [elfcorehdr.Note(NOTE_PA, len(blob), "notes")])
    out["elfcorehdr"] = dest / "elfcorehdr"
    out["elfcorehdr"].write_bytes(hdr)
    return out
