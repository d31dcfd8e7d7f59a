"""`khibernate snapshot` and `khibernate hibernate`: save the running kernel into a store slot through a kexec jump.

read → plan → check, then the writes: slot reserved (superblock, `writing`), the jump round trip
(:class:`~khibernate.capture.roundtrip.RoundTrip`); back here: the typed result, slot read back and checked,
superblock switched to `complete` last.  Any failure after the reservation marks the slot `bad`; the last good
image is never touched.  This module keeps the preflight and the reporting; the jump is the round trip's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from khibernate.capture.errors import RoundTripError, SnapshotError
from khibernate.capture.jobspec import Failed, JsonValue, Resumed, Saved
from khibernate.capture.roundtrip import CAPTURE_PANIC_SECONDS as CAPTURE_PANIC_SECONDS
from khibernate.capture.roundtrip import capture_args as capture_args
from khibernate.errors import KhibernateError
from khibernate.progress import Say
from khibernate.store.superblock import SlotRecord, SlotState

if TYPE_CHECKING:
    from khibernate.capture.arm import ResidentTrip
    from khibernate.capture.jobspec import Job
    from khibernate.capture.roundtrip import CaptureKernel, Outcome
    from khibernate.seal.keysource import KeySource
    from khibernate.store.handle import SlotCheck, Store
    from khibernate.store.plan import SizeEstimate
    from khibernate.store.superblock import Superblock
    from khibernate.system import SystemRoot

DEFAULT_DEADLINE = 600.0


@dataclasses.dataclass(frozen=True)
class Options:
    """What the user asked for."""

    target: str
    level: int = 17
    kernel: str | None = None
    capture_initrd: str | None = None
    keep: int | None = None
    deadline: float = DEFAULT_DEADLINE
    append: str = ""
    kind: str = "snapshot"  # or "hibernate": the capture kernel powers off instead of jumping back
    mem_min: int | None = None  # the capture kernel's window (default: the whole crashkernel= region)
    mem_max: int | None = None
    allow_unresumable: bool = False  # hibernate even where a resume boot may not manage to restore the image
    # a sealed store's key: made (the secret read) only in the child process that derives the image key
    key: Callable[[], KeySource] | None = None


def default_kernel() -> str:
    """This kernel's image in /boot; SnapshotError saying to give --kernel when there is none."""
    rel = os.uname().release
    for p in (f"/boot/vmlinuz-{rel}", f"/boot/bzImage-{rel}", "/boot/vmlinuz", "/boot/bzImage"):
        if Path(p).is_file():
            return p
    raise SnapshotError(f"no kernel image for {rel} in /boot: give the capture kernel with --kernel FILE")


def capture_initrd_for(kernel: str, target: str, given: str | None) -> tuple[str, bool]:
    """(capture initramfs, reused): the one given, or `capture build`'s for that kernel and target (cached)."""
    if given:
        return given, True
    from khibernate.capture import initrd
    from khibernate.jump.bzimage import kernel_release

    path, reused = initrd.ensure(target=target, kernel_release=kernel_release(Path(kernel).read_bytes()))
    return str(path), reused


def check_kdump_sharing(opts: Options, kdump_loaded: bool) -> None:
    """Refuse to jump into the whole crash region while a kdump image lies in it: the capture kernel would take the
    region as RAM and overwrite the loaded kdump kernel, leaving the next panic without a dump."""
    if kdump_loaded and opts.mem_min is None and opts.mem_max is None:
        raise SnapshotError(
            "a kdump capture kernel is loaded in the crashkernel= region, and the capture kernel would use the whole "
            "region as RAM and overwrite it: load kdump into one part of the region (kexec -p -c "
            "--mem-min=... --mem-max=...) and give snapshot the other part (--mem-min/--mem-max), or unload kdump "
            "first (`khibernate kdump unload`)")


