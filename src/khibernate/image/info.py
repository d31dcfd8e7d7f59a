"""What is known about a source: the facts ``image info`` prints and a view's ``info.json`` holds."""

from __future__ import annotations

from typing import Any

from khibernate.elfcore import NT_PRSTATUS
from khibernate.image.sources.base import MemorySource
from khibernate.image.vmcoreinfo import Vmcoreinfo


def describe(src: MemorySource, vmci: Vmcoreinfo | None) -> dict[str, Any]:
    """Facts about any source: common ones, VMCOREINFO's, the reader's own (src.describe()), a Xen host's."""
    d: dict[str, Any] = {"format": src.format_name,
                         "ranges": [[hex(r.start), hex(r.end)] for r in src.ranges],
                         "ram_bytes": sum(r.size for r in src.ranges),
                         "notes": [f"{n.name}/{n.type}" for n in src.notes],
                         "cpus": sum(1 for n in src.notes if n.name == "CORE" and n.type == NT_PRSTATUS),
                         "dump_level": src.dump_level}
    if vmci is not None:
        d.update(osrelease=vmci.osrelease, build_id=vmci.build_id, page_size=vmci.page_size,
                 kerneloffset=hex(vmci.kerneloffset), crashtime=vmci.crashtime)
    d.update(src.describe())
    from khibernate.image.sources import xen

    host = xen.read(src)
    if host is not None:
        d.update(host.describe())
    return d
