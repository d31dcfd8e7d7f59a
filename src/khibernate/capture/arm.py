"""`khibernate arm` / `disarm` and the first kernel's side of a pause through a resident capture kernel.

`arm` loads the capture kernel and jumps once with the ``resident`` job on its command line: the capture kernel
boots, gets ready (imports, store, /proc/vmcore, its jump-back image) and jumps back, staying loaded as this kernel's
kexec image.  From then on a capture (:func:`resident_trip`) is a jump into it with the pause's request in the
resident mailbox — one page of a tmpfs file whose physical address the capture kernel was given once.  What is
armed is kept in ``/run/khibernate/resident.json``; anything that makes the resident capture kernel untrustworthy
(docs/resident.md) makes the caller disarm and load a fresh one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from khibernate.capture import mailbox
from khibernate.capture.errors import MailboxError, RoundTripError
from khibernate.capture.jobspec import Failed, Job, JsonValue, Ready
from khibernate.capture.pauserequest import PER_PAUSE, PauseRequest, ram_digest
from khibernate.errors import KhibernateError
from khibernate.ranges import Range
from khibernate.system import SystemRoot

if TYPE_CHECKING:
    from khibernate.capture.roundtrip import CaptureKernel, Outcome
    from khibernate.progress import Say

STATE = "resident.json"
MAILBOX_FILE = "resident.mailbox"
ARM_DEADLINE = 300.0


class ArmError(KhibernateError):
    """`arm` was refused or its capture kernel did not get ready (nothing stays loaded), or `disarm` failed."""


class ResidentUnusable(KhibernateError):
    """The resident capture kernel cannot be trusted for this pause: the caller disarms and loads a fresh one."""


def _run_dir() -> Path:
    from khibernate.jump.api import RUN_DIR

    return RUN_DIR


class ResidentMailbox:
    """The resident mailbox: one page of a tmpfs file under the run directory.  While mapped it is mlocked; its
    physical address must stay the one the capture kernel was booted with (``paddr``)."""

    def __init__(self, path: Path, paddr: int):
        self.path, self.paddr = path, paddr
        self.image_uuid = bytes(16)
        fd = os.open(path, os.O_RDWR)
        try:
            self.buf = mmap.mmap(fd, mailbox.PAGE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        mailbox.mlock(self.buf)

    @classmethod
    def create(cls, path: Path, avoid: Sequence[Range]) -> ResidentMailbox:
        """A fresh mailbox file whose page lies above 1 MiB and outside ``avoid`` (the ranges the jump swaps)."""
        spare = []
        try:
            for i in range(256):
                trial = path.with_name(f"{path.name}.{i}")
                with open(trial, "wb") as f:
                    f.write(bytes(mailbox.PAGE))
                box = cls(trial, 0)
                paddr = box.physical()
                if paddr >= mailbox.LOW_MEMORY and not any(paddr in r for r in avoid):
                    trial.replace(path)
                    box.path, box.paddr = path, paddr
                    return box
                spare.append((trial, box))  # keep it so that the next try gets another page
            raise MailboxError("could not get a resident mailbox page above 1 MiB outside the swapped ranges")
        finally:
            for trial, b in spare:
                b.close()
                trial.unlink(missing_ok=True)

    def physical(self) -> int:
        return mailbox.physical_address(ctypes.addressof(ctypes.c_char.from_buffer(self.buf)))

    def still_at(self) -> bool:
        """Whether the page is still at the address the capture kernel knows."""
        return self.physical() == self.paddr

    def write(self, page: bytes) -> None:
        """Put a record (a whole page) into the mailbox; its image id is the one a result must carry."""
        self.image_uuid = mailbox.unpack_raw(page)[1]
        self.buf[:] = page

    def result(self) -> dict[str, object]:
        return mailbox.result_in(bytes(self.buf[:]), self.image_uuid, self.still_at)

    def close(self) -> None:
        self.buf.close()


@dataclasses.dataclass(frozen=True)
class Armed:
    """What `arm` left: the capture kernel's files and window, the store, the mailbox, the pauses so far."""

    boot_id: str
    kernel: str
    initrd: str
    target: str
    store_uuid: str
    mailbox: int
    ram_digest: str
    mem_min: int | None = None
    mem_max: int | None = None
    append: str = ""
    seq: int = 0
    armed_at: float = 0.0
    ready_seconds: float = 0.0

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.armed_at))
        return (f"resident capture kernel armed since {when} for {self.target} (kernel {self.kernel}), "
                f"{self.seq} pause(s) through it, mailbox at {self.mailbox:#x}")


def read_state(system: SystemRoot | None = None) -> Armed | None:
    """The armed state of this boot, None when unarmed (no state, another boot's, or no kexec image loaded)."""
    system = system or SystemRoot()
    try:
        data = json.loads((_run_dir() / STATE).read_text())
        armed = Armed(**data)
    except (OSError, ValueError, TypeError):
        return None
    if armed.boot_id != system.boot_id() or system.read_int("/sys/kernel/kexec_loaded") != 1:
        return None
    return armed


def _write_state(armed: Armed) -> None:
    run = _run_dir()
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".{STATE}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(armed)))
    tmp.replace(run / STATE)


def _forget() -> None:
    for name in (STATE, MAILBOX_FILE):
        (_run_dir() / name).unlink(missing_ok=True)


def disarm() -> bool:
    """Unload the resident capture kernel; whether one was armed."""
    from khibernate.jump import api as jump

    armed = read_state()
    if armed is not None:
        try:
            jump.unload()
        except (KhibernateError, OSError) as e:
            raise ArmError(f"unloading the resident capture kernel failed: {e}") from None
    _forget()
    return armed is not None


