"""Benchmark: ``khibernate image save`` against makedumpfile and the zstd CLI on the same vmcore (printed figures).

    python3 benchmarks/image_save.py [VMCORE ...] [--runs N]

Without arguments it uses (and, the first time, makes with the VM harness) the cached 1 GiB and 2 GiB workload
dumps of the test kernel.  QEMU dumps are first converted to an ELF vmcore with direct-map p_vaddr (what
/proc/vmcore looks like), because makedumpfile 1.7.2 refuses QEMU's all-zero p_vaddr.  Every command runs
``--runs`` times on a warm page cache; the best wall time and the largest peak RSS are reported.  khibernate
fsyncs its image before the rename (makedumpfile does not), so a --no-sync row is shown too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(cmd: list[str], out: Path | None, stdout_to: Path | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS KiB, output bytes) of one command; RSS from GNU time (no forked-parent pages)."""
    if out is not None and out.exists():
        out.unlink()
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        with open(stdout_to, "wb") if stdout_to else open(os.devnull, "wb") as so:
            p = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", rss.name, *cmd], stdout=so,
                               stderr=subprocess.PIPE)
        dt = time.perf_counter() - t0
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')[-2000:]}")
        peak = int(rss.read().split()[-1])
    target = stdout_to or out
    return dt, peak, target.stat().st_size if target else 0


def elf_input(path: Path, work: Path) -> Path:
    """An ELF vmcore makedumpfile 1.7.2 accepts (direct-map p_vaddr set)."""
    from khibernate.image import vmcoreinfo
    from khibernate.image.elf import ElfSource
    from khibernate.image.export import export

    with ElfSource(path) as src:
        if any(p.vaddr >= 1 << 63 for p in src.headers.loads):
            return path
        dest = work / (path.parent.name + ".elf")
        if not dest.exists():
            export(src, str(dest), fmt="elf", vmci=vmcoreinfo.from_source(src))
        return dest


def bench(vmcore: Path, work: Path, runs: int) -> list[tuple[str, float, int, int]]:
    py = sys.executable
    khi = [py, "-m", "khibernate.image", "save"]  # the image commands alone, as a capture environment runs them
    cases: list[tuple[str, list[str], Path | None, Path | None]] = [
        ("cat > /dev/null", ["cat", str(vmcore)], None, None),
        ("khibernate save --restorable (-d 17)", [*khi, str(vmcore), str(work / "r.khi")], work / "r.khi", None),
        ("khibernate save --restorable --no-sync", [*khi, str(vmcore), str(work / "rn.khi"), "--no-sync"],
         work / "rn.khi", None),
        ("khibernate save -d 31", [*khi, str(vmcore), str(work / "31.khi"), "-d", "31"], work / "31.khi", None),
        ("makedumpfile -l -d 17", ["makedumpfile", "-l", "-d", "17", str(vmcore), str(work / "l17")],
         work / "l17", None),
        ("makedumpfile -c -d 17", ["makedumpfile", "-c", "-d", "17", str(vmcore), str(work / "c17")],
         work / "c17", None),
        ("makedumpfile -l -d 31", ["makedumpfile", "-l", "-d", "31", str(vmcore), str(work / "l31")],
         work / "l31", None),
        ("makedumpfile -c -d 31", ["makedumpfile", "-c", "-d", "31", str(vmcore), str(work / "c31")],
         work / "c31", None),
        ("makedumpfile -l -d 31 --num-threads 2", ["makedumpfile", "-l", "-d", "31", "--num-threads", "2",
                                                   str(vmcore), str(work / "l31t")], work / "l31t", None),
    ]
    if shutil.which("zstd"):
        cases.append(("zstd -1 -T2 (raw ELF)", ["zstd", "-1", "-T2", "-c", "-q", str(vmcore)], None,
                      work / "raw.zst"))
    results = []
    run(["cat", str(vmcore)], None)  # warm the page cache
    for name, cmd, out, so in cases:
        best, rss, size = float("inf"), 0, 0
        for _ in range(runs):
            dt, r, size = run(cmd, out, so)
            best, rss = min(best, dt), max(rss, r)
        results.append((name, best, rss, size))
        for p in (out, so):
            if p is not None and p.exists():
                p.unlink()
    return results


def table(vmcore: Path, results: list[tuple[str, float, int, int]]) -> str:
    size = vmcore.stat().st_size
    ref = {r[0]: r for r in results}
    lines = [f"vmcore {vmcore} ({size / 1e6:.0f} MB)",
             f"{'command':40} {'wall s':>7} {'MB/s':>7} {'out MB':>8} {'peak RSS MiB':>12}"]
    for name, dt, rss, out in results:
        lines.append(f"{name:40} {dt:7.2f} {size / dt / 1e6:7.0f} {out / 1e6:8.1f} {rss / 1024:12.1f}")
    for ours, theirs in (("khibernate save --restorable (-d 17)", "makedumpfile -l -d 17"),
                         ("khibernate save --restorable --no-sync", "makedumpfile -l -d 17"),
                         ("khibernate save -d 31", "makedumpfile -l -d 31")):
        if ours in ref and theirs in ref:
            o, t = ref[ours], ref[theirs]
            lines.append(f"{ours} vs {theirs}: throughput x{t[1] / o[1]:.2f}, size x{o[3] / max(t[3], 1):.2f}, "
                         f"RSS {o[2] / 1024:.0f} vs {t[2] / 1024:.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vmcores", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    if not os.access("/usr/bin/time", os.X_OK):
        raise SystemExit("GNU time is needed for peak RSS: apt-get install time")
    if shutil.which("makedumpfile") is None:
        raise SystemExit("makedumpfile is not installed: apt-get install makedumpfile")
    vmcores = args.vmcores
    if not vmcores:
        from tests.vm.vmcores import workload_dump

        vmcores = [workload_dump("wl1g").vmcore,
                   workload_dump("wl2g", memory_mb=2048, smp=2, anon_mb=320, tmpfs_mb=200, bdev_mb=48).vmcore]
    with tempfile.TemporaryDirectory(prefix="khb-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        work = Path(d)
        for v in vmcores:
            elf = elf_input(Path(v), Path(v).parent)
            print(table(elf, bench(elf, work, args.runs)), flush=True)
            print()


if __name__ == "__main__":
    main()
