"""Analysis captures: the dump level kdump users keep, and the kdump-tools folder (vmcore + dmesg.txt) of a slot.

An analysis image (``snapshot --for-analysis``, ``watch``) drops zero, cache, user and free pages (-d 31): what is
left is the kernel's own memory, which crash and drgn need; it is not restorable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ANALYSIS_LEVEL = 31


def export_folder(target: str, slot: int, folder: Path) -> dict[str, Any]:
    """Write slot ``slot`` of ``target`` into ``folder`` as ``vmcore`` (kdump-compressed, what crash and drgn open)
    and ``dmesg.txt`` (the kernel log read back from that vmcore); returns what was written, with sizes and time."""
    from khibernate.image.dmesg import kernel_log
    from khibernate.image.sources import open_source
    from khibernate.image.vmcoreinfo import from_source
    from khibernate.store import api as store

    t0 = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    vmcore = folder / "vmcore"
    store.export(target, slot, str(vmcore), "kdump")
    with open_source(vmcore) as src:
        vmci = from_source(src)
        log = kernel_log(src, vmci) if vmci is not None else ""
    (folder / "dmesg.txt").write_text(log)
    return {"folder": str(folder), "vmcore": str(vmcore), "vmcore_bytes": vmcore.stat().st_size,
            "dmesg": str(folder / "dmesg.txt"), "dmesg_lines": log.count("\n"),
            "export_seconds": round(time.monotonic() - t0, 3)}


def dated_folder(root: Path, when: float | None = None, what: str = "") -> Path:
    """root/<UTC date-time>[-what] (kdump-tools' layout); a -N suffix keeps two captures in one second apart."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if when is None else when))
    name = f"{stamp}-{what}" if what else stamp
    d, n = root / name, 1
    while d.exists():
        n += 1
        d = root / f"{name}-{n}"
    return d
