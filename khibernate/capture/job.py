"""The capture job: its description on the kernel command line, and running it in the jumped-to kernel.

The first kernel puts ``khibernate.job=snapshot`` and the job's parameters on the capture kernel's command line
(nothing secret: /proc/cmdline is world-readable).  The capture kernel's /init runs ``python3 -m
khibernate.capture.job``, which saves /proc/vmcore into the slot, posts the result into the mailbox and exits;
/init then always jumps back (also after a failure, or when its watchdog fires).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import threading
import time
import traceback
import uuid as uuidlib
from pathlib import Path
from typing import Any, NoReturn

from khibernate.errors import KhibernateError

PREFIX = "khibernate."
KHIBERNATE_NOTE = "KHIBERNATE"


class JobError(KhibernateError):
    """The job on the command line is malformed, or the capture job failed."""


class DeadlineError(JobError):
    """The capture job ran past its deadline."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What the capture kernel is asked to do."""

    kind: str
    target: str
    store_uuid: str
    slot: int
    offset: int
    capacity: int
    level: int
    image: str
    boot_id: str
    deadline: float
    mailbox: int
    zero_free: bool = False  # the saved kernel zeroes freed pages (init_on_free): a restore zeroes dropped ones
    again: bool = False  # restore: resume an image already resumed once (`khibernate resume --again`)
    target_map: str = ""  # a store file: MAJ:MIN:OFFSET of its disk (store.filedev); target is then the dm device
    attempt: str = ""  # restore: the resume attempt's token (the slot is tried under it; khibernate.restore.attempt)

    def args(self) -> list[str]:
        """The ``khibernate.KEY=VALUE`` words for the command line."""
        return [f"{PREFIX}job={self.kind}", f"{PREFIX}target={self.target}", f"{PREFIX}store={self.store_uuid}",
                f"{PREFIX}slot={self.slot}", f"{PREFIX}offset={self.offset:#x}",
                f"{PREFIX}capacity={self.capacity:#x}", f"{PREFIX}level={self.level}", f"{PREFIX}image={self.image}",
                f"{PREFIX}boot_id={self.boot_id}", f"{PREFIX}deadline={self.deadline:g}",
                f"{PREFIX}mailbox={self.mailbox:#x}"] + ([f"{PREFIX}zero_free=1"] if self.zero_free else []) \
            + ([f"{PREFIX}again=1"] if self.again else []) \
            + ([f"{PREFIX}target_map={self.target_map}"] if self.target_map else []) \
            + ([f"{PREFIX}attempt={self.attempt}"] if self.attempt else [])

    @property
    def image_uuid(self) -> bytes:
        return uuidlib.UUID(self.image).bytes


def parse(cmdline: str) -> Job | None:
    """The job on a kernel command line (also after a '--'); None without khibernate.job=; JobError if malformed."""
    kv = {}
    for w in cmdline.split():
        if w.startswith(PREFIX) and "=" in w:
            k, _, v = w[len(PREFIX):].partition("=")
            kv[k] = v
    if "job" not in kv:
        return None
    try:
        if kv.get("attempt") and len(bytes.fromhex(kv["attempt"])) != 16:
            raise ValueError(f"attempt token {kv['attempt']!r} is not 32 hex digits")
        return Job(kind=kv["job"], target=kv["target"], store_uuid=kv["store"], slot=int(kv["slot"]),
                   offset=int(kv["offset"], 0), capacity=int(kv["capacity"], 0), level=int(kv["level"]),
                   image=str(uuidlib.UUID(kv["image"])), boot_id=kv["boot_id"], deadline=float(kv["deadline"]),
                   mailbox=int(kv["mailbox"], 0), zero_free=kv.get("zero_free") == "1", again=kv.get("again") == "1",
                   target_map=kv.get("target_map", ""), attempt=kv.get("attempt", ""))
    except (KeyError, ValueError) as e:
        raise JobError(f"malformed khibernate job on the command line ({e!r})") from None


