"""`khibernate snapshot` in QEMU on the test kernel: the guest saves itself into a store on its disk and continues.

One booted guest (6.12, 1 GiB, crashkernel=256M) for the module: a refused snapshot (target too small: nothing
jumps, the first kernel is unchanged), then real snapshots; the host exports each image from the guest's disk
file and checks it against what the guest reported (pattern at its physical addresses, VMCOREINFO).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from vmtest.vm import TIMEOUT_SCALE

pytestmark = pytest.mark.vm

HERE = Path(__file__).parent
HELPERS = [(HERE / "snapshot_guest.py", "/usr/libexec/khibernate/snapshot_guest.py"),
           (HERE / "jump_guest_vmcoreinfo.py", "/usr/libexec/khibernate/vmcoreinfo.py")]
PATTERN_PAGES = 256
SNAP = "khibernate snapshot --target /dev/vda --kernel /boot/bzImage --capture-initrd /boot/initrd.img --json"
COUNTER = ("sh -c 'i=0; while :; do i=$((i+1)); echo \"$$ $i\" >/tmp/cnt.new; mv /tmp/cnt.new /tmp/cnt; sleep 1; done' "
           ">/dev/null 2>&1 </dev/null &")


def start_workload(vm) -> None:
    """The counter, the mlocked pattern process (until its first good check), 20 MiB of random data in /dev/shm."""
    vm.run(COUNTER)
    vm.run(f"python3 {HELPERS[0][1]} pattern {PATTERN_PAGES} >/dev/null 2>&1 </dev/null &")
    vm.run("dd if=/dev/urandom of=/dev/shm/blob bs=1M count=20 2>/dev/null; sha256sum /dev/shm/blob > /tmp/blob.sha")
    for _ in range(60):
        if vm.run_status("test -s /tmp/pattern.ok")[0] == 0:
            break
        time.sleep(1)


@pytest.fixture(scope="module")
def guest(module_tmp: Path):
    from tests.tiers import debian_vmlinuz
    from vmtest.diskfile import blank
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    kernel = ensure_kernel()
    # Debian's kernel has no CONFIG_KEXEC_JUMP: a capture kernel that must be refused before anything is reserved
    files = [*HELPERS, (debian_vmlinuz(), "/boot/debian-vmlinuz")]
    sealed = blank(module_tmp / "sealed-store.img", 640)  # /dev/vdb: the sealed store's disk
    with VM(kernel=kernel, append="crashkernel=256M", memory_mb=1024, extra_files=files, disk_mb=640,
            disks=[sealed], name="snapshot-6.12", timeout=300) as vm:
        vm.run("dd if=/dev/zero of=/dev/vda bs=1M count=2 2>/dev/null; sync")
        start_workload(vm)
        yield vm


def counter(vm) -> tuple[int, int]:
    pid, n = vm.run("cat /tmp/cnt").split()
    return int(pid), int(n)


def test_refused_before_any_jump(guest) -> None:
    """Missing target, no store, and a store too small: non-zero exit with the reason, no jump, nothing changed."""
    vm = guest
    boot = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
    mark = vm.mark()
    st, out = vm.run_status(SNAP.replace("/dev/vda", "/dev/nonexistent"), timeout=120)
    assert st != 0 and "does not exist" in out, out
    st, out = vm.run_status(SNAP, timeout=120)
    assert st != 0 and "target init" in out, out  # no store yet
    # a store whose slots are far smaller than this kernel's kept RAM (partition-sized file on tmpfs)
    vm.run("dd if=/dev/zero of=/tmp/small.img bs=1M count=20 2>/dev/null && khibernate target init /tmp/small.img")
    st, out = vm.run_status(SNAP.replace("/dev/vda", "/tmp/small.img"), timeout=120)
    assert st != 0 and "bigger target" in out, out
    # a capture kernel that cannot jump back (Debian's: no KEXEC_JUMP, no embedded config, not this build) is refused
    # before a slot is reserved or anything frozen (before, it was booted and the first kernel stayed frozen)
    vm.run("khibernate target init /dev/vda")
    t0 = time.monotonic()
    st, out = vm.run_status(SNAP.replace("/boot/bzImage", "/boot/debian-vmlinuz"), timeout=600)
    assert st != 0 and "capture kernel /boot/debian-vmlinuz: nothing proves that it can jump back" in out, out
    print(f"\n[snapshot] Debian's kernel refused (its xz payload read in the guest) in {time.monotonic() - t0:.1f} s")
    assert vm.run("khibernate target list /dev/vda").count(": free") == 2  # no slot reserved
    vm.run("dd if=/dev/zero of=/dev/vda bs=1M count=2 2>/dev/null; sync")  # no store again, as the next test expects
    assert "Freezing user space" not in vm.console_since(mark)
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"
    assert vm.run("cat /proc/sys/kernel/random/boot_id").strip() == boot
    assert "free" in vm.run("khibernate target list /tmp/small.img")


def _snapshot(vm, report: dict, command: str = SNAP) -> dict:
    pid0, n0 = counter(vm)
    t0 = time.monotonic()
    st, out = vm.run_status(command, timeout=900)
    wall = time.monotonic() - t0
    assert st == 0, out
    r = json.loads(out[out.index("{\n"):])  # after the JSON lines of --json's messages
    r["wall_seconds"] = round(wall, 1)
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0, (n0, n1)  # the same counter process counts on
    assert vm.run("test -e /tmp/pattern.bad || echo intact").strip() == "intact"
    assert vm.run("sha256sum -c /tmp/blob.sha").strip().endswith("OK")
    report.setdefault("runs", []).append(r)
    return r


def _check_image(vm, tmp_path: Path, r: dict, addrs: list[int], vmci_a: str, marker: str, disk: Path | None = None,
                 key: object = None) -> dict:
    """The slot's image on the host (of ``disk``, sealed with ``key`` if given): verifies, holds the pattern,
    VMCOREINFO, the log up to the jump, our note."""
    from khibernate.image.dmesg import kernel_log
    from khibernate.image.sources.khi import KhiSource
    from khibernate.image.vmcoreinfo import from_source
    from khibernate.store import api as store

    out = tmp_path / f"slot{r['slot']}-{r['seq']}.khi"
    assert store.export(str(disk or vm.disk), r["slot"], str(out)) == r["bytes"]
    src = KhiSource(out, key=key, slot=r["slot"] if key is not None else None)  # type: ignore[arg-type]
    try:
        counts = src.verify()
        assert counts["pages_stored"] == r["pages_stored"]
        assert src.header.dump_level == 17 and src.header.flags & 1  # restorable
        for i, pa in enumerate(addrs):
            unit = f"KHB-PATTERN-{i:06d}-".encode()
            assert src.read(pa, 4096) == (unit * 300)[:4096], f"pattern page {i} at {pa:#x}"
        img = dict(line.split("=", 1) for line in (src.vmcoreinfo_text or "").splitlines() if "=" in line)
        a = dict(line.split("=", 1) for line in vmci_a.splitlines() if "=" in line)
        for key in ("OSRELEASE", "BUILD-ID", "PAGESIZE", "SYMBOL(swapper_pg_dir)", "SYMBOL(_stext)",
                    "NUMBER(phys_base)"):
            if key in a:
                assert img.get(key) == a[key], key
        log = kernel_log(src, from_source(src))
        assert marker in log, f"{marker} not in the image's kernel log (its tail: {log[-2000:]})"
        note = next(n for n in src.notes if n.name == "KHIBERNATE")
        meta = json.loads(note.desc)
        assert meta["boot_id"] == vm.run("cat /proc/sys/kernel/random/boot_id").strip()
        assert meta["jump_back_entry"] and meta["restorable"] is True
        return {"verified_pages": counts["pages_stored"], "osrelease": img.get("OSRELEASE")}
    finally:
        src.close()


def _drgn_lists_the_workload(vm, tmp_path: Path, r: dict) -> None:
    """drgn with the test kernel's vmlinux on the last slot's kdump export lists the guest's workload processes."""
    import drgn
    from drgn.helpers.linux.pid import for_each_task

    from khibernate.store import api as store

    counter_pid, _ = counter(vm)
    pattern_pid = int(vm.run("for p in /proc/[0-9]*; do grep -q snapshot_guest $p/cmdline 2>/dev/null && "
                             "echo ${p#/proc/}; done; true").split()[0])
    out = tmp_path / "last.kdump"
    store.export(str(vm.disk), r["slot"], str(out), "kdump")
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    prog.load_debug_info([str(vm.kernel.vmlinux)])
    tasks = {t.pid.value_(): t.comm.string_().decode() for t in for_each_task(prog)}
    assert tasks.get(counter_pid) == "sh", (counter_pid, tasks)
    assert tasks.get(pattern_pid) == "python3", (pattern_pid, tasks)
    assert tasks.get(1) == "init" or 1 in tasks


