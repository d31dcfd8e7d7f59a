"""The capture environment's cost: initramfs size and the capture kernel's freeze -> job-running time under TCG.

    python3 benchmarks/capture_boot.py sizes
    python3 benchmarks/capture_boot.py snapshot [--first PAYLOAD] [--capture PAYLOAD] [--name NAME]

``sizes``: the capture initramfs this tree builds (zstd, as `khibernate initramfs build`): compressed bytes,
unpacked file bytes, and the Python part (the full build minus a --no-python build), with the biggest site dirs.

``snapshot``: one `khibernate snapshot` on the 6.12 test kernel as tests/vm/test_snapshot.py makes it (1 GiB,
1 CPU, crashkernel=256M, the same workload), the first kernel booting payload FIRST and the capture kernel getting
CAPTURE as /boot/initrd.img (both default to this tree's cached vmtest payload; a payload is a compressed
`initramfs build` output).  Console bytes are stamped with the host's clock as they arrive (polled every 2 ms), so
"freeze -> job running" is measured as host time from the first kernel's "Freezing user space processes" line to
the capture job's first line ("khibernate-capture: job ..."), printed after /init, one Python start and the
jump-back load, before any image code runs; the capture kernel's own timestamps split it up.  Writes
timeline.txt and result.json to the VM's log dir (KHIBERNATE_VMTEST_LOGS/NAME).  The snapshot may fail after the
job's first line (e.g. a capture image lacking a module the image code imports): the times are still measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2**20


def sizes() -> dict[str, float]:
    """Size figures of the capture initramfs built from this tree, in MiB."""
    from khibernate.initramfs import build
    from khibernate.initramfs import python as pybundle

    full = build.build_tree()
    data = full.archive("zstd")
    nopy = build.build_tree(python=False)
    data_nopy = nopy.archive("zstd")
    site = pybundle.guest_site().lstrip("/") + "/"
    top: dict[str, int] = {}
    for path, e in full.entries.items():
        if e.kind == "file" and path.startswith(site):
            name = path[len(site):].split("/")[0]
            top[name] = top.get(name, 0) + len(e.data)
    res = {"compressed": len(data) / MiB, "unpacked": full.total_bytes() / MiB,
           "python_compressed": (len(data) - len(data_nopy)) / MiB,
           "python_unpacked": (full.total_bytes() - nopy.total_bytes()) / MiB}
    for name, n in sorted(top.items(), key=lambda kv: -kv[1])[:8]:
        res[f"site:{name}"] = n / MiB
    return res


def _kts(line: str) -> float | None:
    m = re.match(r"\s*\[\s*(\d+\.\d+)\]", line)
    return float(m.group(1)) if m else None


def snapshot(name: str, first: Path | None, capture: Path | None) -> dict[str, object]:
    """One snapshot (see the module docstring); the measured times in seconds."""
    from khibernate.initramfs import build as builder
    from khibernate.initramfs import cpio
    from tests.vm.test_snapshot import HELPERS, SNAP, start_workload
    from vmtest.initrd import payload
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import LOG_ROOT, VM, check_host

    check_host()
    kernel = ensure_kernel()
    first = first or payload()
    capture = capture or payload()
    extra = builder.Tree()
    for src, dst in HELPERS:
        extra.add_file(Path(src), dst)
    extra.add_libraries()
    outer = builder.Tree(dict(extra.entries))
    outer.add_data("boot/bzImage", Path(kernel.bzimage).read_bytes(), 0o644)
    outer.add_data("boot/initrd.img", cpio.write(extra.entries.values()) + capture.read_bytes(), 0o644)
    (LOG_ROOT / name).mkdir(parents=True, exist_ok=True)
    initrd = LOG_ROOT / f"{name}-initrd.img"
    initrd.write_bytes(cpio.write(outer.entries.values()) + first.read_bytes())
    stamps: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll(vm: VM) -> None:
        last = 0
        while not stop.is_set():
            n = len(vm.console.buf) if vm.console is not None else 0
            if n != last:
                stamps.append((time.monotonic(), n))
                last = n
            time.sleep(0.002)

    with VM(kernel=kernel, append="crashkernel=256M", memory_mb=1024, disk_mb=640, name=name, timeout=300,
            initrd=initrd) as vm:
        threading.Thread(target=poll, args=(vm,), daemon=True).start()
        vm.run("dd if=/dev/zero of=/dev/vda bs=1M count=2 2>/dev/null; sync")
        start_workload(vm)
        vm.run("khibernate target init /dev/vda --slots 2")
        mark = vm.mark()
        status, out = vm.run_status(SNAP, timeout=900)
        time.sleep(1)
        stop.set()
        assert vm.console is not None
        text = bytes(vm.console.buf)
        log_dir = vm.log_dir

    def arrived(offset: int) -> float:
        return next((ts for ts, n in stamps if n > offset), float("nan"))

    lines: list[tuple[int, str]] = []  # (offset of the line's end, text)
    pos = mark
    for raw in text[mark:].split(b"\n"):
        pos += len(raw)
        lines.append((pos, raw.decode(errors="replace").rstrip("\r")))
        pos += 1
    freeze = next(i for i, (_, s) in enumerate(lines) if "Freezing user space processes" in s)
    boot = next(i for i, (_, s) in enumerate(lines) if i > freeze and "Linux version" in s)
    job = next(i for i, (_, s) in enumerate(lines) if i > boot and "khibernate-capture: job" in s)
    h0 = arrived(lines[freeze][0])
    (log_dir / "timeline.txt").write_text("".join(f"{arrived(o) - h0:8.3f}  {s}\n" for o, s in lines[freeze:]))

    def capture_kts(pattern: str) -> float | None:
        return next((_kts(s) for _, s in lines[boot:job] if pattern in s), None)

    init_line = next((s for _, s in lines[boot:job] if "khibernate-init: kernel" in s), "")
    m_init = re.search(r"uptime ([\d.]+) s", init_line)
    m_job = re.search(r"up ([\d.]+) s", lines[job][1])
    res: dict[str, object] = {
        "snapshot_exit": status,
        "first_payload_bytes": first.stat().st_size, "capture_payload_bytes": capture.stat().st_size,
        "freeze_to_job_first_line_host": round(arrived(lines[job][0]) - h0, 3),
        "freeze_to_capture_console_host": round(arrived(lines[boot][0]) - h0, 3),
        "capture_unpack_start": capture_kts("Unpacking initramfs"),
        "capture_unpack_end": capture_kts("Freeing initrd memory"),
        "capture_run_init": capture_kts("Run /init as init process"),
        "capture_init_job_line_uptime": float(m_init.group(1)) if m_init else None,
        "capture_job_first_line_uptime": float(m_job.group(1)) if m_job else None,
    }
    if "{" in out:
        try:
            r = json.loads(out[out.index("{"):])
            res.update({k: r.get(k) for k in ("pause_seconds", "capture_job_started_uptime", "save_seconds")})
        except ValueError:
            pass
    else:
        res["snapshot_output"] = out.strip()[-500:]
    (log_dir / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sizes")
    sp = sub.add_parser("snapshot")
    sp.add_argument("--first", type=Path, help="payload the first kernel boots (default: this tree's)")
    sp.add_argument("--capture", type=Path, help="payload of the capture kernel (default: this tree's)")
    sp.add_argument("--name", default="capture-boot")
    args = ap.parse_args()
    res = sizes() if args.cmd == "sizes" else snapshot(args.name, args.first, args.capture)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