def uptime() -> float:
    """CLOCK_BOOTTIME of this kernel in seconds."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class MemoryWatch:
    """Samples MemAvailable while the job runs: the job's real footprint in the capture kernel's small RAM."""

    def __init__(self, interval: float = 0.2):
        self.start = self.lowest = self._available()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._t.start()

    @staticmethod
    def _available() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.lowest = min(self.lowest, self._available())

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._t.join()
        return {"mem_available_start": self.start, "mem_available_lowest": self.lowest,
                "peak_used_bytes": self.start - self.lowest}


def khibernate_note(job: Job, cmdline: str, extra: dict[str, Any] | None = None) -> bytes:
    """The KHIBERNATE note's JSON: what a later restore needs beyond VMCOREINFO and the ranges (``extra``: what the
    first kernel's request adds, e.g. a hibernation's filesystems)."""
    from khibernate.jump.loader import parse_jump_back_entry

    entry = parse_jump_back_entry(cmdline)
    return json.dumps({"kind": job.kind, "boot_id": job.boot_id, "jump_back_entry": entry, "image": job.image,
                       "capture_cmdline": cmdline.strip(), "capture_release": os.uname().release,
                       "capture_ram": [[r.start, r.end] for r in capture_ram()], "mailbox": job.mailbox,
                       "zero_free": job.zero_free, "restorable": job.level & ~17 == 0, **(extra or {})}).encode()


def capture_ram() -> list[Any]:
    """This (capture) kernel's own System RAM: the crash region and the low RAM it borrowed ([] if unreadable)."""
    from khibernate.jump.memmap import system_ram
    from khibernate.system import SystemRoot

    try:
        return system_ram(SystemRoot().iomem())
    except (OSError, KhibernateError):
        return []


# faults that other steps inject: /init panics before the job, a hibernate job does not power off, a restore fails
# after its first write (khibernate.restore.run.restore_fault)
OTHER_FAULTS = ("panic-early", "poweroff-fails", "restore-raise")


def inject_fault(cmdline: str) -> None:
    """``khibernate.fault=raise|hang`` (``snapshot --append``): fail on purpose, after the slot is reserved, to test
    that a failing or hung capture job still jumps back and leaves the last good image alone (like LKDTM for kdump)."""
    faults = [w.partition("=")[2] for w in cmdline.split() if w.startswith(f"{PREFIX}fault=")]
    if not faults or faults[-1] in OTHER_FAULTS:
        return
    if faults[-1] == "raise":
        raise RuntimeError("khibernate.fault=raise: the capture job raised on purpose")
    if faults[-1] == "hang":
        print("khibernate-capture: khibernate.fault=hang: hanging on purpose until the watchdog", file=sys.stderr,
              flush=True)
        while True:
            time.sleep(3600)
    raise JobError(f"unknown khibernate.fault={faults[-1]!r} (raise, hang, {', '.join(OTHER_FAULTS)})")