def test_snapshots_continue_and_images_hold_the_guest(guest, tmp_path) -> None:
    """A read-only target refused; then three snapshots in a row: each exits 0, the guest runs on; each image
    verifies on the host and holds the log up to the jump; drgn lists the workload's processes in the last one."""
    vm = guest
    vm.run("khibernate target init /dev/vda --slots 2")
    # a read-only target is refused before anything is frozen, loaded or written
    vm.run("busybox blockdev --setro /dev/vda")
    mark = vm.mark()
    st, out = vm.run_status(SNAP, timeout=120)
    vm.run("busybox blockdev --setrw /dev/vda")
    assert st != 0 and "read-only" in out, out
    assert "Freezing user space" not in vm.console_since(mark)
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"
    addrs = json.loads(vm.run("cat /tmp/pattern.json"))
    assert len(addrs) == PATTERN_PAGES and all(addrs)
    vmci_a = vm.run("python3 /usr/libexec/khibernate/vmcoreinfo.py kcore")
    report: dict = {}
    slots_seen = []
    for i in range(3):
        marker = f"KHB-SNAPSHOT-MARK-{i}-{time.time_ns()}"
        vm.run(f"echo {marker} > /dev/kmsg")  # the image's kernel log must hold the log up to the jump
        r = _snapshot(vm, report)
        slots_seen.append(r["slot"])
        # pagemap again: the pattern pages are mlocked and must not have moved
        assert json.loads(vm.run("cat /tmp/pattern.json")) == addrs
        r["check"] = _check_image(vm, tmp_path, r, addrs, vmci_a, marker)
        listing = vm.run("khibernate target list /dev/vda")
        assert re.search(rf"slot {r['slot']}: complete\s+#{r['seq']}", listing), listing
    assert slots_seen == [0, 1, 0]  # the newest good image is never the one overwritten
    _drgn_lists_the_workload(vm, tmp_path, report["runs"][-1])
    for r in report["runs"]:
        print(f"\n[snapshot 6.12 1 GiB] slot {r['slot']} #{r['seq']}: pause {r['pause_seconds']:.2f} s, "
              f"image {r['bytes'] / 1e6:.1f} MB ({r['pages_stored']} of {r['pages_ram']} pages), save "
              f"{r['save_seconds']} s, capture job started at uptime {r['capture_job_started_uptime']} s, "
              f"capture peak used {r['capture_peak_used_bytes'] / 2**20:.1f} MiB (MemAvailable at start "
              f"{r['capture_mem_available_start'] / 2**20:.0f} MiB, ru_maxrss {r['capture_peak_rss_kib']} KiB), "
              f"initramfs {r['capture_initrd_bytes'] / 2**20:.1f} MiB, command {r['wall_seconds']} s")


