"""The capture kernel's side of a resume: read → check → mark resumed → write → post → jump to the saved kernel.

Runs in the capture kernel that a fresh boot of the hibernated kernel jumped to (``khibernate.job=restore``), or
by hand (``khibernate restore``).  Until the first write to memory every failure is a refusal: the caller jumps
back and that boot carries on normally.  From the first write on, the first kernel's memory is the saved kernel's
and half of it may be written: a failure then powers the machine off (:func:`power_off_if_touched`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from khibernate.capture.jobspec import CaptureContext, Failed, Job, Resumed
from khibernate.errors import KhibernateError
from khibernate.progress import Reporter
from khibernate.restore.checks import RestoreRefused, SavedImage, ThisBoot, check
from khibernate.system import SystemRoot

if TYPE_CHECKING:
    from khibernate.image.sources.khi import KhiSource
    from khibernate.restore.krestore import RestoreStats
    from khibernate.seal.keysource import KeySource
    from khibernate.seal.sealing import HandedKey
    from khibernate.store.handle import Store
    from khibernate.store.superblock import SlotRecord

TOUCHED = Path("/run/khibernate/oldmem-written")  # exists once the first byte of old memory was written
REPORTER = Reporter("khibernate-restore", "line")  # the capture kernel's console; `khibernate restore` by hand too


def say(msg: str) -> None:
    REPORTER.say(msg)


def this_boot(vmcore: str = "/proc/vmcore", system: SystemRoot | None = None) -> ThisBoot:
    """What this capture kernel sees of the first kernel (/proc/vmcore) and of itself (/proc/iomem)."""
    from khibernate.image.sources import open_source
    from khibernate.image.vmcoreinfo import from_source
    from khibernate.ranges import Range, merge

    with open_source(vmcore) as src:
        vmci = from_source(src)
        headers = getattr(src, "headers", None)
        loads = [Range(p.paddr, p.paddr + p.memsz) for p in getattr(headers, "loads", ()) if p.memsz]
        return ThisBoot(page_size=src.page_size, ranges=tuple(src.ranges),
                        osrelease=vmci.osrelease if vmci else "", build_id=(vmci.build_id if vmci else "").lower(),
                        capture_ram=tuple((system or SystemRoot()).system_ram()),
                        exact=tuple(merge(loads)) if loads else tuple(src.ranges))


@dataclasses.dataclass
class Prepared:
    """A checked image, ready to be written: nothing has been written yet.  ``store``: the open write handle of the
    slot's store (the slot is marked resumed through it); ``close()`` closes the image and the store."""

    source: KhiSource
    image: SavedImage
    here: ThisBoot
    slot: SlotRecord | None = None  # when the image is a store slot
    verify_seconds: float = 0.0
    store: Store | None = None

    def close(self) -> None:
        self.source.close()
        if self.store is not None:
            self.store.close()


def prepare_slot(target: str, index: int, *, again: bool = False, image_uuid: bytes | None = None,
                 attempt: bytes | None = None, vmcore: str = "/proc/vmcore", key: KeySource | None = None) -> Prepared:
    """Store slot ``index`` of ``target``, every check done (RestoreRefused / store errors); nothing written.
    With ``attempt`` (a resume job) the slot must be tried under that token as the store's current attempt; by hand,
    a complete slot, or with ``again`` one tried or resumed before.  The store stays open for writing (the slot is
    marked resumed before the first write to memory): one open for the whole restore."""
    from khibernate.store.handle import Store

    st = Store.open(target, write=True, say=say)
    try:
        return prepare_open_slot(st, index, again=again, image_uuid=image_uuid, attempt=attempt, vmcore=vmcore,
                                 key=key)
    except BaseException:
        st.close()
        raise


def prepare_open_slot(st: Store, index: int, *, again: bool = False, image_uuid: bytes | None = None,
                      attempt: bytes | None = None, vmcore: str = "/proc/vmcore",
                      key: KeySource | HandedKey | None = None) -> Prepared:
    """prepare_slot on the store ``st`` open for writing (the Prepared holds it; the caller closes it on a
    refusal); ``key`` also the image key a resume handed over."""
    rec = _restorable_slot(st, index, again, image_uuid, attempt)
    t0 = time.monotonic()
    src = st.open_slot(rec, key)  # header, trailer, tables: each its own CRC (sealed: authenticated)
    return _checked(src, rec, t0, vmcore, st.sb.flags, key is not None, f"slot {index} of {st.path}", st)


