"""Does a saved image belong to this boot?  Pure comparisons of what the image says against what this boot has.

A restore overwrites the first kernel's RAM with the image's pages and then enters the saved kernel, so the image
must describe *this* memory: same page size, the same RAM ranges outside the capture kernel's footprint (another
``-m`` or firmware map changes them; the resume boot runs the restore kernel in the saved crash region,
:mod:`khibernate.restore.region`), a restore kernel whose own RAM lies outside everything it writes, and the same
kernel build as the one whose memory is overwritten (its page tables, text and data are what the saved pages point
into).
Every difference is listed; nothing is written unless the list is empty.
"""

from __future__ import annotations

import dataclasses
import json
import uuid as uuidlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from khibernate.capture.jobspec import KHIBERNATE_NOTE
from khibernate.ranges import Range
from khibernate.restore.errors import RestoreRefused as RestoreRefused
from khibernate.restore.filesystems import FsRecord, records_from_json

if TYPE_CHECKING:
    from khibernate.image.sources.khi import KhiSource


def _ranges(value: Any) -> tuple[Range, ...]:
    return tuple(Range(int(a), int(b)) for a, b in value or ())


def _fmt(ranges: Sequence[Range]) -> str:
    return ", ".join(f"{r.start:#x}-{r.end:#x}" for r in ranges) or "none"


@dataclasses.dataclass(frozen=True)
class SavedImage:
    """What a restorable image says about the kernel it holds and the jump that saved it."""

    page_size: int
    ranges: tuple[Range, ...]
    osrelease: str
    build_id: str
    restorable: bool
    image_uuid: bytes
    jump_back_entry: int | None = None
    mailbox: int | None = None
    capture_ram: tuple[Range, ...] = ()
    zero_free: bool = False
    boot_id: str = ""
    kind: str = ""
    filesystems: tuple[FsRecord, ...] | None = None  # read-write filesystems at hibernate time (None: not recorded)

    @classmethod
    def from_source(cls, src: KhiSource) -> SavedImage:
        """From a KhiSource: its header and the capture job's KHIBERNATE note (absent: not from a jump)."""
        h = src.header
        note: dict[str, Any] = {}
        for n in src.notes:
            if n.name == KHIBERNATE_NOTE:
                try:
                    note = json.loads(n.desc)
                except ValueError:
                    note = {}
        vmci = src.vmcoreinfo()
        try:  # the job's image id: the store slot and the first kernel's mailbox request carry it
            image_uuid = uuidlib.UUID(str(note["image"])).bytes
        except (KeyError, ValueError):
            image_uuid = h.uuid
        return cls(page_size=h.page_size, ranges=tuple(Range(r.start, r.end) for r in h.ranges),
                   osrelease=(vmci.osrelease if vmci else "") or h.osrelease,
                   build_id=((vmci.build_id if vmci else "") or h.build_id or "").lower(),
                   restorable=bool(h.flags & 1) and bool(note.get("restorable", False)), image_uuid=image_uuid,
                   jump_back_entry=note.get("jump_back_entry"), mailbox=note.get("mailbox"),
                   capture_ram=_ranges(note.get("capture_ram")), zero_free=bool(note.get("zero_free", False)),
                   boot_id=str(note.get("boot_id", "")), kind=str(note.get("kind", "")),
                   filesystems=records_from_json(note.get("filesystems")))


@dataclasses.dataclass(frozen=True)
class ThisBoot:
    """The memory a restore would overwrite, as this boot sees it (the capture kernel: /proc/vmcore and iomem)."""

    page_size: int
    ranges: tuple[Range, ...]
    osrelease: str
    build_id: str
    capture_ram: tuple[Range, ...] = ()
    exact: tuple[Range, ...] = ()  # the RAM bytes themselves (PT_LOADs / System RAM), not padded to pages: writes
    # stay inside these, so the tail of a partial page (0x9fc00-0x9ffff: the BIOS's EBDA) is never written


def page_ranges(ranges: Sequence[Range], page_size: int) -> tuple[Range, ...]:
    """Ranges widened to whole pages and merged: readers pad an e820 range like 0x1000-0x9fc00 to its last page,
    /proc/iomem does not; compared this way both say the same."""
    out: list[Range] = []
    for r in sorted(ranges):
        a, b = r.start - r.start % page_size, -(-r.end // page_size) * page_size
        if out and a <= out[-1].end:
            out[-1] = Range(out[-1].start, max(out[-1].end, b))
        else:
            out.append(Range(a, b))
    return tuple(out)


def differences(img: SavedImage, here: ThisBoot) -> list[str]:
    """Everything that makes the image wrong for this boot, in words a user can act on (empty: it fits)."""
    out = []
    if not img.restorable:
        out.append("the image is not restorable (saved above dump level 17, or not by a capture job through a "
                   "kexec jump): it is for analysis only")
    if img.jump_back_entry is None:
        out.append("the image records no saved kernel entry (kexec_jump_back_entry)")
    if img.page_size != here.page_size:
        out.append(f"page size: image {img.page_size}, this machine {here.page_size}")
    if page_ranges(img.ranges, img.page_size) != page_ranges(here.ranges, img.page_size):
        out.append(f"memory ranges differ (another -m / memory size, or another firmware memory map): image "
                   f"{_fmt(img.ranges)}; this boot {_fmt(here.ranges)}")
    clash = [c for c in here.capture_ram if any(c.overlaps(r) for r in page_ranges(img.ranges, img.page_size))]
    if clash:
        out.append(f"the capture kernel's own memory {_fmt(clash)} overlaps memory the image restores (it ran in "
                   f"{_fmt(img.capture_ram) if img.capture_ram else 'another region'}): it would overwrite itself")
    if img.osrelease != here.osrelease:
        out.append(f"kernel release: image {img.osrelease or '?'}, the kernel whose memory would be overwritten "
                   f"{here.osrelease or '?'} (boot the kernel that hibernated)")
    if img.build_id and here.build_id and img.build_id != here.build_id:
        out.append(f"kernel build: image BUILD-ID {img.build_id}, this kernel {here.build_id} (same release, "
                   "another build: boot the very kernel image that hibernated)")
    elif not (img.build_id and here.build_id):
        out.append("the kernel build cannot be compared (BUILD-ID missing from the image or this kernel)")
    return out


def check(img: SavedImage, here: ThisBoot) -> None:
    """RestoreRefused listing every difference, or return."""
    diffs = differences(img, here)
    if diffs:
        raise RestoreRefused(diffs)