def test_failing_capture_job_jumps_back_and_keeps_the_last_good_image(guest, tmp_path) -> None:
    """The capture job fails (--deadline 1, and /init made to start it only after the watchdog fired at deadline +
    20 s — a boot slower than the deadline): the watchdog's answer comes back, the capture kernel jumps back,
    snapshot exits non-zero with the reason, the slot it used is marked bad, and the newest good image verifies."""
    from khibernate.store import api as store
    from khibernate.store.superblock import SlotState

    vm = guest
    before = store.read(str(vm.disk))
    good = max((s for s in before.slots if s.state == SlotState.COMPLETE), key=lambda s: s.seq)
    pid0, n0 = counter(vm)
    # khibernate.fault=late-start: /init starts the job only after the watchdog fired, as on a boot slower than
    # the deadline (seen under load: the job then found the watchdog's answer where its request was and wrote its
    # own error over it); the watchdog's answer must be the one that comes back
    st, out = vm.run_status(SNAP + " --deadline 1 --append khibernate.fault=late-start", timeout=900)
    assert st != 0 and "had not started" in out and "watchdog answered" in out and "marked bad" in out, out
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0
    assert vm.run("test -e /tmp/pattern.bad || echo intact").strip() == "intact"
    after = store.read(str(vm.disk))
    assert after.slot(good.index) == good
    assert [s.state for s in after.slots if s.index != good.index] == [SlotState.BAD]
    assert store.verify_slot(str(vm.disk), good.index).pages_stored == good.pages_stored


