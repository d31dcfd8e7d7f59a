"""The files a view offers (``vmcore``, ``oldmem``, ``vmcoreinfo``, ``dmesg``, ``info.json``) over one source.

Independent of FUSE: each file has a size and a ``read(offset, size)``; big files read the source on demand.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from khibernate.image.errors import ImageError
from khibernate.image.info import describe as image_describe
from khibernate.image.plan import default_notes
from khibernate.image.sources.base import MemorySource
from khibernate.image.sources.elf import VmcoreLayout, loads_for
from khibernate.image.vmcoreinfo import Vmcoreinfo, find_in_source


class ViewFile:
    """A read-only file: ``size`` bytes, ``read(offset, size)`` short at EOF."""

    def __init__(self, size: int, read: Callable[[int, int], bytes]):
        self.size = size
        self._read = read

    @classmethod
    def of_bytes(cls, data: bytes) -> ViewFile:
        """A small file held in memory."""
        return cls(len(data), lambda off, n: data[off:off + n])

    def read(self, offset: int, size: int) -> bytes:
        """Bytes at [offset, offset+size) clipped at EOF."""
        size = min(size, self.size - offset)
        return self._read(offset, size) if size > 0 and offset >= 0 else b""


def describe(source: MemorySource, vmci: Vmcoreinfo | None = None) -> dict[str, Any]:
    """info.json / ``view info``: image's description of the source (VMCOREINFO from its note unless given)."""
    if vmci is None:
        vmci = find_in_source(source)
    return image_describe(source, vmci)


def build_files(source: MemorySource, vmci: Vmcoreinfo | None = None) -> dict[str, ViewFile]:
    """The view of ``source``; ``vmcoreinfo``/``dmesg`` only when VMCOREINFO is known (note or ``vmci``)."""
    from khibernate.image.export import kernel_text_load, page_offset

    if vmci is None:
        vmci = find_in_source(source)
    layout = VmcoreLayout(loads_for(source.ranges, page_offset=page_offset(source, vmci),
                                    kernel_text=kernel_text_load(source, vmci)), default_notes(source, vmci))
    end = source.ranges[-1].end if source.ranges else 0

    def phys(paddr: int, n: int) -> bytes:
        return source.read_filled(paddr, n)

    files = {"vmcore": ViewFile(layout.size, lambda off, n: layout.read(off, n, phys)),
             "oldmem": ViewFile(end, phys)}
    info = describe(source, vmci)
    if vmci is not None:
        files["vmcoreinfo"] = ViewFile.of_bytes(vmci.text.encode())
        from khibernate.image.dmesg import kernel_log

        try:
            files["dmesg"] = ViewFile.of_bytes(kernel_log(source, vmci).encode())
        except ImageError as e:
            info["dmesg_error"] = str(e)
    info["vmcore_bytes"] = layout.size
    info["vmcore_loads"] = [[hex(s.paddr), hex(s.size)] for s in layout.segments]
    files["info.json"] = ViewFile.of_bytes((json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return files
