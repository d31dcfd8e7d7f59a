"""Zero-copy reads: an ELF core is gathered straight from its mapping (also through the capture job's
AnnotatedSource), each copied range released; a mapping that refuses MADV_DONTNEED (/proc/vmcore's VM_PFNMAP old
memory) is read on without it."""

from __future__ import annotations

import mmap
from pathlib import Path

from khibernate.image import vmcoreinfo
from khibernate.image.sources import open_source
from khibernate.image.sources.adapters import AnnotatedSource
from khibernate.image.sources.khi import KhiSource, save_file
from tests.image import synthkernel as sk


class _NoDontneed(mmap.mmap):
    """A mapping whose madvise fails like a VM_PFNMAP one's."""

    calls = 0

    def madvise(self, *args: int) -> None:
        type(self).calls += 1
        raise OSError(22, "Invalid argument")


def test_capture_source_gathers_from_the_mapping_and_survives_a_refused_release(synth_elf: Path,
                                                                                synth: sk.SynthKernel,
                                                                                tmp_path: Path) -> None:
    with open_source(synth_elf) as inner:
        src = AnnotatedSource(inner, "KHIBERNATE", b"x")
        view = src.mapped_view(0x100000, 4096)
        assert view is not None and bytes(view) == bytes(synth.mem[0x100000:0x101000])
        view.release()
        inner.file.mm = stub = _NoDontneed(inner.file.fd, 0, prot=mmap.PROT_READ)  # type: ignore[attr-defined]
        stats = save_file(src, tmp_path / "a.khi", vmci=vmcoreinfo.from_source(inner), level=17, restorable=True,
                          block_pages=64)
        assert stub.calls == 1  # asked once, then never again
    with KhiSource(tmp_path / "a.khi") as img:
        assert img.verify()["pages_stored"] == stats.pages_stored > 0
        assert any(n.name == "KHIBERNATE" for n in img.notes)
        for pfns, data in img.iter_blocks():
            for i, pfn in enumerate(pfns):
                assert data[i * 4096:(i + 1) * 4096] == bytes(synth.mem[pfn * 4096:(pfn + 1) * 4096])


def _pages(path: Path) -> tuple[bytes, bytes, dict[int, bytes]]:
    with KhiSource(path) as img:
        pages = {pfn: data[i * 4096:(i + 1) * 4096] for pfns, data in img.iter_blocks() for i, pfn in enumerate(pfns)}
        return bytes(img.stored_bits), bytes(img.zero_bits), pages


def test_mapped_and_read_paths_and_thread_counts_store_the_same_pages(synth_elf: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:  # noqa: ANN001
    """Whether pages come from the mapping (compressed in place or gathered) or by pread, on 1 or 3 threads, the
    image holds the same pages and bitmaps."""
    from khibernate.image.sources import base

    outs = []
    for name, threads, mapped in (("m1", 1, True), ("m3", 3, True), ("r2", 2, False)):
        if not mapped:
            monkeypatch.setattr(base.SegmentedFile, "mapped_view", lambda self, paddr, size: None)
        with open_source(synth_elf) as src:
            save_file(src, tmp_path / f"{name}.khi", vmci=vmcoreinfo.from_source(src), level=17, restorable=True,
                      threads=threads, block_pages=50)
        outs.append(_pages(tmp_path / f"{name}.khi"))
    assert outs[0] == outs[1] == outs[2] and len(outs[0][2]) > 1000
