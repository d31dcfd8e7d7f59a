"""Pick the reader for a file by its first bytes: every format module exports ``probe(head)`` and ``open(path)``
(libkdumpfile's ``format_ops`` table is the model); detection loops over :data:`READERS`."""

from __future__ import annotations

import importlib
import os
from typing import Protocol, cast

from khibernate.image.errors import NotAVmcoreError
from khibernate.image.sources.base import MemorySource

HEAD_SIZE = 64  # bytes a probe sees

# reader modules, imported only when a file is probed (so the CLI starts fast)
READERS = ("khibernate.image.sources.elf", "khibernate.image.sources.kdump", "khibernate.image.sources.khi")


class ReaderModule(Protocol):
    """What a format module exports for detection."""

    def probe(self, head: bytes) -> bool: ...

    def open(self, path: str | os.PathLike[str]) -> MemorySource: ...


def reader_for(head: bytes) -> ReaderModule | None:
    """The first reader module whose probe accepts ``head``, or None."""
    for name in READERS:
        mod = cast(ReaderModule, importlib.import_module(name))
        if mod.probe(head):
            return mod
    return None


def open_source(path: str | os.PathLike[str]) -> MemorySource:
    """Open ``path`` with the reader its first bytes name (ELF, kdump, flattened, khibernate image)."""
    from khibernate.image.inputfile import open_input

    p = os.fspath(path)
    fd = open_input(p)
    try:
        head = os.pread(fd, HEAD_SIZE, 0)
    finally:
        os.close(fd)
    mod = reader_for(head)
    if mod is None:
        raise NotAVmcoreError(
            f"{p}: not a vmcore (no ELF, kdump, flattened or khibernate magic); give /proc/vmcore, a QEMU dump, "
            "a makedumpfile output or a khibernate image"
        )
    return mod.open(p)
