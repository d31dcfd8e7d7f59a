"""The frozen jump target: the kernel a kexec jump left behind, found from the first kernel after the jump back
(the seed's ``/proc/kimgcore``).

Which memory it is: the crash region (``/proc/iomem``) plus every destination page of the loaded kexec-jump image,
whose kimage entry list (``kexec_image->head``: IND_DESTINATION / IND_INDIRECTION / IND_SOURCE / IND_DONE) says
where the return swapped each page to.  The reader of that memory is
:class:`khibernate.image.sources.frozen.FrozenSource`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from khibernate.image.sources.base import MemRange
from khibernate.image.sources.frozen import PAGE, FrozenSource, Kcore
from khibernate.view.errors import NoPreviousKernelError

MASK = ~(PAGE - 1)
IND_DESTINATION, IND_INDIRECTION, IND_DONE, IND_SOURCE = 1, 2, 4, 8
MAX_ENTRIES = 1 << 22  # 16 GiB of pages: a list longer than this is corrupt


def kimage_swaps(head: int, read_u64: Callable[[int], int]) -> dict[int, int]:
    """{destination paddr: source paddr} of a kimage entry list starting at ``head``; ``read_u64(paddr)``."""
    out: dict[int, int] = {}
    if head and not head & IND_INDIRECTION:
        raise NoPreviousKernelError(f"kexec_image->head {head:#x} is not an indirection entry; not a kimage")
    entry, page, idx, dest = head, 0, 0, 0
    for _ in range(MAX_ENTRIES):
        if entry == 0 or entry & IND_DONE:
            return out
        if entry & IND_DESTINATION:
            dest = entry & MASK
        elif entry & IND_SOURCE:
            out[dest] = entry & MASK
            dest += PAGE
        if entry & IND_INDIRECTION:
            page, idx = entry & MASK, 0
        else:
            idx += 1
            if idx >= PAGE // 8:
                raise NoPreviousKernelError("kimage entry list runs past its indirection page; it is corrupt")
        entry = read_u64(page + 8 * idx)
    raise NoPreviousKernelError("kimage entry list does not end; it is corrupt")


def crash_regions(iomem: str) -> list[MemRange]:
    """'Crash kernel' ranges of /proc/iomem text (END inclusive there, exclusive here)."""
    out = []
    for line in iomem.splitlines():
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : Crash kernel$", line)
        if m:
            out.append(MemRange(int(m.group(1), 16), int(m.group(2), 16) + 1))
    return out


def kallsyms_address(text: str, name: str) -> int | None:
    """Address of symbol ``name`` in /proc/kallsyms text (None if absent or hidden as 0)."""
    m = re.search(rf"^([0-9a-f]+) \w {re.escape(name)}$", text, re.M)
    return int(m.group(1), 16) or None if m else None


def kexec_image_address(kallsyms: str = "/proc/kallsyms") -> int:
    """Address of the kernel's ``kexec_image`` pointer; NoPreviousKernelError when hidden or absent."""
    with open(kallsyms) as f:
        sym = kallsyms_address(f.read(), "kexec_image")
    if sym is None:
        raise NoPreviousKernelError("no kexec_image address in /proc/kallsyms: run as root (kptr_restrict) on a "
                                    "kernel with CONFIG_KEXEC")
    return sym


def loaded_image_swaps(kc: Kcore, sym: int) -> dict[int, int] | None:
    """{destination: source} of the running kernel's loaded kexec image (``sym``: kexec_image's address), read
    through its /proc/kcore; None when no image is loaded."""
    image = int.from_bytes(kc.read_virt(sym, 8), "little")
    if image == 0:
        return None
    head = int.from_bytes(kc.read_virt(image, 8), "little")
    return kimage_swaps(head, lambda pa: int.from_bytes(kc.read_phys(pa, 8), "little"))


def open_frozen(kallsyms: str = "/proc/kallsyms", iomem: str = "/proc/iomem",
                kcore: str = "/proc/kcore") -> FrozenSource:
    """The frozen jump target of the loaded kexec-jump image; NoPreviousKernelError saying why not."""
    sym = kexec_image_address(kallsyms)
    with open(iomem) as f:
        crash = crash_regions(f.read())
    if not crash:
        raise NoPreviousKernelError("no 'Crash kernel' region in /proc/iomem: boot with crashkernel= and load a "
                                    "jump image (khibernate jump load)")
    try:
        kc = Kcore(kcore)
    except PermissionError:
        raise NoPreviousKernelError(f"{kcore}: permission denied; run as root (lockdown forbids it)") from None
    try:
        swaps = loaded_image_swaps(kc, sym)
        if swaps is None:
            raise NoPreviousKernelError("no kexec jump image is loaded (kexec_image is NULL): nothing frozen to "
                                        "show; give SOURCE")
        return FrozenSource(kc, crash, swaps)
    except BaseException:
        kc.close()
        raise