def run_snapshot(job: Job, cmdline: str, vmcore: str = "/proc/vmcore",
                 note_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save ``vmcore`` into the job's slot, streaming; returns the result body for the mailbox (raises on failure)."""
    from khibernate.image.sources import open_source
    from khibernate.image.sources.adapters import AnnotatedSource
    from khibernate.image.sources.khi import save
    from khibernate.image.vmcoreinfo import from_source
    from khibernate.store import device
    from khibernate.store.superblock import SlotState

    t0 = uptime()
    fd = device.open_device(job.target, write=True)
    try:
        sb = device.read_superblock(fd)
        if sb.uuid_str != job.store_uuid:
            raise JobError(f"{job.target} holds store {sb.uuid_str}, not {job.store_uuid}: the disk is named "
                           "differently in the capture kernel; nothing written")
        rec = sb.slot(job.slot)
        if rec.state != SlotState.WRITING or rec.image_uuid != job.image_uuid or rec.offset != job.offset \
                or rec.capacity != job.capacity:
            raise JobError(f"slot {job.slot} of {job.target} is not reserved for image {job.image}; nothing written")
        inject_fault(cmdline)
        writer = device.RegionWriter(fd, job.offset, job.capacity, sync_every=32 << 20)
        last = [time.monotonic(), 0]
        total = [0]

        def progress(n: int) -> None:
            total[0] += n
            if uptime() > job.deadline:
                raise DeadlineError(f"the capture job passed its deadline ({job.deadline:g} s after the capture "
                                    "kernel booted); the image is incomplete")
            now = time.monotonic()
            if now - last[0] >= 2:
                rate = (total[0] - last[1]) / (now - last[0]) / 1e6
                print(f"khibernate-capture: {total[0] >> 20} MiB of memory read, {writer.length >> 20} MiB written "
                      f"({rate:.0f} MB/s)", file=sys.stderr, flush=True)
                last[:] = [now, total[0]]

        with open_source(vmcore) as raw:
            vmci = from_source(raw)
            src = AnnotatedSource(raw, KHIBERNATE_NOTE, khibernate_note(job, cmdline, note_extra))
            t1 = uptime()
            stats = save(src, writer, vmci=vmci, level=job.level, restorable=job.level & ~17 == 0,  # type: ignore[arg-type]
                         threads=min(2, os.cpu_count() or 1), progress=progress)
        writer.sync()
        t2 = uptime()
    finally:
        os.close(fd)
    return {"ok": True, "slot": job.slot, "length": writer.length, "crc32": writer.crc32,
            "pages_ram": stats.pages_ram, "pages_stored": stats.pages_stored, "pages_zero": stats.pages_zero,
            "pages_excluded": stats.pages_excluded, "class_counts": stats.class_counts,
            "osrelease": vmci.osrelease if vmci else "", "job_started_uptime": round(t0, 3),
            "save_seconds": round(t2 - t1, 3), "open_seconds": round(t1 - t0, 3)}


def run_hibernate(job: Job, cmdline: str) -> NoReturn:
    """Save like a snapshot (with the filesystems the first kernel recorded, from its mailbox request), read the
    slot back and mark it complete as the image to resume (the first kernel does not run again before a resume),
    then power the machine off; returns only on failure (raises)."""
    from khibernate.capture import mailbox
    from khibernate.jump import syscalls
    from khibernate.store import api as store
    from khibernate.store.superblock import FLAG_HIBERNATE

    request = mailbox.read_request(job.mailbox, job.image_uuid)
    if not isinstance(request.get("filesystems"), list):
        raise JobError("the first kernel's request records no filesystems: a resume could not check the disks")
    body = run_snapshot(job, cmdline, note_extra={"filesystems": request["filesystems"]})
    reserved = store.read(job.target).slot(job.slot)
    done, chk, _ = store.complete(job.target, uuidlib.UUID(job.store_uuid).bytes, reserved, int(body["length"]),
                                  int(body["crc32"]),
                                  pages_stored=int(body["pages_stored"]), pages_excluded=int(body["pages_excluded"]),
                                  flags=FLAG_HIBERNATE)
    print(f"khibernate-capture: hibernation image complete in slot {done.index} of {job.target} "
          f"({chk.length / 1e6:.1f} MB, read back and verified, saved in {body['save_seconds']} s); powering off at "
          f"{uptime():.2f} s", file=sys.stderr, flush=True)
    if power_off_fault(cmdline):
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
    from khibernate.store import api as store
    from khibernate.store.superblock import SlotState, Superblock

    def change(sb: Superblock) -> Superblock:
        rec = sb.slot(job.slot)
        if rec.image_uuid != job.image_uuid or rec.state not in (SlotState.WRITING, SlotState.COMPLETE):
            return sb
        return sb.with_slot(dataclasses.replace(rec, state=SlotState.BAD, flags=0))

    try:
        rec = store.update(job.target, change).slot(job.slot)
    except (KhibernateError, OSError) as e:
        return f"marking slot {job.slot} bad FAILED ({e}); the first kernel tries again"
    return f"slot {job.slot} is {rec.state.name.lower()}: no resumable image is left behind"


def attach_file_target(job: Job) -> Job:
    """For a store file, the job with its target made real here: the dm device over the file's extents."""
    if not job.target_map:
        return job
    from khibernate.store import filedev

    dev = filedev.attach(filedev.TargetMap.parse(job.target_map), os.path.basename(job.target))
    if dev != job.target:
        raise JobError(f"the store file's device came up as {dev}, not {job.target}")
    return dataclasses.replace(job, target=dev)


def main(argv: list[str] | None = None) -> int:
    """Entry point of /init: run the job named on /proc/cmdline, post the result to the mailbox; 0 if it posted.

    ``--timeout`` posts the watchdog's result instead (the job was killed); ``--then-jump-back`` loads the jump-back
    image first and jumps back at the end whatever happened (saving a Python start on the way back).
    """
    from khibernate.capture import mailbox
    from khibernate.jump import api as jump

    argv = sys.argv[1:] if argv is None else argv
    cmdline = Path("/proc/cmdline").read_text()
    job = parse(cmdline)
    if job is None:
        print("khibernate-capture: no khibernate.job= on the command line", file=sys.stderr)
        return 2
    back_error: KhibernateError | None = None
    if argv[:1] == ["--timeout"]:
        body: dict[str, Any] = {"ok": False, "message": f"the capture job was still running at its deadline "
                                f"({job.deadline:g} s after the capture kernel booted, + 20 s grace) and was killed by "
                                "the watchdog; the image is incomplete"}
        if job.kind == "hibernate":
            body["message"] += "; " + withdraw_hibernation(job)
    else:
        if "--then-jump-back" in argv and job.kind != "restore":  # a restore decides itself where it jumps
            try:
                jump.prepare_jump_back()
            except KhibernateError as e:
                back_error = e
                print(f"khibernate-capture: cannot load the jump-back image: {e}", file=sys.stderr, flush=True)
        print(f"khibernate-capture: job {job.kind} image {job.image} -> {job.target} slot {job.slot}, "
              f"-d {job.level}, deadline {job.deadline:g} s, up {uptime():.2f} s", file=sys.stderr, flush=True)
        watch = MemoryWatch()
        try:
            job = attach_file_target(job)
            if job.kind == "snapshot":
                body = run_snapshot(job, cmdline)
            elif job.kind == "hibernate":
                body = run_hibernate(job, cmdline)
            elif job.kind == "restore":
                from khibernate.restore import run as restore_run

                body = restore_run.run_restore(job)  # returns only when refused before any write
            else:
                raise JobError(f"unknown job {job.kind!r}")
        except Exception as e:  # noqa: BLE001 - every failure must reach the first kernel
            if not isinstance(e, KhibernateError):
                traceback.print_exc()
            if job.kind == "restore":
                from khibernate.restore import run as restore_run

                restore_run.power_off_if_touched(e)
            body = {"ok": False, "message": str(e) or type(e).__name__, "error": type(e).__name__}
            if job.kind == "hibernate":
                body["message"] += "; " + withdraw_hibernation(job)
        body.update(watch.stop())
        body["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    body["capture_uptime"] = round(uptime(), 3)
    print(f"khibernate-capture: {'ok' if body.get('ok') else 'FAILED: ' + str(body.get('message'))}",
          file=sys.stderr, flush=True)
    status = 0
    try:
        mailbox.post(job.mailbox, job.image_uuid, body)
    except (OSError, KhibernateError) as e:
        print(f"khibernate-capture: cannot post the result: {e}", file=sys.stderr, flush=True)
        status = 1
    if "--then-jump-back" in argv and not back_error:
        if job.kind == "restore":  # refused before any write: back to the kernel that asked, which boots on
            try:
                jump.prepare_jump_back()
            except KhibernateError as e:
                print(f"khibernate-capture: cannot load the jump-back image: {e}", file=sys.stderr, flush=True)
                return 1
        print(f"khibernate-capture: jumping back at {uptime():.2f} s", file=sys.stderr, flush=True)
        jump.execute()
    return status


if __name__ == "__main__":
    sys.exit(main())
