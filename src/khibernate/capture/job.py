"""The capture kernel's entry: run the job named on its command line, post the typed result, jump back.

The first kernel puts ``khibernate.job=KIND`` and the job's parameters on the capture kernel's command line
(:mod:`khibernate.capture.jobspec`).  The capture kernel's /init runs ``python3 -m khibernate.capture.job``, which
runs the job through the registry :data:`JOBS` (kind -> runner), posts the result into the mailbox and exits;
/init then always jumps back (also after a failure, or when its watchdog fires).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from khibernate.capture import save
from khibernate.capture.errors import DeadlineError as DeadlineError
from khibernate.capture.errors import JobError as JobError
from khibernate.capture.jobspec import KINDS, CaptureContext, Failed, Footprint, Job, JobResult, parse
from khibernate.errors import KhibernateError
from khibernate.restore import run as restore_run

JOB_PID = "/run/khibernate/job.pid"  # /init writes it once the job has claimed the answer (initramfs/init)


@dataclasses.dataclass(frozen=True)
class JobRunner:
    """One kind of job in the capture kernel: ``run`` it (a result, or it does not return: a hibernate powers off,
    a restore enters the saved kernel), what to do ``after_failure`` (returns what was done, appended to the
    failure's message), and whether it ``jumps_back`` to the kernel that asked (a restore decides itself)."""

    run: Callable[[Job, CaptureContext], JobResult]
    after_failure: Callable[[Job, BaseException], str | None] = lambda job, e: None
    jumps_back: bool = True


JOBS: dict[str, JobRunner] = {
    "snapshot": JobRunner(save.run_snapshot),
    "hibernate": JobRunner(save.run_hibernate, lambda job, e: save.withdraw_hibernation(job)),
    "restore": JobRunner(restore_run.run_restore, restore_run.after_failure, jumps_back=False),
}
assert set(JOBS) == set(KINDS)


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

    def stop(self) -> Footprint:
        """Stop sampling; the footprint so far."""
        self._stop.set()
        self._t.join()
        return Footprint(mem_available_start=self.start, mem_available_lowest=self.lowest,
                         peak_used_bytes=self.start - self.lowest)


def attach_file_target(job: Job) -> Job:
    """For a store file, the job with its target made real here: the dm device over the file's extents."""
    if not job.target_map:
        return job
    from khibernate.store import filedev

    dev = filedev.attach(filedev.TargetMap.parse(job.target_map), os.path.basename(job.target))
    if dev != job.target:
        raise JobError(f"the store file's device came up as {dev}, not {job.target}")
    return dataclasses.replace(job, target=dev)


def run_job(job: Job, ctx: CaptureContext) -> JobResult:
    """Run ``job`` through the registry (a store file's dm device attached first); every failure becomes a Failed
    result (after its runner's ``after_failure``), with the job's footprint."""
    runner = JOBS.get(job.kind)
    watch = MemoryWatch()
    try:
        if runner is None:
            raise JobError(f"unknown job {job.kind!r} (the capture kernel knows {', '.join(KINDS)})")
        job = attach_file_target(job)
        result = runner.run(job, ctx)
    except Exception as e:  # noqa: BLE001 - every failure must reach the first kernel
        if not isinstance(e, KhibernateError):
            traceback.print_exc()
        result = Failed(str(e) or type(e).__name__, type(e).__name__)
        done = runner.after_failure(job, e) if runner is not None else None
        if done:
            result = result.adding(done)
    fp = dataclasses.replace(watch.stop(), peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return dataclasses.replace(result, footprint=fp)


def timed_out(job: Job, started: bool = True) -> Failed:
    """The watchdog's result at the job's deadline (a hibernate's slot withdrawn): the job was killed, or — on a
    capture kernel that booted slower than the deadline — never ``started`` (/init's claim went to the watchdog)."""
    when = f"at its deadline ({job.deadline:g} s after the capture kernel booted, + 20 s grace)"
    result = Failed(f"the capture job was still running {when} and was killed by the watchdog; the image is "
                    "incomplete" if started else
                    f"the capture job had not started {when}: the capture kernel booted too slowly; the watchdog "
                    "answered, nothing was written")
    runner = JOBS.get(job.kind)
    done = runner.after_failure(job, DeadlineError(result.message)) if runner is not None else None
    return result.adding(done) if done else result


def main(argv: list[str] | None = None) -> int:
    """Entry point of /init: run the job named on /proc/cmdline, post the result to the mailbox; 0 if it posted.

    ``--timeout`` posts the watchdog's result instead (the job was killed); ``--then-jump-back`` loads the jump-back
    image first and jumps back at the end whatever happened (saving a Python start on the way back).
    """
    from khibernate.capture import mailbox
    from khibernate.jump import api as jump

    argv = sys.argv[1:] if argv is None else argv
    ctx = CaptureContext.read()
    say = ctx.rep.say
    job = parse(ctx.cmdline)
    if job is None:
        say("no khibernate.job= on the command line")
        return 2
    runner = JOBS.get(job.kind)
    back = "--then-jump-back" in argv and (runner is None or runner.jumps_back)
    if argv[:1] == ["--timeout"]:
        result: JobResult = timed_out(job, started=os.path.exists(JOB_PID))
    else:
        if back:
            try:
                jump.prepare_jump_back()
            except KhibernateError as e:
                back = False
                say(f"cannot load the jump-back image: {e}")
        say(f"job {job.kind} image {job.image} -> {job.target} slot {job.slot}, -d {job.level}, deadline "
            f"{job.deadline:g} s, up {ctx.system.uptime():.2f} s")
        result = run_job(job, ctx)
    result = dataclasses.replace(result, footprint=dataclasses.replace(
        result.footprint, capture_uptime=round(ctx.system.uptime(), 3)))
    say("ok" if not isinstance(result, Failed) else f"FAILED: {result.message}")
    status = 0
    try:
        mailbox.post(job.mailbox, job.image_uuid, result.to_json())
    except (OSError, KhibernateError) as e:
        say(f"cannot post the result: {e}")
        status = 1
    if "--then-jump-back" in argv and (back or runner is not None and not runner.jumps_back):
        say(f"jumping back at {ctx.system.uptime():.2f} s")
        try:
            jump.jump_back()  # the image loaded at the start, or (a refused restore) loaded now
        except KhibernateError as e:
            say(f"cannot jump back: {e}")
            return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
