"""Round trips through every writer and reader, and refusal of bad input, on the synthetic kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from khibernate.image import vmcoreinfo
from khibernate.image.errors import (
    AddressError,
    CorruptImageError,
    IncompleteImageError,
    NotAVmcoreError,
    TruncatedError,
    UnsupportedError,
)
from khibernate.image.export import export
from khibernate.image.pagefilter import PageClass
from khibernate.image.sources import open_source
from khibernate.image.sources.elf import ElfSource
from khibernate.image.sources.kdump import KdumpSource
from khibernate.image.sources.khi import KhiSource, save_file
from tests.image import synthkernel as sk

PS = 4096


@pytest.fixture(scope="module")
def khi17(synth_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("khi") / "img.khi"
    with open_source(synth_elf) as src:
        save_file(src, dest, vmci=vmcoreinfo.from_source(src), level=17, restorable=True, block_pages=64)
    return dest


def _same_pages(a: object, b: object, synth: sk.SynthKernel, expect_missing: set[int]) -> None:
    for pfn, cls in enumerate(synth.expected):
        if cls == PageClass.NO_PAGE:
            continue
        want = bytes(synth.mem[pfn * PS:(pfn + 1) * PS])
        if cls in expect_missing:
            with pytest.raises(AddressError):
                b.read(pfn * PS, PS)  # type: ignore[attr-defined]
        else:
            assert b.read(pfn * PS, PS) == want, pfn  # type: ignore[attr-defined]


@pytest.mark.parametrize("compress,flat", [("zstd", False), ("zlib", False), ("none", False), ("zstd", True)])
def test_kdump_roundtrip(khi17: Path, synth: sk.SynthKernel, tmp_path: Path, compress: str, flat: bool) -> None:
    out = tmp_path / "dump.kdump"
    with KhiSource(khi17) as img:
        export(img, str(out), fmt="kdump", compress=compress, flat=flat, vmci=img.vmcoreinfo())
    with open_source(out) as k:
        assert isinstance(k, KdumpSource)
        assert k.header.dump_level == 17 and k.header.version == 6
        assert k.header.utsname[4] == "x86_64" or k.header.utsname[0] == "Linux"
        assert vmcoreinfo.from_source(k).osrelease == "6.12.0-synth"
        _same_pages(None, k, synth, {PageClass.FREE, PageClass.UNUSABLE})


@pytest.mark.parametrize("elf32", [False, True])
def test_elf_export_roundtrip(khi17: Path, synth: sk.SynthKernel, tmp_path: Path, elf32: bool) -> None:
    out = tmp_path / "dump.elf"
    with KhiSource(khi17) as img:
        export(img, str(out), fmt="elf", elf32=elf32, vmci=img.vmcoreinfo())
    with ElfSource(out) as e:
        assert vmcoreinfo.from_source(e).osrelease == "6.12.0-synth"
        if not elf32:
            assert {p.vaddr - p.paddr for p in e.headers.loads} == {sk.PAGE_OFFSET}
        for pfn, cls in enumerate(synth.expected):
            if cls not in (PageClass.NO_PAGE, PageClass.FREE, PageClass.UNUSABLE):
                assert e.read(pfn * PS, PS) == bytes(synth.mem[pfn * PS:(pfn + 1) * PS])


def test_khi_refilter_from_kdump(khi17: Path, synth: sk.SynthKernel, tmp_path: Path) -> None:
    kd = tmp_path / "a.kdump"
    with KhiSource(khi17) as img:
        export(img, str(kd), fmt="kdump", compress="zlib", vmci=img.vmcoreinfo())
    with open_source(kd) as k:
        save_file(k, tmp_path / "b.khi", vmci=vmcoreinfo.from_source(k), level=31)
    with KhiSource(tmp_path / "b.khi") as b:
        b.verify()
        drop = {PageClass.FREE, PageClass.UNUSABLE, PageClass.USER, PageClass.CACHE, PageClass.CACHE_PRIVATE}
        _same_pages(None, b, synth, drop)


def _copy(src: Path, dst: Path, mutate) -> Path:  # noqa: ANN001
    data = bytearray(src.read_bytes())
    data = mutate(data)
    dst.write_bytes(bytes(data))
    return dst


def test_khi_refuses_bad_input(khi17: Path, tmp_path: Path) -> None:
    size = khi17.stat().st_size
    with pytest.raises(IncompleteImageError):
        KhiSource(_copy(khi17, tmp_path / "t", lambda d: d[:size - 1000]))
    with pytest.raises(NotAVmcoreError):
        open_source(_copy(khi17, tmp_path / "m", lambda d: b"XXXX" + d[4:]))

    def version(d: bytearray) -> bytearray:
        d[8] = 99
        return d

    with pytest.raises(UnsupportedError):
        KhiSource(_copy(khi17, tmp_path / "v", version))

    def header_bit(d: bytearray) -> bytearray:
        d[100] ^= 1
        return d

    with pytest.raises(CorruptImageError):
        KhiSource(_copy(khi17, tmp_path / "h", header_bit))
    with KhiSource(khi17) as img:
        block = img.index[len(img.index) // 2].offset + 10

    def block_bit(d: bytearray) -> bytearray:
        d[block] ^= 0x40
        return d

    with KhiSource(_copy(khi17, tmp_path / "b", block_bit)) as bad, pytest.raises(CorruptImageError):
        bad.verify()

    def trailer_bit(d: bytearray) -> bytearray:
        d[-20] ^= 1
        return d

    with pytest.raises(CorruptImageError):
        KhiSource(_copy(khi17, tmp_path / "tr", trailer_bit))
    with pytest.raises(TruncatedError):
        KhiSource(_copy(khi17, tmp_path / "z", lambda d: d[:100]))


def test_other_readers_refuse_bad_input(tmp_path: Path, synth_elf: Path) -> None:
    (tmp_path / "text").write_text("hello")
    with pytest.raises(NotAVmcoreError):
        open_source(tmp_path / "text")
    with pytest.raises(NotAVmcoreError):
        open_source(tmp_path / "missing")
    data = synth_elf.read_bytes()
    (tmp_path / "cut").write_bytes(data[:len(data) // 2])
    with pytest.raises(TruncatedError):
        open_source(tmp_path / "cut")
    exe = bytearray(data[:64])
    exe[16] = 2  # ET_EXEC
    (tmp_path / "exe").write_bytes(bytes(exe))
    with pytest.raises(NotAVmcoreError):
        open_source(tmp_path / "exe")
    (tmp_path / "kd").write_bytes(b"KDUMP   " + bytes(4096))
    with pytest.raises((UnsupportedError, CorruptImageError)):
        open_source(tmp_path / "kd")


def test_flat_stream_without_end_is_incomplete(khi17: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.kdump"
    with KhiSource(khi17) as img:
        export(img, str(out), fmt="kdump", flat=True, vmci=img.vmcoreinfo())
    data = out.read_bytes()
    (tmp_path / "cut").write_bytes(data[:-16])
    with pytest.raises(IncompleteImageError):
        open_source(tmp_path / "cut")


def test_no_partial_dest_on_failure(synth_elf: Path, tmp_path: Path) -> None:
    dest = tmp_path / "x.khi"
    with open_source(synth_elf) as src, pytest.raises(Exception):  # noqa: B017,PT011
        save_file(src, dest, vmci=None, level=31)
    assert not dest.exists() and not list(dest.parent.glob(".*.partial"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("x.khi")]


def test_split_kdump_is_refused(khi17: Path, tmp_path: Path) -> None:
    import struct

    out = tmp_path / "k.kdump"
    with KhiSource(khi17) as img:
        export(img, str(out), fmt="kdump", compress="zlib", vmci=img.vmcoreinfo())
    data = bytearray(out.read_bytes())
    struct.pack_into("<i", data, 4096 + 12, 1)  # kdump_sub_header.split
    (tmp_path / "s.kdump").write_bytes(bytes(data))
    with pytest.raises(UnsupportedError, match="reassemble"):
        open_source(tmp_path / "s.kdump")


@pytest.mark.parametrize("fmt", ["khi", "kdump"])
def test_present_mask_is_a_byte_per_pfn(khi17: Path, tmp_path: Path, fmt: str) -> None:
    """page_present_mask: a bytearray of 0/1 per pfn, 1 exactly where read_page succeeds, 0 beyond max_pfn; any
    window (unaligned too) equals the same slice of the whole mask."""
    path = khi17
    if fmt == "kdump":
        path = tmp_path / "a.kdump"
        with KhiSource(khi17) as img:
            export(img, str(path), fmt="kdump", vmci=img.vmcoreinfo())
    with open_source(path) as src:
        assert isinstance(src, KhiSource | KdumpSource)
        whole = src.page_present_mask(0, src.max_pfn + 100)
        assert type(whole) is bytearray and len(whole) == src.max_pfn + 100 and set(whole) == {0, 1}
        assert not any(whole[src.max_pfn:])
        for pfn in range(src.max_pfn):
            try:
                src.read_page(pfn)
                readable = 1
            except AddressError:
                readable = 0
            assert whole[pfn] == readable, pfn
        for pfn in (0, 3, 13, 1001, src.max_pfn - 5):
            assert src.page_present_mask(pfn, 77) == whole[pfn:pfn + 77], pfn
        if isinstance(src, KhiSource):
            pfns = [p for ps, _ in src.iter_blocks() for p in ps]
            stored = [p for p in range(src.max_pfn) if src.stored_bits[p >> 3] >> (p & 7) & 1]
            assert pfns == stored and all(type(p) is int for p in pfns[:10])
