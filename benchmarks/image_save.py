"""Benchmark: ``khibernate image save`` against makedumpfile and the zstd CLI on the same vmcores (printed figures).

    python3 benchmarks/image_save.py [VMCORE ...] [--vmcore PATH ...] [--runs N] [--no-kdump]

Without VMCORE it uses (and, the first time, makes with the VM harness, one QEMU at a time) the cached 1 GiB and
2 GiB QMP workload dumps of the test kernel and a real ``/proc/vmcore`` copied by a kdump capture kernel
(``tests/vm/vmcores.workload_dump(method="kdump")``, skipped with ``--no-kdump``); ``--vmcore PATH`` adds any
vmcore (e.g. a copy of a real ``/proc/vmcore``) to those.  QEMU dumps are first converted to an ELF vmcore with
direct-map p_vaddr (what /proc/vmcore looks like), because makedumpfile 1.7.2 refuses QEMU's all-zero p_vaddr.

Every input is read once to warm the page cache; then each round runs every command once, ours and the peer's
alternating (the order reverses every other round), ``--runs`` rounds; medians are printed.  Rows:

- the peer, makedumpfile ``-l`` (lzo, kdump-compressed) at -d 17 and -d 31: the reference of every ratio;
- khibernate ``image save --restorable`` (-d 17) with ``--threads`` 1, 2 and $(nproc), ``--no-sync``, ``-d 31``,
  ``--zstd-level -3``, and ``image export --format kdump -d 17`` (our kdump-compressed writer, zstd pages);
- LIMIT rows: ``cat`` of the source, and ``zstd -1`` (-T1 and -T$(nproc)) of exactly the pages the -d 17 save keeps
  (a raw file of the stored blocks of a .khi, made once per input);
- the restore read side: every block of the -d 17 image decompressed and written to a memory-backed file in
  /dev/shm (a child process: KhiSource.iter_blocks + os.pwrite at the pfn offsets, and krestore.write_image through
  OldMemory on that file, which also zeroes the zero pages and reads each write back); single-threaded.

Only the CLI and the reader's stable API (KhiSource.iter_blocks / index / header) are used, so the benchmark keeps
working while the product code changes.  khibernate fsyncs its image before the rename (makedumpfile does not):
the --no-sync row shows what that costs.  Peak RSS is GNU time's %M.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NPROC = os.cpu_count() or 1
MDF17, MDF31 = "makedumpfile -l -d 17", "makedumpfile -l -d 31"
LIM1, LIMN = "LIMIT zstd -1 -T1 kept pages", f"LIMIT zstd -1 -T{NPROC} kept pages"


@dataclasses.dataclass
class Case:
    """One command of the table; ``out`` is the file it writes (its size is the output size), or ``stdout_to``."""

    name: str
    cmd: list[str]
    out: Path | None = None
    stdout_to: Path | None = None
    level: int | None = None  # the dump level it is compared at (makedumpfile -l at the same level)
    threads: int | None = None  # khibernate/zstd threads: the limit row it is compared with
    ours: bool = False


@dataclasses.dataclass
class Result:
    """Medians over the runs of one case."""

    case: Case
    wall: float
    rss_kib: float
    cpu: float
    out_bytes: int


def env() -> dict[str, str]:
    """The environment of every child: this tree's khibernate first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def run(cmd: list[str], out: Path | None = None, stdout_to: Path | None = None) -> tuple[float, int, float, int]:
    """(wall seconds, peak RSS KiB, user+sys CPU seconds, output bytes) of one command, from GNU time (no
    forked-parent pages).  Its output file is removed first; stdout goes to ``stdout_to`` or /dev/null."""
    if out is not None and out.exists():
        out.unlink()
    with tempfile.NamedTemporaryFile("r") as tf:
        t0 = time.perf_counter()
        with open(stdout_to or os.devnull, "wb") as so:
            p = subprocess.run(["/usr/bin/time", "-q", "-f", "%M %U %S", "-o", tf.name, *cmd], stdout=so,
                               stderr=subprocess.PIPE, env=env())
        dt = time.perf_counter() - t0
        if p.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')[-2000:]}")
        rss, user, sys_ = tf.read().split()[-3:]
    target = stdout_to or out
    return dt, int(rss), float(user) + float(sys_), target.stat().st_size if target else 0


def load_vaddrs(path: Path) -> list[int]:
    """p_vaddr of every PT_LOAD of an ELF64 little-endian core (empty if it is not one)."""
    with open(path, "rb") as f:
        eh = f.read(64)
        if eh[:6] != b"\x7fELF\x02\x01":
            return []
        phoff, = struct.unpack_from("<Q", eh, 32)
        phentsize, phnum = struct.unpack_from("<HH", eh, 54)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    return [struct.unpack_from("<Q", ph, i * phentsize + 16)[0] for i in range(phnum)
            if struct.unpack_from("<I", ph, i * phentsize)[0] == 1]