@pytest.mark.parametrize("fault,deadline,expect", [("raise", 600, "raised on purpose"),
                                                    ("hang", 60, "killed by the watchdog")])
def test_raising_or_hung_capture_job_jumps_back(guest, fault: str, deadline: int, expect: str) -> None:
    """The capture job raises (an unexpected exception), or hangs until /init's watchdog kills it at deadline + 20 s:
    either way the capture kernel jumps back, snapshot says why, the slot is bad, and the newest good image verifies."""
    from khibernate.store import api as store
    from khibernate.store.superblock import SlotState

    vm = guest
    before = store.read(str(vm.disk))
    good = max((s for s in before.slots if s.state == SlotState.COMPLETE), key=lambda s: s.seq)
    pid0, n0 = counter(vm)
    st, out = vm.run_status(SNAP + f" --deadline {deadline} --append khibernate.fault={fault}", timeout=900)
    assert st != 0 and expect in out and "marked bad" in out, out
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0
    after = store.read(str(vm.disk))
    assert after.slot(good.index) == good
    assert store.verify_slot(str(vm.disk), good.index).pages_stored == good.pages_stored


def test_hibernate_that_comes_back_leaves_no_resumable_image(guest) -> None:
    """A hibernation whose capture kernel completed the image and then did not power off (khibernate.fault=
    poweroff-fails): the capture kernel marks the slot bad before it jumps back, the first kernel says so and
    exits 1, runs on, and no resume would take the image."""
    from khibernate.store import api as store
    from khibernate.store.superblock import FLAG_HIBERNATE, SlotState

    vm = guest
    before = store.read(str(vm.disk))
    good = max((s for s in before.slots if s.state == SlotState.COMPLETE), key=lambda s: s.seq)
    pid0, n0 = counter(vm)
    mark = vm.mark()
    st, out = vm.run_status("khibernate hibernate --target /dev/vda --kernel /boot/bzImage --capture-initrd "
                            "/boot/initrd.img --append khibernate.fault=poweroff-fails", timeout=900)
    assert st == 1 and "not powering off, on purpose" in out and "is marked bad" in out, out
    console = vm.console_since(mark)
    assert "hibernation image complete in slot" in console and "no resumable image is left behind" in console
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0
    after = store.read(str(vm.disk))
    assert after.slot(good.index) == good
    (used,) = [s for s in after.slots if s.index != good.index]
    assert used.state == SlotState.BAD and not used.flags & FLAG_HIBERNATE
    st, out = vm.run_status("khibernate resume --check --target /dev/vda")
    assert st == 3 and "no hibernation image" in out, out


def _holds(src, needles: list[bytes]) -> list[bytes]:
    """Which of ``needles`` occur anywhere in the image's memory (read in 16 MiB windows that overlap)."""
    found: set[bytes] = set()
    step = 16 << 20
    for r in src.ranges:
        for start in range(r.start, r.end, step):
            data = src.read_filled(start, min(step + 64, r.end - start))
            found.update(n for n in needles if n in data)
    return sorted(found)


