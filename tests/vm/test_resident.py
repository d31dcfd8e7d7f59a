"""A resident capture kernel in QEMU (issue 22): `arm` boots it once, three snapshots pause through it, `disarm`.

One booted guest (6.12, 1 GiB, 1 CPU, crashkernel=256M) running test_snapshot's workload.  Each snapshot must say it
went through the resident capture kernel; its image, exported on the host, is checked as test_snapshot checks its
images (verifies, pattern pages at their physical addresses, VMCOREINFO, the log up to the jump, the KHIBERNATE note)
and must hold the first kernel's control page as the first kernel has it after the pause — the page the capture
kernel's own jump-back image swapped (docs/resident.md): /proc/vmcore shows a stale copy of it in a re-entered
capture kernel.  Then a store re-initialised under the armed capture kernel: it refuses, the snapshot falls back to
a fresh capture kernel and succeeds.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from tests.vm.test_snapshot import HELPERS, SNAP, _check_image, counter, start_workload

pytestmark = pytest.mark.vm

ARM = "khibernate arm --target /dev/vda --kernel /boot/bzImage --capture-initrd /boot/initrd.img"
READ_PHYS = ("python3 -c 'import sys, hashlib; from khibernate.image.sources.frozen import Kcore; "
             "print(hashlib.sha256(Kcore().read_phys(int(sys.argv[1], 0), 4096)).hexdigest())' ")


@pytest.fixture(scope="module")
def guest():
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import VM, check_host

    check_host()
    kernel = ensure_kernel()
    with VM(kernel=kernel, append="crashkernel=256M", memory_mb=1024, extra_files=HELPERS, disk_mb=640,
            name="resident-6.12", timeout=300) as vm:
        vm.run("dd if=/dev/zero of=/dev/vda bs=1M count=2 2>/dev/null; sync")
        start_workload(vm)
        yield vm


def _snapshot_json(vm) -> dict:
    pid0, n0 = counter(vm)
    t0 = time.monotonic()
    st, out = vm.run_status(SNAP, timeout=900)
    assert st == 0, out
    r = json.loads(out[out.index("{\n"):])
    r["wall_seconds"] = round(time.monotonic() - t0, 1)
    time.sleep(2.5)
    pid1, n1 = counter(vm)
    assert pid1 == pid0 and n1 > n0, (n0, n1)
    assert vm.run("test -e /tmp/pattern.bad || echo intact").strip() == "intact"
    assert vm.run("sha256sum -c /tmp/blob.sha").strip().endswith("OK")
    return r


def _control_page_matches(vm, tmp_path: Path, r: dict) -> str:
    """The image's copy of the first kernel's control page equals that page as the first kernel holds it now."""
    from khibernate.image.sources.khi import KhiSource

    src = KhiSource(tmp_path / f"slot{r['slot']}-{r['seq']}.khi")
    try:
        note = json.loads(next(n for n in src.notes if n.name == "KHIBERNATE").desc)
        page = note["jump_back_entry"] & ~0xFFF
        in_image = hashlib.sha256(src.read(page, 4096)).hexdigest()
    finally:
        src.close()
    live = vm.run(READ_PHYS + hex(page)).strip()
    assert in_image == live, f"control page {page:#x}: image {in_image[:16]}, live {live[:16]} (a stale copy?)"
    return f"{page:#x}"


def test_arm_three_snapshots_through_it_disarm(guest, tmp_path) -> None:
    vm = guest
    vm.run("khibernate target init /dev/vda --slots 2")
    boot = vm.run("cat /proc/sys/kernel/random/boot_id").strip()
    t0 = time.monotonic()
    st, out = vm.run_status(ARM, timeout=900)
    arm_wall = time.monotonic() - t0
    assert st == 0 and "resident capture kernel armed" in out, out
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "1"
    assert "resident capture kernel armed" in vm.run("khibernate doctor 2>&1; true")
    addrs = json.loads(vm.run("cat /tmp/pattern.json"))
    vmci_a = vm.run("python3 /usr/libexec/khibernate/vmcoreinfo.py kcore")
    runs = []
    for i in range(3):
        marker = f"KHB-RESIDENT-MARK-{i}-{time.time_ns()}"
        vm.run(f"echo {marker} > /dev/kmsg")
        mark = vm.mark()
        r = _snapshot_json(vm)
        assert r["capture_kernel"] == "resident", r
        console = vm.console_since(mark)
        assert f"resident: pause #{i + 1}" in console, console[-3000:]
        assert "Linux version" not in console  # no capture kernel booted in this pause
        assert json.loads(vm.run("cat /tmp/pattern.json")) == addrs
        r["check"] = _check_image(vm, tmp_path, r, addrs, vmci_a, marker)
        r["control_page"] = _control_page_matches(vm, tmp_path, r)
        listing = vm.run("khibernate target list /dev/vda")
        assert re.search(rf"slot {r['slot']}: complete\s+#{r['seq']}", listing), listing
        runs.append(r)
    assert [r["slot"] for r in runs] == [0, 1, 0]
    assert "3 pause(s)" in vm.run("khibernate doctor 2>&1; true")
    st, out = vm.run_status("khibernate disarm", timeout=120)
    assert st == 0 and "unloaded" in out, out
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"
    assert vm.run("cat /proc/sys/kernel/random/boot_id").strip() == boot
    print(f"\n[resident 6.12 1 GiB] arm {arm_wall:.1f} s (command)")
    for r in runs:
        print(f"[resident 6.12 1 GiB] slot {r['slot']} #{r['seq']}: pause {r['pause_seconds']:.2f} s, image "
              f"{r['bytes'] / 1e6:.1f} MB, save {r['save_seconds']} s, capture peak used "
              f"{r['capture_peak_used_bytes'] / 2**20:.1f} MiB, command {r['wall_seconds']} s, control page "
              f"{r['control_page']} matches")


def test_a_store_changed_under_it_is_refused_and_a_fresh_kernel_captures(guest, tmp_path) -> None:
    vm = guest
    st, out = vm.run_status(ARM, timeout=900)
    assert st == 0, out
    vm.run("khibernate target init /dev/vda --slots 2 --force")  # a new store UUID under the armed capture kernel
    mark = vm.mark()
    r = _snapshot_json(vm)
    assert r["capture_kernel"] == "fresh", r
    console = vm.console_since(mark)
    assert "refused" in console and "re-initialised" in console, console[-3000:]
    assert vm.run("cat /sys/kernel/kexec_loaded").strip() == "0"  # disarmed, the fresh one unloaded after use
    assert "resident capture kernel armed" not in vm.run("khibernate doctor 2>&1; true")
