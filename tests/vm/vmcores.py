"""Real vmcores of the test kernel under a workload, made with the VM harness and cached on disk (never committed).

``workload_dump()`` boots the guest, runs ``guest/workload.py``, snapshots /proc/kpageflags inside the guest right
before QMP ``stop`` + ``dump-guest-memory``, and returns the vmcore with the snapshot (the filter oracle).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from khibernate.cache import cache_root

HERE = Path(__file__).resolve().parent
CACHE = cache_root() / "vmcores"


@dataclasses.dataclass(frozen=True)
class RealDump:
    """A QEMU dump of the test kernel and the guest's own /proc/kpageflags taken just before it."""

    vmcore: Path
    kpageflags: Path
    kernel_dir: Path
    meta: dict

    @property
    def release(self) -> str:
        """`uname -r` as the guest reported it when it booted (not read from the dump)."""
        return str(self.meta["release"])

    def flags(self) -> np.ndarray:
        """The kpageflags snapshot as uint64 per pfn."""
        return np.fromfile(self.kpageflags, dtype="<u8")

    def stable(self) -> np.ndarray:
        """Per pfn: True where a second snapshot, taken right after the dump, shows the same flags (QMP dumps).

        A kdump dump has no second snapshot (the kernel panics right after the first, in the same process): all True.
        """
        after = self.kpageflags.with_name("kpageflags-after")
        before = self.flags()
        if not after.exists():
            return np.ones(len(before), dtype=bool)
        return before == np.fromfile(after, dtype="<u8")


