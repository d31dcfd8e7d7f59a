"""Guest workload for tests/vm/test_distro.py: memory the way a distribution uses it, held by one process per kind.

    python3 distro_memory.py hold KIND PAGES DIR     (a service: systemd-run ... ; runs until stopped)
    python3 distro_memory.py report TAG DIR          (prints one JSON report of every holder in DIR)

Kinds: ``thp`` (anonymous memory with MADV_HUGEPAGE: transparent huge pages), ``hugetlb`` (a file on the hugetlbfs
mount /dev/hugepages, MAP_SHARED), ``ksm`` (anonymous MADV_MERGEABLE pages, four distinct contents repeated, which
ksmd merges), ``anon`` (plain anonymous pages; the test runs this holder as a memcg-limited service).  Page ``i``
of a kind holds ``fill(kind, i)``.  Every region is mlocked (with vm.compact_unevictable_allowed=0 nothing migrates
it) and, except ``thp``, MADV_NOHUGEPAGE (khugepaged leaves it alone).

A holder writes ``DIR/KIND.pid`` when its pages are filled, then waits: for each ``DIR/KIND.request`` (a tag) it
checks every page against ``fill``, reads where the pages are (/proc/self/pagemap) and writes ``DIR/KIND.TAG.json``:
the pfns, the sha256 of the region, the pages that differ from ``fill``, and /proc/self/smaps's AnonHugePages,
Private_Hugetlb and Locked of the region.  ``report`` asks every holder, adds each pfn's /proc/kpageflags bits
(THP, HUGE, KSM, ...), the KSM and hugepage counters and the holders' cgroups, and prints the JSON.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import mmap
import os
import struct
import sys
import time

PAGE = 4096
HUGE = 2 << 20
MADV_MERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 12, 14, 15
KPF = {"anon": 12, "compound_head": 15, "compound_tail": 16, "huge": 17, "unevictable": 18, "ksm": 21, "thp": 22,
       "mlocked": 33}
KINDS = ("thp", "hugetlb", "ksm", "anon")


def fill(kind: str, i: int) -> bytes:
    """The content of page ``i`` of ``kind`` (KSM pages repeat four contents, so ksmd merges them)."""
    unit = f"KHB-{kind.upper()}-{(i % 4) if kind == 'ksm' else i:06d}-".encode()
    return (unit * (PAGE // len(unit) + 1))[:PAGE]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _call(what: str, rc: int) -> None:
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def region(kind: str, pages: int) -> tuple[mmap.mmap, int]:
    """(the mapping, the address where the region starts); THP regions start on a 2 MiB boundary."""
    size = pages * PAGE
    if kind == "hugetlb":
        fd = os.open("/dev/hugepages/khb-distro-memory", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        os.close(fd)
        return m, ctypes.addressof(ctypes.c_char.from_buffer(m))
    m = mmap.mmap(-1, size + (HUGE if kind == "thp" else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    return m, (base + HUGE - 1) & ~(HUGE - 1) if kind == "thp" else base


def hold(kind: str, pages: int, directory: str) -> None:
    libc = _libc()
    m, start = region(kind, pages)
    off = start - ctypes.addressof(ctypes.c_char.from_buffer(m))
    size = pages * PAGE
    if kind != "hugetlb":
        _call("madvise", libc.madvise(start, size, MADV_HUGEPAGE if kind == "thp" else MADV_NOHUGEPAGE))
        if kind == "ksm":
            _call("madvise MERGEABLE", libc.madvise(start, size, MADV_MERGEABLE))
    for i in range(pages):
        m[off + i * PAGE:off + (i + 1) * PAGE] = fill(kind, i)
    _call("mlock", libc.mlock(start, size))
    _write(f"{directory}/{kind}.pid", str(os.getpid()))
    while True:
        for req in glob.glob(f"{directory}/{kind}.request"):
            tag = open(req).read().strip()
            os.unlink(req)
            _write(f"{directory}/{kind}.{tag}.json", json.dumps(look(kind, m, off, start, pages)))
        time.sleep(0.5)


def look(kind: str, m: mmap.mmap, off: int, start: int, pages: int) -> dict:
    """Where the region's pages are and what they hold, as the process sees them now."""
    data = m[off:off + pages * PAGE]
    bad = [i for i in range(pages) if data[i * PAGE:(i + 1) * PAGE] != fill(kind, i)]
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        raw = f.read(pages * 8)
    entries = struct.unpack(f"<{pages}Q", raw)
    pfns = [e & ((1 << 55) - 1) if e >> 63 else -1 for e in entries]
    return {"kind": kind, "pid": os.getpid(), "pages": pages, "start": start, "pfn_runs": runs(pfns),
            "bad_pages": bad[:20],
            "n_bad": len(bad), "sha256": hashlib.sha256(data).hexdigest(), "smaps": smaps_of(start)}


def runs(pfns: list[int]) -> list[list[int]]:
    """[[first pfn, count], ...] of consecutive pfns (-1: not present)."""
    out: list[list[int]] = []
    for p in pfns:
        if out and p >= 0 and out[-1][0] >= 0 and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def expand(pfn_runs: list[list[int]]) -> list[int]:
    """The pfn of every page from ``runs``."""
    return [first + k if first >= 0 else -1 for first, n in pfn_runs for k in range(n)]


def smaps_of(start: int) -> dict:
    """The smaps fields (kB) of the mapping that holds ``start``."""
    out: dict = {}
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= start < hi
        elif inside and head in ("AnonHugePages:", "Private_Hugetlb:", "Shared_Hugetlb:", "Locked:", "Rss:"):
            out[head[:-1]] = int(line.split()[1])
    return out


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def kpageflags(pfns: list[int]) -> dict:
    """How many of the distinct pfns carry each named /proc/kpageflags bit (and ``distinct``: how many there are)."""
    out = {"distinct": 0, **{name: 0 for name in KPF}}
    with open("/proc/kpageflags", "rb") as f:
        for pfn in dict.fromkeys(pfns):
            f.seek(pfn * 8)
            (flags,) = struct.unpack("<Q", f.read(8))
            out["distinct"] += 1
            for name, bit in KPF.items():
                out[name] += flags >> bit & 1
    return out


def report(tag: str, directory: str) -> dict:
    kinds = [k for k in KINDS if os.path.exists(f"{directory}/{k}.pid")]
    for k in kinds:
        _write(f"{directory}/{k}.request", tag)
    deadline = time.monotonic() + 300
    out: dict = {"tag": tag, "kinds": {}}
    for k in kinds:
        path = f"{directory}/{k}.{tag}.json"
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise SystemExit(f"holder {k} did not answer request {tag}")
            time.sleep(0.2)
        r = json.load(open(path))
        r["flags"] = kpageflags([p for p in expand(r["pfn_runs"]) if p >= 0])
        r["cgroup"] = open(f"/proc/{r['pid']}/cgroup").read().strip()
        out["kinds"][k] = r
    ksm = "/sys/kernel/mm/ksm"
    out["ksm"] = {n: int(open(f"{ksm}/{n}").read()) for n in ("pages_shared", "pages_sharing", "full_scans")}
    out["meminfo"] = {k: v for k, v in (line.split(":") for line in open("/proc/meminfo"))
                      if k in ("AnonHugePages", "HugePages_Total", "HugePages_Free", "Hugepagesize", "Mlocked")}
    return out


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        print(json.dumps(report(sys.argv[2], sys.argv[3])))
