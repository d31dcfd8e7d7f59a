"""The peer for hibernate figures: in-kernel hibernation (swsusp) of a test guest to a swap disk, and its resume=.

One implementation for the VM test that prints the figures beside khibernate's and for
benchmarks/hibernate_resume.py: the same kernel, memory, CPUs and workload as the khibernate run it is compared
with, a raw swap disk as the first virtio disk (the place khibernate's store takes), an ext4 data disk mounted, and
times taken the same way — hibernate from the command to QEMU's exit, resume from the new QEMU's start to the
saved kernel's command finishing.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmtest.diskfile import blank
from vmtest.kernel import TestKernel
from vmtest.vm import TIMEOUT_SCALE, VM


@dataclass(frozen=True)
class SwsuspRun:
    """One swsusp round trip: seconds, and what the kernel said it wrote (None when the console lacks the line)."""

    hibernate_s: float
    resume_s: float
    written_mb: float | None
    write_s: float | None

    def image(self) -> str:
        if self.written_mb is None:
            return "size not on console"
        return f"{self.written_mb:.1f} MB written in {self.write_s} s"


def swsusp_round_trip(kernel: TestKernel, work: Path, prepare: Callable[[VM], None],
                      extra_files: Sequence[tuple[Path, str]] = (), memory_mb: int = 1024, smp: int = 1,
                      swap_mb: int = 640, name: str = "swsusp") -> SwsuspRun:
    """Boot, run ``prepare`` (the workload), ``echo disk > /sys/power/state`` to a swap disk, then boot a new QEMU
    with ``resume=`` and wait until the saved kernel's command finished and its shell answers with the same
    boot_id.  Raises AssertionError when the guest did not power off or did not come back as itself."""
    swap = blank(work / f"{name}-swap.img", swap_mb)
    ext4 = blank(work / f"{name}-ext4.img", 64)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4)], check=True)
    with VM(kernel=kernel, append="crashkernel=256M", memory_mb=memory_mb, smp=smp, extra_files=list(extra_files),
            disks=[swap, ext4], name=name, timeout=300) as vm:
        prepare(vm)
        vm.run("mkdir -p /mnt && mount -t ext4 /dev/vdb /mnt && echo swsusp > /mnt/before")
        vm.run("mkswap /dev/vda >/dev/null && swapon /dev/vda")
        boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
        mark = vm.mark()
        t0 = time.monotonic()
        cid = vm.send("echo disk > /sys/power/state")
        assert vm.wait_exit(timeout=600 * TIMEOUT_SCALE) == 0, "swsusp should power the guest off"
        hib_s = time.monotonic() - t0
        wrote = re.search(r"Wrote (\d+) kbytes in ([\d.]+) seconds", vm.console_since(mark))
    vm2 = VM(kernel=kernel, append="crashkernel=256M resume=/dev/vda", memory_mb=memory_mb, smp=smp,
             disks=[swap, ext4], name=f"{name}-resume", timeout=300, wait_ready=False)
    t0 = time.monotonic()
    vm2.start()
    try:
        st, _ = vm2.result_elsewhere(cid, timeout=600 * TIMEOUT_SCALE)
        res_s = time.monotonic() - t0
        assert st == 0, "the resumed kernel's hibernate command failed"
        vm2.wait_for_shell(timeout=60 * TIMEOUT_SCALE, new_boot=False)
        assert vm2.run("cat /proc/sys/kernel/random/boot_id").strip() == boot_id, "swsusp did not resume"
    finally:
        vm2.close()
    return SwsuspRun(hib_s, res_s, int(wrote.group(1)) / 1e3 if wrote else None,
                     float(wrote.group(2)) if wrote else None)
