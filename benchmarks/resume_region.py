"""What a resume pays when its boot reserved another crash region than the hibernating boot (KASLR moves it).

    python3 benchmarks/resume_region.py [--line 6.12] [--memory 1024] [--runs 1]

One guest of the test kernel LINE (1 CPU, MEMORY MiB, `crashkernel=256M`, the workload of tests/vm/test_hibernate.py)
hibernates once; then, RUNS times each and alternating, a cold boot resumes the same image from fresh copies of
its disks: with `crashkernel=256M` (the same region as the hibernating boot: nothing to move) and with
`crashkernel=256M@0x10000000` (another region, as KASLR gives one boot in three: `resume` loads the restore kernel
into the saved region as a jump window in its own RAM and the jump swaps 256 MiB out).  Printed per run, from the
resume boot's console stamped with the host's clock as it arrives: power on → `khibernate resume` starts (the
boot, the same in both), resume's own check + load time (its message), reboot(KEXEC) → the restore kernel's
"Linux version" line (freeze, relocate_kernel's swap, the restore kernel's early boot), resume's jump → the
restore job's first line, and power on → the saved kernel's command finished (the whole resume).
The difference between the two kinds is what re-establishing the region costs.  (The alternative, booting the
same kernel again with `crashkernel=SIZE@ADDRESS` before resuming, would cost a whole extra boot: the "power on →
resume starts" figure.)
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = {"same region": "crashkernel=256M", "other region": "crashkernel=256M@0x10000000"}


def _stamp(vm, pattern: str, since: int = 0) -> float | None:
    """Host time (monotonic) at which ``pattern`` first reached the console after byte ``since``."""
    m = re.search(pattern.encode(), bytes(vm.console.buf[since:]))
    if not m:
        return None
    end = since + m.end()
    return next((t for off, t in vm.stamps if off >= end), None)


def _watch_console(vm) -> None:
    """Record (buffer length, host time) pairs as console bytes arrive, every 2 ms, in vm.stamps."""
    import threading

    vm.stamps = []

    def run() -> None:
        last = -1
        while vm.returncode is None:
            n = len(vm.console.buf)
            if n != last:
                vm.stamps.append((n, time.monotonic()))
                last = n
            time.sleep(0.002)

    threading.Thread(target=run, daemon=True).start()


def one_resume(h: dict, crash: str, tmp: Path, name: str) -> dict[str, float | None]:
    from tests.vm.test_hibernate import resume, shutdown_clean
    from vmtest.diskfile import copy_sparse

    store, ext4 = tmp / f"{name}-store.img", tmp / f"{name}-ext4.img"
    copy_sparse(h["pristine"], store)
    copy_sparse(h["ext4_pristine"], ext4)
    t0 = time.monotonic()
    vm, report, total = resume(h, name, crash=crash, disks=[store, ext4])
    try:
        text = vm.console_text()
        loaded = re.search(r"checked against this boot in ([\d.]+) s, capture kernel loaded in ([\d.]+) s", text)
        started = _stamp(vm, r"khibernate-init: resume from")
        jumped = _stamp(vm, r"resume: checked against this boot")
        kexec = vm.console.buf.find(b"reboot(LINUX_REBOOT_CMD_KEXEC)")
        reboot = _stamp(vm, r"reboot\(LINUX_REBOOT_CMD_KEXEC\)")
        b_kernel = _stamp(vm, r"Linux version", since=max(kexec, 0))
        restore = _stamp(vm, r"khibernate-restore: restore slot")
        assert report["resumed"], report
        shutdown_clean(vm, {**h, "ext4": ext4})
    finally:
        vm.close()
    return {"boot_to_resume_s": started - t0 if started else None,
            "check_s": float(loaded.group(1)) if loaded else None,
            "load_s": float(loaded.group(2)) if loaded else None,
            "jump_to_restore_kernel_s": restore - jumped if restore and jumped else None,
            "kexec_to_b_kernel_s": b_kernel - reboot if b_kernel and reboot else None,
            "total_s": total, "swapped": "swapping this boot's" in text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--line", default="6.12")
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    from tests.vm import test_hibernate
    from vmtest import vm as vmmod
    from vmtest.kernel import ensure_kernel

    original_start = vmmod.VM.start

    def start(self) -> None:  # stamp every console byte of the resume boots with the host clock
        original_start(self)
        _watch_console(self)

    vmmod.VM.start = start  # type: ignore[method-assign]
    tmp = Path(tempfile.mkdtemp(prefix="khb-bench-region-"))
    h = test_hibernate.hibernate(ensure_kernel(args.line), "bench-region", tmp, memory_mb=args.memory)
    print(f"hibernated {h['image_bytes'] / 1e6:.1f} MB from crash region {h['crash_region']} in "
          f"{h['hibernate_seconds']:.1f} s")
    results: dict[str, list[dict]] = {k: [] for k in KINDS}
    for i in range(args.runs):
        for kind, crash in KINDS.items():
            r = one_resume(h, crash, tmp, f"bench-region-{kind.split()[0]}-{i}")
            results[kind].append(r)
            print(f"  {kind:12s} run {i}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in r.items()), flush=True)
    print(f"\n{args.line}, {args.memory} MiB, 1 CPU, TCG; medians of {args.runs} run(s), seconds:")
    cols = ("boot_to_resume_s", "check_s", "load_s", "kexec_to_b_kernel_s", "jump_to_restore_kernel_s", "total_s")
    print(f"  {'':12s} " + " ".join(f"{c:>24s}" for c in cols))
    med = {}
    for kind, rs in results.items():
        med[kind] = {c: statistics.median(r[c] for r in rs if r[c] is not None) for c in cols}
        print(f"  {kind:12s} " + " ".join(f"{med[kind][c]:24.2f}" for c in cols))
    extra = med["other region"]["total_s"] - med["same region"]["total_s"]
    def more(col: str) -> float:
        return med["other region"][col] - med["same region"][col]

    print(f"  re-establishing the saved region cost {extra:+.2f} s of the whole resume: loading the restore kernel "
          f"{more('load_s'):+.2f} s, the jump (freeze, relocate_kernel's swap, until the restore kernel prints) "
          f"{more('kexec_to_b_kernel_s'):+.2f} s; an extra boot of this kernel instead would cost at least "
          f"{med['same region']['boot_to_resume_s']:.1f} s (power on -> resume starts)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
