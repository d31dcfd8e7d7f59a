"""Pick the reader for a file by its magic bytes."""

from __future__ import annotations

import os

from khibernate.image.errors import NotAVmcoreError
from khibernate.image.sources.base import MemorySource


def open_source(path: str | os.PathLike[str]) -> MemorySource:
    """Open ``path`` with the reader its magic names (ELF, kdump, flattened, khibernate image)."""
    from khibernate.image.inputfile import open_input

    p = os.fspath(path)
    fd = open_input(p)
    try:
        magic = os.pread(fd, 16, 0)
    finally:
        os.close(fd)
    if magic.startswith(b"\x7fELF"):
        from khibernate.image.elf import ElfSource

        return ElfSource(p)
    if magic[:8] in (b"KDUMP   ", b"DISKDUMP") or magic.startswith(b"makedumpfile\0"):
        from khibernate.image.kdump import KdumpSource

        return KdumpSource(p)
    from khibernate.image.format import MAGIC

    if magic.startswith(MAGIC):
        from khibernate.image.format import KhiSource

        return KhiSource(p)
    raise NotAVmcoreError(
        f"{p}: not a vmcore (no ELF, kdump, flattened or khibernate magic); give /proc/vmcore, a QEMU dump, "
        "a makedumpfile output or a khibernate image"
    )
