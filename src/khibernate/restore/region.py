"""Where a resume's restore kernel runs: in the crash region the image was saved from, whatever this boot reserved.

An image holds all of the hibernated kernel's RAM except low RAM and the crash region its capture kernel ran in,
so a restore kernel may run there and nowhere else.  A kernel with KASLR reserves ``crashkernel=SIZE`` below the
top of RAM unless its own randomly placed image sits there, and then lower: the resume boot's region is often not
the saved one.  So the restore kernel is loaded into the *saved* region as a jump window, whatever this boot
reserved: where that window is this boot's own RAM, relocate_kernel swaps this boot's pages out of it at the jump
(and back if the restore refuses), exactly as it swaps low RAM every time.  Pure: the saved region is what this
boot's RAM minus the image's ranges minus low RAM leaves, which must be one range.

Also here, for `doctor` and `hibernate`: whether a resume boot will reserve the same region (``region_outlook``:
a region with a fixed address, or KASLR off, is reproducible; KASLR with ``crashkernel=SIZE`` is not) and whether
a resume can do without (the swap is bounded by kexec_load's half-of-RAM rule).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from khibernate.ranges import Range, subtract
from khibernate.restore.checks import page_ranges

LOW_RAM_MAX = 640 << 10  # the low-RAM swap segment every jump has (below 640 KiB)


@dataclasses.dataclass(frozen=True)
class RestoreWindow:
    """Where the restore kernel will run: ``window`` (the saved crash region); ``reserved`` when this boot's own
    crash region holds it (nothing to swap), else how many bytes of this boot's RAM the jump swaps out."""

    window: Range
    reserved: bool
    this_boot_region: Range | None

    @property
    def swapped_bytes(self) -> int:
        return 0 if self.reserved else self.window.size

    def describe(self) -> str:
        """One line for the user."""
        here = (f"this boot's crash region {self.this_boot_region}" if self.this_boot_region
                else "this boot has no crash region")
        if self.reserved:
            return f"the restore kernel runs in {self.window}, inside {here} (the region the image was saved from)"
        return (f"the image was saved from crash region {self.window}, {here}: the restore kernel runs in the saved "
                f"region all the same, the jump swapping this boot's {self.window.size >> 20} MiB there out "
                "(and back, should the restore refuse)")


def saved_region(image_ranges: Sequence[Range], page_size: int, ram: Sequence[Range], low: Range) -> Range | None:
    """The one range of this boot's RAM the image leaves out besides low RAM: the crash region its capture kernel
    ran in.  None when the leftover is not exactly one range (the image describes other memory: another -m or
    firmware map, which the checks then report)."""
    image = page_ranges(image_ranges, page_size)
    if any(not any(r.covers(i) for r in page_ranges(ram, page_size)) for i in image):
        return None
    gaps = [g for g in subtract(page_ranges(ram, page_size), [*image, low]) if g.size]
    return gaps[0] if len(gaps) == 1 else None


def restore_window(image_ranges: Sequence[Range], page_size: int, ram: Sequence[Range], low: Range,
                   crash: Range | None) -> RestoreWindow | None:
    """Where the restore kernel must run for this image on this boot (None: the image does not fit this RAM)."""
    saved = saved_region(image_ranges, page_size, ram, low)
    if saved is None:
        return None
    return RestoreWindow(saved, crash is not None and crash.covers(saved), crash)


# ---------------------------------------------------------------- will a resume find its region? (doctor, hibernate)

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memparse(text: str) -> int | None:
    """The kernel's memparse: ``256M``, ``0x10000000``, ``1G`` → bytes; None when it is not a size."""
    m = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)([KMGT]?)", text.strip(), re.IGNORECASE)
    return int(m.group(1), 0) * _SUFFIX[m.group(2).upper()] if m else None


@dataclasses.dataclass(frozen=True)
class CrashkernelArg:
    """The ``crashkernel=`` word that reserves the main region: its size (None for the ``RANGE:SIZE,…`` form,
    whose size depends on the RAM) and its fixed address (None: the kernel picks one)."""

    text: str
    size: int | None
    offset: int | None


def parse_crashkernel(cmdline: str) -> CrashkernelArg | None:
    """The last ``crashkernel=`` of a command line that is not the ``,low`` companion; None without one."""
    words = [w[len("crashkernel="):] for w in cmdline.split() if w.startswith("crashkernel=")]
    words = [w for w in words if not w.endswith(",low")]
    if not words:
        return None
    text = words[-1]
    spec, _, at = text.removesuffix(",high").partition("@")
    return CrashkernelArg(text, None if ":" in spec else memparse(spec), memparse(at) if at else None)


def kaslr_on(cmdline: str, config: dict[str, str] | None) -> bool | None:
    """Whether this kernel placed itself at a random physical address (None: its config cannot be read)."""
    if "nokaslr" in cmdline.split():
        return False
    if config is None:
        return None
    return config.get("CONFIG_RANDOMIZE_BASE") == "y"


@dataclasses.dataclass(frozen=True)
class RegionOutlook:
    """Whether a resume boot reserves the crash region this boot saves from (``reproducible``, None: unknown) and
    whether a resume can run its restore kernel in the saved region either way (``resumable``)."""

    reproducible: bool | None
    resumable: bool
    message: str


def region_outlook(arg: CrashkernelArg, kaslr: bool | None, region_size: int, mem_total: int) -> RegionOutlook:
    """The outlook for a hibernation saved from a crash region of ``region_size`` bytes on a machine whose
    MemTotal is ``mem_total``: when the resume boot reserves another region, the jump must swap the saved region
    out of the resume boot's RAM, and kexec_load takes at most half of RAM in segments (low RAM included)."""
    mib = region_size >> 20
    fits = region_size + LOW_RAM_MAX <= mem_total // 2
    swap = (f"a resume then runs its restore kernel in the saved region all the same, the jump swapping the resume "
            f"boot's {mib} MiB there out (that boot needs as much free memory at the resume)")
    if arg.offset is not None:
        extra = (f"; but with KASLR a boot whose randomly placed kernel lands in {arg.offset:#x}+{mib}M gets no "
                 "region at all (the reservation fails) and cannot hibernate: crashkernel=SIZE without an address "
                 "avoids that (a resume boot that reserves another region swaps the saved one free)") if kaslr else ""
        return RegionOutlook(True, True, f"crashkernel={arg.text} pins the crash region: a resume boot reserves the "
                                         f"same one{extra}")
    if kaslr is False:
        return RegionOutlook(True, True, f"KASLR is off: crashkernel={arg.text} lands at the same address on every "
                                         "boot of this kernel with this memory")
    why = ("KASLR is on" if kaslr else "KASLR may be on (no kernel config to tell)") + (
        f" and crashkernel={arg.text} has no address: a resume boot may reserve another region (the kernel takes it "
        "below its own randomly placed image when that sits at the top of RAM)")
    if fits:
        return RegionOutlook(None if kaslr is None else False, True, f"{why}; {swap}")
    return RegionOutlook(None if kaslr is None else False, False,
                         f"{why}, and the saved region ({mib} MiB) is more than a jump may swap out of a resume "
                         f"boot's RAM (half of {mem_total >> 20} MiB): a resume would be refused on such a boot. "
                         "Pin it (crashkernel=SIZE@ADDRESS), boot with nokaslr, or reserve a smaller region")