def arm(capture: CaptureKernel, target: str, say: Say, deadline: float = ARM_DEADLINE,
        system: SystemRoot | None = None) -> Armed:
    """Load ``capture`` with the resident job, jump once, and come back with it ready (ArmError otherwise, with
    nothing left loaded)."""
    from khibernate.capture.roundtrip import RoundTrip
    from khibernate.jump import api as jump
    from khibernate.store.handle import Store

    system = system or SystemRoot()
    if read_state(system) is not None:
        raise ArmError("a resident capture kernel is armed already (`khibernate disarm` first)")
    if system.read_int("/sys/kernel/kexec_loaded") == 1:
        raise ArmError("another kexec image is loaded: `khibernate kexec unload` it first")
    with Store.open(target) as st:
        store_uuid = st.sb.uuid_str
    _forget()
    box = ResidentMailbox.create(_run_dir() / MAILBOX_FILE, jump.swapped_ranges(capture.mem_min, capture.mem_max,
                                                                                  system))
    token = uuidlib.uuid4()
    digest = ram_digest(system.system_ram()).hex()
    box.write(mailbox.pack(mailbox.REQUEST, token.bytes, {"request": "arm", "ram_digest": digest},
                           truncate=False))
    job = Job("resident", target, store_uuid, 0, 0, 0, 17, str(token), system.boot_id(), deadline, box.paddr)
    trip = RoundTrip.prepare_with(capture, job, system, box)
    t0 = time.monotonic()
    trip.load()
    try:
        out = trip.enter(lambda: say("arm: jumping to the capture kernel once; it boots, gets ready and jumps back"))
    except RoundTripError as e:
        trip.unload()
        _forget()
        raise ArmError(f"the resident capture kernel did not get ready: {e}") from None
    if not isinstance(out.result, Ready):
        trip.unload()
        _forget()
        why = out.result.message if isinstance(out.result, Failed) else "it answered something else"
        raise ArmError(f"the resident capture kernel did not get ready: {why}")
    armed = Armed(system.boot_id(), capture.kernel, capture.initrd, target, store_uuid, box.paddr, digest,
                  capture.mem_min, capture.mem_max, capture.append, 0, time.time(), round(time.monotonic() - t0, 3))
    _write_state(armed)
    box.close()
    return armed


def pause_words(append: str, armed: Armed) -> list[str] | None:
    """The words of a capture's ``append`` the armed capture kernel takes in the pause's request (fault injection,
    ``khibernate.fault=``); None when the rest differs from the command line it was armed with."""
    def rest(text: str) -> list[str]:
        return [w for w in text.split() if not w.startswith(PER_PAUSE)]

    return [w for w in append.split() if w.startswith(PER_PAUSE)] if rest(append) == rest(armed.append) else None


def unusable_reason(armed: Armed, capture: CaptureKernel, target: str, system: SystemRoot) -> str | None:
    """Why the armed capture kernel cannot serve a capture of ``capture`` into ``target`` now (None: it can)."""
    if (capture.kernel, capture.initrd, capture.mem_min, capture.mem_max) != \
            (armed.kernel, armed.initrd, armed.mem_min, armed.mem_max) or pause_words(capture.append, armed) is None:
        return f"it was armed with another capture kernel ({armed.kernel}, {armed.initrd}) or window or --append"
    if target != armed.target:
        return f"it was armed for {armed.target}, not {target}"
    if ram_digest(system.system_ram()).hex() != armed.ram_digest:
        return "this kernel's memory map changed since arm (memory hotplug)"
    return None


class ResidentTrip:
    """One pause through the armed capture kernel: the request into the mailbox, the jump, the answer."""

    def __init__(self, armed: Armed, box: ResidentMailbox):
        self.armed, self.box = armed, box

    @classmethod
    def open(cls, armed: Armed) -> ResidentTrip:
        """The mailbox mapped and mlocked; ResidentUnusable when it is gone or moved."""
        try:
            box = ResidentMailbox(_run_dir() / MAILBOX_FILE, armed.mailbox)
        except (OSError, MailboxError) as e:
            raise ResidentUnusable(f"the resident mailbox cannot be mapped ({e})") from None
        if not box.still_at():
            box.close()
            raise ResidentUnusable("the resident mailbox page moved in physical memory since arm")
        return cls(armed, box)

    def request(self, job: Job, store_generation: int, extra: Mapping[str, JsonValue] | None,
                append: str = "") -> PauseRequest:
        """The pause's request (``append``: the capture's --append; its per-pause words go in as ``append``)."""
        words = pause_words(append, self.armed) or []
        more: dict[str, JsonValue] = {"append": " ".join(words)} if words else {}
        return PauseRequest(job.kind, self.armed.seq + 1, job.image, job.slot, job.offset, job.capacity, job.level,
                            job.store_uuid, store_generation, bytes.fromhex(self.armed.ram_digest), job.boot_id,
                            job.deadline, job.zero_free, {**dict(extra or {}), **more})

    def enter(self, req: PauseRequest, before: Callable[[], None]) -> Outcome:
        """Write ``req``, jump, read the answer (RoundTripError when the jump did not happen or brought none).  The
        pause counts once the capture kernel took the request (the page no longer holds it)."""
        from khibernate.capture import pauserequest
        from khibernate.capture.roundtrip import enter

        self.box.write(pauserequest.pack(req))
        try:
            return enter(self.box, before)
        finally:
            if self.answered():
                self.armed = dataclasses.replace(self.armed, seq=req.seq)
                _write_state(self.armed)

    def answered(self) -> bool:
        """Whether the mailbox holds something else than the request A wrote (the capture kernel ran)."""
        try:
            return mailbox.unpack_raw(bytes(self.box.buf[:]))[0] != mailbox.PAUSE
        except MailboxError:
            return True

    def close(self) -> None:
        self.box.close()
