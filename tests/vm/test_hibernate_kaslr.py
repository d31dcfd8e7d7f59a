"""Hibernate and resume with KASLR: every cycle resumes at the first boot, wherever the kernel and its region land.

On the distribution-like flavour (`6.12-distro`: KASLR, THP always, memcg, KSM, modular virtio and ext4) a guest
with `crashkernel=256M` hibernates, a cold boot resumes it, the resumed kernel hibernates again, and so on.  Each
resume boot places its kernel at a random physical address, and when that lands at the top of RAM its crash region
goes lower than the hibernating boot's: the resume must run its restore kernel in the saved region all the same.
Every cycle must end in the saved kernel (same boot_id, the counter counting on, the pattern, tmpfs and ext4 data
intact, ext4 clean at the end); each cycle prints where both regions were and what the resume cost.  One chain
with 1 CPU and 1.5 GiB (it also checks one snapshot's image bit for bit: the pattern at its pfns, VMCOREINFO): one
resume; one with 2 CPUs and 2 GiB: two resumes, the resumed kernel hibernating again in between.  CI time counts
(each cycle is a hibernate and a resume, ~1.5-3 min under TCG): KHIBERNATE_KASLR_CYCLES=N runs N resumes in each
chain by hand.  The deterministic case — a resume boot whose region is elsewhere — is
tests/vm/test_hibernate.py's (pinned regions); these chains show the same on random placements.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.vm.test_hibernate import (
    HIB,
    SWAPPED,
    _crash_region,
    check_original_runs_on,
    hibernate,
    resume,
    shutdown_clean,
)
from tests.vm.test_snapshot import _check_image, _snapshot, counter
from vmtest.vm import TIMEOUT_SCALE

pytestmark = pytest.mark.vm

FLAVOUR = "6.12-distro"
# resumes per chain: 1 (1 CPU) and 2 (2 CPUs) in CI; KHIBERNATE_KASLR_CYCLES=N sets both, by hand
CYCLES = os.environ.get("KHIBERNATE_KASLR_CYCLES")


def cycles(default: int) -> int:
    """How many resumes a chain runs: KHIBERNATE_KASLR_CYCLES when set, else ``default``."""
    return int(CYCLES) if CYCLES else default


def _rehibernate(vm, h: dict) -> dict:
    """The resumed kernel hibernates again (its store, its workload); QEMU exits."""
    from khibernate.store import api as store
    from khibernate.store.superblock import FLAG_HIBERNATE

    pid, n = counter(vm)
    t0 = time.monotonic()
    cid = vm.send(HIB)
    assert vm.wait_exit(timeout=900 * TIMEOUT_SCALE) == 0, "the capture kernel should power the machine off"
    seconds = time.monotonic() - t0
    assert "hibernation image complete in slot" in vm.console_text()
    vm.close()
    sb = store.read(str(h["store"]))
    rec = max((s for s in sb.slots if s.state.name == "COMPLETE" and s.flags & FLAG_HIBERNATE), key=lambda s: s.seq)
    return {**h, "cid": cid, "counter": (pid, n), "slot": rec.index, "image_bytes": rec.length,
            "hibernate_seconds": seconds}


def _chain(tmp_path, name: str, memory_mb: int, smp: int, cycles: int, before=None) -> list[dict]:
    """Boot, hibernate, then ``cycles`` times: cold boot → resume → checks → hibernate again (the last: shut down
    cleanly, e2fsck).  Returns one record per resume."""
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    h = hibernate(ensure_kernel(FLAVOUR), name, tmp_path, smp=smp, memory_mb=memory_mb, before=before)
    assert "hibernate: KASLR is on and crashkernel=256M has no address" in h["said"], h["said"][-3000:]
    saved_region = h["crash_region"]
    cycles_done = []
    for i in range(cycles):
        vm, report, resume_s = resume(h, f"{name}-resume{i}")
        try:
            text = vm.console_text()
            check_original_runs_on(vm, h, report)
            if smp > 1:
                assert vm.run("cat /sys/devices/system/cpu/online").strip() == f"0-{smp - 1}"
            swapped = SWAPPED.search(text)
            here = _crash_region(text)
            assert bool(swapped) == (here != saved_region), (saved_region, here, text[-3000:])
            rec = {"cycle": i, "saved_region": saved_region, "resume_boot_region": here, "swapped": bool(swapped),
                   "resume_s": round(resume_s, 1), "hibernate_s": round(h["hibernate_seconds"], 1),
                   "image_mb": round(h["image_bytes"] / 1e6, 1)}
            cycles_done.append(rec)
            print(f"\n[hibernate {FLAVOUR} {memory_mb} MiB {smp} CPU] cycle {i}: saved region {saved_region}, "
                  f"resume boot's {here or 'none'} ({'swapped free' if swapped else 'the same'}); hibernate "
                  f"{rec['hibernate_s']} s, resume {rec['resume_s']} s, image {rec['image_mb']} MB")
            if i + 1 < cycles:
                h = _rehibernate(vm, h)
            else:
                shutdown_clean(vm, h)
        finally:
            vm.close()
    return cycles_done


def _snapshot_bit_exact(tmp_path):
    """One snapshot before the first hibernation, its image checked on the host: the mlocked pattern at the pfns
    pagemap gave, VMCOREINFO equal to the running kernel's, the kernel log up to the jump."""

    def check(vm) -> None:
        import json

        # compaction may migrate mlocked pages (compact_unevictable_allowed): keep the pattern at its pfns
        vm.run("echo 0 > /proc/sys/vm/compact_unevictable_allowed")
        addrs = json.loads(vm.run("cat /tmp/pattern.json"))
        vmci_a = vm.run("python3 /usr/libexec/khibernate/vmcoreinfo.py kcore")
        assert "KERNELOFFSET=" in vmci_a  # KASLR on: the image's VMCOREINFO must carry this boot's offset
        marker = f"KHB-KASLR-SNAPSHOT-{time.time_ns()}"
        vm.run(f"echo {marker} > /dev/kmsg")
        r = _snapshot(vm, {})
        _check_image(vm, tmp_path, r, addrs, vmci_a, marker)
        thp = vm.run("cat /sys/kernel/mm/transparent_hugepage/enabled").strip()
        assert thp.startswith("[always]"), thp

    return check


def test_kaslr_1cpu_1536m_every_cycle_resumes_at_the_first_boot(tmp_path) -> None:
    records = _chain(tmp_path, "kaslr-1cpu", 1536, 1, cycles(1), before=_snapshot_bit_exact(tmp_path))
    assert len(records) == cycles(1)


def test_kaslr_2cpu_2g_every_cycle_resumes_at_the_first_boot(tmp_path) -> None:
    records = _chain(tmp_path, "kaslr-2cpu", 2048, 2, cycles(2))
    assert len(records) == cycles(2)
