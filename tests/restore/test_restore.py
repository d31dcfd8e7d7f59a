"""krestore on a synthetic kernel: a restorable image written back into a file standing in for /dev/mem.

A regular file takes the same mmap calls as /dev/mem, so the write path, the clipping to RAM, zeroing and the
read-back are the product's; only the device differs.  The checks (does an image belong to this boot) are pure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from khibernate.capture.errors import JobError
from khibernate.capture.jobspec import Job, parse
from khibernate.elfcore import gnu_build_id as build_id_from_notes
from khibernate.image import vmcoreinfo
from khibernate.image.sources import open_source
from khibernate.image.sources.adapters import AnnotatedSource
from khibernate.image.sources.khi import KhiSource, save_file
from khibernate.ranges import Range
from khibernate.restore import checks
from khibernate.restore.checks import RestoreRefused, SavedImage, ThisBoot, page_ranges
from khibernate.restore.krestore import runs, write_image
from khibernate.restore.oldmem import OldMemory, OldMemoryError
from khibernate.restore.resume import choose
from khibernate.store.superblock import FLAG_HIBERNATE, SlotState, new_superblock
from tests.image import synthkernel as sk

GARBAGE = 0xA5


def _image(synth: sk.SynthKernel, elf: Path, dest: Path, zero_free: bool = False) -> Path:
    note = {"kind": "hibernate", "boot_id": "b", "jump_back_entry": 0x5CE0F2, "image": "0" * 32,
            "mailbox": 0x1234000, "zero_free": zero_free, "restorable": True, "capture_ram": [[0x2000000, 0x3000000]]}
    with open_source(elf) as raw:
        src = AnnotatedSource(raw, "KHIBERNATE", json.dumps(note).encode())
        save_file(src, dest, vmci=vmcoreinfo.from_source(raw), level=17, restorable=True)
    return dest


@pytest.fixture(scope="module")
def image(synth: sk.SynthKernel, synth_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _image(synth, synth_elf, tmp_path_factory.mktemp("khi") / "img.khi")


def _memory(tmp_path: Path, size: int) -> Path:
    mem = tmp_path / "mem"
    mem.write_bytes(bytes([GARBAGE]) * size)  # another boot's bytes everywhere
    return mem


@pytest.mark.parametrize("zero_free", [False, True])
def test_write_back_restores_every_kept_page(synth: sk.SynthKernel, synth_elf: Path, tmp_path: Path,
                                             zero_free: bool) -> None:
    img = _image(synth, synth_elf, tmp_path / "i.khi", zero_free)
    src = KhiSource(img)
    mem = _memory(tmp_path, len(synth.mem))
    ram = [Range(a, b) for a, b in synth.ranges]
    touched = []
    with OldMemory(ram, path=str(mem)) as om:
        st = write_image(src, om, ram=ram, zero_free=SavedImage.from_source(src).zero_free,
                         on_first_write=lambda: touched.append(1))
    out = mem.read_bytes()
    stored = np.unpackbits(np.frombuffer(src.stored_bits, np.uint8), bitorder="little")[:src.max_pfn].astype(bool)
    zero = np.unpackbits(np.frombuffer(src.zero_bits, np.uint8), bitorder="little")[:src.max_pfn].astype(bool)
    assert touched == [1] and st.pages_written == int(stored.sum()) and st.pages_zeroed == int(zero.sum())
    for pfn in np.flatnonzero(stored)[::7]:
        a = int(pfn) * 4096
        assert out[a:a + 4096] == bytes(synth.mem[a:a + 4096]), hex(a)
    for pfn in np.flatnonzero(zero):
        a = int(pfn) * 4096
        assert out[a:a + 4096] == bytes(4096), hex(a)
    dropped = [p for p in range(src.max_pfn) if not stored[p] and not zero[p]
               and any(a <= p * 4096 < b for a, b in synth.ranges)]
    assert dropped, "the synthetic kernel has free pages"
    for p in dropped:
        want = bytes(4096) if zero_free else bytes([GARBAGE]) * 4096
        assert out[p * 4096:(p + 1) * 4096] == want, hex(p * 4096)
    # the hole between the ranges is never written
    assert out[sk.HOLE[0]:sk.HOLE[1]] == bytes([GARBAGE]) * (sk.HOLE[1] - sk.HOLE[0])
    assert st.pages_free_zeroed == (len(dropped) if zero_free else 0)
    src.close()


def test_writes_stay_inside_the_exact_ram_bytes(synth: sk.SynthKernel, image: Path, tmp_path: Path) -> None:
    """A RAM range ending mid-page (e820's 0x9fc00) is written only up to its end: the BIOS's EBDA after it stays."""
    src = KhiSource(image)
    mem = _memory(tmp_path, len(synth.mem))
    first = synth.ranges[0]
    ram = [Range(first[0], first[1] - 0x400), *[Range(a, b) for a, b in synth.ranges[1:]]]
    with OldMemory(ram, path=str(mem)) as om:
        write_image(src, om, ram=ram)
    out = mem.read_bytes()
    assert out[first[1] - 0x400:first[1]] == bytes([GARBAGE]) * 0x400
    src.close()


def test_oldmemory_refuses_outside_its_ranges(tmp_path: Path) -> None:
    mem = _memory(tmp_path, 1 << 20)
    with OldMemory([Range(0x1000, 0x3000)], path=str(mem)) as om:
        om.write(0x1000, b"x" * 0x2000)
        with pytest.raises(OldMemoryError, match="outside"):
            om.write(0x2000, b"y" * 0x1001)
        with pytest.raises(OldMemoryError, match="outside"):
            om.read(0, 16)
    assert mem.read_bytes()[0x3000] == GARBAGE


def test_runs_of_consecutive_pfns() -> None:
    assert list(runs([1, 2, 3, 7, 9, 10])) == [(1, 3, 0), (7, 1, 3), (9, 2, 4)]
    assert list(runs([])) == []
    assert list(runs([5])) == [(5, 1, 0)]
    assert list(runs(list(range(100, 356)))) == [(100, 256, 0)]
    pfns = sorted({(i * 7919) % 5000 for i in range(3000)})
    got = list(runs(pfns))
    assert [p for first, n, _ in got for p in range(first, first + n)] == pfns
    assert all(pfns[k] == first for first, _, k in got)


def _here(img: SavedImage, **kw: object) -> ThisBoot:
    base = {"page_size": img.page_size, "ranges": img.ranges, "osrelease": img.osrelease, "build_id": "ab12",
            "capture_ram": img.capture_ram}
    base.update(kw)
    return ThisBoot(**base)  # type: ignore[arg-type]


def test_checks_name_every_difference(image: Path) -> None:
    src = KhiSource(image)
    img = SavedImage.from_source(src)
    src.close()
    img = SavedImage(**{**img.__dict__, "build_id": "ab12"})
    assert img.restorable and img.jump_back_entry == 0x5CE0F2 and img.mailbox == 0x1234000
    assert checks.differences(img, _here(img)) == []
    other = _here(img, ranges=(Range(0, 0x9F000), Range(0x100000, 0x1000000)), build_id="ff",
                  osrelease="6.12.0-other", capture_ram=(Range(0x1000, 0x80000), img.ranges[-1]), page_size=16384)
    diffs = checks.differences(img, other)
    text = " | ".join(diffs)
    for word in ("page size", "memory ranges", "capture kernel's own memory", "kernel release", "BUILD-ID"):
        assert word in text, (word, text)
    with pytest.raises(RestoreRefused, match="nothing was written"):
        checks.check(img, other)
    # a reader pads 0x1000-0x9fc00 to its page, /proc/iomem does not: the same memory
    padded = _here(img, ranges=(Range(img.ranges[0].start, img.ranges[0].end - 0x400), *img.ranges[1:]))
    assert checks.differences(img, padded) == []
    unrestorable = SavedImage(**{**img.__dict__, "restorable": False})
    assert "not restorable" in checks.differences(unrestorable, _here(img))[0]


def test_page_ranges_merge_and_widen() -> None:
    assert page_ranges([Range(0x1000, 0x9FC00), Range(0x100000, 0x200000)], 4096) == (
        Range(0x1000, 0xA0000), Range(0x100000, 0x200000))
    assert page_ranges([Range(0, 0x1800), Range(0x1800, 0x3000)], 4096) == (Range(0, 0x3000),)


def test_choose_takes_the_newest_hibernation_image_only_while_never_tried() -> None:
    sb = new_superblock(64 << 20, 4, bytes(16), 0)
    s = list(sb.slots)
    s[0] = s[0].__class__(**{**s[0].__dict__, "state": SlotState.COMPLETE, "seq": 3, "flags": FLAG_HIBERNATE})
    s[1] = s[1].__class__(**{**s[1].__dict__, "state": SlotState.COMPLETE, "seq": 5})  # a snapshot, not hibernate
    s[2] = s[2].__class__(**{**s[2].__dict__, "state": SlotState.RESUMED, "seq": 2, "flags": FLAG_HIBERNATE})
    sb = sb.__class__(**{**sb.__dict__, "slots": tuple(s)})
    assert choose(sb).index == 0  # type: ignore[union-attr]
    assert choose(sb, again=True).index == 0  # type: ignore[union-attr]
    # a newer hibernation image that a boot resumed (or tried) hides the older complete one: never picked
    s[2] = s[2].__class__(**{**s[2].__dict__, "seq": 4})
    sb = sb.__class__(**{**sb.__dict__, "slots": tuple(s)})
    assert choose(sb) is None and choose(sb, again=True).index == 2  # type: ignore[union-attr]
    s[0] = s[0].__class__(**{**s[0].__dict__, "state": SlotState.RESUMED, "seq": 3})
    s[2] = s[2].__class__(**{**s[2].__dict__, "state": SlotState.FREE})
    sb = sb.__class__(**{**sb.__dict__, "slots": tuple(s)})
    assert choose(sb) is None


def test_job_words_round_trip_with_restore_options() -> None:
    job = Job("restore", "/dev/vda", "u", 1, 0x100000, 0x200000, 17, "12345678-1234-5678-1234-567812345678", "b",
              600.0, 0x1234000, zero_free=True, again=True, attempt="ab" * 16)
    assert parse(" ".join(job.args())) == job and "khibernate.attempt=" + "ab" * 16 in job.args()
    with pytest.raises(JobError, match="32 hex digits"):
        parse(" ".join(job.args()).replace("ab" * 16, "abcd"))
    plain = Job("snapshot", "/dev/vda", "u", 1, 0x100000, 0x200000, 17, "12345678-1234-5678-1234-567812345678", "b",
                600.0, 0x1234000)
    assert "khibernate.again=1" not in plain.args() and parse(" ".join(plain.args())) == plain


def test_build_id_from_kernel_notes() -> None:
    from khibernate.elfcore import Note, pack_notes

    blob = pack_notes([Note("Xen", 1, b"1234"), Note("GNU", 3, bytes.fromhex("deadbeef00"))])
    assert build_id_from_notes(blob) == "deadbeef00"
    assert build_id_from_notes(b"") == ""


def test_zeroes_freed_pages_from_cmdline_and_config() -> None:
    from khibernate.capture.snapshot import zeroes_freed_pages

    assert zeroes_freed_pages("ro init_on_free=1")
    assert not zeroes_freed_pages("ro init_on_free=0", {"CONFIG_INIT_ON_FREE_DEFAULT_ON": "y"})
    assert zeroes_freed_pages("ro", {"CONFIG_INIT_ON_FREE_DEFAULT_ON": "y"})
    assert not zeroes_freed_pages("ro", None)


def test_bitmap_runs_cross_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of a bitmap come out whole across unpack chunks, cut at max_pfn."""
    from khibernate import native
    from khibernate.restore import krestore

    monkeypatch.setattr(krestore, "MASK_CHUNK", 16)
    m = bytearray(100)
    for a, b in [(0, 3), (10, 40), (47, 48), (64, 65), (90, 100)]:
        m[a:b] = b"\1" * (b - a)
    bits = native.pack_bits(m)
    assert list(krestore.bitmap_runs(bits, 100)) == [(0, 3), (10, 40), (47, 48), (64, 65), (90, 100)]
    assert list(krestore.bitmap_runs(bits, 95)) == [(0, 3), (10, 40), (47, 48), (64, 65), (90, 95)]
    assert list(krestore.bitmap_runs(bytes(13), 100)) == []
