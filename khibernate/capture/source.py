"""A MemorySource that adds one ELF note to another source (the capture job's KHIBERNATE record)."""

from __future__ import annotations

from khibernate.elfcore import Note
from khibernate.image.sources.base import MemorySource, MemRange


class AnnotatedSource(MemorySource):
    """``inner`` with one more note; every read goes straight to ``inner``."""

    def __init__(self, inner: MemorySource, name: str, desc: bytes, note_type: int = 1):
        self.inner = inner
        self.page_size = inner.page_size
        self._note = Note(name, note_type, desc)

    @property
    def ranges(self) -> tuple[MemRange, ...]:
        return self.inner.ranges

    @property
    def notes(self) -> tuple[Note, ...]:
        return (*self.inner.notes, self._note)

    @property
    def max_pfn(self) -> int:
        return self.inner.max_pfn

    def read(self, paddr: int, size: int) -> bytes:
        return self.inner.read(paddr, size)

    def view(self, paddr: int, size: int) -> memoryview:
        return self.inner.view(paddr, size)

    def readinto(self, paddr: int, buf: memoryview) -> None:
        self.inner.readinto(paddr, buf)

    def mapped_view(self, paddr: int, size: int) -> memoryview | None:
        return self.inner.mapped_view(paddr, size)

    def release(self, paddr: int, size: int) -> None:
        self.inner.release(paddr, size)

    def present(self, paddr: int, size: int) -> bool:
        return self.inner.present(paddr, size)

    def page_present_mask(self, pfn: int, count: int) -> bytearray | None:
        return self.inner.page_present_mask(pfn, count)

    def close(self) -> None:
        self.inner.close()