def prepare_job(job: Job, ctx: CaptureContext, devmem: str = "/dev/mem") -> Prepared:
    """The ``restore`` job's slot, every check done: first the resuming kernel's request taken from its mailbox
    page (capture/save.take_request: the image key of a sealed store wiped from the page at once), then the slot
    opened with that key, every block authenticated (prepare_open_slot).  Nothing written to memory (``devmem``:
    the first kernel's, where its mailbox page is) but the wipe; raises on a refusal."""
    from khibernate.capture.save import take_request
    from khibernate.store.handle import Store

    st = Store.open(job.target, write=True, say=say)
    try:
        _, seal = take_request(st, job, ctx, devmem)
        return prepare_open_slot(st, job.slot, again=job.again, image_uuid=job.image_uuid,
                                 attempt=bytes.fromhex(job.attempt) if job.attempt else None, vmcore=ctx.vmcore,
                                 key=seal.handed if seal is not None else None)
    except BaseException:
        st.close()
        raise


def _restorable_slot(st: Store, index: int, again: bool, image_uuid: bytes | None,
                     attempt: bytes | None) -> SlotRecord:
    """Slot ``index`` when a restore may take it (prepare_slot's rules); RestoreRefused otherwise."""
    from khibernate.restore.attempt import job_problems
    from khibernate.store.superblock import SlotState

    rec = st.sb.slot(index)
    if image_uuid is not None and rec.image_uuid != image_uuid:
        raise RestoreRefused([f"slot {index} of {st.path} now holds another image than the one asked for"])
    if attempt is not None:
        problems = job_problems(st.sb, index, attempt)
        if problems:
            raise RestoreRefused(problems)
    elif rec.state in (SlotState.RESUMED, SlotState.TRIED) and not again:
        raise RestoreRefused([f"slot {index} was {rec.state.name.lower()} once already: an image is tried once, and "
                              "resuming it again runs the same kernel state a second time (give --again to do that "
                              "on purpose)"])
    if not rec.holds_image:
        raise RestoreRefused([f"slot {index} is {rec.state.name.lower()}: it holds no complete image"])
    return rec


def prepare_file(path: str, vmcore: str = "/proc/vmcore", key: KeySource | None = None,
                 allow_unsealed: bool = False) -> Prepared:
    """An image file, every check done; nothing written.  An unsealed file is refused unless ``allow_unsealed``
    (``restore --allow-unsealed``: the file is in no store that could say so)."""
    from khibernate.image.sources.khi import KhiSource
    from khibernate.store.superblock import STORE_UNSEALED

    t0 = time.monotonic()
    return _checked(KhiSource(path, key=key), None, t0, vmcore, STORE_UNSEALED if allow_unsealed else 0,
                    key is not None, path)


def _checked(src: KhiSource, slot: SlotRecord | None, t0: float, vmcore: str, store_flags: int, key_given: bool,
             where: str, st: Store | None = None) -> Prepared:
    """Sealed or allowed unsealed (khibernate.seal.policy), every block's frame against its CRC and, sealed, its
    tag (bitmaps, index, trailer agreeing), then does the image belong to this boot; the source is closed on any
    refusal."""
    from khibernate.seal import policy

    try:
        policy.check_restore(store_flags, src.header.seal is not None, key_given, where)
        src.verify(decompress=False)
        p = Prepared(src, SavedImage.from_source(src), this_boot(vmcore), slot, time.monotonic() - t0, st)
        check(p.image, p.here)
        return p
    except BaseException:
        src.close()
        raise


