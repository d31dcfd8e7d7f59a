"""kexec, kdump and kexec jump driven only by khibernate, in QEMU on the test kernel (no kexec-tools used).

Without root, qemu or the test kernels they skip with a reason (fail under KHIBERNATE_RUN_VM_TESTS=1).
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import pytest

from tests.tiers import debian_vmlinuz

pytestmark = pytest.mark.vm

HERE = Path(__file__).parent
GUEST_HELPER = (HERE / "jump_guest_vmcoreinfo.py", "/usr/libexec/khibernate/vmcoreinfo.py")
# `khibernate kexec|kdump|jump` without the other command groups (same click groups as `khibernate`)
K = "python3 -m khibernate.jump"
B_APPEND = "console=ttyS0 khibernate.agent=1 panic=-1 khb.role=B"
JUMP_LOAD = f"{K} jump load /boot/bzImage --initrd /boot/initrd.img --append '{B_APPEND}'"
COUNTER = ("sh -c 'i=0; while :; do i=$((i+1)); echo \"$$ $i\" >/tmp/cnt.new; mv /tmp/cnt.new /tmp/cnt; sleep 1; done' "
           ">/dev/null 2>&1 </dev/null &")


def tiny_initrd(path: Path, marker: str) -> Path:
    """A newc cpio whose /init (static busybox) prints marker on the console and powers off."""
    busybox = Path("/bin/busybox").read_bytes()
    init = f"#!/bin/busybox sh\n/bin/busybox echo {marker} > /dev/console\n/bin/busybox poweroff -f\n".encode()
    entries = [("dev", 0o40755, b"", 0), ("bin", 0o40755, b"", 0), ("dev/console", 0o20600, b"", (5 << 8) | 1),
               ("bin/busybox", 0o100755, busybox, 0), ("init", 0o100755, init, 0)]
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate(entries + [("TRAILER!!!", 0, b"", 0)], 1):
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(name) + 1, 0]
        out += b"070701" + "".join(f"{x:08x}" for x in fields).encode() + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="module")
def kernel():
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    return ensure_kernel()


def _vm(kernel, name, append="crashkernel=256M", smp=1, extra=(), memory_mb=1024, **kw):
    from vmtest.vm import VM

    return VM(kernel=kernel, append=append, memory_mb=memory_mb, smp=smp, extra_files=[GUEST_HELPER, *extra], name=name,
              timeout=300, **kw)


def finish(vm, cid: str, timeout: float = 60) -> tuple[int, str]:
    """(status, output) of a command started before a jump (its begin marker may be far back in the agent log)."""
    end = re.compile(rb"@@KHB-END " + cid.encode() + rb" (-?\d+)@@")
    begin = re.compile(rb"@@KHB-BEGIN " + cid.encode() + rb"@@\r?\n")
    deadline = time.monotonic() + timeout
    with vm.agent.cond:
        while True:
            m = end.search(vm.agent.buf)
            if m:
                b = begin.search(vm.agent.buf)
                text = bytes(vm.agent.buf[b.end() if b else 0:m.start()]).decode(errors="replace")
                return int(m.group(1)), text
            if time.monotonic() > deadline:
                raise AssertionError(f"{cid} did not finish within {timeout} s; see {vm.agent_log}")
            vm.agent.cond.wait(0.5)


def resync(vm) -> None:
    """Make sure the agent of the kernel now running reads whole commands again.

    Bytes of one host write can be split between the two kernels around a jump (the serial port is shared), which
    leaves a half line in one kernel's tty: a newline ends it, then a marker command must echo back.
    """
    vm._agent_write("\n")
    for _ in range(3):
        if "KHB-SYNC" in vm.run("echo KHB-SYNC"):
            return
    raise AssertionError(f"the guest agent does not answer after a jump; see {vm.agent_log}")


def boot_id(vm) -> str:
    return grun(vm, "cat /proc/sys/kernel/random/boot_id").strip()


def counter(vm) -> tuple[int, int]:
    pid, n = grun(vm, "cat /tmp/cnt").split()
    return int(pid), int(n)


BACK = r"khibernate: back in this kernel \(pid \d+\), away ([\d.]+) s CLOCK_BOOTTIME, ([\d.]+) s CLOCK_MONOTONIC"


def grun(vm, command: str, tries: int = 4) -> str:
    """vm.run that retries an idempotent command whose output came back empty (see resync)."""
    for _ in range(tries):
        out = vm.run(command)
        if out.strip():
            return out
        resync(vm)
    raise AssertionError(f"{command!r} printed nothing {tries} times; see {vm.agent_log}")


def round_trips(vm, n: int, report: dict, load: str = JUMP_LOAD) -> None:
    """n A->B->A trips: the first boots B, the others resume it; checks both sides continue every time.

    Evidence comes from the kernel console (khibernate logs each reboot(KEXEC) return to /dev/kmsg) and from the
    guest shell of the kernel running at that moment: boot_id, the counter process, CPUs.
    """
    a_id = grun(vm, "cat /proc/sys/kernel/random/boot_id").strip()
    vm.run(COUNTER)
    time.sleep(2)
    pid0, n0 = counter(vm)
    out = vm.run(load, timeout=120)
    assert "loaded jump image" in out
    b_id = None
    pending = []
    times: dict[str, list[float]] = {"A->B": [], "B->A": [], "A->B kernel": [], "B->A kernel": []}
    for trip in range(1, n + 1):
        # A -> B: the first time B boots, later B's `jump back` returns
        t0 = time.monotonic()
        vm.mark()
        pending.append(vm.send(f"{K} jump exec"))
        vm.wait_for(r"Freezing user space processes", timeout=120)
        tf = time.monotonic()
        if trip == 1:
            vm.wait_for(r"Run /init as init process", timeout=180)
            times["A->B kernel"].append(time.monotonic() - tf)
            vm.wait_for_shell(timeout=180, new_boot=True)
        else:
            vm.wait_for(BACK, timeout=180)
            times["A->B kernel"].append(time.monotonic() - tf)
            vm.wait_for_shell(timeout=60, new_boot=False)
        times["A->B"].append(time.monotonic() - t0)
        resync(vm)
        now_id = grun(vm, "cat /proc/sys/kernel/random/boot_id").strip()
        if trip == 1:
            b_id = now_id
            assert b_id != a_id
            cmdline = grun(vm, "cat /proc/cmdline")
            m = re.search(r"kexec_jump_back_entry=0x([0-9a-f]{16})", cmdline)
            assert m and int(m.group(1), 16) != 0, cmdline
            assert "elfcorehdr=" in cmdline and "khb.role=B" in cmdline
            assert f"kexec_jump_back_entry={int(m.group(1), 16):#x}" in grun(vm, f"{K} jump status")
            report["vmcoreinfo_B"] = grun(vm, f"python3 {GUEST_HELPER[1]} vmcore")
        else:
            assert now_id == b_id, "the second kernel booted again instead of resuming"
        # B -> A: A's `jump exec` returns
        t1 = time.monotonic()
        vm.mark()
        pending.append(vm.send(f"{K} jump back"))
        m = vm.wait_for(r"jump-back image for entry 0x[0-9a-f]+ (loaded|reused)", timeout=120)
        assert m.group(1) == ("loaded" if trip == 1 else "reused"), m.group(0)
        vm.wait_for(r"Freezing user space processes", timeout=120)
        tf = time.monotonic()
        back = vm.wait_for(BACK, timeout=180)
        times["B->A kernel"].append(time.monotonic() - tf)
        vm.wait_for_shell(timeout=60, new_boot=False)
        times["B->A"].append(time.monotonic() - t1)
        resync(vm)
        assert grun(vm, "cat /proc/sys/kernel/random/boot_id").strip() == a_id
        boottime, mono = float(back.group(1)), float(back.group(2))
        assert boottime > mono + 0.5, back.group(0)  # BOOTTIME includes the time spent in B, MONOTONIC does not
        pid1, n1 = counter(vm)
        time.sleep(2.5)
        pid2, n2 = counter(vm)
        assert pid0 == pid1 == pid2 and n0 <= n1 < n2, (n0, n1, n2)
        n0 = n2
        report.setdefault("away", []).append(boottime)
    report["times"] = times
    report["vmcoreinfo_A"] = grun(vm, f"python3 {GUEST_HELPER[1]} kcore")
    report["returned"] = [finish(vm, cid, timeout=5)[0] for cid in pending[:-1]]


def _print(name, report):
    def fmt(xs):
        return ", ".join(f"{x:.1f}" for x in xs)

    t = report["times"]
    print(f"\n[{name}] command to peer's shell: A->B {fmt(t['A->B'])} s; B->A {fmt(t['B->A'])} s")
    print(f"[{name}] kernel (freeze -> peer's 'Run /init' or 'Restarting tasks'): A->B {fmt(t['A->B kernel'])} s; "
          f"B->A {fmt(t['B->A kernel'])} s; A away (CLOCK_BOOTTIME) {fmt(report['away'])} s")


@pytest.mark.parametrize(("line", "smp", "trips"), [("6.12", 1, 5), ("6.12", 2, 5), ("7.3", 1, 3)],
                         ids=["6.12-smp1", "6.12-smp2", "7.3-smp1"])
def test_jump_round_trips(line, smp, trips):
    """Round trips A<->B driven by `khibernate jump`; B's /proc/vmcore carries A's VMCOREINFO.

    Five with 1 and 2 CPUs on 6.12 (Debian's LTS line); three on 7.3, whose relocate_kernel returns at another
    offset of the control page (+0x12d, 6.12: +0xf2) and runs the peer on its swap page.
    """
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    kernel = ensure_kernel(line)
    report: dict = {}
    name = f"jump-{line}-smp{smp}"
    with _vm(kernel, name, smp=smp) as vm:
        if smp > 1:
            assert grun(vm, "cat /sys/devices/system/cpu/online").strip() == f"0-{smp - 1}"
        round_trips(vm, trips, report)
        assert report["returned"] == [0] * (2 * trips - 1)  # every jump command but the last returned with status 0
        if smp > 1:
            assert grun(vm, "cat /sys/devices/system/cpu/online").strip() == f"0-{smp - 1}"
    _print(name, report)
    a_info, b_info = report["vmcoreinfo_A"], report["vmcoreinfo_B"]
    assert f"OSRELEASE={line}." in a_info and "SYMBOL(swapper_pg_dir)=" in a_info
    b_note = b_info[:b_info.index("PT_LOAD ")]
    assert b_note == a_info, "VMCOREINFO in the second kernel's /proc/vmcore differs from the first kernel's"
    loads = b_info.split("PT_LOAD ")[1].split()
    assert loads and all(not x.startswith("0x2e") for x in loads)  # the crash region is not the first kernel's


def test_jump_into_a_window_of_its_own_ram_over_its_vmcoreinfo(kernel):
    """A window in the first kernel's own RAM, not its crash region, holding its VMCOREINFO buffer (as `resume`
    uses the saved region when its boot reserved another): the jump swaps the window out, the VMCOREINFO note
    travels inside the elfcorehdr, so B's /proc/vmcore carries A's VMCOREINFO; after the round trip A runs on."""
    with _vm(kernel, "jump-own-window") as vm:
        addr, size = (int(x, 16) for x in grun(vm, "cat /sys/kernel/vmcoreinfo").split())
        crash = re.search(r"([0-9a-f]+)-[0-9a-f]+ : Crash kernel", grun(vm, "cat /proc/iomem"))
        assert crash
        start = max(0x100000, (addr & ~0xFFFFF) - (64 << 20))
        end = start + (256 << 20)
        assert addr + size <= end <= int(crash.group(1), 16), (hex(addr), crash.group(0))
        window = f"--mem-min {start:#x} --mem-max {end - 1:#x}"
        plan = vm.run(f"{JUMP_LOAD} {window} --dry-run", timeout=120)
        assert re.search(r"elfcorehdr \(\d+ notes, 1 copied into it", plan), (hex(addr), plan)
        assert "backup (window is not reserved" in plan
        report: dict = {}
        round_trips(vm, 1, report, load=f"{JUMP_LOAD} {window}")
    a_info, b_info = report["vmcoreinfo_A"], report["vmcoreinfo_B"]
    assert "SYMBOL(swapper_pg_dir)=" in a_info and b_info[:b_info.index("PT_LOAD ")] == a_info
    loads = [tuple(int(v, 16) for v in x.split("+")) for x in b_info.split("PT_LOAD ")[1].split()]
    assert loads and not any(a < end and a + n > start for a, n in loads)  # the window is B's RAM, not A's
    _print("jump into a window of its own RAM", report)


def test_refusals_then_kexec_chain(kernel):
    """Refusals with clear errors and nothing loaded; then `kexec load --syscall load` (khibernate's own segments)
    + `kexec exec` boots a second kernel, in which `kexec load` (kexec_file_load) + `kexec exec` boots a third
    (with a tiny initrd whose /init prints a marker: a kexec_file_load'ed kernel unpacks initramfs slowly under TCG)."""
    tiny = tiny_initrd(Path(tempfile.mkdtemp(prefix="khb-tiny-")) / "tiny.cpio", "KHB-K3-INIT-REACHED")
    extra = [(kernel.bzimage, "/khb/bzImage"), (tiny, "/khb/tiny.cpio")]
    with _vm(kernel, "kexec-chain", append="", extra=extra) as vm:
        status, out = vm.run_status(f"{K} jump load /boot/bzImage --initrd /boot/initrd.img")
        assert status == 1 and out.startswith("error: no 'Crash kernel' region") and "Traceback" not in out, out
        status, out = vm.run_status(f"{K} jump load /boot/bzImage --initrd /boot/initrd.img "
                                    "--mem-min 0x3c000000 --mem-max 0x3c7fffff")
        assert status == 1 and "does not fit in the load window" in out and "Traceback" not in out, out
        status, out = vm.run_status(f"{K} jump load /boot/initrd.img --mem-min 0x3c000000 --mem-max 0x3dffffff")
        assert status == 1 and "not an x86 bzImage" in out, out
        status, out = vm.run_status(
            "python3 -c 'import os, sys; os.setgid(65534); os.setuid(65534); "
            "sys.argv = [\"khibernate\", \"kexec\", \"unload\"]; "
            "from khibernate.jump.__main__ import main; main()'")
        assert status == 1 and "needs root" in out and "Traceback" not in out, out
        status, out = vm.run_status(f"{K} jump back")
        assert status == 1 and "no kexec_jump_back_entry" in out, out
        status, out = vm.run_status(f"{K} jump exec")
        assert status == 1 and "no kexec image is loaded" in out, out
        assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"
        # the same groups are registered in the `khibernate` command
        assert "kexec image loaded:         no" in vm.run("khibernate kexec status", timeout=120)

        first = boot_id(vm)
        out = vm.run(f"{K} kexec load /boot/bzImage --initrd /boot/initrd.img --syscall load "
                     "--append 'console=ttyS0 khibernate.agent=1 panic=-1 khb.role=K2'", timeout=120)
        assert "with kexec_load" in out
        assert "kexec image loaded:         yes" in vm.run(f"{K} kexec status")
        t0 = time.monotonic()
        vm.send(f"{K} kexec exec")
        vm.wait_for_shell(timeout=300, new_boot=True)
        print(f"\n[kexec --syscall load] second kernel's shell {time.monotonic() - t0:.1f} s after `kexec exec`")
        assert boot_id(vm) != first and "khb.role=K2" in grun(vm, "cat /proc/cmdline")
        # the second kernel boots a third through kexec_file_load (the default), with a tiny initrd
        out = vm.run(f"{K} kexec load /khb/bzImage --initrd /khb/tiny.cpio "
                     "--append 'console=ttyS0 panic=-1 khb.role=K3'", timeout=120)
        assert "with kexec_file_load" in out
        vm.mark()
        t0 = time.monotonic()
        vm.send(f"{K} kexec exec")
        vm.wait_for(r"Command line: console=ttyS0 panic=-1 khb.role=K3", timeout=120)
        vm.wait_for(r"KHB-K3-INIT-REACHED", timeout=120)
        print(f"[kexec --syscall file] third kernel's /init {time.monotonic() - t0:.1f} s after `kexec exec`")


def test_kdump_load_crash(kernel):
    """`khibernate kdump load` + sysrq-c reaches the capture kernel, whose /proc/vmcore has VMCOREINFO."""
    with _vm(kernel, "kdump") as vm:
        a_info = vm.run(f"python3 {GUEST_HELPER[1]} kcore")
        out = vm.run(f"{K} kdump load /boot/bzImage --initrd /boot/initrd.img "
                     "--append 'console=ttyS0 khibernate.agent=1 panic=-1 khb.role=KDUMP nr_cpus=1 reset_devices'",
                     timeout=120)
        assert "capture kernel" in out
        assert "crash (kdump) image loaded: yes" in vm.run(f"{K} kdump status")
        t0 = time.monotonic()
        vm.send("echo c > /proc/sysrq-trigger")
        vm.wait_for_shell(timeout=180, new_boot=True)
        print(f"\n[kdump] capture kernel's shell {time.monotonic() - t0:.1f} s after sysrq-c")
        cmdline = vm.run("cat /proc/cmdline")
        assert "khb.role=KDUMP" in cmdline and "elfcorehdr=" in cmdline
        b_info = vm.run(f"python3 {GUEST_HELPER[1]} vmcore", timeout=120)
        assert b_info.startswith(a_info) and "CRASHTIME=" in b_info


def test_jump_into_kernel_without_kexec_jump(kernel):
    """A distribution kernel (Debian, no CONFIG_KEXEC_JUMP, KASLR) as the jump target: it boots in the crash region
    with the first kernel's VMCOREINFO in /proc/vmcore, and its `jump back` is refused with a clear error."""
    from khibernate.initramfs import build as builder
    from khibernate.initramfs import cpio
    from khibernate.initramfs.modules import add_modules
    from vmtest import debian

    vmlinuz = debian_vmlinuz()
    # Debian's virtio drivers are modules: the capture environment carries them from modules.dep (the product's
    # add_modules, on the package's own modules and depmod) and its /init loads them, so B sees the disk.
    with tempfile.TemporaryDirectory() as tmp:
        kver = debian.modules_tree(Path(tmp))
        tree = builder.Tree()
        loaded = add_modules(tree, kver, ["virtio_blk", "virtio_pci"], modules_root=Path(tmp) / "lib/modules")
        mods = Path(tmp) / "modules.cpio"
        mods.write_bytes(cpio.write(tree.entries.values()))
        # the distribution kernel needs more than 256 MiB to unpack the Python initramfs
        with _vm(kernel, "jump-debian", append="crashkernel=512M", memory_mb=1536, disk_mb=16,
                 extra=[(vmlinuz, "/khb/vmlinuz-debian"), (mods, "/khb/modules.cpio")]) as vm:
            vm.run("cat /khb/modules.cpio /boot/initrd.img > /tmp/initrd-debian.img")
            a_info = grun(vm, f"python3 {GUEST_HELPER[1]} kcore")
            out = vm.run(f"{K} jump load /khb/vmlinuz-debian --initrd /tmp/initrd-debian.img --append '{B_APPEND}'",
                         timeout=120)
            assert "loaded jump image" in out
            vm.send(f"{K} jump exec")
            vm.wait_for_shell(timeout=300, new_boot=True)
            resync(vm)
            release = grun(vm, "uname -r").strip()
            assert release != kernel.info["release"] and release.endswith("-amd64"), release
            assert "kexec_jump_back_entry=0x" in grun(vm, "cat /proc/cmdline")
            b_info = grun(vm, f"python3 {GUEST_HELPER[1]} vmcore")
            assert b_info[:b_info.index("PT_LOAD ")] == a_info
            in_b = grun(vm, "cut -d' ' -f1 /proc/modules; ls /sys/block").split()
            assert set(loaded) <= set(in_b) and "vda" in in_b, (loaded, in_b)
            status, out = vm.run_status(f"{K} jump back", timeout=120)
            assert status == 1 and "CONFIG_KEXEC_JUMP" in out and "Traceback" not in out, out
            print(f"\n[debian {release}] modules loaded by /init: {' '.join(loaded)}; `jump back` refused: "
                  f"{out.strip()[:160]}")
