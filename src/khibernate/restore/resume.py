"""`khibernate resume`: at early boot, bring back the kernel that `khibernate hibernate` saved.

The store's newest hibernation image is marked ``tried`` first, before any check can refuse it (an image is tried
once: :mod:`khibernate.restore.attempt`).  Then it is checked against this boot (kernel release and build, memory
ranges: :mod:`khibernate.restore.checks`), the capture kernel is loaded with a ``restore`` job for this attempt
into the crash region the image was saved from — this boot's own, or, when this boot reserved another one (KASLR),
its RAM there, which the jump swaps out (:mod:`khibernate.restore.region`) — and entered.  It checks the whole
image again, marks the slot resumed, writes the image into this kernel's memory and enters the saved kernel — this
boot never continues.  If the capture kernel refuses (before any write), it jumps back and this boot carries on
normally; that, and a refusal here, are the only ways :func:`run` returns (by raising).  Run it before any
filesystem is mounted read-write: the saved kernel has those filesystems mounted and its caches describe them as
they were at hibernate time.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from khibernate.errors import KhibernateError
from khibernate.progress import Say
from khibernate.restore.attempt import Attempt
from khibernate.restore.checks import RestoreRefused, SavedImage, ThisBoot, differences
from khibernate.restore.errors import NothingToResume as NothingToResume
from khibernate.restore.errors import ResumeError as ResumeError
from khibernate.restore.region import RestoreWindow, restore_window
from khibernate.store.superblock import FLAG_HIBERNATE, SlotRecord, SlotState, Superblock
from khibernate.system import SystemRoot

if TYPE_CHECKING:
    from khibernate.capture.jobspec import JsonValue
    from khibernate.jump.loader import SystemFacts
    from khibernate.seal.keysource import KeySource
    from khibernate.seal.sealing import HandedKey
    from khibernate.store.handle import Store


@dataclasses.dataclass(frozen=True)
class Options:
    """What the user asked for."""

    target: str
    kernel: str | None = None
    capture_initrd: str | None = None
    again: bool = False
    deadline: float = 600.0
    append: str = ""
    attempt: str | None = None  # continue this attempt (its token, 32 hex digits) instead of starting one
    ignore_changed_filesystems: bool = False  # with again only: resume although a recorded filesystem changed
    # a sealed store's key, made (the secret read, or asked on the console) only in the child process that derives
    # the image key; None: a sealed store's passphrase is asked on the console
    key: Callable[[], KeySource] | None = None


def newest_image(sb: Superblock) -> SlotRecord | None:
    """The store's newest hibernation image, whatever became of it (complete, tried or resumed).  Only the newest is
    ever resumed: an older complete one is staler still than the one a boot already tried."""
    cands = [s for s in sb.slots if s.flags & FLAG_HIBERNATE and s.holds_image]
    return max(cands, key=lambda s: s.seq, default=None)


def choose(sb: Superblock, again: bool = False) -> SlotRecord | None:
    """The hibernation image to resume: the newest one when it is complete (never tried), or with ``again`` also
    when a boot tried or resumed it before; None otherwise."""
    rec = newest_image(sb)
    return rec if rec is not None and (rec.state == SlotState.COMPLETE or again) else None


def tried_before(target: str, rec: SlotRecord) -> str:
    """Why the newest image is not resumed without --again: a boot found it before."""
    what = {SlotState.TRIED: "a boot tried it before (the resume was refused, failed or interrupted, and that boot "
                             "may have gone on and changed the disks)",
            SlotState.RESUMED: "it was resumed before"}.get(rec.state, rec.state.name.lower())
    return (f"slot {rec.index} of {target} holds hibernation image #{rec.seq}, and {what}: an image is tried once, "
            "not resuming (`khibernate resume --again` resumes it on purpose)")


def where_to_restore(img: SavedImage, facts: SystemFacts | None = None) -> RestoreWindow | None:
    """The saved crash region the restore kernel must run in, and whether this boot reserved it (None: the image
    does not describe this boot's RAM; the checks say how).  ``facts``: this boot's SystemFacts (read if None)."""
    from khibernate.jump.loader import SystemFacts
    from khibernate.jump.memmap import crash_region, low_ram, system_ram

    facts = facts or SystemFacts.read(with_notes=False)
    low = low_ram(facts.firmware)
    if low is None:
        return None
    return restore_window(img.ranges, img.page_size, system_ram(facts.iomem), low, crash_region(facts.iomem))


def this_kernel(img: SavedImage | None = None) -> ThisBoot:
    """This (freshly booted) kernel as a capture kernel will see it: the RAM a jump's elfcorehdr describes — a jump
    into the crash region ``img`` was saved from (where_to_restore), or without ``img`` into this boot's own."""
    from khibernate.elfcore import gnu_build_id
    from khibernate.jump.loader import SystemFacts, jump_ram

    facts = SystemFacts.read(with_notes=False)
    where = where_to_restore(img, facts) if img is not None else None
    try:
        build = gnu_build_id(Path("/sys/kernel/notes").read_bytes())
    except OSError:
        build = ""
    bounds = (where.window.start, where.window.end - 1) if where is not None else (None, None)
    return ThisBoot(page_size=os.sysconf("SC_PAGE_SIZE"), ranges=tuple(jump_ram(facts, *bounds)),
                    osrelease=os.uname().release, build_id=build)


def saved_image(st: Store, rec: SlotRecord, key: HandedKey | None = None, key_given: bool = False) -> SavedImage:
    """What the slot's image says about the kernel it holds (header, trailer and tables checked; sealed: opened
    with the image key ``key`` and authenticated), and whether the store accepts it (khibernate.seal.policy: given
    a key, only a sealed image)."""
    from khibernate.seal import policy

    src = st.open_slot(rec, key)
    try:
        policy.check_restore(st.sb.flags, src.header.seal is not None, key_given or key is not None,
                             f"slot {rec.index} of {st.path}")
        return SavedImage.from_source(src)
    finally:
        src.close()


def image_key(opts: Options, st: Store, rec: SlotRecord, ask: bool = True, say: Say = print) -> HandedKey | None:
    """The key of the slot's image in a sealed store, derived in a child process (khibernate.seal.handoff, as a
    snapshot does) from the key ``opts`` names or, none named and ``ask`` (a resume, in the initramfs), from the
    store's TPM slot if it has one and then, when that fails, from a passphrase asked on the console there; None
    for a store that is not sealed.  KeyRequiredError / WrongKeyError / KeySourceError / TpmError before anything
    is loaded."""
    from khibernate.seal import keyring
    from khibernate.seal.errors import KeyRequiredError, SealError
    from khibernate.store.superblock import STORE_SEALED

    if not st.sb.flags & STORE_SEALED:
        return None
    from khibernate.seal.askpass import console_passphrase
    from khibernate.seal.handoff import hand_image_key
    from khibernate.store import keyslots

    what = f"the store {opts.target}"
    if opts.key is not None:
        return hand_image_key(opts.key, keyslots.read(st.fd, opts.target), rec.image_uuid, what)
    if not ask:
        raise KeyRequiredError(f"{opts.target} is a sealed store: give its key to check its image (--key-file FILE, "
                               "--passphrase-file FILE, --tpm, or --passphrase to type it)")
    ring = keyslots.read(st.fd, opts.target)
    kinds = {s.kind for s in ring.slots}
    if keyring.KIND_TPM in kinds:
        from khibernate.seal.tpm import TpmKey

        try:
            return hand_image_key(TpmKey, ring, rec.image_uuid, what)
        except SealError as e:
            if keyring.KIND_PASSPHRASE not in kinds:
                raise
            say(f"resume: {e}; asking for the passphrase instead")
    if keyring.KIND_PASSPHRASE not in kinds:
        raise KeyRequiredError(f"{opts.target} is a sealed store opened by {ring.kinds()}, not by a passphrase "
                               "to type: give its key (--key-file FILE)")
    return hand_image_key(console_passphrase(opts.target), ring, rec.image_uuid, what)


def problems(opts: Options, img: SavedImage, say: Say = print) -> list[str]:
    """Everything that makes ``img`` wrong for this boot: its kernel and memory (checks.differences) and every
    filesystem recorded at hibernate time that is missing or was mounted since (khibernate.restore.filesystems) —
    the latter waived only by --again with --ignore-changed-filesystems, loudly.  Warns about the filesystems whose
    changes cannot be seen.  Empty: resume."""
    from khibernate.restore import filesystems

    try:
        out = differences(img, this_kernel(img))
    except KhibernateError as e:
        out = [str(e)]
    if img.filesystems is None:
        changed = ["the image records no filesystems (saved by an older khibernate, or not by `khibernate "
                   "hibernate`): whether the disks changed since cannot be told"]
    else:
        changed = filesystems.differences(img.filesystems, filesystems.find_on_disks)
        for warning in filesystems.unchecked(img.filesystems):
            say(f"resume: warning: {warning}")
    if changed and opts.again and opts.ignore_changed_filesystems:
        for c in changed:
            say(f"resume: WARNING: --again --ignore-changed-filesystems: resuming although {c}")
        changed = []
    return out + changed


def preflight(opts: Options, say: Say = print) -> tuple[Superblock, SlotRecord, SavedImage]:
    """`resume --check`: the slot a resume would take and its image, checked against this boot; nothing written.
    NothingToResume when there is no image, ResumeError when it was tried before, RestoreRefused / store errors
    when it does not fit."""
    from khibernate.store.handle import Store

    with Store.open(opts.target) as st:
        sb = st.sb
        rec = newest_image(sb)
        if rec is None:
            raise NothingToResume(f"no hibernation image to resume in {opts.target}")
        if choose(sb, opts.again) is None:
            raise ResumeError(tried_before(opts.target, rec))
        # no implicit ask here: --check may run anywhere (the console of a booted system is nobody's terminal)
        img = saved_image(st, rec, image_key(opts, st, rec, ask=False), opts.key is not None)
    found = problems(opts, img, say)
    if found:
        raise RestoreRefused(found)
    return sb, rec, img


def open_for_resume(target: str, say: Say | None = None) -> Store:
    """The write handle a resume holds from the mark to the jump.  A store file on the read-only root (the
    initramfs) is written through the device under it: its superblock copies at the file's offset there, the
    extent map proven first (filetarget.raw_window)."""
    from khibernate.store import filetarget
    from khibernate.store.handle import Store

    window = filetarget.raw_window(target)
    if say is None:
        return Store.open(target, write=True, window=window)
    return Store.open(target, write=True, say=say, window=window)


def begin(opts: Options, st: Store | None = None) -> Attempt:
    """Start the attempt — the newest hibernation image's slot marked tried, before any check — or continue the one
    ``opts.attempt`` names (once).  NothingToResume / ResumeError (nothing marked) otherwise.  ``st``: the write
    handle the resume holds (else one is opened and closed: open_for_resume)."""
    from khibernate.restore import attempt

    if st is None:
        with open_for_resume(opts.target) as own:
            return begin(opts, own)
    if opts.attempt:
        return attempt.resume_continued(st, attempt.parse_token(opts.attempt))
    sb = st.refresh()
    rec = newest_image(sb)
    if rec is None:
        raise NothingToResume(f"no hibernation image to resume in {opts.target}")
    if choose(sb, opts.again) is None:
        try:  # say also what a resume --again would run into (nothing is marked: it is tried already)
            found = problems(opts, saved_image(st, rec), say=lambda m: None)
        except (KhibernateError, OSError) as e:
            found = [f"its image cannot be read ({e})"]
        raise ResumeError(tried_before(opts.target, rec) + ("; besides: " + "; ".join(found) if found else ""),
                          differences=found)
    return attempt.start(st, rec, sb.uuid)


def discard(opts: Options) -> Attempt:
    """``noresume``: mark the newest hibernation image tried without resuming it (swsusp's noresume discards its
    image the same way), so this boot may go on and change the disks; NothingToResume / ResumeError when there is no
    untried image."""
    return begin(dataclasses.replace(opts, again=False, attempt=None))


def check_in_initrd(system: SystemRoot) -> None:
    """ResumeError unless this runs from the initramfs (like systemd-hibernate-resume's "not running in initrd"):
    after the switch to the real root the booted system may have mounted and written the filesystems that the
    saved kernel holds in its caches."""
    if not system.in_initrd():
        from khibernate.system import root_fstype

        fstype = root_fstype(system.read("/proc/1/mountinfo") or "") or "unknown"
        raise ResumeError(f"not running in an initramfs (PID 1's root filesystem is {fstype}: this system has "
                          "booted, and its filesystems may be mounted read-write already); resume runs from the "
                          "initramfs before any filesystem is mounted (initramfs/initramfs-tools), not resuming")


def run(opts: Options, say: Say = print, system: SystemRoot | None = None) -> NoReturn:
    """Resume the saved kernel: on success this boot ends inside.  Otherwise raises NothingToResume (no image),
    or ResumeError with the reason — carrying the attempt's token once a slot was marked tried — and this boot
    carries on.  Refused outside an initramfs (``system``: where /proc is, ``/`` by default) after the mark.  One
    write handle of the store from the mark to the jump."""
    system = system or SystemRoot()
    with open_for_resume(opts.target, say) as st:
        att = begin(opts, st)
        rec = att.slot
        say(f"resume: slot {rec.index} of {opts.target}: {rec.osrelease}, {rec.length / 1e6:.1f} MB, hibernated "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(rec.created_ns / 1e9))} UTC; marked tried "
            f"({'continuing' if att.continued else 'starting'} attempt {att.token_hex})"
            + (" (--again)" if opts.again else ""))
        try:
            check_in_initrd(system)
            _check_and_jump(opts, att, say, system, st)
        except ResumeError as e:
            e.attempt = att.token_hex
            raise
        except KhibernateError as e:
            diffs = e.differences if isinstance(e, RestoreRefused) else []
            raise ResumeError(str(e), attempt=att.token_hex, differences=diffs) from e
        except OSError as e:
            raise ResumeError(f"{e.filename or ''}: {e.strerror or e}; nothing was restored",
                              attempt=att.token_hex) from e


