"""A Xen host for the VM tests: Debian's Xen 4.17 booted by QEMU (multiboot), Debian's 6.1 kernel as its PV dom0.

``python3 -m vmtest.xen`` (run by scripts/setup.sh) downloads ``xen-hypervisor-4.17-amd64`` and its ``-dbg``
package with the host's apt and keeps, in ``$KHIBERNATE_CACHE/xen/<version>/``: the gunzipped hypervisor (a 32-bit
multiboot ELF that QEMU's ``-kernel`` loads directly), its ``xen-syms`` (an ELF symbol table, no DWARF), and the
dom0 modules kexec through Xen needs from the cached Debian kernel package (``xen-privcmd.ko``: /dev/xen/privcmd
and /dev/xen/hypercall; ``xenfs.ko``: /proc/xen, which kexec-tools looks for). Then it builds (once,
vmtest/xen_build.py) the same hypervisor from Debian's source with debug info, whose ``xen-syms`` crash and
makedumpfile ``--xen-syms`` can read (:func:`cached_debug`), and a crash whose Xen mode reads Xen 4.17
(vmtest/crash_build.py: Debian 12's crash 8.0.2 cannot), when called with ``--debug-build``
(``scripts/setup.sh --xen``, what ``scripts/test.sh --xen`` runs). Tests only look them up (:func:`cached`);
nothing is downloaded or built at test time.

:class:`XenVM` is a :class:`vmtest.vm.VM` whose QEMU boots Xen with ``-kernel``, dom0's kernel and the guest
initramfs as multiboot modules (``-initrd "vmlinuz ARGS,initrd"``). Xen owns COM1 (ttyS0 in QEMU: Xen's and, through
``hvc0``, dom0's console), dom0 drives COM2 (ttyS1), where the guest agent runs as in every other VM test.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from vmtest import crash_build, debian, xen_build
from vmtest.kernel import CACHE
from vmtest.vm import VM

XEN_CACHE = CACHE / "xen"
PACKAGE = "xen-hypervisor-4.17-amd64"
HYPERVISOR_MEMBER = "./boot/xen-4.17-amd64.gz"
SYMS_MEMBER = "./usr/lib/debug/boot/xen-syms-4.17-amd64"
DOM0_MODULES = {"xen-privcmd.ko": "kernel/drivers/xen/xen-privcmd.ko", "xenfs.ko": "kernel/drivers/xen/xenfs/xenfs.ko"}
# Debian's 6.1 has virtio as modules: a capture kernel that writes its image to the test disk loads these in order
VIRTIO_BLK = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk")
MODULES = {**DOM0_MODULES, **{f"{m}.ko": f"kernel/drivers/{'block' if m == 'virtio_blk' else 'virtio'}/{m}.ko"
                              for m in VIRTIO_BLK}}
LOAD_VIRTIO_BLK = " && ".join([f"insmod /khb/{m}.ko" for m in VIRTIO_BLK]
                              + ["n=0; while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.2; n=$((n + 1)); done",
                                 "test -b /dev/vda"])
# dom0's console is Xen's (hvc0 -> COM1); the agent is on COM2 as in every VM test
DOM0_APPEND = "console=hvc0 earlyprintk=xen khibernate.agent=1 panic=-1 rootfstype=ramfs"
# a Linux kernel booted natively by Xen's kexec (Xen is gone): the usual serial console
NATIVE_APPEND = "console=ttyS0 khibernate.agent=1 panic=-1 rootfstype=ramfs"
SETUP_HINT = "run scripts/setup.sh as root or `python3 -m vmtest.xen`"


@dataclasses.dataclass(frozen=True)
class XenHypervisor:
    """One cached Xen: ``xen`` (multiboot ELF), ``xen-syms`` and the dom0 modules beside them.

    ``build`` set: the hypervisor (``xen``, ``xen-syms``) is that vmtest.xen_build tree's, built with debug info
    from Debian's source; the dom0 modules stay the Debian package cache's (``dir``)."""

    dir: Path
    build: Path | None = None

    @property
    def version(self) -> str:
        """Debian version of the package, e.g. 4.17.7+13-g2445b30a44-0+deb12u1 (of the source for a build)."""
        if self.build is not None:
            return str(json.loads((self.build / "build-info.json").read_text())["source_version"]) + " (debug info)"
        return self.dir.name

    @property
    def image(self) -> Path:
        """The hypervisor QEMU -kernel boots (and `khibernate kexec load --vmm` loads)."""
        return (self.build or self.dir) / "xen"

    @property
    def syms(self) -> Path:
        """xen-syms: the ELF with the hypervisor's symbols (crash, makedumpfile --xen-syms); DWARF in a build's."""
        return (self.build or self.dir) / "xen-syms"

    def module(self, name: str) -> Path:
        """A dom0 module (xen-privcmd.ko, xenfs.ko) of the cached Debian kernel."""
        return self.dir / "modules" / name

    def complete(self) -> bool:
        """True when every file is there (a fetch that stopped half-way leaves no marker)."""
        return (self.dir / "complete").exists() and all(self.module(n).exists() for n in MODULES)


def cached() -> XenHypervisor | None:
    """The newest complete cached Xen, or None."""
    found = sorted(d for d in XEN_CACHE.glob("4.*") if XenHypervisor(d).complete())
    return XenHypervisor(found[-1]) if found else None


def cached_debug() -> XenHypervisor | None:
    """The cached Debian Xen with the hypervisor swapped for the debug-info build of its source, or None."""
    x, b = cached(), xen_build.cached()
    return dataclasses.replace(x, build=b.dir) if x is not None and b is not None else None


def _extract(deb: Path, member: str, out: Path) -> None:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "data.tar"
        tar.write_bytes(data)
        with tarfile.open(tar) as t:
            f = t.extractfile(member)
            if f is None:
                raise RuntimeError(f"{deb.name} has no {member}")
            raw = f.read()
    out.write_bytes(gzip.decompress(raw) if member.endswith(".gz") else raw)


def fetch() -> XenHypervisor:
    """Download the hypervisor and its -dbg package (apt's candidate), keep xen, xen-syms and the dom0 modules."""
    have = cached()
    if have is not None:
        return have
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", PACKAGE, f"{PACKAGE}-dbg"], cwd=tmp, capture_output=True,
                           text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or len(debs) != 2:
            raise RuntimeError(f"apt-get download {PACKAGE} {PACKAGE}-dbg failed ({r.stderr.strip()[-300:]}); "
                               "run apt-get update (Debian 12 sources needed)")
        version = debs[0].name.split("_")[1]
        out = XEN_CACHE / version
        if out.exists():
            shutil.rmtree(out)
        (out / "modules").mkdir(parents=True)
        main_deb = next(d for d in debs if "-dbg_" not in d.name)
        dbg_deb = next(d for d in debs if "-dbg_" in d.name)
        _extract(main_deb, HYPERVISOR_MEMBER, out / "xen")
        _extract(dbg_deb, SYMS_MEMBER, out / "xen-syms")
        kernel = debian.cached_kernel()
        if kernel is None:
            raise RuntimeError(f"no Debian kernel package in {debian.DEBS}: run `python3 -m vmtest.debian` first")
        for name, member in MODULES.items():
            _extract(kernel.deb, f"./lib/modules/{kernel.kver}/{member}", out / "modules" / name)
        (out / "complete").write_text(kernel.kver + "\n")
    return XenHypervisor(out)


def xen_cmdline(dom0_mb: int, crash_mb: int, extra: str = "") -> str:
    """Xen's command line: console on COM1, a fixed dom0 size, the crash region, every log line."""
    return " ".join(w for w in ["console=com1 com1=115200,8n1", f"dom0_mem={dom0_mb}M,max:{dom0_mb}M",
                                f"crashkernel={crash_mb}M" if crash_mb else "", "loglvl=all guest_loglvl=all",
                                extra] if w)


class XenVM(VM):
    """A QEMU guest running Xen with Debian's 6.1 kernel as PV dom0 and khibernate's initramfs.

    ``prepare()`` (called once the agent answers) loads xen-privcmd and xenfs and mounts /proc/xen, so dom0 has
    /dev/xen/privcmd, /dev/xen/hypercall and /proc/xen/capabilities.
    """

    def __init__(self, xen: XenHypervisor, dom0: debian.CachedKernel, dom0_append: str = "", xen_append: str = "",
                 memory_mb: int = 1536, dom0_mb: int = 640, crash_mb: int = 256,
                 extra_files: Iterable[tuple[Path | str, str]] = (), name: str = "xen", timeout: float = 240,
                 **kwargs: object) -> None:
        files = [(xen.module(n), f"/khb/{n}") for n in MODULES] + list(extra_files)
        super().__init__(kernel=dom0, memory_mb=memory_mb, extra_files=files, name=name, timeout=timeout,
                         cpu=kwargs.pop("cpu", None) or "qemu64", **kwargs)  # type: ignore[arg-type]
        self.xen = xen
        self.append = f"{DOM0_APPEND} {dom0_append}".strip()
        self.xen_append = xen_cmdline(dom0_mb, crash_mb, xen_append)
        self.milestones: dict[str, float] = {}

    def boot_args(self, initrd: Path) -> list[str]:
        """Xen as the multiboot kernel; dom0's kernel (its command line after the path) and initrd as modules."""
        for p in (self.kernel.bzimage, initrd):
            if "," in str(p):
                raise ValueError(f"{p}: QEMU's multiboot -initrd list cannot hold a path with a comma")
        return ["-kernel", str(self.xen.image), "-append", self.xen_append,
                "-initrd", f"{self.kernel.bzimage} {self.append},{initrd}"]

    def start(self) -> None:
        """Boot Xen and dom0, wait for the agent, note when Xen and dom0 started, and prepare dom0."""
        t0 = time.monotonic()
        super().start()
        if not self.wait_ready:
            return
        text = self.console_text()
        self.milestones["ready"] = time.monotonic() - t0
        self._log(f"Xen host up in {self.milestones['ready']:.1f} s ({'Xen' if '(XEN)' in text else '?'} "
                  f"{self.xen.version}, dom0 {self.release})")
        self.prepare()

    def prepare(self) -> None:
        """Load dom0's Xen control modules and mount xenfs (idempotent)."""
        self.run("grep -q '^xen_privcmd ' /proc/modules || insmod /khb/xen-privcmd.ko; "
                 "grep -q '^xenfs ' /proc/modules || insmod /khb/xenfs.ko; "
                 "grep -q ' /proc/xen ' /proc/mounts || mount -t xenfs xenfs /proc/xen", timeout=120)


def crash_region(console: str) -> tuple[int, int] | None:
    """(start, size) of the crash region Xen printed at boot ('(XEN) Kdump: 256MB (262144kB) at 0x...')."""
    m = re.search(r"\(XEN\) Kdump: (\d+)MB \(\d+kB\) at (0x[0-9a-f]+)", console)
    return (int(m.group(2), 16), int(m.group(1)) << 20) if m else None


if __name__ == "__main__":
    x = fetch()
    print(f"[setup] Xen {x.version}: {x.image}, symbols {x.syms}", file=sys.stderr)
    if "--debug-build" not in sys.argv[1:]:
        sys.exit(0)
    try:
        b = xen_build.ensure_build(x.version)
        c = crash_build.ensure_build()
    except xen_build.KernelBuildError as e:
        sys.exit(f"error: {e}")
    print(f"[setup] Xen {b.version} with debug info: {b.image}, symbols {b.syms} ({b.info['build_seconds']} s to "
          f"build); crash {c.info['version']} for its dumps: {c.binary} ({c.info['build_seconds']} s)",
          file=sys.stderr)
