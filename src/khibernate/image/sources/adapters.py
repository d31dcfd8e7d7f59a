"""Sources over another source: every read goes to the inner source, one thing is changed.  Not formats (nothing to
probe): a caller wraps a source it opened.

- :class:`WrappedSource`: the base, forwarding everything;
- :class:`AnnotatedSource`: one more ELF note (the capture job's KHIBERNATE record);
- ``khibernate.image.sources.xen.XenFilteredSource``: a Xen host dump seen through Xen's frame table.
"""

from __future__ import annotations

from khibernate.elfcore import Note
from khibernate.image.sources.base import MemorySource, MemRange


class WrappedSource(MemorySource):
    """``inner`` as it is: ranges, notes, level, format and every kind of read forwarded (subclasses change one)."""

    def __init__(self, inner: MemorySource):
        self.inner = inner
        self.page_size = inner.page_size

    @property
    def ranges(self) -> tuple[MemRange, ...]:
        return self.inner.ranges

    @property
    def notes(self) -> tuple[Note, ...]:
        return self.inner.notes

    @property
    def max_pfn(self) -> int:
        return self.inner.max_pfn

    @property
    def dump_level(self) -> int:
        return self.inner.dump_level

    @property
    def format_name(self) -> str:  # type: ignore[override]
        return self.inner.format_name

    def describe(self) -> dict[str, object]:
        return self.inner.describe()

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


class AnnotatedSource(WrappedSource):
    """``inner`` with one more note."""

    def __init__(self, inner: MemorySource, name: str, desc: bytes, note_type: int = 1):
        super().__init__(inner)
        self._note = Note(name, note_type, desc)

    @property
    def notes(self) -> tuple[Note, ...]:
        return (*self.inner.notes, self._note)
