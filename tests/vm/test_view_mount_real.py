"""``view mount`` of real 6.12 dumps - a QEMU ELF, a khibernate image and a kdump export of it, and a kernel-made
/proc/vmcore: drgn and gdb open DIR/vmcore with the test kernel's vmlinux, and DIR/oldmem equals `image read`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from khibernate.image import vmcoreinfo
from khibernate.image.dmesg import kernel_log
from khibernate.image.export import export
from khibernate.image.sources import open_source
from khibernate.image.sources.khi import KhiSource, save_file
from tests.vm.view_mounting import mounted
from tests.vm.vmcores import RealDump

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sources(workload_1g: RealDump, kdump_1g: RealDump, module_tmp: Path) -> dict[str, Path]:
    """The QEMU ELF, a restorable .khi saved from it, its zlib kdump export, and a kdump kernel's /proc/vmcore."""
    d = module_tmp
    out = {"qemu": workload_1g.vmcore, "khi": d / "wl.khi", "kdump": d / "wl.kdump", "procvmcore": kdump_1g.vmcore}
    with open_source(workload_1g.vmcore) as src:
        save_file(src, out["khi"], vmci=vmcoreinfo.from_source(src), level=17, restorable=True)
    with KhiSource(out["khi"]) as img:
        export(img, str(out["kdump"]), fmt="kdump", compress="zlib", vmci=img.vmcoreinfo())
    return out


@pytest.mark.parametrize("name", ["qemu", "khi", "kdump", "procvmcore"])
def test_peers_open_the_mounted_vmcore(sources: dict[str, Path], workload_1g: RealDump, tmp_path: Path,
                                       name: str) -> None:
    import drgn
    from drgn.helpers.linux.printk import get_printk_records

    vmlinux = workload_1g.kernel_dir / "vmlinux"
    d = tmp_path / "mnt"
    with open_source(sources[name]) as src:
        log = kernel_log(src, vmcoreinfo.from_source(src))
    with mounted(d, sources[name]):
        assert (d / "dmesg").read_text() == log
        info = json.loads((d / "info.json").read_text())
        assert info["osrelease"] == workload_1g.release
        prog = drgn.Program()
        prog.set_core_dump(str(d / "vmcore"))
        prog.load_debug_info([str(vmlinux)])
        assert prog["init_uts_ns"].name.release.string_().decode() == workload_1g.release
        texts = [r.text.decode(errors="replace") for r in get_printk_records(prog)]
        assert any(f"Linux version {workload_1g.release} " in t for t in texts)
        free = prog["vm_zone_stat"][prog["NR_FREE_PAGES"]].counter.value_()
        ref = drgn.Program()  # drgn on the ELF the image was made from (drgn opens no .khi)
        ref.set_core_dump(str(sources["procvmcore" if name == "procvmcore" else "qemu"]))
        ref.load_debug_info([str(vmlinux)])
        assert free == ref["vm_zone_stat"][ref["NR_FREE_PAGES"]].counter.value_() > 1000
        gdb = shutil.which("gdb")
        assert gdb, "gdb is not installed: apt-get install gdb (scripts/setup.sh does)"
        r = subprocess.run([gdb, "-batch", "-nx", "-ex", "print init_uts_ns.name.release", str(vmlinux),
                            str(d / "vmcore")], capture_output=True, text=True, timeout=300)
        assert f'"{workload_1g.release}"' in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["qemu", "khi", "kdump"])
def test_oldmem_dd_equals_image_read(sources: dict[str, Path], tmp_path: Path, name: str) -> None:
    d = tmp_path / "mnt"
    with open_source(sources[name]) as src, mounted(d, sources[name]):
        present = src.page_present_mask(0, src.max_pfn)
        cand = [p for r in src.ranges for p in range(r.start // 4096, r.end // 4096, max(1, r.size // 4096 // 24))]
        pfns = [p for p in cand if present is None or present[p]]
        assert len(pfns) >= 16
        if present is not None and 0 in present:  # a page the filter dropped (zero or free) reads as zeros
            gone = present.index(0)
            with open(d / "oldmem", "rb") as f:
                f.seek(gone * 4096)
                assert f.read(4096) == bytes(4096)
        for i, pfn in enumerate(pfns):
            dd = subprocess.run(["dd", f"if={d / 'oldmem'}", "bs=4096", f"skip={pfn}", "count=1", "status=none"],
                                capture_output=True, check=True).stdout
            assert dd == src.read(pfn * 4096, 4096), pfn
            if i % (len(pfns) // 4) == 0:  # the CLI on a few (each run is a new python)
                ours = subprocess.run([sys.executable, "-m", "khibernate.cli", "image", "read", str(sources[name]),
                                       "--paddr", hex(pfn * 4096), "--size", "4096", "--raw"],
                                      capture_output=True, check=True).stdout
                assert dd == ours, pfn