def test_snapshot_into_a_sealed_store(guest, tmp_path) -> None:
    """A store made with a key file (/dev/vdb): a snapshot without the key is refused before anything runs; with it
    the capture kernel seals the image with the key of that one image, handed through the mailbox page.  On the
    host the slot opens only with the key, verifies and holds the pattern; its file holds no pattern in clear; and
    the store key itself appears nowhere in the memory the image holds (it was unwrapped in a child process that
    had exited before the jump, whose pages were free and dropped at -d 17).  The key file's own bytes are in the
    image here: this guest's root is a ramfs, so the file is memory (docs/sealed.md: keep key files on a disk)."""
    from khibernate.image.sources.khi import KhiSource
    from khibernate.seal.errors import KeyRequiredError
    from khibernate.seal.keysource import KeyFile

    vm = guest
    vm.run("head -c 32 /dev/urandom > /tmp/store.key && chmod 600 /tmp/store.key")
    store_key_file = bytes.fromhex(vm.run("python3 -c \"print(open('/tmp/store.key', 'rb').read().hex())\"").strip())
    vm.run("khibernate target init /dev/vdb --slots 2 --key-file /tmp/store.key")
    sealed_snap = SNAP.replace("/dev/vda", "/dev/vdb")
    mark = vm.mark()
    st, out = vm.run_status(sealed_snap, timeout=120)
    assert st != 0 and "give its key" in out, out
    assert "Freezing user space" not in vm.console_since(mark)
    addrs = json.loads(vm.run("cat /tmp/pattern.json"))
    vmci_a = vm.run("python3 /usr/libexec/khibernate/vmcoreinfo.py kcore")
    marker = f"KHB-SNAPSHOT-SEALED-{time.time_ns()}"
    vm.run(f"echo {marker} > /dev/kmsg")
    r = _snapshot(vm, {}, sealed_snap + " --key-file /tmp/store.key")
    host_key = tmp_path / "store.key"
    host_key.write_bytes(store_key_file)
    host_key.chmod(0o600)
    disk = vm.disks[0]
    check = _check_image(vm, tmp_path, r, addrs, vmci_a, marker, disk=disk, key=KeyFile(host_key))
    out_file = tmp_path / f"slot{r['slot']}-{r['seq']}.khi"
    with pytest.raises(KeyRequiredError):
        KhiSource(out_file)
    assert b"KHB-PATTERN-000000-" not in out_file.read_bytes()
    from khibernate.seal.sealing import unseal

    with KhiSource(out_file, key=KeyFile(host_key), slot=r["slot"]) as src:
        assert src.header.seal is not None
        store_key = unseal(src.header.seal.keyring, src.header.seal.key_id, KeyFile(host_key), "the image")
        assert src.header.uuid.hex() == json.loads(next(n for n in src.notes if n.name == "KHIBERNATE").desc)[
            "image"].replace("-", "")
        assert _holds(src, [store_key, store_key.hex().encode()]) == []
    print(f"\n[snapshot sealed 6.12 1 GiB] pause {r['pause_seconds']:.2f} s, image {r['bytes'] / 1e6:.1f} MB, save "
          f"{r['save_seconds']} s ({check['verified_pages']} pages verified with the key)")


def test_qemu_killed_during_the_save_leaves_the_last_good_image(guest) -> None:
    """QEMU killed while the capture kernel writes: the disk's store still lists the newest good image complete
    (and it verifies), the interrupted slot as `writing`, i.e. incomplete. Runs last on the shared guest."""
    from khibernate.store import api as store
    from khibernate.store.superblock import SlotState

    vm = guest
    before = store.read(str(vm.disk))
    good = max((s for s in before.slots if s.state == SlotState.COMPLETE), key=lambda s: s.seq)
    vm.mark()
    vm.send(SNAP)
    vm.wait_for(r"khibernate-capture: \d+ MiB of memory read, [1-9]\d* MiB written", timeout=600)
    vm.close()  # kills QEMU: the power cut, in the middle of the save
    after = store.read(str(vm.disk))
    assert after.slot(good.index) == good
    cut = next(s for s in after.slots if s.index != good.index)
    assert cut.state == SlotState.WRITING and cut.seq > good.seq
    assert store.verify_slot(str(vm.disk), good.index).pages_stored == good.pages_stored