def preflight(opts: Options, st: Store | None = None,
              system: SystemRoot | None = None) -> tuple[Superblock, SlotRecord, SizeEstimate]:
    """Every check that needs no write: doctor, target (writable, unused, a store), slot, size; returns (superblock,
    slot, estimate).  ``st``: the write handle the capture holds (else one is opened for the checks and closed);
    ``system``: the running system as the operation read it (``/`` if None)."""
    from khibernate.doctor import diagnose
    from khibernate.image.pagefilter import check_level
    from khibernate.store import plan as splan
    from khibernate.store.handle import Store
    from khibernate.system import SystemRoot

    system = system or SystemRoot()
    d = diagnose(system, os.geteuid())
    if d.possible("jump") is False:
        why = "; ".join(f.message for f in d.findings if "jump" in f.blocks)
        raise SnapshotError(f"this machine cannot kexec jump: {why} (`khibernate doctor` says more)")
    check_level(opts.level, False)  # above -d 17 the image is for analysis only (not restorable)
    if opts.kind == "hibernate" and opts.level & ~17:
        raise SnapshotError(f"hibernate needs a restorable image: dump level {opts.level} drops pages the kernel "
                            "needs (use 0, 1, 16 or 17)")
    if opts.kind == "hibernate" and d.possible("hibernate") is False and not opts.allow_unresumable:
        why = "; ".join(f.message for f in d.findings if "hibernate" in f.blocks)
        raise SnapshotError(f"a resume could not restore this hibernation: {why} (--allow-unresumable hibernates "
                            "all the same)")
    check_kdump_sharing(opts, system.read_int("/sys/kernel/kexec_crash_loaded") == 1)
    if st is None:  # a write handle: read-only or busy targets are refused here, before anything is written
        with Store.open(opts.target, write=True) as own:
            return preflight(opts, own, system)
    sb = st.refresh()
    from khibernate.seal import policy

    policy.check_capture(sb.flags, opts.target, opts.kind, opts.key is not None)
    slot = splan.choose_slot(sb)
    est = splan.estimate(sb, splan.parse_meminfo(system.read("/proc/meminfo") or ""))
    splan.check_fits(slot, est)
    if opts.keep is not None and opts.keep < 1:
        raise SnapshotError("--keep must be at least 1")
    from khibernate.capture import kernelcheck

    kernelcheck.check(opts.kernel or default_kernel(), system)  # one that cannot jump back would strand this system
    return sb, slot, est


def hibernate_request(say: Say, system: SystemRoot) -> dict[str, JsonValue]:
    """The mailbox request of a hibernate job: every read-write block filesystem and its on-disk state now (the
    capture job writes them into the image; `resume` refuses when one changed); warns about those it cannot check."""
    from khibernate.restore import filesystems

    records = filesystems.record(system.read("/proc/self/mountinfo") or "")
    for warning in filesystems.unchecked(records):
        say(f"hibernate: warning: {warning}")
    swaps = [line.split()[0] for line in (system.read("/proc/swaps") or "").splitlines()[1:] if line.split()]
    if swaps:
        say(f"hibernate: warning: swap in use on {', '.join(swaps)}: a boot that swaps there before the resume "
            "corrupts the swapped-out memory of the resumed processes (`swapoff -a` first, or boot nothing else)")
    return {"request": "hibernate", "filesystems": [r.to_json() for r in records]}


def mark_failed(opts: Options, st: Store, reserved: SlotRecord, store_uuid: bytes, msg: str) -> SnapshotError:
    """The error for a failed capture after the reservation, once its slot is marked bad.  If marking fails, the
    error says so and what to do — for a hibernation the slot may hold a resumable image of this system, which runs
    on: a later resume would overwrite everything it writes from now on."""
    i = reserved.index
    try:
        st.set_slot(dataclasses.replace(reserved, state=SlotState.BAD, flags=0), store_uuid)
    except (KhibernateError, OSError) as e:
        danger = (f"it may still hold a resumable hibernation image of this system, which runs on: drop it now "
                  f"(`khibernate target drop {opts.target} {i}`) — resuming it would overwrite everything written "
                  "from now on") if opts.kind == "hibernate" else "its state is unknown (`khibernate target list`)"
        return SnapshotError(f"{msg}; marking slot {i} bad FAILED ({e}): {danger}")
    return SnapshotError(f"{msg}; slot {i} is marked bad, earlier images are untouched")


