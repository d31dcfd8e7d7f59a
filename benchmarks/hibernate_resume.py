"""Hibernate and resume: khibernate against swsusp, same guest, same workload, same run.

    python3 benchmarks/hibernate_resume.py [--runs 3] [--kernel 6.12] [--memory-mb 1024] [--smp 1]

Each run does, in alternation, one khibernate round trip (tests/vm/test_hibernate.py's ``hibernate`` and
``resume``: `khibernate hibernate` of the workload guest, then a new QEMU with khibernate.resume=, checked to be the
same kernel with its data) and one swsusp round trip (vmtest/swsusp.py: `echo disk > /sys/power/state` to a swap
disk of the same size, then resume=).  Times are host wall-clock seconds: hibernate from the command to QEMU's exit
(power off), resume from the new QEMU's start to the saved kernel's hibernate command reporting back.  Prints every
run, then medians and khibernate/swsusp ratios.  Needs root, QEMU and the cached test kernels (scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _khibernate(kernel: object, work: Path, memory_mb: int, smp: int, i: int) -> tuple[float, float, float]:
    from tests.vm.test_hibernate import check_original_runs_on, hibernate, resume

    h = hibernate(kernel, f"bench-khib-{i}", work, smp=smp, memory_mb=memory_mb)
    vm, report, resume_s = resume(h, f"bench-khib-{i}-resume")
    try:
        check_original_runs_on(vm, h, report)
    finally:
        vm.close()
    return h["hibernate_seconds"], resume_s, h["image_bytes"] / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--smp", type=int, default=1)
    args = ap.parse_args()

    from tests.vm.test_snapshot import HELPERS, start_workload
    from vmtest.kernel import ensure_kernel
    from vmtest.swsusp import swsusp_round_trip
    from vmtest.vm import check_host

    check_host()
    kernel = ensure_kernel(args.kernel)
    rows: dict[str, list[tuple[float, float]]] = {"khibernate": [], "swsusp": []}
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="khib-bench-") as d:
            hib, res, mb = _khibernate(kernel, Path(d), args.memory_mb, args.smp, i)
            rows["khibernate"].append((hib, res))
            print(f"run {i + 1} khibernate: hibernate {hib:.1f} s, resume {res:.1f} s, image {mb:.1f} MB", flush=True)
        with tempfile.TemporaryDirectory(prefix="khib-bench-") as d:
            sw = swsusp_round_trip(kernel, Path(d), start_workload, HELPERS, args.memory_mb, args.smp,
                                   name=f"bench-swsusp-{i}")
            rows["swsusp"].append((sw.hibernate_s, sw.resume_s))
            print(f"run {i + 1} swsusp:     hibernate {sw.hibernate_s:.1f} s, resume {sw.resume_s:.1f} s, "
                  f"image {sw.image()}", flush=True)
    med = {k: (statistics.median(h for h, _ in v), statistics.median(r for _, r in v)) for k, v in rows.items()}
    print(f"\n{args.kernel}, {args.memory_mb} MiB, {args.smp} CPU(s), {args.runs} runs, medians:")
    print(f"{'':12}{'hibernate (s)':>15}{'resume (s)':>12}")
    for k, (h, r) in med.items():
        print(f"{k:12}{h:15.1f}{r:12.1f}")
    kh, sw_ = med["khibernate"], med["swsusp"]
    print(f"{'ratio':12}{kh[0] / sw_[0]:14.2f}x{kh[1] / sw_[1]:11.2f}x   (khibernate / swsusp)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
