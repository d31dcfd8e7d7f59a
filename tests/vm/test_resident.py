"""A resident capture kernel in QEMU (issue 22): `arm` boots it once, pauses jump into it, `disarm` unloads it.

One booted guest (6.12, 1 GiB, 1 CPU, crashkernel=256M) running test_snapshot's workload plus test_hibernate's ext4
disk, in this order: arm + disarm; arm, then a store re-initialised under the armed capture kernel — it refuses and
the snapshot falls back to a fresh capture kernel; arm, three snapshots through the resident capture kernel, each
image exported on the host and checked as test_snapshot checks its images (verifies, pattern pages at their physical
addresses, VMCOREINFO, the log up to the jump, the KHIBERNATE note) and holding the first kernel's control page as
the first kernel saved it at *that* jump — the page the capture kernel's own jump-back image swapped
(docs/resident.md): /proc/vmcore shows a stale copy in a re-entered capture kernel; a 4th pause whose job hangs is
killed by the resident kernel's watchdog; `watch` captures an Oops through the same resident capture kernel (its
5th pause); then a hibernation through it (its 6th) → QEMU
powers off → a new QEMU resumes: test_hibernate's checks (same boot_id, the counter counts on, pattern and data
intact, ext4 clean after shutdown).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.vm.test_hibernate import HIB, STORE_MB, _ext4, resume_and_check
from tests.vm.test_snapshot import HELPERS, SNAP, _check_image, counter, start_workload
from vmtest.vm import TIMEOUT_SCALE

pytestmark = pytest.mark.vm

ARM = "khibernate arm --target /dev/vda --kernel /boot/bzImage --capture-initrd /boot/initrd.img"
READ_PHYS = ("python3 -c 'import sys; from khibernate.image.sources.frozen import Kcore; "
             "print(Kcore().read_phys(int(sys.argv[1], 0), 4096).hex())' ")
STACK_TAIL = 0xF00  # relocate_kernel's stack: the end of its control page
# (kernel line, CPUs, MiB): CI runs 6.12 with 1 CPU; docs/resident.md's 7.3 run is this module with ("7.3", 2, 2048)
GUEST = ("6.12", 1, 1024)
TAG = f"[resident {GUEST[0]} {GUEST[2] // 1024} GiB {GUEST[1]} CPU]"


@pytest.fixture(scope="module")
def guest(module_tmp):
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    kernel = ensure_kernel(GUEST[0])
    ext4 = _ext4(module_tmp / "resident-ext4.img")
    with VM(kernel=kernel, append="crashkernel=256M", memory_mb=GUEST[2], smp=GUEST[1], extra_files=HELPERS,
            disk_mb=STORE_MB, disks=[ext4], name=f"resident-{GUEST[0]}", timeout=300) as vm:
        vm.run("dd if=/dev/zero of=/dev/vda bs=1M count=2 2>/dev/null; sync")
        start_workload(vm)
        vm.run("mkdir -p /mnt && mount -t ext4 /dev/vdb /mnt && cp /tmp/blob.sha /mnt/blob.sha")
        vm.kernel_build = kernel
        vm.ext4 = ext4
        yield vm


def _snapshot_json(vm, said: list[str] | None = None) -> dict:
    pid0, n0 = counter(vm)
    t0 = time.monotonic()
    st, out = vm.run_status(SNAP, timeout=900)
    assert st == 0, out
    r = json.loads(out[out.index("{\n"):])
    r["wall_seconds"] = round(time.monotonic() - t0, 1)
    if said is not None:
        said.append(out)
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0, (n0, n1)
    assert vm.run("test -e /tmp/pattern.bad || echo intact").strip() == "intact"
    assert vm.run("sha256sum -c /tmp/blob.sha").strip().endswith("OK")
    return r


def _control_page_words(vm, tmp_path: Path, r: dict) -> tuple[int, list[tuple[int, int, int]]]:
    """The first kernel's control page: its address and the 8-byte words where the image's copy differs from the
    page as the first kernel holds it now (offset, image, live)."""
    from khibernate.image.sources.khi import KhiSource

    src = KhiSource(tmp_path / f"slot{r['slot']}-{r['seq']}.khi")
    try:
        note = json.loads(next(n for n in src.notes if n.name == "KHIBERNATE").desc)
        page = note["jump_back_entry"] & ~0xFFF
        in_image = src.read(page, 4096)
    finally:
        src.close()
    live = bytes.fromhex(vm.run(READ_PHYS + hex(page)).strip())
    return page, [(o, int.from_bytes(in_image[o:o + 8], "little"), int.from_bytes(live[o:o + 8], "little"))
                  for o in range(0, 4096, 8) if in_image[o:o + 8] != live[o:o + 8]]


def _mem_available(vm) -> int:
    return int(vm.run("grep MemAvailable /proc/meminfo").split()[1]) * 1024


def _image_page(tmp_path: Path, r: dict, page: int) -> bytes:
    from khibernate.image.sources.khi import KhiSource

    with KhiSource(tmp_path / f"slot{r['slot']}-{r['seq']}.khi") as src:
        return src.read(page, 4096)


def test_arm_disarm(guest) -> None:
    vm = guest
    vm.run("khibernate target init /dev/vda --slots 2")
    st, out = vm.run_status(ARM, timeout=900)
    assert st == 0 and "resident capture kernel armed" in out, out
    st, out = vm.run_status(ARM, timeout=120)
    assert st != 0 and "armed already" in out, out
    st, out = vm.run_status("khibernate disarm", timeout=120)
    assert st == 0 and "unloaded" in out, out
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"
    assert "resident capture kernel armed" not in vm.run("khibernate doctor 2>&1; true")


def test_a_store_changed_under_it_is_refused_and_a_fresh_kernel_captures(guest, tmp_path) -> None:
    vm = guest
    st, out = vm.run_status(ARM, timeout=900)
    assert st == 0, out
    vm.run("khibernate target init /dev/vda --slots 2 --force")  # a new store UUID under the armed capture kernel
    said: list[str] = []
    r = _snapshot_json(vm, said)
    assert r["capture_kernel"] == "fresh", r
    assert "the resident capture kernel refuses this pause" in said[0] and "armed for" in said[0], said[0]
    assert "loading a fresh capture kernel" in said[0], said[0]
    print(f"\n{TAG} refused, then a fresh capture kernel: pause {r['pause_seconds']:.2f} s (its own "
          f"round trip; the refused jump before it is not counted), save {r['save_seconds']} s, image "
          f"{r['bytes'] / 1e6:.1f} MB, command {r['wall_seconds']} s")
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"  # disarmed, the fresh one unloaded after use
    assert "resident capture kernel armed" not in vm.run("khibernate doctor 2>&1; true")


def test_arm_three_snapshots_through_it(guest, tmp_path) -> None:
    vm = guest
    vm.run("khibernate target init /dev/vda --slots 2 --force")
    boot = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
    mem0 = _mem_available(vm)
    t0 = time.monotonic()
    st, out = vm.run_status(ARM, timeout=900)
    arm_wall = time.monotonic() - t0
    assert st == 0 and "resident capture kernel armed" in out, out
    pinned = mem0 - _mem_available(vm)
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "1"
    assert "resident capture kernel armed" in vm.run("khibernate doctor 2>&1; true")
    entry = int(re.findall(r"kexec_jump_back_entry=(0x[0-9a-f]+)", vm.serial_log.read_text(errors="replace"))[-1], 16)
    after_arm = bytes.fromhex(vm.run(READ_PHYS + hex(entry & ~0xFFF)).strip())  # what a stale copy would hold
    addrs = json.loads(vm.run("cat /tmp/pattern.json"))
    vmci_a = vm.run("python3 /usr/libexec/khibernate/vmcoreinfo.py kcore")
    runs = []
    for i in range(3):
        marker = f"KHB-RESIDENT-MARK-{i}-{time.time_ns()}"
        vm.run(f"echo {marker} > /dev/kmsg")
        mark = vm.serial_log.stat().st_size
        r = _snapshot_json(vm)
        assert r["capture_kernel"] == "resident", r
        with open(vm.serial_log, "rb") as f:
            f.seek(mark)
            console = f.read().decode(errors="replace")
        assert f"resident: pause #{i + 1}" in console, console[-3000:]
        assert "Linux version" not in console  # no capture kernel booted in this pause
        assert json.loads(vm.run("cat /tmp/pattern.json")) == addrs
        r["check"] = _check_image(vm, tmp_path, r, addrs, vmci_a, marker)
        # the image holds what this kernel saved at *this* jump (its registers in the page's data area); only the
        # stack at the page's end, which relocate_kernel's return path wrote after the save, may differ
        page, diff = _control_page_words(vm, tmp_path, r)
        assert all(o >= STACK_TAIL for o, _, _ in diff), [(hex(o), hex(a), hex(b)) for o, a, b in diff]
        image_page = _image_page(tmp_path, r, page)
        stale = [o for o in range(0, STACK_TAIL, 8) if image_page[o:o + 8] != after_arm[o:o + 8]]
        assert stale, "the snapshot's control page equals the one after arm: the test could not tell a stale copy"
        r["control_page"] = f"{page:#x}: image = live but {[hex(o) for o, _, _ in diff]}, != after arm at " \
                            f"{[hex(o) for o in stale]}"
        listing = vm.run("khibernate target list /dev/vda")
        assert re.search(rf"slot {r['slot']}: complete\s+#{r['seq']}", listing), listing
        runs.append(r)
    assert [r["slot"] for r in runs] == [0, 1, 0]
    assert "3 pause(s)" in vm.run("khibernate doctor 2>&1; true")
    # a pause whose job hangs (khibernate.fault=hang, carried in the pause's request): the resident kernel's own
    # watchdog kills the job at its deadline + 20 s and answers; the slot is bad, the kernel stays armed
    st, out = vm.run_status(SNAP + " --deadline 5 --append khibernate.fault=hang", timeout=900)
    assert st != 0 and "killed by the watchdog" in out and "after the pause began" in out, out
    assert "marked bad" in out, out
    assert "4 pause(s)" in vm.run("khibernate doctor 2>&1; true")
    assert vm.run("cat /proc/sys/kernel/random/boot_id").strip() == boot
    print(f"\n{TAG} arm {arm_wall:.1f} s (command); MemAvailable drop while armed "
          f"{pinned / 2**20:.1f} MiB (the loaded image's pages in this kernel)")
    for r in runs:
        print(f"{TAG} slot {r['slot']} #{r['seq']}: pause {r['pause_seconds']:.2f} s, image "
              f"{r['bytes'] / 1e6:.1f} MB, save {r['save_seconds']} s, capture peak used "
              f"{r['capture_peak_used_bytes'] / 2**20:.1f} MiB, command {r['wall_seconds']} s, control page "
              f"{r['control_page']}")


def test_watch_captures_an_oops_through_it_and_runs_on(guest, tmp_path) -> None:
    """`watch` with the resident capture kernel armed: an Oops (LKDTM EXCEPTION, panic_on_oops=0) is captured in
    the resident kernel's 5th pause, the guest runs on, the image's kernel log holds the Oops."""
    from tests.vm.test_watch import DIRECT, image_log, one_capture

    vm = guest
    vm.run("mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug")
    assert vm.run_status(f"test -w {DIRECT}")[0] == 0, "no LKDTM in the test kernel (CONFIG_LKDTM, DEBUG_FS)"
    vm.run("echo 0 > /proc/sys/kernel/panic_on_oops; echo 0 > /proc/sys/kernel/panic_on_warn")
    cap = one_capture(vm, "--on oops,bug --min-interval 30 --max 1 --no-export", "/tmp/watch-resident.log",
                      f"sh -c 'sleep 1; echo EXCEPTION > {DIRECT}' >/dev/null 2>&1 </dev/null &")
    name, ev = cap.name, cap.event
    assert name.endswith("-oops") and ev["ok"] and ev["snapshot"]["capture_kernel"] == "resident", ev
    trig = ev["event"]["trigger"]
    assert trig.startswith("BUG: kernel NULL pointer dereference"), trig
    klog = image_log(vm, tmp_path, ev["snapshot"]["slot"])
    assert "lkdtm_EXCEPTION" in klog[klog.index(trig):][:8000]
    assert "5 pause(s)" in vm.run("khibernate doctor 2>&1; true")
    print(f"{TAG} watch: Oops captured through the resident capture kernel, pause "
          f"{ev['snapshot']['pause_seconds']:.2f} s, -d 31 image {ev['snapshot']['bytes'] / 1e6:.1f} MB")


def test_hibernate_through_it_after_three_snapshots_resumes(guest) -> None:
    """The 6th pause of the same resident capture kernel is a hibernation: QEMU powers off, a new QEMU resumes the
    image and the original kernel runs on (test_hibernate's checks and clean ext4)."""
    from khibernate.store import api as store
    from khibernate.store.superblock import FLAG_HIBERNATE

    vm = guest
    assert "5 pause(s)" in vm.run("khibernate doctor 2>&1; true")  # the kernel the captures went through
    vm.run("echo written-just-before-hibernate > /mnt/before")  # no sync: hibernate syncs first
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
    pid, n = counter(vm)
    t0 = time.monotonic()
    cid = vm.send(HIB)
    assert vm.wait_exit(timeout=900 * TIMEOUT_SCALE) == 0, "the capture kernel should power the machine off"
    hib_s = time.monotonic() - t0
    said = vm.agent_log.read_text(errors="replace")
    assert "jumping into the resident capture kernel" in said, said[-2000:]
    assert "hibernation image complete in slot" in vm.console_text()
    sb = store.read(str(vm.disk))
    rec = max((s for s in sb.slots if s.state.name == "COMPLETE" and s.flags & FLAG_HIBERNATE), key=lambda s: s.seq)
    h = {"kernel": vm.kernel_build, "name": "resident", "smp": GUEST[1], "memory_mb": GUEST[2], "store": vm.disk,
         "ext4": vm.ext4, "cid": cid, "boot_id": boot_id, "counter": (pid, n), "hibernate_seconds": hib_s,
         "slot": rec.index, "image_bytes": rec.length}
    text = resume_and_check(h, f"resident-resume-{GUEST[0]}", f"{GUEST[0]} resident",
                            cpus=f"0-{GUEST[1] - 1}" if GUEST[1] > 1 else None)
    assert "khibernate-restore: entering the saved kernel" in text
    print(f"{TAG} hibernate through the resident capture kernel (command -> power off) "
          f"{hib_s:.1f} s")
