"""What the two kernels say to each other: the job the first kernel puts on the capture kernel's command line, and
the typed result the capture kernel posts back into the first kernel's mailbox.

Both sides import this module and nothing else of each other: the first kernel (snapshot, hibernate, resume) builds
a :class:`Job` and reads a :data:`JobResult`; the capture kernel (:mod:`khibernate.capture.job`, which runs the job
named by :data:`KINDS` through its registry) parses the job and posts the result.  Pure: no I/O here.

The job is a set of ``khibernate.KEY=VALUE`` words (nothing secret: /proc/cmdline is world-readable); the result
is one JSON object (flat, as :mod:`khibernate.capture.mailbox` carries it): ``{"ok": true, ...}`` an image saved,
``{"ok": true, "resumed": true, ...}`` the saved kernel resumed, ``{"ok": false, "message": ...}`` a failure.
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib
from collections.abc import Mapping
from typing import Union

from khibernate.capture.errors import JobError
from khibernate.progress import Reporter
from khibernate.ranges import Range
from khibernate.system import SystemRoot

PREFIX = "khibernate."
KHIBERNATE_NOTE = "KHIBERNATE"  # the ELF note a capture adds to the image: what a restore needs beyond VMCOREINFO
KINDS = ("snapshot", "hibernate", "restore")  # the jobs the capture kernel runs (khibernate.capture.job.JOBS)


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

    @property
    def restorable(self) -> bool:
        """Whether the image keeps every page a restore needs (dump level 0, 1, 16 or 17)."""
        return self.level & ~17 == 0


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


@dataclasses.dataclass(frozen=True)
class CaptureContext:
    """What the capture kernel hands every job: its command line, its system (``/``), the first kernel's memory
    (``vmcore``) and the console reporter."""

    cmdline: str
    system: SystemRoot = SystemRoot()
    rep: Reporter = dataclasses.field(default_factory=lambda: Reporter("khibernate-capture", "line"))
    vmcore: str = "/proc/vmcore"
    # a resident capture kernel's pause: the request's extra JSON (instead of a mailbox REQUEST record), and the first
    # kernel's pages its own jump-back image parked in its RAM (first kernel paddr -> paddr here; capture/relocated)
    request: Mapping[str, JsonValue] | None = None
    parked: Mapping[int, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, system: SystemRoot | None = None) -> CaptureContext:
        """The running capture kernel's context."""
        system = system or SystemRoot()
        return cls(system.cmdline(), system)

    def capture_ram(self) -> list[Range]:
        """This capture kernel's own System RAM: the crash region and the low RAM it borrowed."""
        return self.system.system_ram()


# ---------------------------------------------------------------- results

JsonValue = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]  # noqa: UP007
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "list[int]": (list,), "dict[str, float]": (dict,)}


def _fields(cls: type, body: Mapping[str, object], what: str) -> dict[str, object]:
    """The dataclass ``cls``'s fields taken from ``body`` (defaults where absent); JobError on a wrong type."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise JobError(f"the {what} lacks {f.name!r}")
            continue
        v = body[f.name]
        want = _TYPES.get(str(f.type))
        if want is not None and (not isinstance(v, want) or (bool not in want and isinstance(v, bool))):
            raise JobError(f"the {what}'s {f.name!r} is {v!r}, not {f.type}")
        out[f.name] = v
    return out


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What the job cost the capture kernel: MemAvailable at its start and lowest, its peak RSS, the capture
    kernel's uptime when it posted (all 0 when not measured, e.g. after the watchdog killed the job)."""

    mem_available_start: int = 0
    mem_available_lowest: int = 0
    peak_used_bytes: int = 0
    peak_rss_kib: int = 0
    capture_uptime: float = 0.0

    def to_json(self) -> dict[str, JsonValue]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Saved:
    """A snapshot or hibernate job wrote its image into the slot (``length`` bytes with ``crc32``), not yet read
    back by the first kernel."""

    slot: int
    length: int
    crc32: int
    pages_ram: int
    pages_stored: int
    pages_zero: int
    pages_excluded: int
    class_counts: list[int]
    osrelease: str = ""
    job_started_uptime: float = 0.0
    save_seconds: float = 0.0
    open_seconds: float = 0.0
    footprint: Footprint = Footprint()

    def to_json(self) -> dict[str, JsonValue]:
        d: dict[str, JsonValue] = {"ok": True}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "footprint"})
        return {**d, **self.footprint.to_json()}


@dataclasses.dataclass(frozen=True)
class Resumed:
    """The restore job wrote the saved kernel back and entered it: posted into the saved kernel's own mailbox (what
    `hibernate` finds when it returns).  ``restore``: the write's figures (RestoreStats.as_dict)."""

    restore: dict[str, float]
    resume_boot_id: str
    slot: int
    again: bool = False
    restore_uptime: float = 0.0
    footprint: Footprint = Footprint()

    def to_json(self) -> dict[str, JsonValue]:
        return {"ok": True, "resumed": True, "restore": dict(self.restore), "resume_boot_id": self.resume_boot_id,
                "slot": self.slot, "again": self.again, "restore_uptime": self.restore_uptime,
                **self.footprint.to_json()}


@dataclasses.dataclass(frozen=True)
class Failed:
    """The job failed (``refused``: a restore refused before any write, the asking boot carries on); ``message``
    says why and what to do, ``error`` is the exception's class."""

    message: str
    error: str = ""
    refused: bool = False
    footprint: Footprint = Footprint()

    def to_json(self) -> dict[str, JsonValue]:
        return {"ok": False, "message": self.message, "error": self.error, "refused": self.refused,
                **self.footprint.to_json()}

    def adding(self, note: str) -> Failed:
        """The same failure with ``note`` appended to its message (what was done about it)."""
        return dataclasses.replace(self, message=f"{self.message}; {note}")


@dataclasses.dataclass(frozen=True)
class Ready:
    """A resident capture kernel booted and is ready for pauses (``ready_uptime``: its uptime then, seconds)."""

    ready_uptime: float
    footprint: Footprint = Footprint()

    def to_json(self) -> dict[str, JsonValue]:
        return {"ok": True, "ready": True, "ready_uptime": self.ready_uptime, **self.footprint.to_json()}


JobResult = Union[Saved, Resumed, Failed, Ready]  # noqa: UP007 - a runtime alias (isinstance, from __future__)


def result_from_json(body: Mapping[str, object]) -> JobResult:
    """The result a mailbox carried; JobError when it is not one (a truncated record reads as a Failed)."""
    fp = Footprint(**_fields(Footprint, body, "capture job's footprint"))  # type: ignore[arg-type]
    if body.get("ok") is not True:
        message = body.get("message")
        if not isinstance(message, str):
            raise JobError(f"the capture job's result is neither a success nor a failure: {dict(body)!r}")
        f = _fields(Failed, {k: v for k, v in body.items() if k != "footprint"}, "capture job's failure")
        return Failed(**f, footprint=fp)  # type: ignore[arg-type]
    if body.get("ready") is True:
        return Ready(**_fields(Ready, body, "resident capture kernel's answer"), footprint=fp)  # type: ignore[arg-type]
    if body.get("resumed") is True:
        return Resumed(**_fields(Resumed, body, "resume's result"), footprint=fp)  # type: ignore[arg-type]
    return Saved(**_fields(Saved, body, "capture job's result"), footprint=fp)  # type: ignore[arg-type]