def elf_input(path: Path, work: Path) -> Path:
    """An ELF vmcore makedumpfile 1.7.2 accepts (direct-map p_vaddr set); a QEMU dump (all p_vaddr 0) is exported
    once with ``khibernate image export --format elf`` beside it (or in ``work``)."""
    if any(v >= 1 << 63 for v in load_vaddrs(path)) or not load_vaddrs(path):
        return path
    dest = work / (path.parent.name + ".elf")
    if not dest.exists():
        run([sys.executable, "-m", "khibernate.image", "export", "--format", "elf", "--no-sync", str(path),
             str(dest)], dest)
    return dest


def kept_pages(khi: Path, dest: Path) -> int:
    """Write the stored (kept, non-zero) pages of image ``khi``, every block's data in order, to ``dest``; bytes."""
    from khibernate.image.sources.khi import KhiSource

    n = 0
    with KhiSource(khi) as src, open(dest, "wb") as f:
        for _pfns, data in src.iter_blocks():
            f.write(data)
            n += len(data)
    return n


def cases(src: Path, work: Path) -> list[Case]:
    """Every timed command for one input (the peer first, then ours, then the limits)."""
    py = sys.executable
    save = [py, "-m", "khibernate.image", "save"]  # the image commands alone, as a capture environment runs them
    s = str(src)
    out: list[Case] = [
        Case(MDF17, ["makedumpfile", "-l", "-d", "17", s, str(work / "l17")], work / "l17", level=17),
        Case(MDF31, ["makedumpfile", "-l", "-d", "31", s, str(work / "l31")], work / "l31", level=31),
    ]
    for t in sorted({1, 2, NPROC}):
        label = f"khibernate save --restorable --threads {t}" + (" (nproc)" if t == NPROC else "")
        out.append(Case(label, [*save, "--restorable", "--threads", str(t), s, str(work / f"r{t}.khi")],
                        work / f"r{t}.khi", level=17, threads=t, ours=True))
    n = str(NPROC)
    out += [
        Case(f"khibernate save --restorable -T{n} --no-sync", [*save, "--restorable", "--threads", n, "--no-sync", s,
             str(work / "rn.khi")], work / "rn.khi", level=17, threads=NPROC, ours=True),
        Case(f"khibernate save -r -T{n} --zstd-level -3", [*save, "--restorable", "--threads", n, "--zstd-level",
             "-3", s, str(work / "rz.khi")], work / "rz.khi", level=17, threads=NPROC, ours=True),
        Case(f"khibernate export --format kdump -d 17 -T{n}", [py, "-m", "khibernate.image", "export", "--format",
             "kdump", "-d", "17", "--threads", n, s, str(work / "e17.kdump")], work / "e17.kdump", level=17,
             threads=NPROC, ours=True),
        Case(f"khibernate save -d 31 -T{n}", [*save, "-d", "31", "--threads", n, s, str(work / "31.khi")],
             work / "31.khi", level=31, threads=NPROC, ours=True),
        Case("LIMIT cat > /dev/null", ["cat", s]),
    ]
    kept = str(work / "kept.raw")
    for t in sorted({1, NPROC}):
        out.append(Case(LIM1 if t == 1 else LIMN, ["zstd", "-1", f"-T{t}", "-q", "-c", kept], threads=t))
    return out


def bench(src: Path, work: Path, runs: int) -> tuple[list[Result], dict[str, dict[str, float] | str], int]:
    """Medians of every case over ``runs`` alternating rounds, the restore read side, and the bytes of the pages a
    -d 17 save keeps, for one input."""
    run(["cat", str(src)])  # warm the page cache
    khi = work / "keep.khi"  # the -d 17 image the limit file and the restore rows come from
    run([sys.executable, "-m", "khibernate.image", "save", "--restorable", "--threads", str(NPROC), "--no-sync",
         str(src), str(khi)], khi)
    kept = kept_pages(khi, work / "kept.raw")
    todo = cases(src, work)
    samples: dict[str, list[tuple[float, int, float, int]]] = {c.name: [] for c in todo}
    for r in range(runs):
        for c in todo if r % 2 == 0 else reversed(todo):
            samples[c.name].append(run(c.cmd, c.out, c.stdout_to))
            if c.out is not None and c.out.exists():
                c.out.unlink()
    results = []
    for c in todo:
        s = samples[c.name]
        size = s[-1][3]
        if c.name.startswith("LIMIT zstd"):  # timed to /dev/null; its size measured once, untimed
            size = run(c.cmd, None, work / "kept.zst")[3]
        results.append(Result(c, statistics.median(x[0] for x in s), statistics.median(x[1] for x in s),
                              statistics.median(x[2] for x in s), size))
    restore = {mode: restore_side(khi, mode, runs) for mode in ("pwrite", "krestore")}
    for p in (work / "kept.raw", work / "kept.zst", khi):
        p.unlink(missing_ok=True)
    return results, restore, kept


