"""The filter oracle: page classes from the guest kernel's own /proc/kpageflags, and a confusion table."""

from __future__ import annotations

import numpy as np

from khibernate.image.pagefilter import PageClass

KPF = {"slab": 7, "buddy": 10, "anon": 12, "swapcache": 13, "swapbacked": 14, "lru": 5, "huge": 17,
       "hwpoison": 19, "nopage": 20, "offline": 23, "private": 35}


def kpageflags_classes(flags: np.ndarray) -> np.ndarray:
    """PageClass per pfn from /proc/kpageflags bits, with makedumpfile's rules (what -d means)."""

    def bit(name: str) -> np.ndarray:
        return ((flags >> np.uint64(KPF[name])) & np.uint64(1)).astype(bool)

    slab = bit("slab")
    anon = bit("anon") & ~slab
    cache = (bit("lru") | (bit("swapcache") & bit("swapbacked"))) & ~anon & ~slab
    cls = np.full(len(flags), PageClass.OTHER, dtype=np.uint8)
    cls[cache & ~bit("private")] = PageClass.CACHE
    cls[cache & bit("private")] = PageClass.CACHE_PRIVATE
    cls[anon | bit("huge")] = PageClass.USER
    cls[bit("hwpoison") | bit("offline")] = PageClass.UNUSABLE
    cls[bit("buddy")] = PageClass.FREE
    cls[bit("nopage")] = PageClass.NO_PAGE
    return cls


def confusion(ours: np.ndarray, oracle: np.ndarray) -> tuple[np.ndarray, str]:
    """(matrix[oracle][ours], printable table with per-class agreement)."""
    k = len(PageClass)
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (oracle.astype(np.int64), ours.astype(np.int64)), 1)
    names = [c.name.lower()[:9] for c in PageClass]
    lines = ["oracle \\ ours " + " ".join(f"{n:>9}" for n in names) + "   agree"]
    for i, n in enumerate(names):
        tot = m[i].sum()
        agree = f"{100.0 * m[i, i] / tot:7.3f}%" if tot else "      -"
        lines.append(f"{n:>13} " + " ".join(f"{v:9d}" for v in m[i]) + f"  {agree}")
    return m, "\n".join(lines)
