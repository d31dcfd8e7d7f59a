"""Reader, translation, filter and image round trips on the synthetic kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from khibernate import native
from khibernate.image import vmcoreinfo
from khibernate.image.errors import AddressError
from khibernate.image.pagefilter import PageClass, PageFilter
from khibernate.image.sources import open_source
from khibernate.image.sources.elf import ElfSource
from khibernate.image.sources.khi import KhiSource, save_file
from khibernate.image.x86_64 import X86_64
from tests.image import synthkernel as sk


@pytest.mark.parametrize("kind", ["elf64", "elf32", "qemu"])
def test_elf_reader(synth: sk.SynthKernel, tmp_path: Path, kind: str) -> None:
    p = tmp_path / "core"
    synth.write_elf(p, elf32=kind == "elf32", qemu=kind == "qemu")
    with open_source(p) as src:
        assert isinstance(src, ElfSource)
        assert [(r.start, r.end) for r in src.ranges] == synth.ranges
        assert src.read(0x100000, 8192) == bytes(synth.mem[0x100000:0x102000])
        assert src.read(0x9E000, 0x1000) == bytes(synth.mem[0x9E000:0x9F000])
        with pytest.raises(AddressError):
            src.read(0x9F000, 16)
        assert vmcoreinfo.from_source(src).osrelease == "6.12.0-synth"
        assert sum(n.name == "CORE" for n in src.notes) == 1


def test_translation(synth_elf: Path, synth: sk.SynthKernel) -> None:
    with open_source(synth_elf) as src:
        kx = X86_64(src, vmcoreinfo.from_source(src))
        assert kx.to_pa(sk.KTEXT_VA + 0x10) == sk.PHYS_BASE + 0x1000010
        assert kx.walk(sk.PAGE_OFFSET + 0x123456)[0] == 0x123456
        assert kx.walk(sk.VMEMMAP + 4096 * 3 + 5)[0] == 0x1700000 + 4096 * 3 + 5
        assert kx.page_offset() == sk.PAGE_OFFSET
        with pytest.raises(AddressError):
            kx.walk(0xFFFFC90000000000)


@pytest.mark.parametrize("chunk", [1 << 15, 1000, 333])
def test_filter_exact(synth_elf: Path, synth: sk.SynthKernel, chunk: int) -> None:
    with open_source(synth_elf) as src:
        pf = PageFilter(src, vmcoreinfo.from_source(src))
        got = np.concatenate([c for _, c in pf.classes(chunk)])
    ram = synth.expected != PageClass.NO_PAGE
    assert np.array_equal(got[ram], synth.expected[ram]), np.flatnonzero(got[ram] != synth.expected[ram])[:20]


@pytest.mark.parametrize("level,restorable", [(0, False), (1, False), (17, True), (31, False), (16, False)])
def test_save_roundtrip(synth_elf: Path, synth: sk.SynthKernel, tmp_path: Path, level: int, restorable: bool) -> None:
    dest = tmp_path / "img.khi"
    with open_source(synth_elf) as src:
        stats = save_file(src, dest, vmci=vmcoreinfo.from_source(src), level=level, restorable=restorable,
                          threads=2, block_pages=100)
    assert not (tmp_path / "img.khi.partial").exists() and not list(tmp_path.glob(".*.partial"))
    drop = {0: set(), 1: set(), 16: {PageClass.FREE}, 17: {PageClass.FREE},
            31: {PageClass.FREE, PageClass.CACHE, PageClass.CACHE_PRIVATE, PageClass.USER}}[level]
    if level & ~1:
        drop.add(PageClass.UNUSABLE)
    with KhiSource(dest) as img:
        assert img.verify()["pages_stored"] == stats.pages_stored
        for pfn, cls in enumerate(synth.expected):
            if cls == PageClass.NO_PAGE:
                continue
            want = bytes(synth.mem[pfn * 4096:(pfn + 1) * 4096])
            if cls in drop:
                with pytest.raises(AddressError):
                    img.read_page(pfn)
            else:
                assert img.read_page(pfn) == want, pfn
        assert img.vmcoreinfo() is not None and img.header.osrelease == "6.12.0-synth"
    if level & 1:
        assert stats.pages_zero == int((synth.zero & ~np.isin(synth.expected, list(drop))).sum())


@pytest.mark.parametrize("l5,extreme", [(True, True), (False, False), (True, False)])
def test_filter_paging_and_memory_models(tmp_path: Path, l5: bool, extreme: bool) -> None:
    """5-level paging and static (non-EXTREME) mem_section give the same exact classes."""
    k = sk.build(l5=l5, extreme=extreme)
    core = tmp_path / "core"
    k.write_elf(core, kernel_alias=False)
    with open_source(core) as src:
        v = vmcoreinfo.from_source(src)
        kx = X86_64(src, v)
        assert kx.l5 == l5 and kx.page_offset() == k.page_offset
        got = np.concatenate([c for _, c in PageFilter(src, v).classes(700)])
    ram = k.expected != PageClass.NO_PAGE
    assert np.array_equal(got[ram], k.expected[ram])


@pytest.mark.parametrize("variant", ["6.6", "6.3", "6.1"])
def test_filter_older_page_type_schemes(tmp_path: Path, variant: str) -> None:
    """hugetlb via PG_hugetlb (6.6-6.8), folio dtor (6.3-6.5), compound_dtor + PG_slab + bit-cleared types (older)."""
    k = sk.build(variant=variant)
    core = tmp_path / "core"
    k.write_elf(core)
    with open_source(core) as src:
        got = np.concatenate([c for _, c in PageFilter(src, vmcoreinfo.from_source(src)).classes(900)])
    ram = k.expected != PageClass.NO_PAGE
    assert np.array_equal(got[ram], k.expected[ram]), np.flatnonzero(got[ram] != k.expected[ram])[:10]


def test_head_lookup_keeps_the_chunk_classifier_state(synth_elf: Path, synth: sk.SynthKernel) -> None:
    """Resolving a far tail's head classifies that head on the side; the chunk being resolved keeps its own
    per-page classes (classes() reads them for heads found inside the chunk after such a lookup)."""
    with open_source(synth_elf) as src:
        pf = PageFilter(src, vmcoreinfo.from_source(src))
        sec = pf.sections[0]
        n = min(512, sec.nr_pages)
        pf._classifier.classify(pf._struct_pages(sec, sec.start_pfn, n), n, sec.mem_map, 0)
        before = [pf._classifier.own_class(i) for i in range(n)]
        probe = native.Classifier(pf._layout_c, 2)
        for pfn in range(sec.start_pfn + n, sec.start_pfn + sec.nr_pages - 2):  # a head unlike pages 0 and 1
            probe.classify(pf._struct_pages(sec, pfn, 2), 2, sec.mem_map + (pfn - sec.start_pfn) * pf.layout.size, 0)
            if [probe.own_class(0), probe.own_class(1)] != before[:2]:
                break
        else:
            raise AssertionError("the synthetic kernel has no page classed unlike the section's first two")
        pf._head_class(pfn)
        assert [pf._classifier.own_class(i) for i in range(n)] == before
