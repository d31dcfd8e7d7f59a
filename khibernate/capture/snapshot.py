"""`khibernate snapshot`: save the running kernel into a store slot through a kexec jump, and continue.

read → plan → check, then the writes: slot reserved (superblock, `writing`), fresh jump load, jump; back here:
mailbox read, slot read back and checked, superblock switched to `complete` last.  Any failure after the
reservation marks the slot `bad`; the last good image is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from khibernate.errors import KhibernateError
from khibernate.store.superblock import SlotRecord, SlotState

if TYPE_CHECKING:
    from khibernate.capture.mailbox import Mailbox
    from khibernate.jump.api import JumpResult
    from khibernate.jump.loader import Plan
    from khibernate.store.handle import SlotCheck, Store
    from khibernate.store.plan import SizeEstimate
    from khibernate.store.superblock import Superblock

DEFAULT_DEADLINE = 600.0


class SnapshotError(KhibernateError):
    """The snapshot was refused before the jump, or failed in the capture kernel."""


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


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


CAPTURE_PANIC_SECONDS = 10


def capture_args(cmdline: str) -> list[str]:
    """The capture kernel's own words before the user's: the console words of this kernel's command line, and
    ``panic=N`` — a capture kernel that panics resets the machine after N seconds instead of hanging with the first
    kernel frozen forever (the first kernel cannot run on either way: only the capture kernel can jump back)."""
    return [w for w in cmdline.split() if w.startswith(("console=", "earlycon", "loglevel="))] \
        + [f"panic={CAPTURE_PANIC_SECONDS}"]


def capture_initrd_for(kernel: str, target: str, given: str | None) -> tuple[str, bool]:
    """(capture initramfs, reused): the one given, or `capture build`'s for that kernel and target (cached)."""
    if given:
        return given, True
    from khibernate.capture import initrd
    from khibernate.jump.bzimage import kernel_release

    path, reused = initrd.ensure(target=target, kernel_release=kernel_release(Path(kernel).read_bytes()))
    return str(path), reused


def default_kernel() -> str:
    """This kernel's image in /boot; SnapshotError saying to give --kernel when there is none."""
    rel = os.uname().release
    for p in (f"/boot/vmlinuz-{rel}", f"/boot/bzImage-{rel}", "/boot/vmlinuz", "/boot/bzImage"):
        if Path(p).is_file():
            return p
    raise SnapshotError(f"no kernel image for {rel} in /boot: give the capture kernel with --kernel FILE")


def check_kdump_sharing(opts: Options, kdump_loaded: bool) -> None:
    """Refuse to jump into the whole crash region while a kdump image lies in it: the capture kernel would take the
    region as RAM and overwrite the loaded kdump kernel, leaving the next panic without a dump."""
    if kdump_loaded and opts.mem_min is None and opts.mem_max is None:
        raise SnapshotError(
            "a kdump capture kernel is loaded in the crashkernel= region, and the capture kernel would use the whole "
            "region as RAM and overwrite it: load kdump into one part of the region (kexec -p -c "
            "--mem-min=... --mem-max=...) and give snapshot the other part (--mem-min/--mem-max), or unload kdump "
            "first (`khibernate kdump unload`)")


def preflight(opts: Options, st: Store | None = None) -> tuple[Superblock, SlotRecord, SizeEstimate]:
    """Every check that needs no write: doctor, target (writable, unused, a store), slot, size; returns (superblock,
    slot, estimate).  ``st``: the write handle the capture holds (else one is opened for the checks and closed)."""
    from khibernate.doctor import diagnose
    from khibernate.image.pagefilter import check_level
    from khibernate.store import plan as splan
    from khibernate.store.handle import Store
    from khibernate.system import SystemRoot

    d = diagnose(SystemRoot(), os.geteuid())
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
    check_kdump_sharing(opts, SystemRoot().read_int("/sys/kernel/kexec_crash_loaded") == 1)
    if st is None:  # a write handle: read-only or busy targets are refused here, before anything is written
        with Store.open(opts.target, write=True) as own:
            return preflight(opts, own)
    sb = st.refresh()
    from khibernate.seal import policy

    policy.check_capture(sb.flags, opts.target)  # a sealed store: its images could not be sealed yet
    slot = splan.choose_slot(sb)
    est = splan.estimate(sb, splan.parse_meminfo(Path("/proc/meminfo").read_text()))
    splan.check_fits(slot, est)
    if opts.keep is not None and opts.keep < 1:
        raise SnapshotError("--keep must be at least 1")
    from khibernate.capture import kernelcheck

    kernelcheck.check(opts.kernel or default_kernel())  # one that cannot jump back would strand this system
    return sb, slot, est


