"""Peers read what we write, on a real 6.12 workload dump: makedumpfile 1.7.2 and drgn (with the vmlinux)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from khibernate.image import vmcoreinfo
from khibernate.image.dmesg import kernel_log
from khibernate.image.export import export
from khibernate.image.sources import open_source
from khibernate.image.sources.khi import KhiSource, save_file
from tests.vm.vmcores import RealDump

pytestmark = pytest.mark.vm


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: apt-get install {tool}")
    return path


@pytest.fixture(scope="module")
def exports(workload_1g: RealDump, module_tmp: Path) -> dict[str, Path]:
    d = module_tmp
    out = {"khi": d / "wl.khi"}
    with open_source(workload_1g.vmcore) as src:
        save_file(src, out["khi"], vmci=vmcoreinfo.from_source(src), level=17, restorable=True)
    with KhiSource(out["khi"]) as img:
        v = img.vmcoreinfo()
        for name, kw in {"elf": dict(fmt="elf"), "zlib": dict(fmt="kdump", compress="zlib"),
                         "zstd": dict(fmt="kdump", compress="zstd"),
                         "flat": dict(fmt="kdump", compress="zstd", flat=True)}.items():
            out[name] = d / f"wl.{name}"
            export(img, str(out[name]), vmci=v, **kw)  # type: ignore[arg-type]
    return out


def test_dmesg_matches_makedumpfile(exports: dict[str, Path], workload_1g: RealDump, tmp_path: Path) -> None:
    md = _need("makedumpfile")
    with open_source(workload_1g.vmcore) as src:
        ours = kernel_log(src, vmcoreinfo.from_source(src))
    assert "KHB-KPF-READY" in ours and "Linux version 6.12" in ours
    for name in ("elf", "zlib"):
        txt = tmp_path / f"{name}.txt"
        r = subprocess.run([md, "--dump-dmesg", str(exports[name]), str(txt)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert txt.read_text() == ours, f"makedumpfile --dump-dmesg on our {name} export differs"


def test_makedumpfile_refilters_our_kdump(exports: dict[str, Path], tmp_path: Path) -> None:
    """makedumpfile 1.7.2 reads every dumpable page of our zlib file while re-filtering it to -d 31."""
    md = _need("makedumpfile")
    r = subprocess.run([md, "-c", "-d", "31", str(exports["zlib"]), str(tmp_path / "r31")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "makedumpfile Completed" in r.stdout + r.stderr, r.stdout + r.stderr
    with open_source(tmp_path / "r31") as k:
        assert k.header.dump_level == 31


def test_flattened_reassembles_byte_identical(exports: dict[str, Path], tmp_path: Path) -> None:
    md = _need("makedumpfile")
    with open(exports["flat"], "rb") as f:
        r = subprocess.run([md, "-R", str(tmp_path / "r.kdump")], stdin=f, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "r.kdump").read_bytes() == exports["zstd"].read_bytes()


@pytest.mark.parametrize("name", ["elf", "zlib", "zstd", "flat"])
def test_drgn_reads_export(exports: dict[str, Path], workload_1g: RealDump, name: str) -> None:
    import drgn
    from drgn.helpers.linux.printk import get_printk_records

    prog = drgn.Program()
    prog.set_core_dump(str(exports[name]))
    prog.load_debug_info([str(workload_1g.kernel_dir / "vmlinux")])
    assert prog["init_uts_ns"].name.release.string_().decode() == workload_1g.release
    texts = [r.text.decode(errors="replace") for r in get_printk_records(prog)]
    assert any("KHB-KPF-READY" in t for t in texts)
    free = prog["vm_zone_stat"][prog["NR_FREE_PAGES"]].counter.value_()
    flags = workload_1g.flags()
    buddy = int(((flags >> 10) & 1).sum())
    assert abs(free - buddy) <= 64, (free, buddy)


def test_reader_roundtrip_equals_source(exports: dict[str, Path], workload_1g: RealDump) -> None:
    """Every page our kdump/ELF readers return equals the original QEMU dump."""
    with open_source(workload_1g.vmcore) as src, KhiSource(exports["khi"]) as img:
        ps = 4096
        mask_all = img.page_present_mask(0, img.max_pfn)
        for name in ("zstd", "zlib", "flat", "elf"):
            with open_source(exports[name]) as exp:
                theirs = exp.page_present_mask(0, exp.max_pfn)
                missing = 0
                for pfn in range(0, img.max_pfn, 97):
                    if not mask_all[pfn]:
                        continue
                    there = pfn < exp.max_pfn and (theirs[pfn] if theirs is not None else exp.present(pfn * ps, ps))
                    if not there:
                        missing += 1  # only QEMU's BIOS ROM (no struct page) is left out of exports
                        assert pfn * ps >= 0xFFFC0000, (name, pfn)
                        continue
                    assert exp.read(pfn * ps, ps) == src.read(pfn * ps, ps), (name, pfn)
                assert missing <= 1


def test_kdump_vmcore_dmesg_and_roundtrip(kdump_1g: RealDump, tmp_path: Path) -> None:
    """A real /proc/vmcore (kernel text alias PT_LOAD, crash notes): our dmesg equals makedumpfile's on the
    original file, and the saved image holds every kept page byte for byte."""
    md = _need("makedumpfile")
    txt = tmp_path / "md.txt"
    r = subprocess.run([md, "--dump-dmesg", str(kdump_1g.vmcore), str(txt)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    img = tmp_path / "kd.khi"
    with open_source(kdump_1g.vmcore) as src:
        v = vmcoreinfo.from_source(src)
        assert any(n.name == "CORE" for n in src.notes) and "CRASHTIME" in v.text
        assert kernel_log(src, v) == txt.read_text()
        save_file(src, img, vmci=v, level=17, restorable=True)
        with KhiSource(img) as k:
            k.verify()
            assert "sysrq triggered crash" in kernel_log(k, k.vmcoreinfo())
            present = k.page_present_mask(0, k.max_pfn)
            for pfn in range(0, k.max_pfn, 61):
                if present[pfn]:
                    assert k.read(pfn * 4096, 4096) == src.read(pfn * 4096, 4096), pfn


def test_gdb_reads_elf_export(exports: dict[str, Path], workload_1g: RealDump) -> None:
    gdb = _need("gdb")
    r = subprocess.run([gdb, "-batch", "-nx", "-ex", "print init_uts_ns.name.release",
                        str(workload_1g.kernel_dir / "vmlinux"), str(exports["elf"])],
                       capture_output=True, text=True, timeout=300)
    assert f'"{workload_1g.release}"' in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("flat", [False, True])
def test_we_read_makedumpfile_output(exports: dict[str, Path], workload_1g: RealDump, tmp_path: Path,
                                     flat: bool) -> None:
    """makedumpfile 1.7.2 -c (zlib) from our ELF export, plain and flattened (-F): our reader returns the same pages."""
    md = _need("makedumpfile")
    out = tmp_path / "md.kdump"
    cmd = [md, "-c", "-d", "1", *(["-F"] if flat else []), str(exports["elf"])]
    if flat:
        with open(out, "wb") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, timeout=300)
    else:
        r = subprocess.run([*cmd, str(out)], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open_source(out) as theirs, open_source(exports["elf"]) as ours:
        assert vmcoreinfo.from_source(theirs).osrelease == workload_1g.release
        mask = theirs.page_present_mask(0, theirs.max_pfn)
        checked = 0
        for pfn in range(0, theirs.max_pfn, 53):
            if mask[pfn]:
                assert theirs.read(pfn * 4096, 4096) == ours.read(pfn * 4096, 4096), pfn
                checked += 1
        assert checked > 1000


@pytest.mark.parametrize("name", ["zstd", "zlib"])
def test_libkdumpfile_reads_every_page(exports: dict[str, Path], workload_1g: RealDump, name: str,
                                       tmp_path: Path) -> None:
    """libkdumpfile (Debian's python3-libkdumpfile) reads every page of our kdump export equal to the source."""
    import hashlib

    import numpy as np

    system_python = "/usr/bin/python3"
    probe = subprocess.run([system_python, "-c", "import kdumpfile"], capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"libkdumpfile's Python binding is missing: apt-get install python3-libkdumpfile\n{probe.stderr}")
    with open_source(exports[name]) as exp:
        mask = exp.page_present_mask(0, exp.max_pfn)
        assert mask is not None
        pfns = np.flatnonzero(np.frombuffer(mask, dtype=np.uint8)).astype("<u8")
    assert len(pfns) > 10000
    (tmp_path / "pfns").write_bytes(pfns.tobytes())
    h = hashlib.sha256()
    with open_source(workload_1g.vmcore) as src:
        for pfn in pfns.tolist():
            h.update(src.read(pfn * 4096, 4096))
    r = subprocess.run([system_python, str(Path(__file__).with_name("kdumpfile_digest.py")), str(exports[name]),
                        str(tmp_path / "pfns")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(pfns)), h.hexdigest()]
