"""Each failure class of issue 12, on a small real file: tracebacks, unbounded sizes, hangs, silent wrong data,
writer/reader asymmetry, unsafe outputs, incomplete kdump files, and the issue-13 image defects."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.elfcore import EHDR64, PHDR64, VMCOREINFO_NOTE, LoadSpec, Note
from khibernate.image.atomic import atomic_output
from khibernate.image.errors import (
    CorruptImageError,
    FileAccessError,
    ImageError,
    IncompleteImageError,
    NotAVmcoreError,
    TruncatedError,
)
from khibernate.image.layouts.kdump import DISK_DUMP_HEADER, DUMP_DH_COMPRESSED_INCOMPLETE, PAGE_DESC, SUB_HEADER
from khibernate.image.layouts.khi import HEADER, INDEX, TRAILER, BlockEntry
from khibernate.image.sources import open_source
from khibernate.image.sources.elf import write_elf
from khibernate.image.sources.kdump import KdumpSource
from khibernate.image.sources.khi import KhiSource
from tests.image import basefiles

PS = 4096


@pytest.fixture(scope="module")
def base() -> Iterator[dict[str, Path]]:
    with tempfile.TemporaryDirectory() as d:
        yield basefiles.build(Path(d))


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["image", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


def patched(src: Path, dst: Path, fn: Callable[[bytearray], object]) -> Path:
    data = bytearray(src.read_bytes())
    fn(data)
    dst.write_bytes(bytes(data))
    return dst


def one_error_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ kdump / flat


def test_flattened_shorter_than_header(base: dict[str, Path], tmp_path: Path) -> None:
    p = patched(base["kdump-flat"], tmp_path / "f", lambda d: d.__delitem__(slice(100, None)))
    with pytest.raises(TruncatedError):
        open_source(p)


def test_kdump_cut_in_descriptor_table(base: dict[str, Path], tmp_path: Path) -> None:
    with KdumpSource(base["kdump-zlib"]) as k:
        cut = k.desc_offset + 10
    p = patched(base["kdump-zlib"], tmp_path / "k", lambda d: d.__delitem__(slice(cut, None)))
    with pytest.raises(TruncatedError):
        KdumpSource(p)


def _sub_field(i: int) -> int:
    """File offset of sub-header field ``i`` (block size 4096)."""
    return PS + struct.calcsize("<" + SUB_HEADER.format[1:][:i]) if i else PS


@pytest.mark.parametrize("what,fmt,off,value", [
    ("bitmap_blocks 0", "<i", 8 + 4 + 390 + 6 + 16 + 4 + 4 + 4, 0),
    ("size_note 2^64-1", "<Q", PS + 8 + 4 + 4 + 8 + 8 + 8 + 8 + 8, (1 << 64) - 1),
    ("offset_note -1", "<q", PS + 8 + 4 + 4 + 8 + 8 + 8 + 8, -1),
    ("max_mapnr_64 2^50", "<Q", PS + SUB_HEADER.size - 8, 1 << 50),
])
def test_kdump_bad_sizes(base: dict[str, Path], tmp_path: Path, what: str, fmt: str, off: int, value: int) -> None:
    p = patched(base["kdump-zlib"], tmp_path / "k", lambda d: struct.pack_into(fmt, d, off, value))
    with pytest.raises((CorruptImageError, TruncatedError)):
        with open_source(p) as k:
            k.verify()
    code, _, err = run("info", str(p))
    assert code == 1 and one_error_line(err), what


def test_kdump_header_offsets_are_what_the_tests_patch() -> None:
    assert DISK_DUMP_HEADER.size == 464 and struct.calcsize("<8si390s6xqqIii") == 8 + 4 + 390 + 6 + 16 + 12


def test_zstd_kdump_export_has_content_checksums(base: dict[str, Path], tmp_path: Path) -> None:
    """A flipped byte inside a zstd page is refused (zlib pages always were)."""
    with KdumpSource(base["kdump-zstd"]) as k:
        raw = k.io.pread(k.desc_offset, PAGE_DESC.size * 40)
        descs = [PAGE_DESC.unpack_from(raw, i * PAGE_DESC.size) for i in range(40)]
        off, size, flags, _ = next(d for d in descs if d[2] & 0x20 and d[1] > 64)
    p = patched(base["kdump-zstd"], tmp_path / "z", lambda d: d.__setitem__(off + size - 6, d[off + size - 6] ^ 1))
    with open_source(p) as k, pytest.raises(CorruptImageError):
        k.verify()


def test_incomplete_kdump_is_reported(base: dict[str, Path], tmp_path: Path) -> None:
    with KdumpSource(base["kdump-zlib"]) as k:
        cut = k.desc_offset + PAGE_DESC.size * 5

    def mark(d: bytearray) -> None:
        status_off = 8 + 4 + 390 + 6 + 16
        struct.pack_into("<i", d, status_off, struct.unpack_from("<i", d, status_off)[0]
                         | DUMP_DH_COMPRESSED_INCOMPLETE)
        del d[cut:]

    p = patched(base["kdump-zlib"], tmp_path / "inc", mark)
    code, out, _ = run("info", str(p), "--json")
    assert code == 0 and json.loads(out)["incomplete"] is True
    with KdumpSource(p) as k, pytest.raises(IncompleteImageError, match="incomplete"):
        k.verify()


def test_verify_of_filtered_kdump(tmp_path: Path, synth_elf: Path) -> None:
    """A -d 31 kdump has RAM pages it does not hold: verify reads only the pages it holds."""
    out = tmp_path / "d31.kdump"
    code, _, err = run("export", str(synth_elf), str(out), "--format", "kdump", "--compress", "zlib", "-d", "31")
    assert code == 0, err
    code, text, err = run("verify", str(out))
    assert code == 0 and "OK" in text, err


# ------------------------------------------------------------------------------------------------ ELF


@pytest.mark.parametrize("fmt", ["elf64", "raw"])
def test_elf_bad_note_and_phoff(base: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    src = base["elfcorehdr"] if fmt == "raw" else base[fmt]
    note_phdr = EHDR64.size  # the first program header is the PT_NOTE
    cases = {
        "p_filesz": lambda d: struct.pack_into("<Q", d, note_phdr + 32, (1 << 64) - 1),
        "p_offset": lambda d: struct.pack_into("<Q", d, note_phdr + 8, (1 << 64) - 16),
        "e_phoff": lambda d: struct.pack_into("<Q", d, 32, 1 << 63),
    }
    for name, fn in cases.items():
        p = patched(src, tmp_path / name, fn)
        with pytest.raises(ImageError):
            if fmt == "raw":
                from khibernate.image.sources.raw import RawSource

                RawSource.with_elfcorehdr(base["raw"], p.read_bytes()).close()
            else:
                open_source(p).close()


def test_huge_p_memsz_is_refused_and_zero_fill_never_read(base: dict[str, Path], tmp_path: Path) -> None:
    load = EHDR64.size + PHDR64.size  # first PT_LOAD
    memsz = struct.unpack_from("<Q", base["elf64"].read_bytes(), load + 40)[0]
    p = patched(base["elf64"], tmp_path / "big", lambda d: struct.pack_into("<Q", d, load + 40, memsz + (1 << 50)))
    with pytest.raises(CorruptImageError, match="TiB"):
        open_source(p)
    p = patched(base["elf64"], tmp_path / "tail", lambda d: struct.pack_into("<Q", d, load + 40, memsz + (1 << 40)))
    t0 = time.monotonic()
    with open_source(p) as e:
        e.verify()
    assert time.monotonic() - t0 < 10


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NotAVmcoreError, match="FIFO"):
        open_source(fifo)
    code, _, err = run("info", str(fifo))
    assert code == 1 and one_error_line(err)


def test_segmented_file_closes_its_fd_on_error(base: dict[str, Path], tmp_path: Path) -> None:
    from khibernate.image.sources.raw import RawSource

    short = patched(base["raw"], tmp_path / "short", lambda d: d.__delitem__(slice(0x20000, None)))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(TruncatedError):
            RawSource.with_elfcorehdr(short, base["elfcorehdr"].read_bytes())
    assert len(os.listdir("/proc/self/fd")) == before


# ------------------------------------------------------------------------------------------------ VMCOREINFO


def _elf_with_vmcoreinfo(path: Path, text: str) -> Path:
    mem = basefiles.memory()
    loads = [LoadSpec(a, b - a) for a, b in basefiles.RANGES]
    with open(path, "wb") as f:
        write_elf(f, loads, [Note(VMCOREINFO_NOTE, 0, text.encode("latin-1"))], lambda pa, n: mem[pa:pa + n])
    return path


@pytest.mark.parametrize("bad", ["PAGESIZE=abc", "KERNELOFFSET=xyz", "NUMBER(phys_base)=garbage", "CRASHTIME=x"])
def test_vmcoreinfo_values_that_are_not_numbers(tmp_path: Path, bad: str) -> None:
    p = _elf_with_vmcoreinfo(tmp_path / "v", f"OSRELEASE=6.12.0\nPAGESIZE=4096\n{bad}\nSYMBOL(init_uts_ns)=zz\n")
    for cmd in (["info", str(p)], ["dmesg", str(p)], ["save", str(p), str(tmp_path / "o.khi"), "-d", "31"],
                ["export", str(p), str(tmp_path / "o.kd"), "--format", "kdump"]):
        code, _, err = run(*cmd)
        if code:
            assert one_error_line(err), (cmd, err)


ISSUE_18_VALUES = [("NUMBER(SECTION_SIZE_BITS)", v) for v in ("0", "11", "64", "200")] + \
    [("NUMBER(MAX_PHYSMEM_BITS)", v) for v in ("0", "20")] + \
    [("SIZE(mem_section)", "0"), ("SIZE(page)", "0"), ("OFFSET(page.flags)", "-5"), ("OFFSET(page.private)", "64"),
     ("LENGTH(zone.free_area)", "0"), ("OFFSET(mem_section.section_mem_map)", "99999999999999"),
     ("NUMBER(KERNEL_IMAGE_SIZE)", "0"), ("NUMBER(pgtable_l5_enabled)", "7"), ("PAGESIZE", "4097")]


@pytest.mark.parametrize("key,value", ISSUE_18_VALUES, ids=[f"{k}={v}" for k, v in ISSUE_18_VALUES])
def test_vmcoreinfo_numbers_no_kernel_can_have(synth: object, tmp_path: Path, key: str, value: str) -> None:
    """A VMCOREINFO number outside what a kernel can have is one error naming it (was: a traceback from a
    negative shift or a division by zero, or silently wrong classes for offsets outside struct page)."""
    import dataclasses
    import re

    text = synth.vmcoreinfo  # type: ignore[attr-defined]
    bad = re.sub(rf"^{re.escape(key)}=.*$", f"{key}={value}", text, flags=re.M)
    assert bad != text, key
    core = tmp_path / "core"
    dataclasses.replace(synth, vmcoreinfo=bad).write_elf(core)  # type: ignore[call-overload]
    code, _, err = run("save", str(core), str(tmp_path / "o.khi"), "-d", "31")
    assert code != 0 and one_error_line(err) and key in err, err
    assert not (tmp_path / "o.khi").exists()


def test_non_ascii_osrelease_reads_back(tmp_path: Path) -> None:
    p = _elf_with_vmcoreinfo(tmp_path / "v", "OSRELEASE=6.12.0-\xe9t\xe9\nPAGESIZE=4096\n")
    code, _, err = run("save", str(p), str(tmp_path / "a.khi"), "-d", "1")
    assert code == 0, err
    code, out, err = run("info", str(tmp_path / "a.khi"), "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "khi"
    code, _, err = run("verify", str(tmp_path / "a.khi"))
    assert code == 0, err


def test_info_uses_vmcoreinfo_file(base: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare.elf"
    mem = basefiles.memory()
    with open(bare, "wb") as f:
        write_elf(f, [LoadSpec(a, b - a) for a, b in basefiles.RANGES], [], lambda pa, n: mem[pa:pa + n])
    vi = tmp_path / "vmcoreinfo"
    vi.write_text(basefiles.VMCOREINFO)
    code, out, _ = run("info", str(bare), "--json")
    assert "osrelease" not in json.loads(out)
    code, out, err = run("info", str(bare), "--vmcoreinfo", str(vi), "--json")
    assert code == 0 and json.loads(out)["osrelease"] == "6.12.0-fuzz", err


# ------------------------------------------------------------------------------------------------ .khi


def rewrite_khi(src: Path, dst: Path, *, header: Callable[[bytearray], object] | None = None,
                index: Callable[[list[BlockEntry]], list[BlockEntry]] | None = None,
                tables: Callable[[bytearray, int], object] | None = None,
                trailer: Callable[[list[int]], object] | None = None) -> Path:
    """Change a .khi and recompute every CRC a forger would (header, tables, trailer)."""
    data = bytearray(src.read_bytes())
    t = list(TRAILER.unpack_from(data, len(data) - TRAILER.size))
    hsize = struct.unpack_from("<I", data, 12)[0]
    if header:
        header(data)
        struct.pack_into("<I", data, HEADER.size - 4, 0)
        struct.pack_into("<I", data, HEADER.size - 4, zlib.crc32(bytes(data[:hsize])))
    start = t[1]
    tab = bytearray(data[start:len(data) - TRAILER.size])
    ib = t[4] - start
    entries = [BlockEntry(*INDEX.unpack_from(tab, ib + i * INDEX.size)) for i in range(t[5])]
    if index:
        entries = index(entries)
        tab[ib:] = b"".join(INDEX.pack(*(getattr(e, f) for f in BlockEntry.__dataclass_fields__)) for e in entries)
    if tables:
        tables(tab, t[3])
    if trailer:
        trailer(t)
    t[-2] = zlib.crc32(bytes(tab))
    raw = TRAILER.pack(*t[:-1], 0)
    out = bytes(data[:start]) + bytes(tab) + raw[:-4] + struct.pack("<I", zlib.crc32(raw[:-4]))
    dst.write_bytes(out)
    return dst


def _refused(p: Path) -> None:
    with pytest.raises(CorruptImageError):
        with KhiSource(p) as k:
            k.verify()


def test_khi_rewrite_helper_keeps_a_valid_image(base: dict[str, Path], tmp_path: Path) -> None:
    with KhiSource(rewrite_khi(base["khi"], tmp_path / "same")) as k:
        assert k.verify()["pages_stored"] == 49


def test_khi_swapped_or_redirected_blocks_do_not_verify(base: dict[str, Path], tmp_path: Path) -> None:
    def swap(es: list[BlockEntry]) -> list[BlockEntry]:
        return [es[1], es[0], *es[2:]]

    _refused(rewrite_khi(base["khi"], tmp_path / "swap", index=swap))

    def redirect(es: list[BlockEntry]) -> list[BlockEntry]:
        """Entries keep their pfn ranges but trade frames (offset, size, crc) where page counts agree."""
        a, b = next((i, j) for i in range(len(es)) for j in range(i + 1, len(es)) if es[i].npages == es[j].npages)
        ea, eb = es[a], es[b]
        es = list(es)
        es[a] = BlockEntry(ea.first_pfn, ea.end_pfn, eb.offset, eb.csize, ea.usize, ea.npages, eb.crc32)
        es[b] = BlockEntry(eb.first_pfn, eb.end_pfn, ea.offset, ea.csize, eb.usize, eb.npages, ea.crc32)
        return sorted(es, key=lambda e: e.first_pfn)

    p = rewrite_khi(base["khi"], tmp_path / "redir", index=redirect)
    with pytest.raises(CorruptImageError):
        with KhiSource(p) as k:
            k.verify()


def test_khi_inconsistent_tables_do_not_verify(base: dict[str, Path], tmp_path: Path) -> None:
    with KhiSource(base["khi"]) as k:
        first_stored = k.index[0].first_pfn

    def both(tab: bytearray, bitmap_size: int) -> None:  # a pfn both stored and zero
        tab[bitmap_size + first_stored // 8] |= 1 << (first_stored % 8)

    _refused(rewrite_khi(base["khi"], tmp_path / "both", tables=both))
    _refused(rewrite_khi(base["khi"], tmp_path / "zero", trailer=lambda t: t.__setitem__(7, t[7] + 1)))
    _refused(rewrite_khi(base["khi"], tmp_path / "comp", header=lambda d: struct.pack_into("<I", d, 204, 7)))
    _refused(rewrite_khi(base["khi"], tmp_path / "rng", header=lambda d: struct.pack_into("<Q", d, 256 + 8, 0)))


@pytest.mark.parametrize("what,patch", [
    ("page_size 0", lambda d: struct.pack_into("<I", d, 16, 0)),
    ("nr_ranges huge", lambda d: struct.pack_into("<I", d, 64, 1 << 30)),
    ("osrelease not UTF-8", lambda d: d.__setitem__(slice(72, 76), b"\xff\xfe\xe9\x80")),
])
def test_khi_bad_header_fields(base: dict[str, Path], tmp_path: Path, what: str, patch: Callable) -> None:
    p = rewrite_khi(base["khi"], tmp_path / "h", header=patch)
    code, _, err = run("info", str(p))
    assert (code == 1 and one_error_line(err)) or (code == 0 and what == "osrelease not UTF-8"), (what, err)


@pytest.mark.parametrize("bitmap_size", [0, 1 << 40])
def test_khi_bad_bitmap_size(base: dict[str, Path], tmp_path: Path, bitmap_size: int) -> None:
    p = rewrite_khi(base["khi"], tmp_path / "b", trailer=lambda t: t.__setitem__(3, bitmap_size))
    with pytest.raises(CorruptImageError):
        KhiSource(p)


def test_khi_version_1_still_reads(base: dict[str, Path], tmp_path: Path) -> None:
    """A version-1 image (block CRC over the frame alone) verifies and reads the same pages."""
    data = base["khi"].read_bytes()

    def v1(es: list[BlockEntry]) -> list[BlockEntry]:
        return [BlockEntry(e.first_pfn, e.end_pfn, e.offset, e.csize, e.usize, e.npages,
                           zlib.crc32(data[e.offset:e.offset + e.csize])) for e in es]

    p = rewrite_khi(base["khi"], tmp_path / "v1", header=lambda d: struct.pack_into("<I", d, 8, 1), index=v1)
    with KhiSource(p) as old, KhiSource(base["khi"]) as new:
        assert old.header.version == 1 and new.header.version == 2
        assert old.verify() == new.verify()
        assert old.read(0x100000, 8 * PS) == new.read(0x100000, 8 * PS)


def test_restorable_is_bounded_by_the_source(synth_elf: Path, tmp_path: Path) -> None:
    kd = tmp_path / "d31.kdump"
    assert run("export", str(synth_elf), str(kd), "--format", "kdump", "--compress", "zlib", "-d", "31")[0] == 0
    code, _, err = run("save", str(kd), str(tmp_path / "r.khi"))
    assert code == 2 and "dump level 31" in err and not (tmp_path / "r.khi").exists()
    code, _, err = run("save", str(kd), str(tmp_path / "r.khi"), "--restorable", "-d", "1")
    assert code == 2
    code, out, err = run("save", str(kd), str(tmp_path / "r.khi"), "-d", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["dump_level"] == 31 and res["restorable"] is False
    code, out, _ = run("info", str(tmp_path / "r.khi"), "--json")
    assert json.loads(out)["restorable"] is False and json.loads(out)["dump_level"] == 31


# ------------------------------------------------------------------------------------------------ outputs


def test_output_never_follows_a_partial_symlink(base: dict[str, Path], tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "out.khi"
    os.symlink(victim, str(dest) + ".partial")
    code, _, err = run("save", str(base["elf64"]), str(dest), "-d", "1")
    assert code == 0, err
    assert victim.read_bytes() == b"precious" and KhiSource(dest).verify()
    assert oct(dest.stat().st_mode & 0o777) == "0o600"


def test_output_refuses_devices_fifos_and_symlinks(base: dict[str, Path], tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    os.symlink(tmp_path / "elsewhere", link)
    for dest in (fifo, link):
        code, _, err = run("save", str(base["elf64"]), str(dest), "-d", "1")
        assert code == 1 and one_error_line(err) and "DEST" not in err or "not a regular" in err or "link" in err
    assert fifo.is_fifo() and link.is_symlink() and not (tmp_path / "elsewhere").exists()
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("sig,status", [(15, 143), (2, 1)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_leaves_no_partial_file(tmp_path: Path, sig: int, status: int) -> None:
    """Issue 18: SIGTERM (how systemd stops the watch service) during a real `image save` removes the temporary
    file as SIGINT does, and exits 143; before, the process died at once and left DEST's .partial behind."""
    import signal
    import subprocess
    import sys

    raw = tmp_path / "mem.raw"
    raw.write_bytes(os.urandom(16 << 20))  # incompressible: zstd -19 takes seconds for it
    dest = tmp_path / "out.khi"
    child = subprocess.Popen([sys.executable, "-m", "khibernate", "image", "save", str(raw), str(dest), "-d", "0",
                              "--ranges", "0-1000000", "--zstd-level", "19", "--threads", "1", "--block-pages", "16"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             # a run started in the background of a script inherits SIGINT ignored (POSIX, no job
                             # control), and Python then installs no handler: the child gets the default as a
                             # terminal's foreground process has it
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not [p for p in tmp_path.glob(".out.khi.*.partial") if p.stat().st_size > 0]:
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.02)
        child.send_signal(signal.Signals(sig))
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == status, err
    assert not list(tmp_path.glob(".*.partial")) and not dest.exists(), err
    assert "Traceback" not in err, err


def test_output_refuses_a_dest_replaced_meanwhile(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    with pytest.raises(FileAccessError, match="while this write ran"):
        with atomic_output(dest) as f:
            f.write(b"mine")
            dest.write_bytes(b"someone else's")
    assert dest.read_bytes() == b"someone else's" and not list(tmp_path.glob(".*.partial"))


def test_output_fsyncs_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import khibernate.image.atomic as atomic

    synced: list[str] = []
    monkeypatch.setattr(atomic, "fsync_dir", synced.append)
    with atomic_output(tmp_path / "x") as f:
        f.write(b"1")
    with atomic_output(tmp_path / "y", sync=False) as f:
        f.write(b"2")
    assert synced == [str(tmp_path)]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_numbers_and_help(base: dict[str, Path]) -> None:
    code, out, err = run("read", str(base["elf64"]), "--paddr", "1M", "--size", "0x10")
    assert code == 0 and out.startswith("0000000000100000"), err
    code, _, err = run("read", str(base["elf64"]), "--paddr", "zz", "--size", "4K")
    assert code == 2 and "'--paddr'" in err and "is not a number" in err, err
    code, out, _ = run("export", "--help")
    assert "--threads" in out and "Debian 12" in " ".join(out.split())
    code, out, _ = run("save", "--help")
    assert "--zstd-level" in out and "--level" not in out.replace("--zstd-level", "")


@pytest.mark.parametrize("fmt", ["kdump", "elf"])
def test_filtered_export_reopens(synth_elf: Path, synth: object, tmp_path: Path, fmt: str) -> None:
    """export -d 31 keeps the kernel's own pages, so the export can be inspected, saved and verified again."""
    from khibernate.image.pagefilter import PageClass

    out = tmp_path / f"d31.{fmt}"
    assert run("export", str(synth_elf), str(out), "--format", fmt, "-d", "31")[0] == 0
    code, text, err = run("info", str(out), "--json")
    assert code == 0 and json.loads(text)["osrelease"] == "6.12.0-synth", err
    code, text, err = run("save", str(out), str(tmp_path / "again.khi"), "-d", "31", "--json")
    assert code == 0, err
    assert json.loads(text)["classes"]["user"] == 0 and json.loads(text)["classes"]["free"] == 0
    assert run("verify", str(tmp_path / "again.khi"))[0] == 0
    assert run("verify", str(out))[0] == 0
    mem, expected = synth.mem, synth.expected  # type: ignore[attr-defined]
    with KhiSource(tmp_path / "again.khi") as img:
        for pfn in np.flatnonzero(expected == PageClass.OTHER)[::97]:
            assert img.read(int(pfn) * PS, PS) == bytes(mem[pfn * PS:(pfn + 1) * PS])


def test_registry_detects_every_format(base: dict[str, Path]) -> None:
    from khibernate.image.sources.detect import READERS, reader_for

    names = {fmt: open_source(base[fmt]).format_name for fmt in ("khi", "kdump-zlib", "kdump-flat", "elf64")}
    assert names == {"khi": "khi", "kdump-zlib": "kdump", "kdump-flat": "kdump-flat", "elf64": "elf"}
    assert reader_for(b"junk" * 16) is None and len(READERS) == 3


def test_khi_stored_page_before_every_block_is_corrupt_not_the_last_block(base: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    with KhiSource(base["khi"]) as k:
        first = k.index[0].first_pfn

    def shift(es: list[BlockEntry]) -> list[BlockEntry]:
        e = es[0]
        return [BlockEntry(e.first_pfn + 1, e.end_pfn, e.offset, e.csize, e.usize, e.npages, e.crc32), *es[1:]]

    with KhiSource(rewrite_khi(base["khi"], tmp_path / "s", index=shift)) as k:
        with pytest.raises(CorruptImageError, match="no block holds it"):
            k.read(first * PS, PS)


def test_raw_source_closes_its_fd_when_notes_are_bad(base: dict[str, Path], tmp_path: Path) -> None:
    from khibernate.image.sources.raw import RawSource

    hdr = bytearray(base["elfcorehdr"].read_bytes())
    struct.pack_into("<Q", hdr, EHDR64.size + 32, 1 << 30)  # the PT_NOTE's p_filesz
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ImageError):
            RawSource.with_elfcorehdr(base["raw"], bytes(hdr))
    assert len(os.listdir("/proc/self/fd")) == before