def hibernate_request(say: Callable[[str], object]) -> dict[str, Any]:
    """The mailbox request of a hibernate job: every read-write block filesystem and its on-disk state now (the
    capture job writes them into the image; `resume` refuses when one changed); warns about those it cannot check."""
    from khibernate.restore import filesystems

    records = filesystems.record(Path("/proc/self/mountinfo").read_text())
    for warning in filesystems.unchecked(records):
        say(f"hibernate: warning: {warning}")
    swaps = [line.split()[0] for line in (Path("/proc/swaps").read_text().splitlines()[1:]) if line.split()]
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


def run(opts: Options, say: Any = print) -> dict[str, Any]:
    """Take one snapshot; returns the report (raises SnapshotError with the reason on failure).  The store's
    writer lock is held from the checks to the slot's completion: one open of the target for the whole capture."""
    from khibernate.store.handle import Store

    with Store.open(opts.target, write=True) as st:
        return _run(opts, st, say)


def _run(opts: Options, st: Store, say: Callable[[str], None]) -> dict[str, Any]:
    from khibernate.capture.job import Job
    from khibernate.capture.mailbox import Mailbox
    from khibernate.jump import api as jump
    from khibernate.store import filedev
    from khibernate.system import SystemRoot

    t_start = time.monotonic()
    sb, slot, est = preflight(opts, st)
    kernel = opts.kernel or default_kernel()
    initrd, reused = capture_initrd_for(kernel, opts.target, opts.capture_initrd)
    say(f"{opts.kind}: slot {slot.index} of {opts.target} ({slot.capacity / 2**20:.0f} MiB), {est.describe()}; "
        f"capture kernel {kernel}, initramfs {initrd}{' (cached)' if reused else ' (built)'}")
    image = uuidlib.uuid4()
    boot_id = _boot_id()
    box = Mailbox(image.bytes, hibernate_request(say) if opts.kind == "hibernate" else None,
                  avoid=jump.swapped_ranges(opts.mem_min, opts.mem_max))
    cmdline = Path("/proc/cmdline").read_text()
    # the deadline counts from the capture kernel's boot: the jump itself is excluded
    job_target, target_map = filedev.for_capture(opts.target)  # a store file: the dm device over its extents
    job = Job(opts.kind, job_target, sb.uuid_str, slot.index, slot.offset, slot.capacity, opts.level, str(image),
              boot_id, opts.deadline, box.paddr,
              zero_free=zeroes_freed_pages(cmdline, SystemRoot().kernel_config()[0]), target_map=target_map)
    append = " ".join([*capture_args(cmdline), opts.append, *job.args()]).strip()
    plan = jump.plan_jump(kernel, initrd, append, opts.mem_min, opts.mem_max)
    # ---- writes start here: reserve the slot (the last good image stays untouched), load, jump
    reserved = dataclasses.replace(slot, state=SlotState.WRITING, seq=sb.next_seq(), length=0, crc32=0,
                                   dump_level=opts.level, image_uuid=image.bytes, created_ns=time.time_ns(),
                                   pages_stored=0, pages_excluded=0, boot_id=uuidlib.UUID(boot_id).bytes,
                                   osrelease=os.uname().release, flags=0)
    st.set_slot(reserved, sb.uuid)

    def fail(msg: str) -> SnapshotError:
        return mark_failed(opts, st, reserved, sb.uuid, msg)

    result, body = _jump(opts, plan, box, fail, say)
    if opts.kind == "hibernate":
        if not body.get("resumed"):
            raise fail(f"the capture kernel came back without powering off ({body.get('message') or body})")
        return resumed_report(opts, reserved, body, result.boottime_s, t_start)
    try:
        done, chk, freed = st.complete(reserved, int(body["length"]), int(body["crc32"]),
                                       pages_stored=int(body["pages_stored"]),
                                       pages_excluded=int(body["pages_excluded"]), keep=opts.keep)
    except KhibernateError as e:
        raise fail(f"the image read back from the target is wrong: {e}") from None
    from khibernate.capture import kernelcheck

    with contextlib.suppress(OSError):
        kernelcheck.remember(kernel)  # this very image jumped back: proof for the next time
    return snapshot_report(opts, done, chk, freed, body, result.boottime_s, initrd, kernel, t_start)


