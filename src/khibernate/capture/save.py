"""The capture kernel's side of snapshot and hibernate: save /proc/vmcore into the job's reserved slot, streaming.

Run by :mod:`khibernate.capture.job` (the registry's ``snapshot`` and ``hibernate`` entries).  A snapshot returns
its :class:`~khibernate.capture.jobspec.Saved` result for the first kernel to read back and complete; a hibernate
job reads its slot back and marks it complete itself, then powers the machine off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from khibernate.capture.errors import DeadlineError, JobError
from khibernate.capture.jobspec import KHIBERNATE_NOTE, PREFIX, CaptureContext, Job, JsonValue, Saved
from khibernate.errors import KhibernateError
from khibernate.progress import Say

if TYPE_CHECKING:
    from khibernate.image.sources.base import MemorySource
    from khibernate.seal.sealing import Sealing
    from khibernate.store.handle import Store
    from khibernate.store.superblock import Superblock


def khibernate_note(job: Job, ctx: CaptureContext, extra: Mapping[str, JsonValue] | None = None) -> bytes:
    """The KHIBERNATE note's JSON: what a later restore needs beyond VMCOREINFO and the ranges (``extra``: what the
    first kernel's request adds, e.g. a hibernation's filesystems)."""
    from khibernate.jump.loader import parse_jump_back_entry

    entry = parse_jump_back_entry(ctx.cmdline)
    return json.dumps({"kind": job.kind, "boot_id": job.boot_id, "jump_back_entry": entry, "image": job.image,
                       "capture_cmdline": ctx.cmdline.strip(), "capture_release": os.uname().release,
                       "capture_ram": [[r.start, r.end] for r in ctx.capture_ram()], "mailbox": job.mailbox,
                       "zero_free": job.zero_free, "restorable": job.restorable, **(extra or {})}).encode()


# faults that other steps inject: /init panics before the job, a hibernate job does not power off, a restore fails
# after its first write (khibernate.restore.run.restore_fault)
OTHER_FAULTS = ("panic-early", "late-start", "poweroff-fails", "restore-raise")


def inject_fault(cmdline: str, say: Say | None = None) -> None:
    """``khibernate.fault=raise|hang`` (``snapshot --append``): fail on purpose, after the slot is reserved, to test
    that a failing or hung capture job still jumps back and leaves the last good image alone (like LKDTM for kdump)."""
    faults = [w.partition("=")[2] for w in cmdline.split() if w.startswith(f"{PREFIX}fault=")]
    if not faults or faults[-1] in OTHER_FAULTS:
        return
    if faults[-1] == "raise":
        raise RuntimeError("khibernate.fault=raise: the capture job raised on purpose")
    if faults[-1] == "hang":
        if say is not None:
            say("khibernate.fault=hang: hanging on purpose until the watchdog")
        while True:
            time.sleep(3600)
    raise JobError(f"unknown khibernate.fault={faults[-1]!r} (raise, hang, {', '.join(OTHER_FAULTS)})")


def check_reserved(st: Store, job: Job) -> None:
    """JobError unless the target holds the job's store with its slot reserved for the job's image."""
    reserved_problem = check_reserved_in(st.sb, job)
    if reserved_problem:
        raise JobError(reserved_problem)


def check_reserved_in(sb: Superblock, job: Job) -> str | None:
    """What is wrong with the superblock ``sb`` for ``job`` (another store, or the slot not reserved for the job's
    image), or None."""
    from khibernate.store.superblock import SlotState

    if sb.uuid_str != job.store_uuid:
        return (f"{job.target} holds store {sb.uuid_str}, not {job.store_uuid}: the disk is named differently in the "
                "capture kernel; nothing written")
    if not 0 <= job.slot < len(sb.slots):
        return f"{job.target} has no slot {job.slot}; nothing written"
    rec = sb.slot(job.slot)
    if rec.state != SlotState.WRITING or rec.image_uuid != job.image_uuid or rec.offset != job.offset \
            or rec.capacity != job.capacity:
        return f"slot {job.slot} of {job.target} is not reserved for image {job.image}; nothing written"
    return None


def take_request(st: Store, job: Job, ctx: CaptureContext,
                 devmem: str = "/dev/mem") -> tuple[dict[str, object], Sealing | None]:
    """The first kernel's request and, for a sealed store, the sealing of this job's image with the image key the
    request hands over.  The key is wiped from the first kernel's mailbox page at once, before its memory is read
    (so no image holds it there).  JobError / SealError when store and request disagree: nothing written."""
    from khibernate.capture import mailbox
    from khibernate.seal.sealing import HandedKey, Sealing
    from khibernate.store import keyslots
    from khibernate.store.superblock import STORE_SEALED

    # a resident capture kernel's pause brought its request in the pause record (ctx.request); the page is wiped all
    # the same (overwritten with the request without the key)
    request: dict[str, object] = dict(ctx.request) if ctx.request is not None \
        else mailbox.read_request(job.mailbox, job.image_uuid, devmem)
    handed = request.pop("seal", None)
    if handed is not None:
        mailbox.post(job.mailbox, job.image_uuid, request, devmem, kind=mailbox.REQUEST)
    if not st.sb.flags & STORE_SEALED:
        if handed is not None:
            raise JobError(f"{job.target} is not a sealed store, but the first kernel sent a key: the store was made "
                           "again since the capture began; nothing written")
        return request, None
    key = HandedKey.from_json(handed)
    if key.image_uuid != job.image_uuid:
        raise JobError("the handed image key is for another image than this job's; nothing written")
    return request, Sealing.from_handed(key, keyslots.read(st.fd, job.target), job.slot)


def save_into(st: Store, job: Job, ctx: CaptureContext, note_extra: Mapping[str, JsonValue] | None = None,
              seal: Sealing | None = None) -> Saved:
    """Save ``ctx.vmcore`` into the job's reserved slot of the open store ``st``, streaming (sealed with ``seal``
    when given); the result for the mailbox (raises on failure, DeadlineError past the job's deadline)."""
    from khibernate.image.sources import open_source
    from khibernate.image.sources.adapters import AnnotatedSource
    from khibernate.image.sources.khi import save
    from khibernate.image.vmcoreinfo import from_source
    from khibernate.store import device

    t0 = ctx.system.uptime()
    check_reserved(st, job)
    inject_fault(ctx.cmdline, ctx.rep.say)
    writer = device.RegionWriter(st.fd, job.offset, job.capacity, sync_every=32 << 20)
    with open_source(ctx.vmcore) as raw, \
            ctx.rep.meter("memory read", detail=lambda: f"{writer.length >> 20} MiB written") as meter:
        def progress(n: int) -> None:
            if ctx.system.uptime() > job.deadline:
                raise DeadlineError(f"the capture job passed its deadline ({job.deadline:g} s after the capture "
                                    "kernel booted); the image is incomplete")
            meter.update(n)

        vmci = from_source(raw)
        src = AnnotatedSource(relocated(raw, ctx), KHIBERNATE_NOTE, khibernate_note(job, ctx, note_extra))
        t1 = ctx.system.uptime()
        stats = save(src, writer, vmci=vmci, level=job.level, restorable=job.restorable,  # type: ignore[arg-type]
                     threads=min(2, os.cpu_count() or 1), progress=progress, seal=seal)
    writer.sync()
    t2 = ctx.system.uptime()
    return Saved(slot=job.slot, length=writer.length, crc32=writer.crc32, pages_ram=stats.pages_ram,
                 pages_stored=stats.pages_stored, pages_zero=stats.pages_zero, pages_excluded=stats.pages_excluded,
                 class_counts=list(stats.class_counts), osrelease=vmci.osrelease if vmci else "",
                 job_started_uptime=round(t0, 3), save_seconds=round(t2 - t1, 3), open_seconds=round(t1 - t0, 3))


def relocated(raw: MemorySource, ctx: CaptureContext) -> MemorySource:
    """``raw`` with the pages a resident capture kernel's jump-back image parked read from where they are."""
    if not ctx.parked:
        return raw
    from khibernate.capture.relocated import RelocatedSource
    from khibernate.image.sources.frozen import Kcore

    kc = Kcore()
    return RelocatedSource(raw, ctx.parked, lambda pa: kc.read_phys(pa, 4096))


def run_snapshot(job: Job, ctx: CaptureContext) -> Saved:
    """The ``snapshot`` job: save into the slot; the first kernel reads it back and marks it complete."""
    from khibernate.store.handle import Store

    with Store.open(job.target, write=True, say=ctx.rep.say) as st:
        _, seal = take_request(st, job, ctx)
        return save_into(st, job, ctx, seal=seal)


def run_hibernate(job: Job, ctx: CaptureContext) -> NoReturn:
    """Save like a snapshot (with the filesystems the first kernel recorded, from its mailbox request), read the
    slot back and mark it complete as the image to resume (the first kernel does not run again before a resume),
    then power the machine off; returns only on failure (raises).  One open of the store for all of it."""
    from khibernate.jump import syscalls
    from khibernate.store.handle import Store
    from khibernate.store.superblock import FLAG_HIBERNATE

    with Store.open(job.target, write=True, say=ctx.rep.say) as st:
        request, seal = take_request(st, job, ctx)
        filesystems = request.get("filesystems")
        if not isinstance(filesystems, list):
            raise JobError("the first kernel's request records no filesystems: a resume could not check the disks")
        saved = save_into(st, job, ctx, note_extra={"filesystems": filesystems}, seal=seal)
        done, chk, _ = st.complete(st.sb.slot(job.slot), saved.length, saved.crc32, pages_stored=saved.pages_stored,
                                   pages_excluded=saved.pages_excluded, flags=FLAG_HIBERNATE)
    ctx.rep.say(f"hibernation image complete in slot {done.index} of {job.target} ({chk.length / 1e6:.1f} MB, read "
                f"back and verified, saved in {saved.save_seconds} s); powering off at {ctx.system.uptime():.2f} s")
    if power_off_fault(ctx.cmdline):
        raise JobError("khibernate.fault=poweroff-fails: not powering off, on purpose (as if the power-off failed)")
    syscalls.reboot_power_off()
    raise JobError("the power-off returned")  # reboot(2) does not return when it works


def power_off_fault(cmdline: str) -> bool:
    """``khibernate.fault=poweroff-fails``: a hibernate job that completed its image comes back instead of powering
    off, to test that the image does not stay resumable while the first kernel runs on."""
    return f"{PREFIX}fault=poweroff-fails" in cmdline.split()


def withdraw_hibernation(job: Job) -> str:
    """A hibernate job that jumps back after all (failure, power-off refused, watchdog): its slot must not hold a
    resumable image while the first kernel runs on, so it is marked bad here, before the jump back (the first kernel
    marks it again, and says so if it cannot).  Returns what was done, for the log and the result."""
    from khibernate.store.handle import Store
    from khibernate.store.superblock import SlotState

    def change(sb: Superblock) -> Superblock:
        rec = sb.slot(job.slot)
        if rec.image_uuid != job.image_uuid or rec.state not in (SlotState.WRITING, SlotState.COMPLETE):
            return sb
        return sb.with_slot(dataclasses.replace(rec, state=SlotState.BAD, flags=0))

    try:
        with Store.open(job.target, write=True) as st:
            rec = st.update(change).slot(job.slot)
    except (KhibernateError, OSError) as e:
        return f"marking slot {job.slot} bad FAILED ({e}); the first kernel tries again"
    return f"slot {job.slot} is {rec.state.name.lower()}: no resumable image is left behind"


