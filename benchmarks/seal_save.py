"""Sealed against unsealed on the same vmcore, same run: save (-d 17, restorable), the restore's check pass
(``verify(decompress=False)``: every frame's CRC, sealed also its tag) and the restore's read side (every block
read, checked and decompressed: ``iter_blocks``), medians of alternating runs (the order flips every round).

    python3 benchmarks/seal_save.py VMCORE [--runs 3] [--threads 2] [--dir /dev/shm]

VMCORE: e.g. the cached 1 GiB workload dump of the VM tests (~/.cache/khibernate/vmcores/wl1g-*/vmcore, a real
/proc/vmcore-like ELF).  Images go to --dir (memory-backed by default, so the disk does not dominate) and are
deleted at the end.  The key is a key file (a passphrase's scrypt runs once per open, ~0.5 s, not per block).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from khibernate.image import vmcoreinfo
    from khibernate.image.sources import open_source
    from khibernate.image.sources.khi import KhiSource, save_file
    from khibernate.seal.keysource import KeyFile
    from khibernate.seal.sealing import Sealing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vmcore")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="khibernate-seal-bench-") as d:
        kf = Path(d) / "key"
        kf.write_bytes(os.urandom(32))
        kf.chmod(0o600)
        key = KeyFile(kf)
        sealing = Sealing.new([key])
        images = {"unsealed": Path(d) / "u.khi", "sealed": Path(d) / "s.khi"}
        times: dict[str, list[float]] = {}
        size = 0

        def timed(name: str, fn: Callable[[], object]) -> None:
            t0 = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - t0)

        def save(kind: str) -> None:
            with open_source(a.vmcore) as src:
                save_file(src, images[kind], vmci=vmcoreinfo.from_source(src), level=17, restorable=True,
                          threads=a.threads, sync=False, seal=sealing if kind == "sealed" else None)

        def check(kind: str) -> None:
            with KhiSource(images[kind], key=key if kind == "sealed" else None) as s:
                s.verify(decompress=False)

        def read(kind: str) -> None:
            with KhiSource(images[kind], key=key if kind == "sealed" else None) as s:
                for _ in s.iter_blocks():
                    pass

        with open(a.vmcore, "rb") as f:  # warm the page cache
            while f.read(1 << 24):
                pass
        for r in range(a.runs):
            order = ["unsealed", "sealed"] if r % 2 == 0 else ["sealed", "unsealed"]
            for step, fn in (("save", save), ("check pass", check), ("read + decompress", read)):
                for kind in order:
                    timed(f"{step} {kind}", lambda fn=fn, kind=kind: fn(kind))  # type: ignore[misc]
        size = os.path.getsize(a.vmcore)
        print(f"{a.vmcore}: {size / 1e6:.0f} MB; images: unsealed {images['unsealed'].stat().st_size / 1e6:.1f} MB, "
              f"sealed {images['sealed'].stat().st_size / 1e6:.1f} MB; {a.runs} runs, medians, {a.threads} threads")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:28s} {med:7.2f} s  {size / 1e6 / med:7.0f} MB/s of vmcore")


if __name__ == "__main__":
    main()
