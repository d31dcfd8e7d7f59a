import io

from elftools.elf.elffile import ELFFile

from khibernate.jump import elfcorehdr
from khibernate.jump.elfcorehdr import Note
from khibernate.ranges import Range


def test_round_trip_pyelftools():
    ram = [Range(0x100000, 0x2F000000), Range(0x3F000000, 0x3FFE0000)]
    notes = [Note(0x3FC1A000, 0x150, "cpu0"), Note(0x3FC1B000, 0x150, "cpu1"), Note(0x1E3C000, 0x1024, "VMCOREINFO")]
    data = elfcorehdr.build(ram, notes)
    elf = ELFFile(io.BytesIO(data))
    assert elf.header.e_type == "ET_CORE" and elf.header.e_machine == "EM_X86_64"
    assert elf.elfclass == 64 and elf.little_endian
    segs = list(elf.iter_segments())
    assert [s["p_type"] for s in segs] == ["PT_NOTE"] * 3 + ["PT_LOAD"] * 2   # notes first: vmcore.c merges them
    assert [(s["p_offset"], s["p_filesz"]) for s in segs[:3]] == [(n.paddr, n.size) for n in notes]
    loads = segs[3:]
    assert [(s["p_paddr"], s["p_memsz"]) for s in loads] == [(r.start, r.size) for r in ram]
    assert loads[0]["p_offset"] == 0x100000 and loads[0]["p_vaddr"] == elfcorehdr.PAGE_OFFSET + 0x100000
    assert elfcorehdr.parse(data)[1] == ram


def test_sysfs_parsing(tmp_path):
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel/vmcoreinfo").write_text("0x0000000001e3c000 1024\n")
    for i in (0, 1, 10):
        d = tmp_path / f"devices/system/cpu/cpu{i}"
        d.mkdir(parents=True)
        (d / "crash_notes").write_text(f"{0x3fc1a000 + i * 0x1000:x}\n")
        (d / "crash_notes_size").write_text("336\n")
    notes = elfcorehdr.read_notes(tmp_path)
    assert [n.paddr for n in notes] == [0x3FC1A000, 0x3FC1B000, 0x3FC24000, 0x1E3C000]
    assert notes[-1] == Note(0x1E3C000, 0x1024, "VMCOREINFO")


def test_round_trip_khibernate_image_reader():
    """The header is what khibernate/image's ELF reader expects of a vmcore's headers."""
    from khibernate.elfcore import ELFCLASS64, EM_X86_64, parse_headers

    ram = [Range(0x9F000, 0x9FC00), Range(0x100000, 0x2E000000), Range(0x3E000000, 0x3FFE0000)]
    notes = [Note(0x3FC1A000, 0x150, "cpu0"), Note(0x1FA000, 0x1024, "VMCOREINFO")]
    h = parse_headers(elfcorehdr.build(ram, notes))
    assert h.elfclass == ELFCLASS64 and h.machine == EM_X86_64
    assert [(p.offset, p.filesz) for p in h.note_phdrs] == [(n.paddr, n.size) for n in notes]
    assert [(p.paddr, p.offset, p.filesz) for p in h.loads] == [(r.start, r.start, r.size) for r in ram]
