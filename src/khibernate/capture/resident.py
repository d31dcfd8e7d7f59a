"""The resident capture kernel's job (``khibernate.job=resident``): get ready once, then serve pauses.

Booted by `khibernate arm` (:mod:`khibernate.capture.arm`).  Ready means: the savers imported, the target's store
readable and the armed one, /proc/vmcore readable, the jump-back image loaded; then *Ready* goes into the mailbox and
the kernel jumps back.  Each time the first kernel re-enters it, :func:`serve_pause` reads the pause's request from
the mailbox, runs the checks (:mod:`khibernate.capture.pausecheck`), finds the first kernel's parked pages
(:mod:`khibernate.capture.relocated`), runs the job in a child process under a watchdog (the deadline counts from
this pause's start), posts the answer and returns to jump back.  Design: docs/resident.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from khibernate.capture import mailbox, pauserequest
from khibernate.capture.errors import JobError, MailboxError
from khibernate.capture.jobspec import CaptureContext, Failed, Job, JobResult, Ready, result_from_json
from khibernate.capture.pausecheck import Armed, check_pause
from khibernate.errors import KhibernateError

if TYPE_CHECKING:
    from khibernate.store.handle import Store

READY_FILE = "/run/khibernate/resident-ready"  # /init's boot watchdog stands down once this exists
WATCHDOG_GRACE = 20.0
WARM_IMPORTS = ("khibernate.capture.save", "khibernate.capture.job", "khibernate.capture.relocated",
                "khibernate.image.sources.khi", "khibernate.image.sources.adapters", "khibernate.image.vmcoreinfo",
                "khibernate.image.sources.frozen", "khibernate.view.frozen", "khibernate.store.device")


def get_ready(job: Job, ctx: CaptureContext) -> tuple[Armed, Store]:
    """Everything a pause needs that can be done once; raises saying what is missing."""
    import importlib

    from khibernate.image.sources import open_source
    from khibernate.jump import api as jump
    from khibernate.store.handle import Store

    for name in WARM_IMPORTS:  # what every pause's saver imports, paid here once
        importlib.import_module(name)
    request = mailbox.read_request(job.mailbox, job.image_uuid)
    digest = request.get("ram_digest")
    if request.get("request") != "arm" or not isinstance(digest, str):
        raise JobError("the mailbox holds no arm request with the first kernel's RAM digest")
    st = Store.open(job.target)
    if st.sb.uuid_str != job.store_uuid:
        st.close()
        raise JobError(f"{job.target} holds store {st.sb.uuid_str}, not {job.store_uuid}: the disk is named "
                       "differently in the capture kernel")
    with open_source(ctx.vmcore) as raw:
        if not raw.ranges:
            raise JobError(f"{ctx.vmcore} shows no memory of the first kernel")
    jump.prepare_jump_back()
    return Armed(job.target, job.store_uuid, job.boot_id, bytes.fromhex(digest), job.mailbox), st


def parked_pages(ctx: CaptureContext) -> dict[int, int]:
    """The first kernel's pages this kernel's own jump-back image parked here (RelocationError when the first
    kernel's control page is not among them: then nothing says where its live copy is)."""
    from khibernate.capture.relocated import RelocationError, page_locations
    from khibernate.image.sources import open_source
    from khibernate.image.sources.frozen import Kcore
    from khibernate.jump.loader import parse_jump_back_entry
    from khibernate.view.frozen import kexec_image_address, loaded_image_swaps

    kc = Kcore()
    try:
        swaps = loaded_image_swaps(kc, kexec_image_address()) or {}
    finally:
        kc.close()
    with open_source(ctx.vmcore) as raw:
        first = list(raw.ranges)
    locations = page_locations(swaps, first, ctx.capture_ram())
    entry = parse_jump_back_entry(ctx.cmdline)
    if entry is None or entry & ~0xFFF not in locations:
        raise RelocationError(f"this kernel's jump-back image does not park the first kernel's control page "
                              f"({entry or 0:#x}): the live copy of that page is nowhere to be found")
    return locations


def run_forked(job: Job, ctx: CaptureContext, seconds: float) -> JobResult:
    """Run ``job`` in a child; the watchdog kills it ``seconds`` + a grace after ``job.deadline - seconds`` (the
    pause's start) and answers that (the job's deadline is that uptime)."""
    from khibernate.capture.job import run_job, timed_out

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, hand the result over, exit (a hibernate powers off instead)
        os.close(rfd)
        try:
            body = json.dumps(run_job(job, ctx).to_json()).encode()
            os.write(wfd, body)
        finally:
            os._exit(0)
    os.close(wfd)
    data = b""
    try:
        while True:
            left = job.deadline + WATCHDOG_GRACE - ctx.system.uptime()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                late = timed_out(dataclasses.replace(job, deadline=seconds))
                return dataclasses.replace(late, message=late.message.replace("after the capture kernel booted",
                                                                              "after the pause began"))
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
    os.waitpid(pid, 0)
    try:
        return result_from_json(json.loads(data))
    except (ValueError, JobError):
        return Failed(f"the capture job's process ended without a result ({len(data)} bytes)", "JobError")


def serve_pause(armed: Armed, st: Store, ctx: CaptureContext) -> Armed:
    """One pause: request, checks, parked pages, the job, the answer posted; the state after it."""
    say = ctx.rep.say
    t0 = ctx.system.uptime()
    try:
        req = pauserequest.unpack(mailbox.read_page(armed.mailbox))
    except (MailboxError, OSError) as e:
        say(f"resident: no valid pause request in the mailbox ({e}); jumping back without an answer")
        return armed
    job = dataclasses.replace(req.job(armed.target, armed.mailbox), deadline=t0 + req.deadline)
    try:
        check_pause(armed, req, st.refresh())
        parked = parked_pages(ctx)
    except (KhibernateError, OSError) as e:
        say(f"resident: pause #{req.seq} refused: {e}")
        _post(job, Failed(str(e), type(e).__name__, refused=True), say)
        return armed.after(req)
    say(f"resident: pause #{req.seq}: {req.kind} image {req.image} -> slot {req.slot}, -d {req.level}, first "
        f"kernel's pages parked here: {', '.join(f'{d:#x}<-{s:#x}' for d, s in parked.items())}")
    words = str(req.extra.get("append", ""))  # per-pause fault injection (arm.PER_PAUSE words only)
    pctx = dataclasses.replace(ctx, request=dict(req.extra), parked=parked,
                               cmdline=f"{ctx.cmdline} {words}" if words else ctx.cmdline)
    result = run_forked(job, pctx, req.deadline)
    result = dataclasses.replace(result, footprint=dataclasses.replace(
        result.footprint, capture_uptime=round(ctx.system.uptime() - t0, 3)))
    say("ok" if not isinstance(result, Failed) else f"FAILED: {result.message}")
    _post(job, result, say)
    return armed.after(req)


def _post(job: Job, result: JobResult, say: object) -> None:
    try:
        mailbox.post(job.mailbox, job.image_uuid, result.to_json())
    except (OSError, KhibernateError) as e:
        if callable(say):
            say(f"resident: cannot post the answer: {e}")


def main(job: Job, ctx: CaptureContext) -> int:
    """The resident job: ready, then pauses until the machine powers off; returns (1) only when it could not get
    ready or its jump back failed — /init then jumps back (or reboots) itself."""
    from khibernate.jump import api as jump

    say = ctx.rep.say
    say(f"resident: arming for {job.target}, up {ctx.system.uptime():.2f} s")
    try:
        armed, st = get_ready(job, ctx)
    except Exception as e:  # noqa: BLE001 - every failure must reach the first kernel
        say(f"resident: not ready: {e}")
        _post(job, Failed(f"the resident capture kernel could not get ready: {e}", type(e).__name__), say)
        return 1
    ready_at = round(ctx.system.uptime(), 3)
    _post(job, Ready(ready_at), say)
    Path(READY_FILE).parent.mkdir(parents=True, exist_ok=True)
    Path(READY_FILE).write_text(f"{ready_at}\n")
    say(f"resident: ready at {ready_at:.2f} s; jumping back")
    while True:
        try:
            jump.jump_back()
        except KhibernateError as e:
            say(f"resident: cannot jump back: {e}")
            return 1
        t = time.monotonic()
        armed = serve_pause(armed, st, ctx)
        say(f"resident: pause served in {time.monotonic() - t:.2f} s; jumping back")


def entry() -> int:
    """``python3 -m khibernate.capture.resident``: what /init runs for ``khibernate.job=resident``."""
    from khibernate.capture.jobspec import parse

    ctx = CaptureContext.read()
    job = parse(ctx.cmdline)
    if job is None or job.kind != "resident":
        ctx.rep.say("no khibernate.job=resident on the command line")
        return 2
    return main(job, ctx)


if __name__ == "__main__":
    sys.exit(entry())
