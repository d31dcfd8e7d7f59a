"""`khibernate watch` in QEMU on the 6.12 test kernel: LKDTM provokes a WARNING, an Oops and a burst of WARNINGs;
the watcher takes one analysis snapshot (-d 31) per event within its limits and the guest runs on.

One booted guest (1 GiB, crashkernel=384M: 128 MiB of it for a kdump kernel in the last test; the snapshot tests'
workload, a store on /dev/vda, debugfs mounted) for the module; each test starts its own watcher (its options
differ) and waits until it has stopped.  The host reads the images straight from the guest's disk file: the kernel
log in the image, and drgn on the kdump export.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest

from tests.vm.test_snapshot import HELPERS, counter, start_workload
from vmtest.vm import TIMEOUT_SCALE

pytestmark = pytest.mark.vm

DIRECT = "/sys/kernel/debug/provoke-crash/DIRECT"
WATCH = ("khibernate watch --target /dev/vda --kernel /boot/bzImage --capture-initrd /boot/initrd.img "
         "--dir /var/crash/khibernate")


@pytest.fixture(scope="module")
def guest():
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    with VM(kernel=ensure_kernel("6.12"), append="crashkernel=384M", memory_mb=1024, extra_files=HELPERS,
            disk_mb=640, name="watch-6.12", timeout=300) as vm:
        prepare(vm)
        yield vm


def prepare(vm) -> None:  # noqa: ANN001
    """debugfs with LKDTM, a two-slot store on /dev/vda, oopses and WARNs that do not panic, the workload."""
    vm.run("mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug")
    assert vm.run_status(f"test -w {DIRECT}")[0] == 0, "no LKDTM in the test kernel (CONFIG_LKDTM, DEBUG_FS)"
    vm.run("dd if=/dev/zero of=/dev/vda bs=1M count=2 2>/dev/null; khibernate target init /dev/vda --slots 2")
    vm.run("echo 0 > /proc/sys/kernel/panic_on_oops; echo 0 > /proc/sys/kernel/panic_on_warn")
    start_workload(vm)


def start_watch(vm, args: str, log: str) -> int:
    """Start a watcher in the background; returns its pid once it follows /dev/kmsg."""
    pid = int(vm.run(f"{WATCH} {args} >{log} 2>&1 </dev/null & echo $!").strip())
    wait_log(vm, log, "following /dev/kmsg", timeout=180)
    return pid


def wait_log(vm, log: str, text: str, count: int = 1, timeout: float = 600) -> str:
    """The watcher's log once it holds ``text`` ``count`` times (polled; the guest pauses during a capture)."""
    end = time.monotonic() + timeout * TIMEOUT_SCALE
    while time.monotonic() < end:
        st, out = vm.run_status(f"cat {log}", timeout=600)
        if out.count(text) >= count:
            return out
        time.sleep(2)
    raise AssertionError(f"{text!r} x{count} not in {log} after {timeout} s:\n{out[-3000:]}")