# ------------------------------------------------------------------------------------------------ restore read side


def restore_child(mode: str, khi: str, target: str) -> None:
    """In a child: decompress every block of ``khi`` and write it into the memory-backed file ``target``; print
    JSON {bytes, seconds, cpu} of the loop alone (imports and table reads excluded)."""
    from khibernate.image.sources.khi import KhiSource

    src = KhiSource(khi)
    ps = src.page_size
    fd = os.open(target, os.O_RDWR)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    if mode == "pwrite":
        for pfns, data in src.iter_blocks():
            mv = memoryview(data)
            pl = [int(p) for p in pfns]
            i = 0
            while i < len(pl):  # one pwrite per run of consecutive pfns
                j = i + 1
                while j < len(pl) and pl[j] == pl[j - 1] + 1:
                    j += 1
                os.pwrite(fd, mv[i * ps:j * ps], pl[i] * ps)
                i = j
            n += len(data)
    else:
        from khibernate.restore.krestore import write_image
        from khibernate.restore.oldmem import OldMemory

        with OldMemory(src.ranges, path=target) as mem:
            st = write_image(src, mem)
        n = st.pages_written * ps
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}))
    os.close(fd)
    src.close()


def restore_side(khi: Path, mode: str, runs: int) -> dict[str, float] | str:
    """Median over ``runs`` children of ``restore_child``: stored MB, loop seconds, MB/s (wall), MB/s per CPU
    second, peak RSS (or the child's error); the target is a /dev/shm file of the image's max_pfn pages, allocated
    before the runs."""
    from khibernate.image.sources.khi import KhiSource

    with KhiSource(khi) as src:
        size = src.header.max_pfn * src.page_size
    fd, target = tempfile.mkstemp(prefix="khb-bench-restore-", dir="/dev/shm")
    try:
        os.posix_fallocate(fd, 0, size)  # the memory exists before a restore writes it
        got = []
        for _ in range(runs):
            with tempfile.NamedTemporaryFile("r") as tf:
                p = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", tf.name, sys.executable, __file__,
                                    "--restore-child", mode, str(khi), target], capture_output=True, env=env())
                if p.returncode:
                    return p.stderr.decode(errors="replace").strip()[-300:]
                j = json.loads(p.stdout.decode().splitlines()[-1])
                got.append((j["bytes"], j["seconds"], j["cpu"], int(tf.read().split()[-1])))
    finally:
        os.close(fd)
        os.unlink(target)
    b = got[0][0]
    sec, cpu = statistics.median(g[1] for g in got), statistics.median(g[2] for g in got)
    return {"mb": b / 1e6, "seconds": sec, "mb_s": b / 1e6 / sec, "mb_s_cpu": b / 1e6 / max(cpu, 1e-9),
            "rss_mib": statistics.median(g[3] for g in got) / 1024}


# ------------------------------------------------------------------------------------------------ report


