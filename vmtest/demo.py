"""``python -m vmtest.demo [hibernate|kexec|kdump|jump ...]``: the test kernel in QEMU, step by step — by default
the product (hibernate a running guest, power off, resume it in a new QEMU); kexec, kdump and a kexec jump by name.

Each demo boots its own VM (logs under /tmp/khibernate-vmtest/demo-*) and prints what happened and how long it took.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile

from vmtest import guest
from vmtest.kernel import TestKernel, ensure_kernel
from vmtest.vm import BASE_APPEND, VM, VMError


def say(msg: str) -> None:
    print(msg, flush=True)


def _lines(text: str, pattern: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if re.search(pattern, ln)]


def demo_kexec(kernel: TestKernel) -> None:
    """kexec -l + kexec -e: a second kernel boots without firmware."""
    say("\n== 1. kexec: load a second kernel and boot into it ==")
    with VM(kernel=kernel, name="demo-kexec", timeout=180) as vm:
        say(f"first kernel up in {vm.boot_seconds:.1f} s (boot id {vm.boot_id})")
        t = time.monotonic()
        vm.run(f"kexec -l /boot/bzImage --initrd=/boot/initrd-nopy.img --append='{BASE_APPEND} demo.kernel=second'",
               timeout=120)
        say(f"[first]  kexec -l /boot/bzImage ...   ({time.monotonic() - t:.1f} s)")
        mark = vm.mark()
        t = time.monotonic()
        vm.send("kexec -e")
        vm.wait_for_shell(timeout=180)
        say(f"[first]  kexec -e   -> second kernel's shell after {time.monotonic() - t:.1f} s (boot id {vm.boot_id})")
        for line in _lines(vm.console_since(mark), r"Starting new kernel|Linux version|Command line:")[:3]:
            say(f"         console: {line}")
        say(f"[second] cat /proc/cmdline: {vm.run('cat /proc/cmdline').strip()}")


def demo_kdump(kernel: TestKernel) -> None:
    """crashkernel= + kexec -p + a panic: the capture kernel saves the old memory as an ELF core to the disk."""
    say("\n== 2. kdump: crash the kernel, the capture kernel saves its memory to the virtio disk ==")
    with VM(kernel=kernel, append="crashkernel=256M", name="demo-kdump", disk_mb=1200, timeout=180) as vm:
        base, end = guest.crash_region(vm.run("cat /proc/iomem"))
        say(f"first kernel up in {vm.boot_seconds:.1f} s; crash region {base:#x}-{end:#x}")
        vm.run(f"kexec -p /boot/bzImage --initrd=/boot/initrd-nopy.img --append='{BASE_APPEND}"
               " khibernate.role=kdump-to-disk nr_cpus=1 reset_devices'", timeout=120)
        say("[first]  kexec -p ... loaded (kexec_crash_loaded=" + vm.run("cat /sys/kernel/kexec_crash_loaded").strip()
            + ")")
        t = time.monotonic()
        vm.send("echo c > /proc/sysrq-trigger")
        say("[first]  echo c > /proc/sysrq-trigger")
        vm.wait_for(r"Kernel panic - not syncing: sysrq triggered crash", timeout=60)
        say("         console: Kernel panic - not syncing: sysrq triggered crash")
        m = vm.wait_for(r"kdump-to-disk: copying /proc/vmcore \((\d+) bytes\)", timeout=180)
        say(f"[capture] copying /proc/vmcore ({int(m.group(1)) / 2**20:.0f} MiB) to /dev/vda")
        vm.wait_for(r"@@KHB-ROLE-DONE kdump-to-disk 0@@", timeout=400)
        say(f"[capture] done, {time.monotonic() - t:.1f} s after the panic")
    with open(vm.disk, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        info: dict[str, str] = {}
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                for note in seg.iter_notes():
                    if note["n_name"] == "VMCOREINFO":
                        desc = note["n_desc"]
                        text = desc.decode() if isinstance(desc, bytes) else desc
                        info = dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)
        say(f"[host]   {vm.disk}: ELF {elf['e_type']}, {len(loads)} PT_LOAD segments, VMCOREINFO OSRELEASE="
            f"{info.get('OSRELEASE')} (test kernel: {kernel.info['release']})")


def demo_jump(kernel: TestKernel) -> None:
    """kexec-tools --load-preserve-context into the crash region, kexec -e: the first half of a kexec jump."""
    say("\n== 3. kexec jump, first half: jump out into a second kernel confined to the crash region ==")
    with VM(kernel=kernel, append="crashkernel=256M", name="demo-jump", timeout=180) as vm:
        iomem = vm.run("cat /proc/iomem")
        base, end = guest.crash_region(iomem)
        say(f"first kernel up in {vm.boot_seconds:.1f} s; crash region {base:#x}-{end:#x}")
        t = time.monotonic()
        append = guest.load_jump(vm, base, end, extra="iomem=relaxed")
        say(f"[first]  kexec --load-preserve-context --mem-min={base:#x} --mem-max={end:#x} ... "
            f"({time.monotonic() - t:.1f} s, two loads)\n         second kernel's command line: {append}")
        t = time.monotonic()
        vm.send("kexec -e")
        vm.wait_for_shell(timeout=240)
        say(f"[first]  kexec -e   -> second kernel's shell after {time.monotonic() - t:.1f} s")
        cmdline = vm.run("cat /proc/cmdline").strip()
        entry = guest.jump_back_entry(cmdline)
        say(f"[second] /proc/cmdline ends with: ...{cmdline[len(append) - 3:]}")
        say(f"[second] kexec_jump_back_entry = {entry:#x}" if entry else "[second] NO kexec_jump_back_entry!")
        for line in _lines(vm.run("cat /proc/iomem"), r"System RAM"):
            say(f"[second] its own RAM: {line}")
        say("[second] (jumping back to the first kernel is the jump issue's: see khibernate jump)")


COUNTER = ("sh -c 'i=0; while :; do i=$((i+1)); echo \"$$ $i\" >/tmp/cnt.new; mv /tmp/cnt.new /tmp/cnt; sleep 1; done' "
           ">/dev/null 2>&1 </dev/null &")
HIBERNATE = "khibernate hibernate --target /dev/vda --kernel /boot/bzImage --capture-initrd /boot/initrd.img"


def demo_hibernate(kernel: TestKernel) -> None:
    """The product: hibernate a running guest, power off, boot a NEW QEMU, resume — the same kernel runs on."""
    say("\n== hibernate / resume across a cold boot, with khibernate's own commands only ==")
    with VM(kernel=kernel, append="crashkernel=256M", name="demo-hibernate", disk_mb=640, timeout=300) as vm:
        say(f"[QEMU #1] kernel {vm.release} up in {vm.boot_seconds:.1f} s, boot_id {vm.boot_id}")
        vm.run("khibernate target init /dev/vda")
        say("[guest]  khibernate target init /dev/vda")
        vm.run(COUNTER)
        vm.run("echo 'a line typed before hibernating' > /dev/shm/note")
        time.sleep(3)
        before = vm.run("cat /tmp/cnt").split()
        say(f"[guest]  counter process {before[0]} at {before[1]}; /dev/shm/note written")
        t = time.monotonic()
        cid = vm.send(HIBERNATE)
        say(f"[guest]  {HIBERNATE}")
        vm.wait_exit(timeout=900)
        say(f"[QEMU #1] exited {time.monotonic() - t:.1f} s later: the capture kernel saved the guest and powered off")
        for line in _lines(vm.console_text(), r"hibernation image complete")[:1]:
            say(f"         console: {line}")
        disk, boot_id = vm.disk, vm.boot_id
    vm2 = VM(kernel=kernel, append="crashkernel=256M khibernate.resume=/dev/vda", name="demo-resume",
             disks=[disk], timeout=300, wait_ready=False)
    t = time.monotonic()
    vm2.start()
    try:
        say("[QEMU #2] a new QEMU process boots the same kernel with khibernate.resume=/dev/vda (its /init runs "
            "`khibernate resume --target /dev/vda` before anything else)")
        status, out = vm2.result_elsewhere(cid, timeout=900)
        say(f"[QEMU #2] the hibernated kernel runs again {time.monotonic() - t:.1f} s after power-on; its "
            f"`khibernate hibernate` returned {status}: {out.strip().splitlines()[-1] if out.strip() else ''}")
        for line in _lines(vm2.console_text(), r"khibernate-restore: \d+ pages written|entering the saved")[:2]:
            say(f"         console: {line}")
        vm2.wait_for_shell(timeout=60, new_boot=False)
        same = vm2.run("cat /proc/sys/kernel/random/boot_id").strip()
        time.sleep(2)
        after = vm2.run("cat /tmp/cnt").split()
        say(f"[guest]  boot_id {same} ({'the same kernel' if same == boot_id else 'A DIFFERENT KERNEL'}); counter "
            f"process {after[0]} at {after[1]} (was {before[1]}); /dev/shm/note: "
            f"{vm2.run('cat /dev/shm/note').strip()!r}")
        if same != boot_id or after[0] != before[0]:
            raise VMError("the resumed kernel is not the one that hibernated")
    finally:
        vm2.close()


def main(argv: list[str]) -> int:
    names = argv or ["hibernate"]
    demos = {"hibernate": demo_hibernate, "kexec": demo_kexec, "kdump": demo_kdump, "jump": demo_jump}
    unknown = [n for n in names if n not in demos]
    if unknown:
        print(f"unknown demo(s) {unknown}; choose from {', '.join(demos)}", file=sys.stderr)
        return 2
    kernel = ensure_kernel()
    say(f"test kernel {kernel.info['release']}: {kernel.bzimage}")
    t = time.monotonic()
    for n in names:
        try:
            demos[n](kernel)
        except VMError as e:
            print(f"\ndemo {n} FAILED: {e}\nlogs: {Path('/tmp/khibernate-vmtest')}/demo-{n}", file=sys.stderr)
            return 1
    say(f"\nall demos done in {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