def _key(kernel_dir: Path, **params: object) -> str:
    h = hashlib.sha256(str(kernel_dir.name).encode())
    for p in sorted((HERE / "guest").glob("*.py")) + [Path(__file__)]:
        h.update(p.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


KDUMP_SNAPSHOT_MB = 1400  # where the kpageflags snapshot goes on the disk in kdump mode (after the vmcore)


def workload_dump(name: str, *, memory_mb: int = 1024, smp: int = 1, anon_mb: int = 160, tmpfs_mb: int = 100,
                  bdev_mb: int = 48, method: str = "qmp", line: str = "6.12") -> RealDump:
    """Make (or reuse from the cache) a workload vmcore with its kpageflags oracle.

    ``method`` "qmp": QMP stop + dump-guest-memory (a QEMU ELF); "kdump": the guest panics into a kdump kernel
    (crashkernel=256M) that copies /proc/vmcore to the disk (the ELF the kernel itself makes).
    ``line`` is the test kernel line (vmtest.kernel.LINES).
    """
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    kernel = ensure_kernel(line)
    params = dict(memory_mb=memory_mb, smp=smp, anon_mb=anon_mb, tmpfs_mb=tmpfs_mb, bdev_mb=bdev_mb, method=method)
    out = CACHE / f"{name}-{_key(kernel.directory, **params)}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never make the same dump into one directory
        return _make_or_reuse(name, kernel, params, out)


def _make_or_reuse(name: str, kernel, params: dict, out: Path) -> RealDump:  # noqa: ANN001 - TestKernel
    memory_mb, smp, anon_mb, tmpfs_mb, bdev_mb, method = (params[k] for k in (
        "memory_mb", "smp", "anon_mb", "tmpfs_mb", "bdev_mb", "method"))
    vmcore, kpf, meta_p = out / "vmcore", out / "kpageflags", out / "meta.json"
    if meta_p.exists():
        return RealDump(vmcore, kpf, kernel.directory, json.loads(meta_p.read_text()))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [(HERE / "guest" / "workload.py", "/guest/workload.py"), (HERE / "guest" / "kpf.py", "/guest/kpf.py")]
    if method == "kdump":
        meminfo, dmesg_before, release = _kdump(kernel, name, tmp, files, memory_mb, smp, anon_mb, tmpfs_mb, bdev_mb)
    else:
        meminfo, dmesg_before, release = _qmp(kernel, name, tmp, files, memory_mb, smp, anon_mb, tmpfs_mb, bdev_mb)
    meta = {"params": params, "meminfo": meminfo, "dmesg_tail": dmesg_before, "release": release}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return RealDump(vmcore, kpf, kernel.directory, meta)


def _workload(vm, anon_mb: int, tmpfs_mb: int, bdev_mb: int) -> tuple[str, str]:  # noqa: ANN001 - vmtest.vm.VM
    vm.run(f"python3 /guest/workload.py {anon_mb} {tmpfs_mb} {bdev_mb}; "
           "while [ ! -e /tmp/workload.ready ]; do sleep 0.2; done", timeout=600)
    return vm.run("cat /proc/meminfo"), vm.run("dmesg | tail -5")


def _qmp(kernel, name, tmp, files, memory_mb, smp, anon_mb, tmpfs_mb, bdev_mb):  # noqa: ANN001,ANN202
    from vmtest.vm import VM

    with VM(kernel, memory_mb=memory_mb, smp=smp, extra_files=files, disk_mb=max(64, bdev_mb + 8),
            name=f"image-{name}", timeout=300) as vm:
        meminfo, dmesg_before = _workload(vm, anon_mb, tmpfs_mb, bdev_mb)
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
            (tmp / "kpageflags-after").write_bytes(f.read(n))
        return meminfo, dmesg_before, vm.release


def _kdump(kernel, name, tmp, files, memory_mb, smp, anon_mb, tmpfs_mb, bdev_mb):  # noqa: ANN001,ANN202
    from vmtest.vm import BASE_APPEND, VM

    with VM(kernel, append="crashkernel=256M", memory_mb=memory_mb, smp=smp, extra_files=files,
            disk_mb=KDUMP_SNAPSHOT_MB + 64, name=f"image-{name}", timeout=300) as vm:
        meminfo, dmesg_before = _workload(vm, anon_mb, tmpfs_mb, bdev_mb)
        vm.run("kexec -p /boot/bzImage --initrd=/boot/initrd.img --append='"
               f"{BASE_APPEND} khibernate.role=kdump-to-disk nr_cpus=1 reset_devices'", timeout=120)
        vm.mark()
        vm.send(f"python3 /guest/kpf.py --kdump {KDUMP_SNAPSHOT_MB << 20}")
        vm.wait_for(r"Kernel panic - not syncing: sysrq triggered crash", timeout=120)
        size = int(vm.wait_for(r"kdump-to-disk: copying /proc/vmcore \((\d+) bytes\)", timeout=180).group(1))
        vm.wait_for(r"@@KHB-ROLE-DONE kdump-to-disk 0@@", timeout=600)
        release = vm.release
    with open(vm.disk, "rb") as f, open(tmp / "vmcore", "wb") as out:
        left = size
        while left:
            chunk = f.read(min(left, 8 << 20))
            out.write(chunk)
            left -= len(chunk)
        f.seek(KDUMP_SNAPSHOT_MB << 20)
        n = int.from_bytes(f.read(8), "little")
        (tmp / "kpageflags").write_bytes(f.read(n))
    return meminfo, dmesg_before, release


@dataclasses.dataclass(frozen=True)
class DebianDump:
    """A QEMU dump of Debian's own kernel (the cached linux-image .deb, KASLR on) and that build's debug vmlinux."""

    vmcore: Path
    vmlinux: Path
    meta: dict  # release, the kernel-log marker, the pid of a named sleeper the dump must show


DEBIAN_MARK = "KHB-DEBIAN-DUMP-MARK"
DEBIAN_SLEEP = 31337  # `sleep 31337`: a process crash's `ps` must list


def debian_dump(memory_mb: int = 1024) -> DebianDump:
    """Make (or reuse from the cache) a QMP dump of a running Debian 6.1 guest: the guest initramfs on Debian's
    vmlinuz, ``qemu_fw_cfg`` loaded from the .deb so the kernel hands QEMU its VMCOREINFO (the dump then carries
    KERNELOFFSET for KASLR), a marker in the kernel log and a ``sleep`` process, then QMP stop + dump-guest-memory."""
    from tests.tiers import debian_kernel_with_dbg
    from vmtest import debian
    from vmtest.vm import VM, check_host

    check_host()
    k = debian_kernel_with_dbg()
    out = CACHE / f"debian-{k.kver}-{_key(k.deb, memory_mb=memory_mb, mark=DEBIAN_MARK)}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta_p = out / "meta.json"
        if meta_p.exists():
            return DebianDump(out / "vmcore", k.vmlinux, json.loads(meta_p.read_text()))
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        debian.modules_tree(tmp / "mods", ("kernel/drivers/firmware",))
        ko = tmp / "mods/lib/modules" / k.kver / "kernel/drivers/firmware/qemu_fw_cfg.ko"
        with VM(k, memory_mb=memory_mb, extra_files=[(ko, "/khb/qemu_fw_cfg.ko")], name="debian-dump",
                timeout=300) as vm:
            vm.run("insmod /khb/qemu_fw_cfg.ko && test -e /sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo")
            vm.run(f"echo {DEBIAN_MARK} > /dev/kmsg")
            pid = int(vm.run(f"sleep {DEBIAN_SLEEP} </dev/null >/dev/null 2>&1 & p=$!; "
                             "while [ \"$(cat /proc/$p/comm)\" != sleep ]; do :; done; echo $p").split()[-1])
            vm.qmp("stop")
            vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{tmp / 'vmcore'}")
            meta = {"release": vm.release, "mark": DEBIAN_MARK, "sleep_pid": pid, "memory_mb": memory_mb}
        shutil.rmtree(tmp / "mods")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return DebianDump(out / "vmcore", k.vmlinux, meta)