def table(label: str, src: Path, results: list[Result], restore: dict[str, dict[str, float] | str], runs: int,
          kept: int) -> str:
    """The figures of one input as printed lines."""
    size = src.stat().st_size
    ref = {r.case.name: r for r in results}
    lines = [f"== {label}: {src} ({size / 1e6:.0f} MB), median of {runs} alternating run(s), nproc {NPROC}",
             "   MB/s = source size / wall; 'vs mdf' = makedumpfile -l at the same -d (throughput x, size x);",
             "   'of limit' (-d 17 rows) = throughput x and size x of zstd -1 on the kept pages, -T1 for --threads 1,",
             f"   -T{NPROC} otherwise; the pages a -d 17 save keeps: {kept / 1e6:.0f} MB uncompressed",
             f"{'command':50} {'wall s':>7} {'MB/s':>7} {'out MB':>8} {'RSS MiB':>8} {'CPU s':>6} "
             f"{'thr vs mdf':>10} {'size vs mdf':>11} {'thr of lim':>10} {'size of lim':>11}"]
    for r in results:
        c = r.case
        vs = of = ""
        m = ref.get(MDF17 if c.level == 17 else MDF31) if c.level else None
        if m is not None and m is not r:
            vs = f"{m.wall / r.wall:10.2f} {r.out_bytes / max(m.out_bytes, 1):11.2f}"
        lim = ref.get(LIM1 if c.threads == 1 else LIMN)
        if c.level == 17 and c.ours and lim is not None:
            of = f"{lim.wall / r.wall:10.2f} {r.out_bytes / max(lim.out_bytes, 1):11.2f}"
        lines.append(f"{c.name:50} {r.wall:7.2f} {size / r.wall / 1e6:7.0f} {r.out_bytes / 1e6:8.1f} "
                     f"{r.rss_kib / 1024:8.1f} {r.cpu:6.2f} {vs or ' ' * 22:22} {of}".rstrip())
    t1 = ref.get("khibernate save --restorable --threads 1")
    t2 = next((r for r in results if r.case.name.startswith("khibernate save --restorable --threads 2")), None)
    if t1 and t2:
        lines.append(f"scaling: --threads 2 / --threads 1 throughput x{t1.wall / t2.wall:.2f} "
                     f"(CPU {t2.cpu:.2f} vs {t1.cpu:.2f} s)")
    for mode, d in restore.items():
        what = ("KhiSource.iter_blocks + os.pwrite at pfn offsets" if mode == "pwrite" else
                "krestore.write_image via OldMemory (zeroes zero pages, reads back)")
        if isinstance(d, str):
            lines.append(f"restore read side, {what}: failed: {d}")
            continue
        lines.append(f"restore read side, {what} -> /dev/shm, 1 thread: {d['mb']:.0f} MB stored in "
                     f"{d['seconds']:.2f} s = {d['mb_s']:.0f} MB/s ({d['mb_s_cpu']:.0f} MB/s per CPU second), "
                     f"peak RSS {d['rss_mib']:.0f} MiB")
    return "\n".join(lines)


def flatness(all_results: list[tuple[str, Path, list[Result]]]) -> str:
    """Peak RSS of every khibernate row on the largest input / on the first one (the 1 GiB dump by default)."""
    (sl, sp, sr) = all_results[0]
    (ll, lp, lr) = max(all_results, key=lambda x: x[1].stat().st_size)
    if lp == sp:
        return ""
    small = {r.case.name: r for r in sr}
    lines = [f"RSS flatness: peak RSS on {ll} ({lp.stat().st_size / 1e6:.0f} MB) / on {sl} "
             f"({sp.stat().st_size / 1e6:.0f} MB), source x{lp.stat().st_size / sp.stat().st_size:.2f}:"]
    for r in lr:
        s = small.get(r.case.name)
        if r.case.ours and s is not None:
            lines.append(f"  {r.case.name:50} {r.rss_kib / 1024:6.1f} / {s.rss_kib / 1024:6.1f} MiB = "
                         f"x{r.rss_kib / s.rss_kib:.2f}")
    return "\n".join(lines)


def default_inputs(kdump: bool) -> list[tuple[str, Path, bool]]:
    """The cached test-kernel dumps (made with QEMU the first time, one at a time)."""
    from tests.vm.vmcores import workload_dump

    out = [("1 GiB QMP workload dump", workload_dump("wl1g").vmcore, True),
           ("2 GiB QMP workload dump (2 vCPUs)",
            workload_dump("wl2g", memory_mb=2048, smp=2, anon_mb=320, tmpfs_mb=200, bdev_mb=48).vmcore, True)]
    if kdump:
        out.append(("1 GiB kdump /proc/vmcore copy (kdump kernel, crashkernel=256M)",
                    workload_dump("kd1g", method="kdump").vmcore, True))
    return out


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--restore-child":
        restore_child(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vmcores", nargs="*", type=Path, help="inputs instead of the cached test-kernel dumps")
    ap.add_argument("--vmcore", action="append", type=Path, default=[],
                    help="add this vmcore (e.g. a copy of a real /proc/vmcore) to the inputs (repeatable)")
    ap.add_argument("--runs", type=int, default=3, help="alternating rounds; medians are printed (default 3)")
    ap.add_argument("--no-kdump", action="store_true", help="without the cached kdump /proc/vmcore input")
    args = ap.parse_args()
    if not os.access("/usr/bin/time", os.X_OK):
        raise SystemExit("GNU time is needed for peak RSS: apt-get install time")
    for tool in ("makedumpfile", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install {tool}")
    inputs = [(str(v), v, False) for v in args.vmcores] or default_inputs(not args.no_kdump)
    inputs += [(f"--vmcore {v}", v, False) for v in args.vmcore]
    done = []
    with tempfile.TemporaryDirectory(prefix="khb-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        work = Path(d)
        for label, v, cached in inputs:
            src = elf_input(v, v.parent if cached else work)  # a cached dump keeps its ELF conversion beside it
            results, restore, kept = bench(src, work, args.runs)
            print(table(label, src, results, restore, args.runs, kept), flush=True)
            print(flush=True)
            done.append((label, src, results))
    f = flatness(done)
    if f:
        print(f)


if __name__ == "__main__":
    main()
