"""The Debian 12 test machine booted in QEMU: a private copy of the cached disk (vmtest/rootfs.py), started from
what its own /boot holds, with systemd as PID 1 and the harness's agent on ttyS1 (a systemd unit in the image).

Like a boot loader, each boot reads the kernel and initrd from the disk's ext4 (debugfs, no journal replay: what
GRUB sees), so an initramfs that `update-initramfs -u` rebuilt inside the guest is the one the next boot runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

from vmtest.rootfs import PARTITION_OFFSET, RootfsImage
from vmtest.vm import LOG_ROOT, VM

# crashkernel= as a distribution's kdump setup puts it on the command line (kdump-tools: a fixed size)
CRASHKERNEL = "crashkernel=256M"


@dataclasses.dataclass(frozen=True)
class BootFiles:
    """A kernel and initrd read from the machine's /boot (``bzimage`` is what vmtest.vm.VM boots)."""

    bzimage: Path
    initrd: Path
    release: str


class Machine:
    """One machine: its disk (a sparse copy of the cached image, kept across boots) and how to boot it."""

    def __init__(self, image: RootfsImage, name: str):
        self.image = image
        self.name = name
        self.dir = LOG_ROOT / f"{name}-machine"
        self.disk = self.dir / "disk.img"
        self.extra_disks: list[Path] = []  # more raw disks, attached after the root disk (/dev/vdb, ...)
        self.boots = 0

    def create(self) -> float:
        """Copy the cached disk (sparse) into this machine's folder; returns the seconds it took."""
        t0 = time.monotonic()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        subprocess.run(["cp", "--sparse=always", str(self.image.disk), str(self.disk)], check=True)
        return time.monotonic() - t0

    @property
    def root_fs(self) -> str:
        """The root partition as e2fsprogs opens it inside the disk image."""
        return f"{self.disk}?offset={PARTITION_OFFSET}"

    def read_file(self, path: str) -> bytes:
        """A file of the guest's root filesystem as on disk now (QEMU stopped or not writing it)."""
        out = self.dir / "debugfs.out"
        out.unlink(missing_ok=True)
        r = subprocess.run(["debugfs", "-R", f"dump {path} {out}", self.root_fs], capture_output=True, text=True)
        if r.returncode != 0 or not out.is_file() or "File not found" in r.stderr:
            raise FileNotFoundError(f"{path} in {self.disk}: {r.stderr.strip()[-300:]}")
        data = out.read_bytes()
        out.unlink()
        return data

    def put_file(self, src: Path, path: str) -> None:
        """Write a host file into the guest's root filesystem (debugfs -w; only while the machine is off and its
        filesystem clean, e.g. before the first boot: what a user downloaded)."""
        r = subprocess.run(["debugfs", "-w", "-R", f"write {src} {path}", self.root_fs], capture_output=True, text=True)
        if r.returncode != 0 or "rror" in r.stderr:
            raise OSError(f"debugfs write {src} {path}: {r.stderr.strip()[-300:]}")

    def boot_files(self, release: str | None = None) -> BootFiles:
        """/boot/vmlinuz-REL and /boot/initrd.img-REL from the disk (the image's kernel by default)."""
        rel = release or self.image.release
        bz = self.dir / f"vmlinuz-{rel}"
        ird = self.dir / f"initrd.img-{rel}"
        bz.write_bytes(self.read_file(f"/boot/vmlinuz-{rel}"))
        ird.write_bytes(self.read_file(f"/boot/initrd.img-{rel}"))
        return BootFiles(bz, ird, rel)

    def append(self, extra: str = "") -> str:
        """The kernel command line a distribution's boot loader would pass, plus ``extra``."""
        return f"root=UUID={self.image.root_uuid} ro console=ttyS0 {CRASHKERNEL} panic=-1 {extra}".strip()

    def vm(self, extra_append: str = "", memory_mb: int = 1536, smp: int = 1, timeout: float = 300,
           wait_ready: bool = True, release: str | None = None) -> VM:
        """A VM booting this machine's disk (enter it to start); each boot gets its own log folder."""
        self.boots += 1
        files = self.boot_files(release)
        return VM(kernel=files, initrd=files.initrd, base_append=self.append(extra_append), memory_mb=memory_mb,
                  smp=smp, disks=[self.disk, *self.extra_disks], timeout=timeout, name=f"{self.name}-boot{self.boots}",
                  wait_ready=wait_ready)

    def fsck(self) -> tuple[int, str]:
        """e2fsck -fn of the root filesystem on the host (QEMU must have exited): (status, output)."""
        r = subprocess.run(["e2fsck", "-fn", self.root_fs], capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr


def wait_system_running(vm: VM, timeout: float = 300) -> str:
    """Wait until systemd finished booting (`systemctl is-system-running --wait`); returns its state."""
    status, out = vm.run_status("systemctl is-system-running --wait", timeout=timeout)
    state = out.strip().splitlines()[-1] if out.strip() else ""
    if state not in ("running", "degraded"):
        raise AssertionError(f"systemd did not finish booting: {out!r} (status {status})")
    return state
