"""Real vmcores of the test kernel under a workload, made with the VM harness and cached on disk (never committed).

``workload_dump()`` boots the guest, runs ``guest/workload.py``, snapshots /proc/kpageflags inside the guest right
before QMP ``stop`` + ``dump-guest-memory``, and returns the vmcore with the snapshot (the filter oracle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KHIBERNATE_CACHE", Path.home() / ".cache" / "khibernate")) / "vmcores"


@dataclasses.dataclass(frozen=True)
class RealDump:
    """A QEMU dump of the test kernel and the guest's own /proc/kpageflags taken just before it."""

    vmcore: Path
    kpageflags: Path
    kernel_dir: Path
    meta: dict

    def flags(self) -> np.ndarray:
        """The kpageflags snapshot as uint64 per pfn."""
        return np.fromfile(self.kpageflags, dtype="<u8")


def _key(kernel_dir: Path, **params: object) -> str:
    h = hashlib.sha256(str(kernel_dir.name).encode())
    for p in sorted((HERE / "guest").glob("*.py")) + [Path(__file__)]:
        h.update(p.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def workload_dump(name: str, *, memory_mb: int = 1024, smp: int = 1, anon_mb: int = 160, tmpfs_mb: int = 100,
                  bdev_mb: int = 48) -> RealDump:
    """Make (or reuse from the cache) a workload vmcore with its kpageflags oracle."""
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    kernel = ensure_kernel()
    params = dict(memory_mb=memory_mb, smp=smp, anon_mb=anon_mb, tmpfs_mb=tmpfs_mb, bdev_mb=bdev_mb)
    out = CACHE / f"{name}-{_key(kernel.directory, **params)}"
    vmcore, kpf, meta_p = out / "vmcore", out / "kpageflags", out / "meta.json"
    if meta_p.exists():
        return RealDump(vmcore, kpf, kernel.directory, json.loads(meta_p.read_text()))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [(HERE / "guest" / "workload.py", "/guest/workload.py"), (HERE / "guest" / "kpf.py", "/guest/kpf.py")]
    with VM(kernel, memory_mb=memory_mb, smp=smp, extra_files=files, disk_mb=max(64, bdev_mb + 8),
            name=f"image-{name}", timeout=300) as vm:
        vm.run(f"python3 /guest/workload.py {anon_mb} {tmpfs_mb} {bdev_mb}; "
               "while [ ! -e /tmp/workload.ready ]; do sleep 0.2; done; free; cat /proc/meminfo", timeout=600)
        meminfo = vm.run("cat /proc/meminfo")
        dmesg_before = vm.run("dmesg | tail -5")
        vm.mark()
        vm.run("python3 /guest/kpf.py >/tmp/kpf.log 2>&1 &")
        vm.wait_for(r"KHB-KPF-READY \d+", timeout=120)
        vm.qmp("stop")
        vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{tmp / 'vmcore'}")
        vm.qmp("cont")
        vm.run("touch /tmp/go; while [ ! -e /tmp/kpf.done ]; do sleep 0.1; done; cat /tmp/kpf.log", timeout=120)
        with open(vm.disk, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            (tmp / "kpageflags").write_bytes(f.read(n))
    meta = {"params": params, "meminfo": meminfo, "dmesg_tail": dmesg_before, "release": vm.release}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return RealDump(vmcore, kpf, kernel.directory, meta)