def _jump(opts: Options, plan: Plan, box: Mailbox, fail: Callable[[str], SnapshotError],
          say: Callable[[str], None]) -> tuple[JumpResult, dict[str, Any]]:
    """Load the capture kernel, jump, and read its result from the mailbox: (jump result, result body); a failure
    on the way is ``fail(reason)`` raised (the slot marked bad)."""
    from khibernate.capture.mailbox import MailboxError
    from khibernate.jump import api as jump

    try:
        jump.load_plan(plan)
    except KhibernateError as e:
        raise fail(f"loading the capture kernel failed: {e}") from None
    if not box.still_at():
        with contextlib.suppress(KhibernateError, OSError):
            jump.unload()
        raise fail("the mailbox page moved before the jump (memory compaction); run snapshot again")
    say("hibernate: syncing filesystems, then jumping to the capture kernel; it saves this system and powers the "
        "machine off (`khibernate resume` at the next boot brings it back)" if opts.kind == "hibernate" else
        "snapshot: syncing filesystems, then jumping to the capture kernel (this system pauses now)")
    os.sync()  # before every jump: a capture kernel that never comes back must not take dirty data with it
    try:
        result = jump.execute()
    except KhibernateError as e:  # e.g. the freezer gave up (a task in D state): the jump never happened
        with contextlib.suppress(KhibernateError, OSError):
            jump.unload()
        raise fail(f"the jump did not happen: {e}") from None
    with contextlib.suppress(KhibernateError, OSError):
        jump.unload()  # the loaded image is the capture kernel's saved state: a fresh load serves the next snapshot
    try:
        body = box.result()
    except MailboxError as e:
        raise fail(str(e)) from None
    if not body.get("ok"):
        raise fail(f"the capture job failed: {body.get('message')}")
    return result, body


def snapshot_report(opts: Options, done: SlotRecord, chk: SlotCheck, freed: list[int], body: dict[str, Any],
                    away: float, initrd: str, kernel: str, t_start: float) -> dict[str, Any]:
    """The report of a snapshot whose slot was read back and marked complete."""
    from khibernate.image.levels import PageClass

    classes = {c.name.lower(): int(body["class_counts"][c]) for c in PageClass}
    return {"slot": done.index, "seq": done.seq, "image": str(uuidlib.UUID(bytes=done.image_uuid)),
            "target": opts.target, "dump_level": opts.level,
            "bytes": chk.length, "pages_ram": body["pages_ram"], "pages_stored": body["pages_stored"],
            "pages_zero": body["pages_zero"], "pages_excluded": body["pages_excluded"], "classes": classes,
            "pause_seconds": round(away, 3), "save_seconds": body.get("save_seconds"),
            "throughput_mb_s": round(chk.length / 1e6 / body["save_seconds"], 1) if body.get("save_seconds") else None,
            "capture_job_started_uptime": body.get("job_started_uptime"),
            "capture_peak_used_bytes": body.get("peak_used_bytes"), "capture_peak_rss_kib": body.get("peak_rss_kib"),
            "capture_mem_available_start": body.get("mem_available_start"), "retired_slots": freed,
            "capture_initrd": initrd, "capture_initrd_bytes": os.path.getsize(initrd), "kernel": kernel,
            "total_seconds": round(time.monotonic() - t_start, 3), "verified": True}


def zeroes_freed_pages(cmdline: str, config: dict[str, str] | None = None) -> bool:
    """Whether this kernel zeroes pages when they are freed (init_on_free=1, or CONFIG_INIT_ON_FREE_DEFAULT_ON
    without init_on_free=0), so a restore must zero the free pages the image dropped rather than leave another
    boot's bytes in them."""
    words = [w.split("=", 1)[1] for w in cmdline.split() if w.startswith("init_on_free=")]
    if words:
        return words[-1] in ("1", "on", "y")
    return (config or {}).get("CONFIG_INIT_ON_FREE_DEFAULT_ON") == "y"


def resumed_report(opts: Options, reserved: SlotRecord, body: dict[str, Any], away: float,
                   t_start: float) -> dict[str, Any]:
    """Back in this kernel after `hibernate`: the capture kernel powered off, a later boot restored this kernel
    and entered it (krestore posted that into the mailbox)."""
    return {"resumed": True, "slot": reserved.index, "image": str(uuidlib.UUID(bytes=reserved.image_uuid)),
            "target": opts.target, "away_seconds": round(away, 3), "restore": body.get("restore", {}),
            "resume_boot_id": body.get("resume_boot_id"), "again": body.get("again", False),
            "total_seconds": round(time.monotonic() - t_start, 3)}


def describe(r: dict[str, Any]) -> str:
    """The report for a human."""
    c = r["classes"]
    cls = ", ".join(f"{k} {v}" for k, v in c.items() if v)
    return (f"snapshot #{r['seq']} saved to slot {r['slot']} of {r['target']} and verified: image {r['image']}\n"
            f"  {r['pages_stored']} of {r['pages_ram']} pages stored ({r['pages_zero']} zero, "
            f"{r['pages_excluded'] - r['pages_zero']} {'free ' if r['dump_level'] & ~17 == 0 else ''}dropped at "
            f"-d {r['dump_level']}); classes: {cls}\n"
            f"  {r['bytes'] / 1e6:.1f} MB, saved in {r['save_seconds']} s ({r['throughput_mb_s']} MB/s)\n"
            f"  the system was paused {r['pause_seconds']:.2f} s (freeze -> thaw)"
            + (f"; retired slots {r['retired_slots']}" if r["retired_slots"] else ""))
