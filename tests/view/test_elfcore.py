"""The on-the-fly vmcore: header built once, offsets mapped to physical addresses, holes read as zeros."""

from __future__ import annotations

import io

import pytest

from khibernate.elfcore import PT_LOAD, PT_NOTE, LoadSpec, Note, parse_headers
from khibernate.image.errors import AddressError
from khibernate.image.sources.base import MemorySource, MemRange, StoredSource
from khibernate.image.sources.elf import ElfSource, VmcoreLayout, loads_for, write_elf
from khibernate.view.files import ViewFile, build_files

PS = 4096


class Pattern(StoredSource):
    """Memory where every 8-byte word holds its own physical address; ``excluded`` pfns raise AddressError."""

    def __init__(self, ranges: list[MemRange], excluded: frozenset[int] = frozenset(), notes: tuple[Note, ...] = ()):
        self._ranges = tuple(ranges)
        self._notes = notes
        self.excluded = excluded

    def read(self, paddr: int, size: int) -> bytes:
        if not self.present(paddr, size):
            raise AddressError(f"{paddr:#x} outside")
        if any(p in self.excluded for p in range(paddr // PS, -(-(paddr + size) // PS))):
            raise AddressError(f"{paddr:#x} excluded")
        a0 = paddr & ~7
        words = b"".join(a.to_bytes(8, "little") for a in range(a0, paddr + size + 8, 8))
        return words[paddr - a0:paddr - a0 + size]


def expected(paddr: int, size: int, src: Pattern) -> bytes:
    out = bytearray()
    for a in range(paddr, paddr + size):
        inside = src.present(a, 1) and a // PS not in src.excluded
        out += (a & ~7).to_bytes(8, "little")[a & 7:(a & 7) + 1] if inside else b"\0"
    return bytes(out)


RANGES = [MemRange(0x1000, 0x9f000), MemRange(0x100000, 0x180000), MemRange(0x200000, 0x201000)]
NOTES = (Note("CORE", 1, b"\1" * 336), Note("VMCOREINFO", 0, b"OSRELEASE=6.12.0-test\nPAGESIZE=4096\n"))


def layout(text: LoadSpec | None = None) -> VmcoreLayout:
    return VmcoreLayout(loads_for(RANGES, page_offset=0xFFFF888000000000, kernel_text=text), NOTES)


def test_header_is_an_elf_core_with_notes_and_one_load_per_range() -> None:
    lay = layout()
    h = parse_headers(lay.header)
    assert [p.type for p in h.phdrs] == [PT_NOTE] + [PT_LOAD] * len(RANGES)
    assert [(p.paddr, p.memsz, p.filesz) for p in h.loads] == [(r.start, r.size, r.size) for r in RANGES]
    assert all(p.vaddr == 0xFFFF888000000000 + p.paddr for p in h.loads)
    assert h.loads[0].offset % PS == 0 and h.loads[0].offset >= len(lay.header) - PS
    assert lay.size == h.loads[-1].offset + h.loads[-1].filesz


def test_offset_maps_to_paddr_across_segment_boundaries() -> None:
    lay = layout()
    s0 = lay.segments[0]
    assert lay.pieces(s0.offset + 8, 16) == [(s0.offset + 8, 16, 0x1008)]
    end0 = s0.offset + s0.size
    assert lay.pieces(end0 - 4, 8) == [(end0 - 4, 4, 0x9f000 - 4), (end0, 4, 0x100000)]
    assert lay.pieces(0, 4)[0][2] is None  # header bytes
    assert lay.pieces(lay.size - 2, 100) == [(lay.size - 2, 2, 0x201000 - 2)]  # clipped at EOF
    assert lay.pieces(lay.size, 10) == []


def test_kernel_text_alias_comes_first_at_its_virtual_address() -> None:
    text = LoadSpec(0x100000, 0x20000, 0xFFFFFFFF81000000)
    h = parse_headers(layout(text).header)
    assert (h.loads[0].paddr, h.loads[0].vaddr, h.loads[0].memsz) == (0x100000, 0xFFFFFFFF81000000, 0x20000)
    assert len(h.loads) == 1 + len(RANGES)


def test_on_the_fly_file_equals_write_elf_and_reads_back_through_elfsource(tmp_path) -> None:  # noqa: ANN001
    src = Pattern(RANGES)
    lay = layout()
    loads = loads_for(RANGES, page_offset=0xFFFF888000000000)
    buf = io.BytesIO()
    write_elf(buf, loads, NOTES, src.read)
    whole = lay.read(0, lay.size, src.read)
    assert whole == buf.getvalue()
    for off, n in [(0, 64), (lay.segments[1].offset - 5, 4100), (lay.size - 3, 3), (100, 200000)]:
        assert lay.read(off, n, src.read) == whole[off:off + n]
    p = tmp_path / "vmcore"
    p.write_bytes(whole)
    with ElfSource(p) as back:
        assert back.ranges == tuple(RANGES)
        assert back.read(0x100ff8, 16) == src.read(0x100ff8, 16)
        assert back.vmcoreinfo_text == NOTES[1].desc.decode()


def test_read_filled_zeros_holes_and_excluded_pages_only() -> None:
    src = Pattern(RANGES, excluded=frozenset({0x101}))
    for paddr, n in [(0x9e000, 0x3000), (0x100ff0, 0x20), (0x100800, 0x2000), (0, 10), (0x1000, 64)]:
        assert src.read_filled(paddr, n) == expected(paddr, n, src)
    assert src.read_filled(0x5000, 0) == b""


def test_view_files_oldmem_is_physical_and_vmcore_carries_notes() -> None:
    src: MemorySource = Pattern(RANGES, notes=NOTES)
    files = build_files(src)
    assert set(files) == {"vmcore", "oldmem", "vmcoreinfo", "info.json"}  # no prb: no dmesg
    old = files["oldmem"]
    assert old.size == 0x201000
    assert old.read(0x100000, 16) == src.read(0x100000, 16)
    assert old.read(0xA0000, 8) == bytes(8)  # a hole reads as zeros
    assert old.read(0x201000 - 4, 100) == src.read(0x201000 - 4, 4)  # short at EOF
    assert old.read(0x201000, 1) == b""
    assert files["vmcoreinfo"].read(0, 1 << 20) == NOTES[1].desc
    h = parse_headers(files["vmcore"].read(0, 4096))
    assert [p.paddr for p in h.loads] == [r.start for r in RANGES]  # no vmcoreinfo symbols: no text alias


@pytest.mark.parametrize("off,n,want", [(0, 3, b"abc"), (2, 10, b"c"), (3, 1, b""), (-1, 2, b"")])
def test_small_file_clips(off: int, n: int, want: bytes) -> None:
    assert ViewFile.of_bytes(b"abc").read(off, n) == want
