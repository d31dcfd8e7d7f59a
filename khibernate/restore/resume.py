"""`khibernate resume`: at early boot, bring back the kernel that `khibernate hibernate` saved.

read → plan → check, then the jump: the store's newest hibernation image not yet resumed is checked against this
boot (kernel release and build, memory ranges, crash region: :mod:`khibernate.restore.checks`); then the capture
kernel is loaded with a ``restore`` job and entered.  It checks the whole image again, marks the slot resumed,
writes the image into this kernel's memory and enters the saved kernel — this boot never continues.  If the
capture kernel refuses (before any write), it jumps back and this boot carries on normally; that is the only
way :func:`run` returns.  Run it before any filesystem is mounted read-write: the saved kernel has those
filesystems mounted and its caches describe them as they were at hibernate time.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, NoReturn

from khibernate.errors import KhibernateError
from khibernate.restore.checks import SavedImage, ThisBoot, check
from khibernate.store.superblock import FLAG_HIBERNATE, SlotRecord, SlotState, Superblock


class NothingToResume(KhibernateError):
    """The store holds no hibernation image to resume: boot normally."""


class ResumeError(KhibernateError):
    """The resume was refused or failed before any write: this boot continues normally."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What the user asked for."""

    target: str
    kernel: str | None = None
    capture_initrd: str | None = None
    again: bool = False
    deadline: float = 600.0
    append: str = ""


def choose(sb: Superblock, again: bool = False) -> SlotRecord | None:
    """The newest hibernation image that may be resumed: complete, or already resumed when ``again``."""
    ok = {SlotState.COMPLETE, SlotState.RESUMED} if again else {SlotState.COMPLETE}
    cands = [s for s in sb.slots if s.flags & FLAG_HIBERNATE and s.state in ok]
    return max(cands, key=lambda s: s.seq, default=None)


def build_id_from_notes(data: bytes) -> str:
    """The GNU build-id (hex) in /sys/kernel/notes, '' if absent."""
    from khibernate.image.elf import parse_notes

    try:
        notes = parse_notes(data)
    except KhibernateError:
        return ""
    return next((n.desc.hex() for n in notes if n.name == "GNU" and n.type == 3), "")


def this_kernel() -> ThisBoot:
    """This (freshly booted) kernel as a capture kernel will see it: the RAM a jump's elfcorehdr describes."""
    from khibernate.jump.loader import SystemFacts, jump_ram

    facts = SystemFacts.read(with_notes=False)
    try:
        build = build_id_from_notes(Path("/sys/kernel/notes").read_bytes())
    except OSError:
        build = ""
    return ThisBoot(page_size=os.sysconf("SC_PAGE_SIZE"), ranges=tuple(jump_ram(facts)),
                    osrelease=os.uname().release, build_id=build)


def preflight(opts: Options) -> tuple[Superblock, SlotRecord, SavedImage]:
    """The slot to resume and its image's identity, checked against this boot; nothing written.
    NothingToResume when there is no image, RestoreRefused / store errors when it does not fit."""
    from khibernate.store import api as store

    sb = store.read(opts.target)
    rec = choose(sb, opts.again)
    if rec is None:
        resumed = [s.index for s in sb.slots if s.flags & FLAG_HIBERNATE and s.state == SlotState.RESUMED]
        hint = (f" (slot {resumed[0]} holds an image resumed before: `khibernate resume --again` resumes it once "
                "more)") if resumed else ""
        raise NothingToResume(f"no hibernation image to resume in {opts.target}{hint}")
    src = store.open_slot(opts.target, rec)
    try:
        img = SavedImage.from_source(src)
    finally:
        src.close()
    check(img, this_kernel())
    return sb, rec, img


def run(opts: Options, say: Any = print) -> NoReturn:
    """Resume the saved kernel: on success this boot ends inside; otherwise raises ResumeError / NothingToResume /
    RestoreRefused with the reason, and this boot carries on."""
    from khibernate.capture.job import Job
    from khibernate.capture.mailbox import Mailbox, MailboxError
    from khibernate.capture.snapshot import capture_initrd_for, console_args, default_kernel
    from khibernate.jump import api as jump
    from khibernate.store import filedev

    t0 = time.monotonic()
    sb, rec, img = preflight(opts)
    kernel = opts.kernel or default_kernel()
    initrd, _ = capture_initrd_for(kernel, opts.target, opts.capture_initrd)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    image = str(uuidlib.UUID(bytes=rec.image_uuid))
    box = Mailbox(rec.image_uuid)
    cmdline = Path("/proc/cmdline").read_text()
    job_target, target_map = filedev.for_capture(opts.target)  # a store file: the dm device over its extents
    job = Job("restore", job_target, sb.uuid_str, rec.index, rec.offset, rec.capacity, rec.dump_level, image,
              boot_id, opts.deadline, box.paddr, again=opts.again, target_map=target_map)
    plan = jump.plan_jump(kernel, initrd, " ".join([*console_args(cmdline), opts.append, *job.args()]).strip())
    say(f"resume: slot {rec.index} of {opts.target}: {rec.osrelease}, {rec.length / 1e6:.1f} MB, hibernated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(rec.created_ns / 1e9))} UTC"
        + (" (resumed before: --again)" if rec.state == SlotState.RESUMED else ""))
    jump.load_plan(plan)
    if not box.still_at():
        jump.unload()
        raise ResumeError("the mailbox page moved before the jump; run resume again")
    say(f"resume: checked against this boot in {time.monotonic() - t0:.2f} s; entering the capture kernel, which "
        "restores the saved kernel (this boot ends here unless it refuses)")
    jump.execute()
    # only a refusal comes back here: nothing was written
    try:
        jump.unload()
    except KhibernateError:
        pass
    try:
        body = box.result()
    except MailboxError as e:
        raise ResumeError(f"the capture kernel came back without a result ({e}); nothing was restored") from None
    raise ResumeError(f"the capture kernel refused the image: {body.get('message')}")
