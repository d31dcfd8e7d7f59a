"""Physical reads that never fail inside the address space: holes and excluded pages read as zeros.

This is what ``oldmem`` and the PT_LOAD data of the on-the-fly ``vmcore`` return (a filtered image dropped
those pages; a reader that wants to know asks the source's ``present``/``page_present_mask``).
"""

from __future__ import annotations

from khibernate.image.errors import AddressError
from khibernate.image.sources.base import MemorySource


def read_filled(source: MemorySource, paddr: int, size: int) -> bytes:
    """Bytes of [paddr, paddr+size): the source's bytes where it has them, zeros elsewhere (no AddressError)."""
    if size <= 0:
        return b""
    try:
        return source.read(paddr, size)
    except AddressError:
        pass
    ps = source.page_size
    out = bytearray(size)
    pos = paddr
    end = paddr + size
    while pos < end:
        n = min(ps - pos % ps, end - pos)
        if source.present(pos, n):
            try:
                out[pos - paddr:pos - paddr + n] = source.read(pos, n)
            except AddressError:
                pass  # excluded by the filter: stays zero
        pos += n
    return bytes(out)