@dataclasses.dataclass(frozen=True)
class SnapshotReport:
    """A snapshot whose slot was read back and marked complete (``to_json`` is `snapshot --json`'s object)."""

    slot: int
    seq: int
    image: str
    target: str
    dump_level: int
    bytes: int
    pages_ram: int
    pages_stored: int
    pages_zero: int
    pages_excluded: int
    classes: dict[str, int]
    pause_seconds: float
    save_seconds: float
    throughput_mb_s: float | None
    capture_job_started_uptime: float
    capture_peak_used_bytes: int
    capture_peak_rss_kib: int
    capture_mem_available_start: int
    retired_slots: list[int]
    capture_initrd: str
    capture_initrd_bytes: int
    kernel: str
    total_seconds: float
    verified: bool = True
    capture_kernel: str = "fresh"  # "resident": the pause jumped into the armed capture kernel (`khibernate arm`)
    export: dict[str, JsonValue] | None = None  # `--export-dir`: what went where (analysis.export_folder)

    def to_json(self) -> dict[str, JsonValue]:
        d: dict[str, JsonValue] = dataclasses.asdict(self)
        if self.export is None:
            del d["export"]
        return d

    def describe(self) -> str:
        """The report for a human."""
        cls = ", ".join(f"{k} {v}" for k, v in self.classes.items() if v)
        return (f"snapshot #{self.seq} saved to slot {self.slot} of {self.target} and verified: image {self.image}\n"
                f"  {self.pages_stored} of {self.pages_ram} pages stored ({self.pages_zero} zero, "
                f"{self.pages_excluded - self.pages_zero} {'free ' if self.dump_level & ~17 == 0 else ''}dropped at "
                f"-d {self.dump_level}); classes: {cls}\n"
                f"  {self.bytes / 1e6:.1f} MB, saved in {self.save_seconds} s ({self.throughput_mb_s} MB/s)\n"
                f"  the system was paused {self.pause_seconds:.2f} s (freeze -> thaw, {self.capture_kernel} capture "
                "kernel)"
                + (f"; retired slots {self.retired_slots}" if self.retired_slots else ""))


@dataclasses.dataclass(frozen=True)
class ResumedReport:
    """Back in this kernel after `hibernate`: the capture kernel powered off, a later boot restored this kernel and
    entered it (the restore job posted that into the mailbox).  ``to_json`` is `hibernate --json`'s object."""

    slot: int
    image: str
    target: str
    away_seconds: float
    restore: dict[str, float]
    resume_boot_id: str
    again: bool
    total_seconds: float

    def to_json(self) -> dict[str, JsonValue]:
        return {"resumed": True, **dataclasses.asdict(self)}

    def describe(self) -> str:
        """The report for a human."""
        return (f"resumed from slot {self.slot} of {self.target} after {self.away_seconds:.1f} s away; restore "
                f"wrote {self.restore.get('bytes_written', 0) / 1e6:.0f} MB at "
                f"{self.restore.get('throughput_mb_s', 0)} MB/s")


def run(opts: Options, say: Say = print, system: SystemRoot | None = None) -> SnapshotReport | ResumedReport:
    """Take one snapshot (or hibernate); returns the report (raises SnapshotError with the reason on failure).  The
    store's writer lock is held from the checks to the slot's completion: one open of the target for the whole
    capture.  ``system``: the running system, read once for the whole operation (``/`` if None)."""
    from khibernate.store.handle import Store
    from khibernate.system import SystemRoot

    system = system or SystemRoot()
    with Store.open(opts.target, write=True, say=say) as st:
        return _run(opts, st, say, system)


def snapshot(opts: Options, say: Say = print, system: SystemRoot | None = None) -> SnapshotReport:
    """run() of a snapshot (``opts.kind`` "snapshot")."""
    report = run(opts, say, system)
    assert isinstance(report, SnapshotReport)
    return report


def hibernate(opts: Options, say: Say = print, system: SystemRoot | None = None) -> ResumedReport:
    """run() of a hibernation: returns after the resume (``opts.kind`` "hibernate")."""
    report = run(dataclasses.replace(opts, kind="hibernate"), say, system)
    assert isinstance(report, ResumedReport)
    return report


