"""The one door to every reader: :func:`open_source`.

A file format is picked by its first bytes: every format module exports ``probe(head)`` and ``open(path)``
(libkdumpfile's ``format_ops`` table is the model) and detection loops over :data:`READERS`.  Raw physical memory
has no magic: it is opened when the caller says what it holds (``ranges=``, or ``elfcorehdr=`` with the header's
bytes), by pread for a file and by mmap windows for a memory device (``/dev/mem``, whose read() stops at the running
kernel's own end of RAM).  Live and derived sources are opened by their users: the frozen jump target
(``khibernate/view/frozen.py``) and the adapters over another source (``adapters.py``, ``xen.py``).
"""

from __future__ import annotations

import importlib
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

from khibernate.image.errors import NotAVmcoreError, UsageErrorImage
from khibernate.image.sources.base import MemorySource, MemRange

if TYPE_CHECKING:
    from khibernate.seal.keysource import KeySource

HEAD_SIZE = 64  # bytes a probe sees

# reader modules, imported only when a file is probed (so the CLI starts fast)
READERS = ("khibernate.image.sources.elf", "khibernate.image.sources.kdump", "khibernate.image.sources.khi")


class ReaderModule(Protocol):
    """What a format module exports for detection."""

    def probe(self, head: bytes) -> bool: ...

    def open(self, path: str | os.PathLike[str]) -> MemorySource: ...


class KeyedReaderModule(Protocol):
    """A format module whose images may be sealed: ``open`` takes the key."""

    def open(self, path: str | os.PathLike[str], key: KeySource | None = None) -> MemorySource: ...


SEALED_READER = "khibernate.image.sources.khi"  # the one format with sealed images


def reader_for(head: bytes) -> ReaderModule | None:
    """The first reader module whose probe accepts ``head``, or None."""
    for name in READERS:
        mod = cast(ReaderModule, importlib.import_module(name))
        if mod.probe(head):
            return mod
    return None


def open_source(path: str | os.PathLike[str], *, ranges: Sequence[MemRange] | None = None,
                elfcorehdr: bytes | None = None, key: KeySource | None = None) -> MemorySource:
    """Open ``path`` with the reader its first bytes name (ELF, kdump, flattened, khibernate image), or as raw
    physical memory when ``elfcorehdr`` (the bytes of the ELF core header that describes it) or ``ranges`` is
    given.  ``key`` opens a sealed khibernate image; given for anything else it is refused (a key the user thinks
    protects something must not be ignored)."""
    from khibernate.image.inputfile import open_input

    p = os.fspath(path)
    raw = elfcorehdr is not None or ranges is not None
    fd = open_input(p)
    try:
        device = stat.S_ISCHR(os.fstat(fd).st_mode)
        head = b"" if raw else os.pread(fd, HEAD_SIZE, 0)
    finally:
        os.close(fd)
    if raw:
        from khibernate.image.sources.raw import DevMemSource, RawSource

        cls = DevMemSource if device else RawSource
        return cls.with_elfcorehdr(p, elfcorehdr) if elfcorehdr is not None else cls(p, ranges or ())
    mod = reader_for(head)
    if mod is None:
        raise NotAVmcoreError(
            f"{p}: not a vmcore (no ELF, kdump, flattened or khibernate magic); give /proc/vmcore, a QEMU dump, "
            "a makedumpfile output or a khibernate image"
        )
    if key is None:
        return mod.open(p)
    if getattr(mod, "__name__", "") != SEALED_READER:
        raise UsageErrorImage(f"{p}: a key was given, but this is not a sealed khibernate image (keys open sealed "
                              ".khi images only)")
    return cast(KeyedReaderModule, mod).open(p, key=key)
