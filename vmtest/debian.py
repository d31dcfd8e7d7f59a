"""A Debian distribution kernel (KASLR, no CONFIG_KEXEC_JUMP) for the tests: found in /boot or in the cache.

``python3 -m vmtest.debian`` (run by scripts/setup.sh) downloads the linux-image .deb of linux-image-amd64 with the
host's apt and extracts its vmlinuz into ``$KHIBERNATE_CACHE/debs``, then the same kernel's debug vmlinux (for crash)
from its ``-dbg`` package; tests only ever look them up (:func:`find`, :func:`cached_kernel`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from vmtest.kernel import CACHE

DEBS = CACHE / "debs"
DBG_VMLINUX = "./usr/lib/debug/boot/vmlinux-{kver}"  # the -dbg package's member crash and gdb read


@dataclasses.dataclass(frozen=True)
class CachedKernel:
    """The cached Debian kernel package: its vmlinuz and, once :func:`fetch_dbg` ran, its debug vmlinux."""

    deb: Path  # linux-image-KVER_VERSION_amd64.deb
    package: str  # linux-image-KVER
    version: str  # Debian version, e.g. 6.1.192-3

    @property
    def kver(self) -> str:
        """The kernel release (uname -r), e.g. 6.1.0-57-amd64."""
        return self.package.removeprefix("linux-image-")

    @property
    def vmlinuz(self) -> Path:
        return self.deb.with_name(self.deb.name + ".vmlinuz")

    @property
    def bzimage(self) -> Path:
        """What vmtest.vm.VM boots (it takes this object as its ``kernel``): the vmlinuz."""
        return self.vmlinuz

    @property
    def modular(self) -> bool:
        """False for vmtest.vm.VM: its guest initramfs carries no module tree of this kernel (a caller that needs
        some of its modules ships the .ko files itself, as vmtest/xen.py does for dom0)."""
        return False

    @property
    def vmlinux(self) -> Path:
        """The debug vmlinux extracted from ``PACKAGE-dbg`` of the same version (the .deb itself is not kept)."""
        return DEBS / f"{self.package}-dbg_{self.version}_amd64.vmlinux"


def cached_kernel() -> CachedKernel | None:
    """The newest cached linux-image .deb (not /boot: its debug vmlinux must be the same build); None if none."""
    debs = sorted(DEBS.glob("linux-image-*-amd64_*_amd64.deb"))
    if not debs:
        return None
    package, version, _ = debs[-1].name.split("_")
    return CachedKernel(debs[-1], package, version)


def find() -> Path | None:
    """The newest /boot/vmlinuz-*, else the vmlinuz cached by :func:`fetch`; None if neither exists."""
    found = sorted(Path("/boot").glob("vmlinuz-*"))
    if found:
        return found[-1]
    cached = sorted(DEBS.glob("linux-image-*-amd64_*.deb.vmlinuz"))
    return cached[-1] if cached else None


def fetch() -> Path:
    """Download linux-image-amd64's kernel package into the cache (if not there) and extract its vmlinuz."""
    debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    if not debs:
        DEBS.mkdir(parents=True, exist_ok=True)
        dep = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                             check=True).stdout
        pkg = next((line.split()[-1] for line in dep.splitlines() if "Depends: linux-image-" in line), None)
        if pkg is None:
            raise RuntimeError("apt-cache knows no linux-image-amd64: run apt-get update (Debian sources needed)")
        subprocess.run(["apt-get", "download", pkg], cwd=DEBS, check=True, capture_output=True)
        debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    out = DEBS / (debs[-1].name + ".vmlinuz")
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "data.tar"
            tar.write_bytes(subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True,
                                           check=True).stdout)
            with tarfile.open(tar) as t:
                member = next(m for m in t.getmembers() if m.name.startswith("./boot/vmlinuz-"))
                f = t.extractfile(member)
                assert f is not None
                partial = out.with_suffix(".partial")
                partial.write_bytes(f.read())
                partial.rename(out)
    return out


def fetch_dbg() -> Path:
    """Download ``linux-image-KVER-dbg`` of the cached kernel's version (~860 MB) and keep only its vmlinux
    (~630 MB): the package is streamed through tar and deleted once the vmlinux is out."""
    k = cached_kernel()
    if k is None:
        raise RuntimeError(f"no linux-image .deb in {DEBS}: run `python3 -m vmtest.debian` (scripts/setup.sh does)")
    if k.vmlinux.exists():
        return k.vmlinux
    pkg = f"{k.package}-dbg"
    deb = DEBS / f"{pkg}_{k.version}_amd64.deb"
    if not deb.exists():
        r = subprocess.run(["apt-get", "download", f"{pkg}={k.version}"], cwd=DEBS, capture_output=True, text=True)
        if r.returncode != 0 or not deb.exists():
            raise RuntimeError(f"apt-get download {pkg}={k.version} failed ({r.stderr.strip()[-300:]}); the mirror "
                               "keeps only the newest kernel's -dbg: delete the cached linux-image .deb and rerun "
                               "`python3 -m vmtest.debian` to move both to the newest version")
    member = DBG_VMLINUX.format(kver=k.kver)
    partial = k.vmlinux.with_suffix(".partial")
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert dpkg.stdout is not None
    try:
        with tarfile.open(fileobj=dpkg.stdout, mode="r|") as t:
            for m in t:
                if m.name == member:
                    f = t.extractfile(m)
                    assert f is not None
                    with open(partial, "wb") as out:
                        while chunk := f.read(8 << 20):
                            out.write(chunk)
                    break
            else:
                raise RuntimeError(f"{deb.name} has no {member}")
    finally:
        dpkg.kill()  # the rest of the archive (module debug info) is not needed
        dpkg.wait()
    partial.rename(k.vmlinux)
    deb.unlink()
    return k.vmlinux


def modules_tree(dest: Path, wanted_dirs: tuple[str, ...] = ("kernel/drivers/virtio", "kernel/drivers/block")) -> str:
    """Extract the cached .deb's modules under ``wanted_dirs`` into ``dest``/lib/modules/KVER, run depmod there
    (kmod, from setup) as the package's postinst would, and return KVER."""
    debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    if not debs:
        raise RuntimeError(f"no linux-image .deb in {DEBS}: run `python3 -m vmtest.debian` (scripts/setup.sh does)")
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True, check=True).stdout
    kver = ""
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "data.tar"
        tar.write_bytes(data)
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                parts = m.name.split("/")  # ./lib/modules/KVER/kernel/...
                if m.isfile() and len(parts) > 5 and parts[1:3] == ["lib", "modules"] and \
                        any("/".join(parts[4:]).startswith(d + "/") for d in wanted_dirs):
                    kver = parts[3]
                    t.extract(m, dest, filter="data")
    if not kver:
        raise RuntimeError(f"{debs[-1].name} has no modules under {', '.join(wanted_dirs)}")
    depmod = next((p for p in ("/sbin/depmod", "/usr/sbin/depmod") if Path(p).exists()), "depmod")
    subprocess.run([depmod, "-b", str(dest), kver], check=True, capture_output=True)
    return kver


if __name__ == "__main__":
    print(f"[setup] Debian kernel: {fetch()}", file=sys.stderr)
    print(f"[setup] its debug vmlinux (crash reads it): {fetch_dbg()}", file=sys.stderr)