def _check_and_jump(opts: Options, att: Attempt, say: Say, system: SystemRoot, st: Store) -> NoReturn:
    """Every check against this boot, then the restore job's round trip; raises on a refusal (the boot goes on)."""
    from khibernate.capture import kernelcheck
    from khibernate.capture.errors import RoundTripError
    from khibernate.capture.jobspec import Failed, Job
    from khibernate.capture.roundtrip import CaptureKernel, RoundTrip
    from khibernate.capture.snapshot import capture_initrd_for, default_kernel
    from khibernate.store import filedev

    t0 = time.monotonic()
    rec = att.slot
    handed = image_key(opts, st, rec, say=say)  # a wrong key or passphrase: refused here, nothing loaded
    img = saved_image(st, rec, handed, opts.key is not None)
    if handed is not None:
        say(f"resume: the image is sealed: its key derived, its header and tables authentic "
            f"({time.monotonic() - t0:.2f} s, typing included); the capture kernel authenticates every block before "
            "the first write")
    found = problems(opts, img, say)
    if found:
        raise RestoreRefused(found)
    where = where_to_restore(img)
    if where is None:  # the checks found the image's memory to fit this boot, so its crash region is known
        raise ResumeError("cannot tell which crash region the image was saved from")
    kernel = opts.kernel or default_kernel()
    # it must jump back here when it refuses, and into the saved kernel when it restores
    kernelcheck.check(kernel, system)
    initrd, _ = capture_initrd_for(kernel, opts.target, opts.capture_initrd)
    job_target, target_map = filedev.for_capture(opts.target)  # a store file: the dm device over its extents
    job = Job("restore", job_target, str(uuidlib.UUID(bytes=att.store_uuid)), rec.index, rec.offset, rec.capacity,
              rec.dump_level, str(uuidlib.UUID(bytes=rec.image_uuid)), system.boot_id(), opts.deadline, 0,
              again=opts.again, attempt=att.token_hex, target_map=target_map)
    request: dict[str, JsonValue] = {"request": "restore"}
    if handed is not None:  # the image key through the mailbox page (never the command line, never the disk)
        request["seal"] = dict(handed.to_json())
    trip = RoundTrip.prepare(CaptureKernel(kernel, initrd, where.window.start, where.window.end - 1, opts.append),
                             job, system, request)
    say(f"resume: {where.describe()}")
    t_load = time.monotonic()
    try:
        out = trip.run(lambda: say(f"resume: checked against this boot in {t_load - t0:.2f} s, capture kernel loaded "
                                   f"in {time.monotonic() - t_load:.2f} s; entering it: it restores the saved kernel "
                                   "(this boot ends here unless it refuses)"))
    except RoundTripError as e:
        raise ResumeError(f"{e}; nothing was restored, the image stays tried (`khibernate resume --again` tries it "
                          "once more)") from None
    # only a refusal comes back here: nothing was written
    why = out.result.message if isinstance(out.result, Failed) else f"it came back with {out.result}"
    raise ResumeError(f"the capture kernel refused the image: {why}")