def _run(opts: Options, st: Store, say: Say, system: SystemRoot) -> SnapshotReport | ResumedReport:
    from khibernate.capture.jobspec import Job
    from khibernate.capture.roundtrip import CaptureKernel, RoundTrip
    from khibernate.store import filedev

    t_start = time.monotonic()
    sb, slot, est = preflight(opts, st, system)
    kernel = opts.kernel or default_kernel()
    initrd, reused = capture_initrd_for(kernel, opts.target, opts.capture_initrd)
    say(f"{opts.kind}: slot {slot.index} of {opts.target} ({slot.capacity / 2**20:.0f} MiB), {est.describe()}; "
        f"capture kernel {kernel}, initramfs {initrd}{' (cached)' if reused else ' (built)'}")
    image = uuidlib.uuid4()
    boot_id = system.boot_id()
    # the deadline counts from the capture kernel's boot: the jump itself is excluded; the mailbox address is
    # the round trip's to fill in
    job_target, target_map = filedev.for_capture(opts.target)  # a store file: the dm device over its extents
    job = Job(opts.kind, job_target, sb.uuid_str, slot.index, slot.offset, slot.capacity, opts.level, str(image),
              boot_id, opts.deadline, 0, zero_free=zeroes_freed_pages(system.cmdline(), system.kernel_config()[0]),
              target_map=target_map)
    request: dict[str, JsonValue] = (hibernate_request(say, system) if opts.kind == "hibernate"
                                     else {"request": "snapshot"})
    if opts.key is not None:  # a sealed store (preflight): the capture kernel seals with this image's key
        from khibernate.seal.handoff import hand_image_key
        from khibernate.store import keyslots

        request["seal"] = dict(hand_image_key(opts.key, keyslots.read(st.fd, opts.target), image.bytes).to_json())
    capture = CaptureKernel(kernel, initrd, opts.mem_min, opts.mem_max, opts.append)
    trip = RoundTrip.prepare(capture, job, system, request)
    resident = resident_for(opts, capture, system, say)
    # ---- writes start here: reserve the slot (the last good image stays untouched), load, jump
    reserved = dataclasses.replace(slot, state=SlotState.WRITING, seq=sb.next_seq(), length=0, crc32=0,
                                   dump_level=opts.level, image_uuid=image.bytes, created_ns=time.time_ns(),
                                   pages_stored=0, pages_excluded=0, boot_id=uuidlib.UUID(boot_id).bytes,
                                   osrelease=os.uname().release, flags=0)
    generation = st.set_slot(reserved, sb.uuid).generation

    def fail(msg: str) -> SnapshotError:
        return mark_failed(opts, st, reserved, sb.uuid, msg)

    try:
        out = through_resident(resident, job, generation, request, say, opts.append) if resident is not None \
            else None
        how = "resident" if out is not None else "fresh"
        if out is None:
            out = trip.run(lambda: say(JUMP_WORDS[opts.kind]))
    except RoundTripError as e:
        raise fail(str(e)) from None
    if isinstance(out.result, Failed):
        raise fail(f"the capture job failed: {out.result.message}")
    if opts.kind == "hibernate":
        if not isinstance(out.result, Resumed):
            raise fail("the capture kernel came back without powering off (its image was written but not marked "
                       "for resume)")
        return resumed_report(opts, reserved, out, t_start)
    if not isinstance(out.result, Saved):
        raise fail("the capture kernel reported a resume, not a saved image")
    report = _complete(opts, st, reserved, out, out.result, fail, (kernel, initrd), t_start)
    return dataclasses.replace(report, capture_kernel=how)


def resident_for(opts: Options, capture: CaptureKernel, system: SystemRoot, say: Say) -> ResidentTrip | None:
    """The armed resident capture kernel's trip for this capture, or None: unarmed, or (said, and disarmed) one that
    cannot serve it — the capture then loads a fresh capture kernel."""
    from khibernate.capture import arm

    armed = arm.read_state(system)
    if armed is None:
        return None
    reason = arm.unusable_reason(armed, capture, opts.target, system)
    try:
        if reason is None:
            return arm.ResidentTrip.open(armed)
    except arm.ResidentUnusable as e:
        reason = str(e)
    say(f"{opts.kind}: the resident capture kernel cannot serve this capture ({reason}): disarming it, a fresh one "
        "is loaded")
    arm.disarm()
    return None


def through_resident(resident: ResidentTrip, job: Job, generation: int, request: Mapping[str, JsonValue] | None,
                     say: Say, append: str = "") -> Outcome | None:
    """The pause through the resident capture kernel; None when it refused (it is disarmed: load a fresh one).
    RoundTripError as a fresh round trip's (the resident kernel disarmed: its state is unknown)."""
    from khibernate.capture import arm, pauserequest
    from khibernate.capture.errors import MailboxError

    req = resident.request(job, generation, request, append)
    try:
        pauserequest.pack(req)
    except MailboxError as e:
        say(f"{job.kind}: the pause request does not fit the resident mailbox ({e}): disarming, loading a fresh one")
        resident.close()
        arm.disarm()
        return None
    try:
        out = resident.enter(req, lambda: say(RESIDENT_WORDS[job.kind]))
    except RoundTripError:
        arm.disarm()
        raise
    finally:
        resident.close()
    if isinstance(out.result, Failed) and out.result.refused:
        say(f"{job.kind}: {out.result.message}: disarming it, loading a fresh capture kernel")
        arm.disarm()
        return None
    if isinstance(out.result, Resumed):
        arm.disarm()  # a resume brought this kernel back: the resident capture kernel's memory did not survive
    return out