def test_capture_kernel_panic_resets_the_machine_and_synced_data_survives(tmp_path) -> None:
    """A capture kernel that panics before its job starts (khibernate.fault=panic-early: /init exits) resets the
    machine after panic=10 s — QEMU (-no-reboot) exits — instead of leaving the first kernel frozen forever; the
    first kernel cannot run on (only the capture kernel could jump back).  A file written just before the snapshot,
    without sync, is on the ext4 disk: snapshot syncs before every jump."""
    from khibernate.store import api as store
    from khibernate.store.superblock import SlotState
    from tests.vm.test_hibernate import _ext4
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    ext4 = _ext4(tmp_path / "ext4.img")
    with VM(kernel=ensure_kernel(), append="crashkernel=256M", memory_mb=1024, disk_mb=640, disks=[ext4],
            name="snapshot-panic-early", timeout=300) as vm:
        vm.run("khibernate target init /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vdb /mnt && "
               "echo dirty-before-the-jump > /mnt/dirty")  # no sync: page cache only
        mark = vm.mark()
        vm.send(SNAP + " --append khibernate.fault=panic-early")
        vm.wait_for(r"Kernel panic - not syncing", timeout=600)
        t_panic = time.monotonic()
        assert vm.wait_exit(timeout=120 * TIMEOUT_SCALE) == 0  # the reset: QEMU runs with -no-reboot
        reset_after = time.monotonic() - t_panic
        console = vm.console_since(mark)
    assert "khibernate.fault=panic-early" in console and "Rebooting in 10 seconds" in console, console[-3000:]
    print(f"\n[snapshot] capture kernel panic -> machine reset after {reset_after:.1f} s")
    fsck = subprocess.run(["e2fsck", "-fy", str(ext4)], capture_output=True, text=True)  # replays the journal
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /dirty", str(ext4)], capture_output=True, text=True)
    assert cat.stdout.strip() == "dirty-before-the-jump", cat.stdout + cat.stderr
    slots = store.read(str(vm.disk)).slots
    assert [s.state for s in slots].count(SlotState.WRITING) == 1  # reserved, never completed: reused next time


def test_snapshot_on_7_3_with_two_cpus(tmp_path) -> None:
    """The other kernel line, SMP and 2 GiB in one guest: one snapshot, both CPUs back online, the image holds the
    pattern (the capture job's peak memory while saving 2 GiB is printed); then swsusp of the same guest."""
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    with VM(kernel=ensure_kernel("7.3"), append="crashkernel=256M", memory_mb=2048, smp=2, extra_files=HELPERS,
            disk_mb=640, name="snapshot-7.3-smp2", timeout=300) as vm:
        assert vm.run("cat /sys/devices/system/cpu/online").strip() == "0-1"
        start_workload(vm)
        vm.run("khibernate target init /dev/vda")
        addrs = json.loads(vm.run("cat /tmp/pattern.json"))
        vmci_a = vm.run("python3 /usr/libexec/khibernate/vmcoreinfo.py kcore")
        report: dict = {}
        marker = f"KHB-SNAPSHOT-MARK-7.3-{time.time_ns()}"
        vm.run(f"echo {marker} > /dev/kmsg")
        r = _snapshot(vm, report)
        assert vm.run("cat /sys/devices/system/cpu/online").strip() == "0-1"
        check = _check_image(vm, tmp_path, r, addrs, vmci_a, marker)
        assert check["osrelease"].startswith("7.3")
        print(f"\n[snapshot 7.3 2 GiB 2 CPUs] pause {r['pause_seconds']:.2f} s, image {r['bytes'] / 1e6:.1f} MB, "
              f"save {r['save_seconds']} s, capture peak used {r['capture_peak_used_bytes'] / 2**20:.1f} MiB")
        # For scale, the peer: in-kernel hibernation (swsusp, LZO) of the same guest to a swap device on the same
        # disk, from the command to QEMU's exit (freeze + snapshot + write + ACPI S4 power-off).
        vm.run("mkswap /dev/vda >/dev/null && swapon /dev/vda")
        mark = vm.mark()
        t0 = time.monotonic()
        vm.send("echo disk > /sys/power/state")
        assert vm.wait_exit(timeout=600 * TIMEOUT_SCALE) == 0
        hib = time.monotonic() - t0
        with open(vm.disk, "rb") as disk:  # swsusp's signature replaces SWAPSPACE2 once the image is written
            assert disk.read(4096)[4086:4095] == b"S1SUSPEND"
        wrote = re.search(r"Wrote (\d+) kbytes in ([\d.]+) seconds", vm.console_since(mark))
        detail = (f", snapshot of {int(wrote.group(1)) / 1e3:.1f} MB written in {wrote.group(2)} s"
                  if wrote else " (its 'Wrote' line did not reach the console)")
        print(f"[swsusp 7.3 2 GiB 2 CPUs, same guest, LZO] echo disk -> QEMU exit {hib:.1f} s{detail}; "
              f"khibernate snapshot pause {r['pause_seconds']:.1f} s for {r['bytes'] / 1e6:.1f} MB (zstd, -d 17)")