def write_back(p: Prepared, devmem: str | None = None, fail_after_first_block: bool = False) -> RestoreStats:
    """Mark the slot resumed, then write the image into the first kernel's memory and read it back; the stats.
    ``fail_after_first_block`` (``khibernate.fault=restore-raise``) raises once the first block is written, to
    prove that a failure from there on powers the machine off."""
    from khibernate.restore.krestore import write_image
    from khibernate.restore.oldmem import OldMemory
    from khibernate.store.superblock import SlotState

    if p.slot is not None and p.store is not None:  # before the first write to memory
        p.store.set_slot(dataclasses.replace(p.slot, state=SlotState.RESUMED))

    def touched() -> None:
        TOUCHED.parent.mkdir(parents=True, exist_ok=True)
        TOUCHED.write_text("the first kernel's memory is being overwritten\n")

    ram = p.here.exact or p.image.ranges
    with OldMemory(ram, path=devmem) as mem, REPORTER.meter("memory written back") as meter:
        def progress(n: int) -> None:
            if fail_after_first_block:
                raise RuntimeError("khibernate.fault=restore-raise: failing on purpose after the first block was "
                                   "written")
            meter.update(n)

        stats = write_image(p.source, mem, ram=ram, zero_free=zero_free(p), progress=progress,
                            on_first_write=touched)
    stats.verify_seconds = round(p.verify_seconds, 3)
    why = "init_on_free" if p.image.zero_free else "sealed: nothing of the resume boot is left behind"
    say(f"{stats.pages_written} pages written, {stats.pages_zeroed} zeroed"
        + (f", {stats.pages_free_zeroed} free pages zeroed ({why})" if stats.pages_free_zeroed else "")
        + f", all read back equal: {stats.bytes_written / 1e6:.0f} MB in {stats.write_seconds:.2f} s "
        f"({stats.throughput_mb_s:.0f} MB/s); image checked in {p.verify_seconds:.2f} s")
    return stats


def zero_free(p: Prepared) -> bool:
    """Whether the restore zeroes the pages the image dropped as free: when the saved kernel zeroes freed pages
    (init_on_free), and for every sealed image — the resume boot's memory is not the saved kernel's to keep: its
    pages that the image does not overwrite would hold what that boot had (the typed passphrase, the image key)."""
    return p.image.zero_free or p.source.cipher is not None


def enter_saved_kernel(p: Prepared, resumed: Resumed) -> None:
    """Tell the saved kernel it was resumed (its mailbox page), then jump to its saved entry; does not return
    unless the jump fails (then raises, and the caller powers off: memory is no longer the booted kernel's)."""
    from khibernate.capture import mailbox
    from khibernate.jump import api as jump

    entry = p.image.jump_back_entry
    if entry is None:
        raise RestoreRefused(["the image records no saved kernel entry"])
    if p.image.mailbox:
        try:
            mailbox.post(p.image.mailbox, p.image.image_uuid, resumed.to_json())
        except (OSError, KhibernateError) as e:
            say(f"warning: the saved kernel's mailbox could not be written ({e}); it will not know it was resumed")
    say(f"entering the saved kernel at {entry:#x}")
    jump.jump_back(entry)
    raise KhibernateError("the saved kernel returned into the restore kernel")  # it never jumps back here


def run_restore(job: Job, ctx: CaptureContext) -> Failed:
    """The ``restore`` capture job: a refusal returns its result for the asking kernel's mailbox; success never
    returns (the saved kernel runs)."""
    say(f"restore slot {job.slot} of {job.target} (image {job.image}){' again' if job.again else ''}, up "
        f"{ctx.system.uptime():.2f} s")
    try:
        p = prepare_job(job, ctx)
    except KhibernateError as e:
        return Failed(str(e), type(e).__name__, refused=True)
    say(f"image checked ({p.verify_seconds:.2f} s): {p.image.osrelease}, {len(p.image.ranges)} RAM ranges, entry "
        f"{p.image.jump_back_entry:#x}; writing it back")
    stats = write_back(p, fail_after_first_block=restore_fault(ctx.cmdline))
    enter_saved_kernel(p, Resumed(restore=stats.as_dict(), resume_boot_id=job.boot_id, slot=job.slot,
                                  again=job.again, restore_uptime=round(ctx.system.uptime(), 3)))
    raise KhibernateError("the saved kernel returned into the restore kernel")  # not reached


def after_failure(job: Job, error: BaseException) -> None:
    """A restore job that failed: power off if memory was touched (power_off_if_touched)."""
    power_off_if_touched(error)


def restore_fault(cmdline: str) -> bool:
    """``khibernate.fault=restore-raise`` on the capture kernel's command line (`resume --append`)."""
    return "khibernate.fault=restore-raise" in cmdline.split()


def power_off_if_touched(error: BaseException) -> None:
    """After the first write to the first kernel's memory, a failure must not return into it: power off."""
    if not TOUCHED.exists():
        return
    say(f"FAILED after the first write to memory ({error}); the saved kernel is half restored and the booted one "
        "overwritten: powering off (the image is kept; `khibernate resume --again` retries)")
    from khibernate.jump import syscalls

    syscalls.reboot_power_off()