def wait_exit(vm, pid: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout * TIMEOUT_SCALE
    while time.monotonic() < end:
        if vm.run_status(f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status")[0] != 0:
            return
        time.sleep(1)
    raise AssertionError(f"watcher {pid} still running")


def events(vm, since: set[str] | None = None) -> dict[str, dict]:
    """event.json of every capture folder (name -> record), without those in ``since``."""
    names = vm.run("ls /var/crash/khibernate 2>/dev/null; true").split()
    return {n: json.loads(vm.run(f"cat /var/crash/khibernate/{n}/event.json")) for n in names
            if n not in (since or set())}


def image_log(vm, tmp_path: Path, slot: int) -> str:
    """The kernel log inside the slot's image, read on the host from the guest's disk file."""
    from khibernate.image.dmesg import kernel_log
    from khibernate.image.sources.khi import KhiSource
    from khibernate.image.vmcoreinfo import from_source
    from khibernate.store import api as store

    out = tmp_path / f"slot{slot}.khi"
    store.export(str(vm.disk), slot, str(out))
    src = KhiSource(out)
    try:
        assert src.header.dump_level == 31 and not src.header.flags & 1  # analysis image: not restorable
        vmci = from_source(src)
        assert vmci is not None
        return kernel_log(src, vmci)
    finally:
        src.close()


@dataclasses.dataclass(frozen=True)
class Capture:
    """What one watch capture left: its event folder's name and event.json, the watcher's PID, the workload
    counter's PID (the same before and after) and what the trigger command printed."""

    name: str
    event: dict
    watch_pid: int
    counter_pid: int
    trigger_output: str


def one_capture(vm, args: str, log: str, trigger: str, before: set[str] | None = None) -> Capture:  # noqa: ANN001
    """`watch ARGS` started, TRIGGER run in the guest: exactly one capture, watch exits, and the workload's counter
    counts on in the same process; the one new event (since ``before``) is returned."""
    pid = start_watch(vm, args, log)
    pid0, n0 = counter(vm)
    out = vm.run(trigger)
    text = wait_log(vm, log, "stopped after 1 capture(s)")
    wait_exit(vm, pid)
    assert text.count("-> capture") == 1, text
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0  # the same counter counts on
    ((name, ev),) = events(vm, before).items()
    return Capture(name, ev, pid, pid0, out)


def figures(tag: str, snap: dict, extra: str = "") -> None:
    print(f"\n[watch 6.12 1 GiB {tag}] pause {snap['pause_seconds']:.2f} s, image {snap['bytes'] / 1e6:.1f} MB at "
          f"-d {snap['dump_level']} ({snap['pages_stored']} of {snap['pages_ram']} pages stored), save "
          f"{snap['save_seconds']} s{extra}")


def test_warning_one_capture_runs_on_and_drgn_reads_it(guest, tmp_path) -> None:
    """echo WARNING > DIRECT: one capture, the guest runs on; the image's kernel log holds the WARNING with its stack
    trace; the guest's export folder has vmcore + dmesg.txt; drgn on the host's kdump export reads the log and lists
    the guest's processes (the workload's counter and the watcher itself)."""
    import drgn
    from drgn.helpers.linux.pid import for_each_task
    from drgn.helpers.linux.printk import get_printk_records

    from khibernate.store import api as store

    vm = guest
    cap = one_capture(vm, "--on oops,warn,bug --min-interval 30 --max 1", "/tmp/watch1.log",
                      f"echo WARNING > {DIRECT}")
    name, ev, pid, pid0 = cap.name, cap.event, cap.watch_pid, cap.counter_pid
    assert vm.run("test -e /tmp/pattern.bad || echo intact").strip() == "intact"
    assert name.endswith("-warn") and ev["ok"], ev
    assert ev["event"]["trigger"].startswith("WARNING: CPU: ") and "lkdtm_WARNING" in ev["event"]["trigger"]
    assert ev["event"]["ended_by"] == "end trace"
    snap, exp = ev["snapshot"], ev["export"]
    folder = f"/var/crash/khibernate/{name}"
    assert int(vm.run(f"grep -c 'lkdtm_WARNING' {folder}/dmesg.txt")) >= 2  # the WARNING line and its stack
    assert vm.run(f"head -c 8 {folder}/vmcore").startswith("KDUMP")
    # on the host: the image's own kernel log holds the WARNING and its stack trace
    klog = image_log(vm, tmp_path, snap["slot"])
    warn_at = klog.index(ev["event"]["trigger"])
    trace = klog[warn_at:warn_at + 6000]
    assert "Call Trace:" in trace and "lkdtm_WARNING" in trace and "end trace" in trace, trace
    # drgn with the vmlinux on the kdump export of that slot
    out = tmp_path / "warn.kdump"
    store.export(str(vm.disk), snap["slot"], str(out), "kdump")
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    prog.load_debug_info([str(vm.kernel.vmlinux)])
    texts = [r.text.decode(errors="replace") for r in get_printk_records(prog)]
    assert any(t.startswith("WARNING: CPU: ") and "lkdtm_WARNING" in t for t in texts)
    tasks = {t.pid.value_(): t.comm.string_().decode() for t in for_each_task(prog)}
    assert tasks.get(pid0) == "sh" and pid in tasks, (pid0, pid, tasks)
    figures("WARNING", snap, f"; guest export: vmcore {exp['vmcore_bytes'] / 1e6:.1f} MB (kdump, zlib) + dmesg.txt "
                             f"in {exp['export_seconds']} s; drgn: {len(texts)} log records, {len(tasks)} tasks")


def test_oops_in_a_process_kills_it_and_the_rest_runs_on(guest, tmp_path) -> None:
    """EXCEPTION with panic_on_oops=0: one capture; the process that wrote it is dead, the counter counts on; the
    capture's kernel log shows the Oops."""
    vm = guest
    before = set(events(vm))
    cap = one_capture(vm, "--on oops,bug --min-interval 30 --max 1 --no-export", "/tmp/watch2.log",
                      f"sh -c 'sleep 1; echo EXCEPTION > {DIRECT}' >/dev/null 2>&1 </dev/null & echo $!", before)
    victim = int(cap.trigger_output.strip())
    state = vm.run(f"grep '^State:' /proc/{victim}/status 2>/dev/null || echo gone").strip()
    assert state == "gone" or "Z" in state, state  # killed by the Oops (a zombie until reaped)
    name, ev = cap.name, cap.event
    assert name.endswith("-oops") and ev["ok"] and "export" not in ev, ev
    trig = ev["event"]["trigger"]
    assert trig.startswith("BUG: kernel NULL pointer dereference"), trig
    klog = image_log(vm, tmp_path, ev["snapshot"]["slot"])
    at = klog.index(trig)
    assert re.search(r"Oops: .*\[#\d+\]", klog[at:]) and "lkdtm_EXCEPTION" in klog[at:at + 8000]
    figures("EXCEPTION Oops", ev["snapshot"])


def test_burst_of_warnings_is_rate_limited_and_max_is_respected(guest) -> None:
    """Three bursts of ten WARNINGs with --min-interval 20 --max 2: the first WARNING of burst 1 and of burst 2 are
    captured (the other nine of each are within the interval), the watcher stops at --max: burst 3 gets none."""
    from khibernate.store import api as store

    vm = guest
    before = set(events(vm))
    seq0 = max(s.seq for s in store.read(str(vm.disk)).slots)
    log_path = "/tmp/watch3.log"
    pid = start_watch(vm, "--on warn --min-interval 20 --max 2 --no-export", log_path)
    burst = f"for i in 1 2 3 4 5 6 7 8 9 10; do echo WARNING > {DIRECT}; done"
    vm.run(burst)
    wait_log(vm, log_path, "recorded in")
    wait_log(vm, log_path, "not captured (rate limit", 9, timeout=120)
    time.sleep(21)
    vm.run(burst)
    log = wait_log(vm, log_path, "stopped after 2 capture(s)")
    wait_exit(vm, pid)
    vm.run(burst)  # nobody watches now
    time.sleep(5)
    assert log.count("-> capture") == 2 and log.count("not captured (rate limit") == 9, log
    assert "--max 2 captures taken; stopping" in log
    new = events(vm, before)
    assert len(new) == 2 and all(e["ok"] and e["event"]["kind"] == "warn" for e in new.values())
    assert max(s.seq for s in store.read(str(vm.disk)).slots) == seq0 + 2
    for e in new.values():
        figures("burst", e["snapshot"])


def test_panic_on_warn_is_left_to_kdump_sharing_the_crash_region(guest) -> None:
    """panic_on_warn=1: `--on warn` refuses to start (nothing it could capture); with a kdump kernel loaded into the
    bottom 128 MiB of the crash region, `--on oops,warn` says at start that WARNINGs panic and are left to kdump, and
    captures an Oops with its capture kernel in the rest of the region; the kdump image survives that capture, and a
    WARNING then panics into it (no capture by the watcher). Runs last: the guest ends in the kdump kernel."""
    from vmtest import guest as guestinfo
    from vmtest.vm import BASE_APPEND

    vm = guest
    start, end = guestinfo.crash_region(vm.run("cat /proc/iomem"))
    mid = start + (128 << 20)
    vm.run("echo 1 > /proc/sys/kernel/panic_on_warn")
    st, out = vm.run_status(f"{WATCH} --on warn --max 1", timeout=180)
    assert st != 0 and "kernel.panic_on_warn=1" in out and "nothing for `watch` to capture" in out, out
    doctor = vm.run_status("khibernate doctor")[1]
    assert "kernel.panic_on_warn=1: WARNINGs panic this kernel" in doctor and "watch : possible" in doctor, doctor
    # kdump (kexec_load, so kexec-tools places it: --mem-max keeps every segment and, the kernel allocating them
    # from the region's start up, its control pages in the bottom part)
    vm.run(f"kexec -p -c --mem-max={mid - 1:#x} /boot/bzImage --initrd=/boot/initrd-nopy.img --append='{BASE_APPEND} "
           "khibernate.role=kdump-to-disk nr_cpus=1 reset_devices'", timeout=200)
    assert vm.run("cat /sys/kernel/kexec_crash_loaded").strip() == "1"
    st, out = vm.run_status(f"{WATCH} --on oops --max 1", timeout=180)  # the whole region would overwrite kdump
    assert st != 0 and "a kdump capture kernel is loaded" in out, out
    before = set(events(vm))
    log_path = "/tmp/watch4.log"
    pid = start_watch(vm, f"--on oops,warn --max 2 --min-interval 0 --no-export --mem-min={mid:#x} "
                      f"--mem-max={end:#x}", log_path)
    log = vm.run(f"cat {log_path}")
    assert "capturing on oops" in log and "capturing on oops,warn" not in log, log
    assert re.search(r"warn events panic this kernel \(kernel.panic_on_warn=1\).*not claimed.*kdump capture "
                     r"kernel loaded", log), log
    vm.run(f"sh -c 'sleep 1; echo EXCEPTION > {DIRECT}' >/dev/null 2>&1 </dev/null &")
    wait_log(vm, log_path, "recorded in")
    ((name, ev),) = events(vm, before).items()
    assert ev["ok"] and ev["event"]["kind"] == "oops", ev
    assert vm.run("cat /sys/kernel/kexec_crash_loaded").strip() == "1"
    assert vm.run_status(f"test -d /proc/{pid}")[0] == 0  # still watching (--max 2) when the WARNING comes
    figures("Oops, kdump loaded, 256 MiB window", ev["snapshot"])
    mark = vm.mark()
    vm.send(f"echo WARNING > {DIRECT}")
    vm.wait_for(r"Kernel panic - not syncing: kernel: panic_on_warn set", timeout=120)
    before_panic = vm.console_since(mark)
    vm.wait_for(r"Command line: .*elfcorehdr=", timeout=180)
    vm.wait_for(r"kdump-to-disk: copying /proc/vmcore \(\d+ bytes\)", timeout=300)
    assert "Freezing user space" not in before_panic.split("Kernel panic")[0]  # the watcher did not jump


def hung_task_refused_safely(vm) -> None:  # noqa: ANN001
    """LKDTM HUNG_TASK leaves a writer in D state for good (so: last in a guest). The watcher says at start that such
    a task blocks the freezer; the detector reports it; the one capture attempt is refused by the freezer before the
    jump: the event is recorded as failed, the capture image is unloaded, the reserved slot is
    marked bad, earlier images stay, and the workload's counter runs on."""
    vm.run("echo 2 > /proc/sys/kernel/hung_task_timeout_secs")
    before = set(events(vm))
    listing0 = vm.run("khibernate target list /dev/vda")
    pid = start_watch(vm, "--on hung-task --max 1", "/tmp/watch-hung.log")
    assert "D state" in vm.run("cat /tmp/watch-hung.log")
    pid0, n0 = counter(vm)
    vm.run(f"(echo HUNG_TASK > {DIRECT} &); sleep 0.2")
    log = wait_log(vm, "/tmp/watch-hung.log", "stopped after 1 capture(s)", timeout=300)
    wait_exit(vm, pid)
    assert "-> capture 1" in log and "capture failed" in log, log
    ((name, ev),) = events(vm, before).items()
    assert name.endswith("-hung-task") and not ev["ok"], ev
    assert ev["event"]["trigger"].startswith("INFO: task ") and "blocked for more than" in ev["event"]["trigger"]
    err = ev["error"]
    assert "jump did not happen" in err and "freezer" in err and "marked bad" in err, err
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"
    listing = vm.run("khibernate target list /dev/vda")
    assert "bad" in listing and listing.count("complete") == listing0.count("complete"), (listing0, listing)
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0
    print(f"\n[watch hung task] capture refused by the freezer: {ev['error']}")


def test_7_3_warning_capture_runs_on_and_a_hung_task_is_refused_safely(tmp_path) -> None:
    """The watcher on the 7.3 line (the kexec-jump rework of 6.14): echo WARNING > DIRECT gives one -d 31 capture,
    the same counter runs on after it, and the image's kernel log holds the WARNING with its stack trace; then a
    hung task's capture is refused by the freezer without harm (hung_task_refused_safely)."""
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    with VM(kernel=ensure_kernel("7.3"), append="crashkernel=256M", memory_mb=1024, extra_files=HELPERS,
            disk_mb=384, name="watch-7.3", timeout=300) as vm:
        prepare(vm)
        cap = one_capture(vm, "--on warn --max 1", "/tmp/watch73.log", f"echo WARNING > {DIRECT}")
        name, ev = cap.name, cap.event
        assert name.endswith("-warn") and ev["ok"] and "lkdtm_WARNING" in ev["event"]["trigger"], ev
        klog = image_log(vm, tmp_path, ev["snapshot"]["slot"])
        trace = klog[klog.index(ev["event"]["trigger"]):][:6000]
        assert "Call Trace:" in trace and "lkdtm_WARNING" in trace, trace
        assert vm.run("uname -r").strip().startswith("7.3")
        print(f"\n[watch 7.3 1 GiB WARNING] pause {ev['snapshot']['pause_seconds']:.2f} s, image "
              f"{ev['snapshot']['bytes'] / 1e6:.1f} MB at -d 31, save {ev['snapshot']['save_seconds']} s")
        hung_task_refused_safely(vm)
