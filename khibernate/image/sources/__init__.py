"""Every way to get at the old kernel's memory, behind one small interface (:class:`MemorySource`).

``open_source(path)`` sniffs the format (ELF vmcore, QEMU ELF dump, kdump-compressed, flattened, khibernate
image) and returns the matching reader.  Readers live next to their writers in ``khibernate.image.<format>``.
"""

from __future__ import annotations

from khibernate.elfcore import Note
from khibernate.image.sources.base import MemorySource, MemRange
from khibernate.image.sources.detect import open_source

__all__ = ["MemRange", "MemorySource", "Note", "open_source"]
