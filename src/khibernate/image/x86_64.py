"""x86_64 kernel virtual -> physical translation from the image itself (no vmlinux).

Kernel text/data addresses map through ``__START_KERNEL_map`` + ``phys_base``; everything else (the randomised
direct map, vmemmap, vmalloc) goes through a walk of ``init_top_pgt``/``swapper_pg_dir`` with 4- or 5-level paging.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from khibernate.image.errors import AddressError, MissingVmcoreinfoError
from khibernate.image.sources.base import MemorySource
from khibernate.image.vmcoreinfo import ADDRESS, Vmcoreinfo

START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_IMAGE_SIZE_DEFAULT = 1 << 30
KERNEL_IMAGE_SIZES = (1 << 21, 1 << 31)  # 512 MiB or 1 GiB; the __START_KERNEL_map area is 2 GiB
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7
PTE_ADDR_MASK = 0x000FFFFFFFFFF000
_U64 = struct.Struct("<Q")


class X86_64:
    """Translates kernel VAs of one x86_64 kernel image using only its VMCOREINFO and memory.

    ``image_base`` is where the image mapping starts (``__START_KERNEL_map`` for Linux; the Xen hypervisor's
    translator in image/sources/xen.py sets its own)."""

    image_base = START_KERNEL_MAP

    def __init__(self, source: MemorySource, vmci: Vmcoreinfo):
        self.source = source
        self.vmci = vmci
        self.phys_base = vmci.number_or("phys_base", 0) or 0
        self.l5 = bool(vmci.number_or("pgtable_l5_enabled", 0, (0, 1)))
        self.sme_mask = vmci.number_or("sme_mask", 0, ADDRESS) or 0
        self.kernel_image_size = vmci.number_or("KERNEL_IMAGE_SIZE", KERNEL_IMAGE_SIZE_DEFAULT,
                                                KERNEL_IMAGE_SIZES) or 0
        for name in ("init_top_pgt", "swapper_pg_dir"):
            if vmci.has(f"SYMBOL({name})"):
                self.pgd_paddr = self.kernel_text_to_pa(vmci.symbol(name))
                break
        else:
            raise MissingVmcoreinfoError("VMCOREINFO has neither SYMBOL(init_top_pgt) nor SYMBOL(swapper_pg_dir); "
                                         "cannot translate kernel addresses without a page table root")
        self._table_cache: dict[int, bytes] = {}

    def kernel_text_to_pa(self, va: int) -> int:
        """PA of an address in the kernel image mapping (``__START_KERNEL_map`` region)."""
        return va - self.image_base + self.phys_base

    def _table(self, paddr: int) -> bytes:
        """One 4 KiB page-table page, cached."""
        t = self._table_cache.get(paddr)
        if t is None:
            if len(self._table_cache) > 4096:
                self._table_cache.clear()
            t = self._table_cache[paddr] = self.source.read(paddr, 4096)
        return t

    def walk(self, va: int) -> tuple[int, int]:
        """(PA, bytes left in the mapping page) for ``va`` by walking the kernel page tables."""
        mask = PTE_ADDR_MASK & ~self.sme_mask
        table = self.pgd_paddr
        shifts = (48, 39, 30, 21, 12) if self.l5 else (39, 30, 21, 12)
        for level, shift in enumerate(shifts):
            idx = (va >> shift) & 0x1FF
            (entry,) = _U64.unpack_from(self._table(table), idx * 8)
            if not entry & PTE_PRESENT:
                raise AddressError(f"kernel address {va:#x} is not mapped (level {len(shifts) - level} entry empty)")
            last = shift == 12 or (shift in (30, 21) and entry & PTE_PSE)
            if last:
                page_mask = (1 << shift) - 1
                pa = (entry & mask & ~page_mask) | (va & page_mask)
                return pa, (1 << shift) - (va & page_mask)
            table = entry & mask
        raise AssertionError("unreachable")

    def to_pa(self, va: int) -> int:
        """PA of any mapped kernel VA."""
        if self.image_base <= va < self.image_base + self.kernel_image_size:
            return self.kernel_text_to_pa(va)
        return self.walk(va)[0]

    def pieces(self, va: int, size: int) -> Iterator[tuple[int, int]]:
        """(PA, length) runs covering [va, va+size), physically contiguous runs merged."""
        run_pa, run_len = -1, 0
        end = va + size
        while va < end:
            if self.image_base <= va < self.image_base + self.kernel_image_size:
                pa, left = self.kernel_text_to_pa(va), self.image_base + self.kernel_image_size - va
            else:
                pa, left = self.walk(va)
            n = min(left, end - va)
            if run_len and run_pa + run_len == pa:
                run_len += n
            else:
                if run_len:
                    yield run_pa, run_len
                run_pa, run_len = pa, n
            va += n
        if run_len:
            yield run_pa, run_len

    def read(self, va: int, size: int) -> bytes:
        """Bytes at kernel VA [va, va+size)."""
        parts = [self.source.read(pa, n) for pa, n in self.pieces(va, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_u64(self, va: int) -> int:
        """Unsigned 64-bit value at ``va``."""
        return int(_U64.unpack(self.read(va, 8))[0])

    def read_u32(self, va: int) -> int:
        """Unsigned 32-bit value at ``va``."""
        return int(struct.unpack("<I", self.read(va, 4))[0])

    def page_offset(self) -> int | None:
        """Base of the direct map (KASLR randomises it in 1 GiB steps): the lowest kernel VA that maps PA 0."""
        mask = PTE_ADDR_MASK & ~self.sme_mask
        bits = 57 if self.l5 else 48
        shifts = (48, 39, 30) if self.l5 else (39, 30)

        def descend(table: int, level: int, va: int) -> int | None:
            data = self._table(table)
            shift = shifts[level]
            for i in range(256 if level == 0 else 0, 512):
                (entry,) = _U64.unpack_from(data, i * 8)
                if not entry & PTE_PRESENT:
                    continue
                sub = va | (i << shift)
                if shift == 30:
                    try:
                        if self.walk(_canonical(sub, bits))[0] == 0:
                            return _canonical(sub, bits)
                    except AddressError:
                        pass
                    continue
                if entry & PTE_PSE:
                    continue
                found = descend(entry & mask, level + 1, sub)
                if found is not None:
                    return found
            return None

        return descend(self.pgd_paddr, 0, 0)


def _canonical(va: int, bits: int) -> int:
    """Sign-extend a ``bits``-wide virtual address to 64 bits."""
    return va | (((1 << 64) - 1) ^ ((1 << bits) - 1)) if va >> (bits - 1) & 1 else va
