"""Every way to get at the old kernel's memory, behind one small interface (:class:`MemorySource`, ``base.py``) and
one door (:func:`open_source`, ``detect.py``).

- file formats, found by their first bytes, reader and writer side by side over ``image/layouts/``: ``elf`` (ELF
  vmcores, /proc/vmcore, QEMU dumps), ``kdump`` (makedumpfile's kdump-compressed file and flattened stream),
  ``khi`` (khibernate's image);
- raw physical memory, opened when the caller says what it holds (ranges or an elfcorehdr): ``raw``;
- live memory: ``frozen`` (the frozen jump target, from the first kernel);
- sources over another source: ``adapters`` (one more note), ``xen`` (a Xen host dump seen through Xen's frame
  table).
"""

from __future__ import annotations

from khibernate.elfcore import Note
from khibernate.image.sources.base import MemorySource, MemRange
from khibernate.image.sources.detect import open_source

__all__ = ["MemRange", "MemorySource", "Note", "open_source"]