RESIDENT_WORDS = {
    "hibernate": "hibernate: syncing filesystems, then jumping into the resident capture kernel; it saves this system "
                 "and powers the machine off (`khibernate resume` at the next boot brings it back)",
    "snapshot": "snapshot: syncing filesystems, then jumping into the resident capture kernel (this system pauses "
                "now)"}


JUMP_WORDS = {
    "hibernate": "hibernate: syncing filesystems, then jumping to the capture kernel; it saves this system and powers "
                 "the machine off (`khibernate resume` at the next boot brings it back)",
    "snapshot": "snapshot: syncing filesystems, then jumping to the capture kernel (this system pauses now)"}


def _complete(opts: Options, st: Store, reserved: SlotRecord, out: Outcome, saved: Saved,
              fail: Callable[[str], SnapshotError], used: tuple[str, str], t_start: float) -> SnapshotReport:
    """Read the saved slot back and mark it complete (``fail`` on a mismatch); the report."""
    from khibernate.capture import kernelcheck

    try:
        done, chk, freed = st.complete(reserved, saved.length, saved.crc32, pages_stored=saved.pages_stored,
                                       pages_excluded=saved.pages_excluded, keep=opts.keep)
    except KhibernateError as e:
        raise fail(f"the image read back from the target is wrong: {e}") from None
    with contextlib.suppress(OSError):
        kernelcheck.remember(used[0])  # this very image jumped back: proof for the next time
    return snapshot_report(opts, done, chk, freed, out, used, t_start)


def snapshot_report(opts: Options, done: SlotRecord, chk: SlotCheck, freed: list[int], out: Outcome,
                    used: tuple[str, str], t_start: float) -> SnapshotReport:
    """The report of a snapshot whose slot was read back and marked complete (``used``: kernel, initramfs)."""
    from khibernate.image.levels import PageClass

    r = out.result
    assert isinstance(r, Saved)
    kernel, initrd = used
    return SnapshotReport(
        slot=done.index, seq=done.seq, image=str(uuidlib.UUID(bytes=done.image_uuid)), target=opts.target,
        dump_level=opts.level, bytes=chk.length, pages_ram=r.pages_ram, pages_stored=r.pages_stored,
        pages_zero=r.pages_zero, pages_excluded=r.pages_excluded,
        classes={c.name.lower(): r.class_counts[c] for c in PageClass}, pause_seconds=round(out.away.boottime_s, 3),
        save_seconds=r.save_seconds,
        throughput_mb_s=round(chk.length / 1e6 / r.save_seconds, 1) if r.save_seconds else None,
        capture_job_started_uptime=r.job_started_uptime, capture_peak_used_bytes=r.footprint.peak_used_bytes,
        capture_peak_rss_kib=r.footprint.peak_rss_kib, capture_mem_available_start=r.footprint.mem_available_start,
        retired_slots=freed, capture_initrd=initrd, capture_initrd_bytes=os.path.getsize(initrd), kernel=kernel,
        total_seconds=round(time.monotonic() - t_start, 3))


def resumed_report(opts: Options, reserved: SlotRecord, out: Outcome, t_start: float) -> ResumedReport:
    """Back in this kernel after `hibernate`: the capture kernel powered off, a later boot restored this kernel
    and entered it (the restore job posted that into the mailbox)."""
    r = out.result
    assert isinstance(r, Resumed)
    return ResumedReport(slot=reserved.index, image=str(uuidlib.UUID(bytes=reserved.image_uuid)), target=opts.target,
                         away_seconds=round(out.away.boottime_s, 3), restore=r.restore,
                         resume_boot_id=r.resume_boot_id, again=r.again,
                         total_seconds=round(time.monotonic() - t_start, 3))


def zeroes_freed_pages(cmdline: str, config: dict[str, str] | None = None) -> bool:
    """Whether this kernel zeroes pages when they are freed (init_on_free=1, or CONFIG_INIT_ON_FREE_DEFAULT_ON
    without init_on_free=0), so a restore must zero the free pages the image dropped rather than leave another
    boot's bytes in them."""
    words = [w.split("=", 1)[1] for w in cmdline.split() if w.startswith("init_on_free=")]
    if words:
        return words[-1] in ("1", "on", "y")
    return (config or {}).get("CONFIG_INIT_ON_FREE_DEFAULT_ON") == "y"


