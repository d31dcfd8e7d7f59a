"""A Debian distribution kernel (KASLR, no CONFIG_KEXEC_JUMP) for the tests: found in /boot or in the cache.

``python3 -m vmtest.debian`` (run by scripts/setup.sh) downloads the linux-image .deb of linux-image-amd64 with the
host's apt and extracts its vmlinuz into ``$KHIBERNATE_CACHE/debs``; tests only ever look it up (:func:`find`).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from vmtest.kernel import CACHE

DEBS = CACHE / "debs"


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
