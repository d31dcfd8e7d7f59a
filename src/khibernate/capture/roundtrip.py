"""One kexec-jump round trip from the first kernel into a capture kernel and back: the only place the first kernel's
flows (snapshot, hibernate, watch, resume) jump.

``RoundTrip.prepare`` does everything that writes nothing — the mailbox page (outside the memory the jump swaps
out), the typed :class:`~khibernate.capture.jobspec.Job` with the mailbox's address, the capture kernel's command
line and the jump plan — so the caller can still refuse (and reserve its slot) afterwards.  Then ``run()``: load →
the mailbox still where the job says → execute (sync, freeze, jump; back here) → unload → the typed result from the
mailbox.  A failure on the way is a :class:`RoundTripError` saying what happened; the result itself (a
:data:`~khibernate.capture.jobspec.JobResult`) is the caller's to judge.

Shaped for "load once, execute many" (a resident capture kernel, issue 22): ``load``, ``enter`` and ``unload`` are
separate steps, and ``enter`` asks nothing of the load but that it happened — a resident kernel would be loaded
once and entered once per job (with the job in the mailbox instead of on the command line).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from khibernate.capture.errors import RoundTripError
from khibernate.capture.jobspec import Job, JobResult, JsonValue, result_from_json
from khibernate.errors import KhibernateError
from khibernate.system import SystemRoot

if TYPE_CHECKING:
    from khibernate.jump.api import JumpResult
    from khibernate.jump.loader import Plan

CAPTURE_PANIC_SECONDS = 10


def capture_args(cmdline: str) -> list[str]:
    """The capture kernel's own words before the user's: the console words of this kernel's command line, and
    ``panic=N`` — a capture kernel that panics resets the machine after N seconds instead of hanging with the first
    kernel frozen forever (the first kernel cannot run on either way: only the capture kernel can jump back)."""
    return [w for w in cmdline.split() if w.startswith(("console=", "earlycon", "loglevel="))] \
        + [f"panic={CAPTURE_PANIC_SECONDS}"]


@dataclasses.dataclass(frozen=True)
class CaptureKernel:
    """The capture kernel a round trip loads: its image and initramfs, the window of the crash region it runs in
    (None: the whole region) and the user's extra command line words."""

    kernel: str
    initrd: str
    mem_min: int | None = None
    mem_max: int | None = None
    append: str = ""

    def command_line(self, system_cmdline: str, job: Job) -> str:
        """Console words and panic=N (capture_args), the user's words, then the job's."""
        return " ".join([*capture_args(system_cmdline), self.append, *job.args()]).strip()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What came back: how long this kernel was away and the capture kernel's typed result."""

    away: JumpResult
    result: JobResult


class Box(Protocol):
    """A mailbox the capture kernel was told about: where it is, whether it is still there, the result in it."""

    paddr: int

    def still_at(self) -> bool: ...

    def result(self) -> dict[str, object]: ...


def enter(box: Box, before: Callable[[], None] = lambda: None) -> Outcome:
    """The jump of a round trip whose capture kernel is loaded: ``box`` still in place, ``before``, jump, read the
    result (RoundTripError when the jump did not happen or brought no result)."""
    from khibernate.capture.errors import JobError
    from khibernate.capture.mailbox import MailboxError
    from khibernate.jump import api as jump

    if not box.still_at():
        raise RoundTripError("the mailbox page moved before the jump (memory compaction); nothing was run")
    before()
    try:
        away = jump.execute()
    except KhibernateError as e:  # e.g. the freezer gave up (a task in D state): the jump never happened
        raise RoundTripError(f"the jump did not happen: {e}") from None
    try:
        return Outcome(away, result_from_json(box.result()))
    except (MailboxError, JobError) as e:
        raise RoundTripError(f"the capture kernel came back without a result ({e})") from None


class RoundTrip:
    """A prepared round trip (nothing loaded yet): ``job`` carries the mailbox's address; ``run()`` jumps."""

    def __init__(self, capture: CaptureKernel, job: Job, box: Box, plan: Plan):
        self.capture, self.job, self.box, self.plan = capture, job, box, plan
        self.loaded = False

    @classmethod
    def prepare(cls, capture: CaptureKernel, job: Job, system: SystemRoot,
                request: Mapping[str, JsonValue] | None = None) -> RoundTrip:
        """The mailbox (holding ``request`` for the capture job), ``job`` with its address, the jump plan; nothing
        loaded or written (MailboxError, jump planning errors)."""
        from khibernate.capture.mailbox import Mailbox
        from khibernate.jump import api as jump

        box = Mailbox(job.image_uuid, dict(request) if request is not None else None,
                      avoid=jump.swapped_ranges(capture.mem_min, capture.mem_max, system))
        return cls.prepare_with(capture, job, system, box)

    @classmethod
    def prepare_with(cls, capture: CaptureKernel, job: Job, system: SystemRoot, box: Box) -> RoundTrip:
        """As prepare, with a mailbox the caller set up (a resident capture kernel's)."""
        from khibernate.jump import api as jump

        job = dataclasses.replace(job, mailbox=box.paddr)
        plan = jump.plan_jump(capture.kernel, capture.initrd, capture.command_line(system.cmdline(), job),
                              capture.mem_min, capture.mem_max, system)
        return cls(capture, job, box, plan)

    def load(self) -> None:
        """Load the capture kernel (RoundTripError if refused: nothing loaded)."""
        from khibernate.jump import api as jump

        try:
            jump.load_plan(self.plan)
        except KhibernateError as e:
            raise RoundTripError(f"loading the capture kernel failed: {e}") from None
        self.loaded = True

    def enter(self, before: Callable[[], None] = lambda: None) -> Outcome:
        """Check the mailbox is still where the job says, call ``before`` (the last word to the user), jump (execute
        syncs the filesystems and freezes this system), and read the result once back.  RoundTripError when the
        jump did not happen or brought no result."""
        return enter(self.box, before)

    def unload(self) -> None:
        """Unload the capture kernel (best effort: the loaded image is the capture kernel's saved state, a fresh
        load serves the next round trip)."""
        from khibernate.jump import api as jump

        if self.loaded:
            with contextlib.suppress(KhibernateError, OSError):
                jump.unload()
            self.loaded = False

    def run(self, before: Callable[[], None] = lambda: None) -> Outcome:
        """load → enter → unload: one round trip (RoundTripError on the way; the capture kernel unloaded)."""
        self.load()
        try:
            return self.enter(before)
        finally:
            self.unload()
