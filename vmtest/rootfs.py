"""The Debian 12 test machine's disk: a root filesystem made by mmdebstrap from Debian's packages, on the ext4 root
partition of a raw (virtio) disk image, built once and cached by what makes it.

``python -m vmtest.rootfs`` builds (or finds) it and prints its directory.  The disk holds systemd, udev, dbus,
initramfs-tools, python3, e2fsprogs, a kernel installed as a distribution installs it (its modules in
/lib/modules, its initrd made by update-initramfs inside the image), and a local apt repository with what
khibernate's .deb depends on (the guest has no network; see vmtest/distro/customize.sh).  Nothing of khibernate is
installed: the tests install it the way a user does.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from vmtest import debian
from vmtest.kernel import CACHE, host_debian_uris

HERE = Path(__file__).resolve().parent
DISTRO_DIR = HERE / "distro"
ROOTFS_CACHE = CACHE / "rootfs"
SUITE = "bookworm"
# busybox as a default Debian install has it (initramfs-tools Recommends it; minbase leaves Recommends out): the
# package's `busybox-static | busybox` is then met by it, and `apt remove` + `autoremove --purge` leave it as found.
PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "libpam-systemd", "initramfs-tools", "kmod", "python3",
            "e2fsprogs", "procps", "zstd", "util-linux", "less", "busybox")
# what debian/control makes khibernate depend on: put in the image's local apt repository, not installed
KHIBERNATE_DEPS = ("python3-click", "python3-zstandard", "python3-pyelftools", "python3-cffi", "python3-cryptography",
                   "python3-packaging",
                   "dmsetup", "kexec-tools")
DISK_MB = 4096
PART_START_MB = 1
PARTITION_OFFSET = PART_START_MB << 20


class RootfsError(RuntimeError):
    """The root filesystem or its disk image could not be built: the message says which step and its log."""


@dataclasses.dataclass(frozen=True)
class KernelSource:
    """The kernel installed into the image: a Debian linux-image .deb, or a tree with boot/ and lib/modules/."""

    release: str
    deb: Path | None = None
    tree: Path | None = None

    def key(self) -> str:
        what = self.deb if self.deb is not None else self.tree
        assert what is not None
        st = what.stat()
        return f"{self.release}\0{what.name}\0{st.st_size}\0{st.st_mtime_ns}"


def debian_kernel() -> KernelSource:
    """Debian's own 6.1 kernel package from setup's cache (no KEXEC_JUMP: boots and installs, cannot jump)."""
    k = debian.cached_kernel()
    if k is None:
        raise RootfsError(f"no linux-image .deb in {debian.DEBS}: run `python3 -m vmtest.debian` (scripts/setup.sh)")
    return KernelSource(k.kver, deb=k.deb)


def flavour_kernel(tk) -> KernelSource:
    """A modular test kernel build (vmtest.kernel's ``6.12-distro``: bzImage, config, System.map and an installed
    modules tree) staged as the tree a kernel package installs: boot/vmlinuz-REL, boot/config-REL,
    boot/System.map-REL and lib/modules/REL.  The stage is cached beside the build."""
    rel = tk.release
    stage = tk.directory / "install-tree"
    if not (stage / "lib" / "modules" / rel / "modules.dep").is_file():
        tmp = tk.directory / "install-tree.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "boot").mkdir(parents=True)
        shutil.copy2(tk.bzimage, tmp / "boot" / f"vmlinuz-{rel}")
        shutil.copy2(tk.config, tmp / "boot" / f"config-{rel}")
        shutil.copy2(tk.system_map, tmp / "boot" / f"System.map-{rel}")
        shutil.copytree(tk.modules_root / rel, tmp / "lib" / "modules" / rel, symlinks=True)
        for link in ("build", "source"):  # point into the build tree, which the image does not carry
            (tmp / "lib" / "modules" / rel / link).unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        tmp.rename(stage)
    return KernelSource(rel, tree=stage)


@dataclasses.dataclass(frozen=True)
class RootfsImage:
    """A built, cached disk image: ``disk.img`` (GPT, one ext4 partition at 1 MiB) and ``info.json``."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    @property
    def info(self) -> dict:
        return json.loads((self.directory / "info.json").read_text())

    @property
    def release(self) -> str:
        return str(self.info["release"])

    @property
    def root_uuid(self) -> str:
        return str(self.info["root_uuid"])

    def complete(self) -> bool:
        return self.disk.is_file() and (self.directory / "info.json").is_file()


# Bump when the way the image is made changes (here, not in vmtest/distro/: those files are hashed by content).
RECIPE = "rootfs-v1: mmdebstrap minbase, GPT + ext4 at 1 MiB, deps-only local repo"


def image_key(kernel: KernelSource) -> str:
    """Hash of what makes the image: packages, suite, the customize hook and its files, the recipe, the kernel."""
    h = hashlib.sha256(RECIPE.encode() + b"\0")
    h.update(f"{SUITE}\0{','.join(PACKAGES)}\0{','.join(KHIBERNATE_DEPS)}\0{DISK_MB}\0".encode())
    for p in sorted(DISTRO_DIR.iterdir()):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update((HERE.parent / "initramfs/usr/libexec/khibernate/vm-agent").read_bytes())
    h.update(kernel.key().encode())
    return h.hexdigest()[:12]


def find_cached(kernel: KernelSource) -> RootfsImage | None:
    """The cached image for this kernel and these inputs, or None (nothing is built)."""
    img = RootfsImage(ROOTFS_CACHE / f"bookworm-{kernel.release}-{image_key(kernel)}")
    return img if img.complete() else None


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise RootfsError(f"{cmd[0]} failed (status {r.returncode}); log {log}:\n{tail}")


def _mirrors() -> list[str]:
    main, sec, _ = host_debian_uris()
    lines = [f"deb {main} {SUITE} main", f"deb {main} {SUITE}-updates main"]
    if sec:
        lines.append(f"deb {sec} {SUITE}-security main")
    return lines


def _bootstrap(tree: Path, kernel: KernelSource, root_uuid: str, log: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise RootfsError("mmdebstrap not found: apt-get install mmdebstrap (scripts/setup.sh does)")
    env = dict(os.environ, KHB_DEPS=" ".join(KHIBERNATE_DEPS), KHB_ROOT_UUID=root_uuid, KHB_HERE=str(DISTRO_DIR),
               KHB_KERNEL_DEB=str(kernel.deb or ""), KHB_KERNEL_TREE=str(kernel.tree or ""))
    cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", "--include=" + ",".join(PACKAGES),
           "--aptopt=APT::Install-Recommends \"false\"", "--skip=cleanup/apt/lists",
           f"--customize-hook=sh {DISTRO_DIR / 'customize.sh'} \"$1\"", SUITE, str(tree), *_mirrors()]
    _run(cmd, log, env)


def _make_disk(tree: Path, disk: Path, root_uuid: str, log: Path) -> None:
    """GPT with one Linux partition from 1 MiB to 1 MiB before the end; ext4 there, filled from ``tree``."""
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(DISK_MB << 20)
    part_mb = DISK_MB - PART_START_MB - 1
    layout = f"label: gpt\nstart={PART_START_MB}MiB, size={part_mb}MiB, type=linux, name=root\n"
    with open(log, "ab") as f:
        r = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", str(disk)], input=layout.encode(),
                           stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RootfsError(f"sfdisk failed; log {log}")
    _run(["mke2fs", "-q", "-t", "ext4", "-U", root_uuid, "-L", "root", "-d", str(tree),
          "-E", f"offset={PARTITION_OFFSET}", str(disk), f"{part_mb}M"], log)
    _run(["e2fsck", "-fn", f"{disk}?offset={PARTITION_OFFSET}"], log)


def _remove_work(work: Path) -> None:
    """Delete an interrupted build's folder, never through a mount an interrupted mmdebstrap left inside it
    (its chroot has the host's /proc, /sys and /dev mounted while it runs)."""
    inside = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(work) + "/")]
    if inside:
        raise RootfsError(f"{work} still has mounts inside ({', '.join(inside[:3])}): an mmdebstrap is running or "
                          "was killed; unmount them (umount -R) before the image can be rebuilt")
    shutil.rmtree(work, ignore_errors=True)


def build(kernel: KernelSource, log=print) -> RootfsImage:
    """Build the image for ``kernel`` into the cache (under a lock; a finished one is reused)."""
    key = image_key(kernel)
    img = RootfsImage(ROOTFS_CACHE / f"bookworm-{kernel.release}-{key}")
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    with open(ROOTFS_CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if img.complete():
            return img
        work = ROOTFS_CACHE / f"work-{key}"
        _remove_work(work)
        work.mkdir()
        blog = work / "build.log"
        root_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"khibernate-rootfs-{key}"))
        t0 = time.monotonic()
        log(f"[vmtest.rootfs] mmdebstrap {SUITE} with kernel {kernel.release} (a few minutes; log {blog})")
        tree = work / "tree"
        _bootstrap(tree, kernel, root_uuid, blog)
        t1 = time.monotonic()
        log(f"[vmtest.rootfs] root filesystem in {t1 - t0:.0f} s; making the ext4 disk image")
        _make_disk(tree, work / "disk.img", root_uuid, blog)
        versions = subprocess.run(["chroot", str(tree), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
                                  capture_output=True, text=True).stdout
        used = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(tree)
        info = {"release": kernel.release, "root_uuid": root_uuid, "disk_mb": DISK_MB,
                "partition_offset": PARTITION_OFFSET, "suite": SUITE, "tree_bytes": used,
                "bootstrap_seconds": round(t1 - t0, 1), "disk_seconds": round(time.monotonic() - t1, 1),
                "packages": versions.splitlines()}
        (work / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        shutil.rmtree(img.directory, ignore_errors=True)
        work.rename(img.directory)
        log(f"[vmtest.rootfs] built {img.directory} in {time.monotonic() - t0:.0f} s")
        return img


DISTRO_FLAVOUR = "6.12-distro"


def distro_image(log=print) -> RootfsImage:
    """The image the distribution tests boot: the modular KASLR flavour installed as a package would install it."""
    from vmtest.kernel import ensure_kernel

    return build(flavour_kernel(ensure_kernel(DISTRO_FLAVOUR)), log=log)


if __name__ == "__main__":
    print(distro_image(log=lambda m: print(m, file=sys.stderr)).directory)
