"""The per-pause request a first kernel puts into a resident capture kernel's mailbox: reader and writer.

A resident capture kernel (docs/resident.md) booted once with the arm job on its command line; what each later pause
asks of it travels in the mailbox page instead, as a mailbox record (:mod:`khibernate.capture.mailbox`: magic, kind
``PAUSE``, the pause's image id, length, CRC32 over header and body) whose body is the fixed record :data:`PAUSE`
(fields declared once by name) followed by ``extra_length`` bytes of JSON (what does not fit a field: a
hibernation's filesystems).  Pure: no I/O here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid as uuidlib
from collections.abc import Mapping, Sequence

from khibernate.capture.errors import MailboxError
from khibernate.capture.jobspec import Job, JsonValue
from khibernate.capture.mailbox import PAUSE as PAUSE_KIND
from khibernate.capture.mailbox import pack_raw, unpack_raw
from khibernate.layout import Layout
from khibernate.ranges import Range

VERSION = 1
PAUSE = Layout("resident pause request", "<", [
    ("version", "H"), ("kind", "H"),  # index into KINDS
    ("seq", "I"),  # 1 for the first pause after the arm, then +1: a replayed or skipped request is refused
    ("slot", "I"), ("level", "I"), ("flags", "I"),  # FLAG_*
    ("offset", "Q"), ("capacity", "Q"),  # the reserved slot's bytes on the target
    ("store_uuid", "16s"), ("store_generation", "Q"),  # the superblock the first kernel wrote last (the reservation)
    ("ram_digest", "32s"),  # ram_digest() of the first kernel's System RAM now
    ("boot_id", "16s"),  # the first kernel's boot
    ("deadline", "d"),  # seconds this pause's job may run in the capture kernel (CLOCK_MONOTONIC there)
    ("extra_length", "I")])  # bytes of JSON after the record
KINDS = ("snapshot", "hibernate")
FLAG_ZERO_FREE = 1
_FLAGS = FLAG_ZERO_FREE
_MAX_DEADLINE = 7 * 24 * 3600.0
PER_PAUSE = "khibernate.fault="  # the only command line words a pause may add (extra "append": fault injection)


@dataclasses.dataclass(frozen=True)
class PauseRequest:
    """One pause's job for a resident capture kernel (``image``: the image id, in the record's header)."""

    kind: str
    seq: int
    image: str
    slot: int
    offset: int
    capacity: int
    level: int
    store_uuid: str
    store_generation: int
    ram_digest: bytes
    boot_id: str
    deadline: float
    zero_free: bool = False
    extra: Mapping[str, JsonValue] = dataclasses.field(default_factory=dict)

    def job(self, target: str, mailbox: int) -> Job:
        """The :class:`Job` the capture side's savers take (the deadline counts from the pause's start there)."""
        return Job(self.kind, target, self.store_uuid, self.slot, self.offset, self.capacity, self.level, self.image,
                   self.boot_id, self.deadline, mailbox, zero_free=self.zero_free)


def ram_digest(ram: Sequence[Range]) -> bytes:
    """SHA-256 of a System RAM map (sorted, merged as given): equal digests, same memory map."""
    text = "".join(f"{r.start:x}-{r.end:x}\n" for r in sorted(ram, key=lambda r: r.start))
    return hashlib.sha256(text.encode()).digest()


def pack(req: PauseRequest) -> bytes:
    """The mailbox page carrying ``req`` (MailboxError when its extra JSON does not fit the page)."""
    if req.kind not in KINDS:
        raise MailboxError(f"a resident capture kernel runs {', '.join(KINDS)}, not {req.kind!r}")
    extra = json.dumps(dict(req.extra), sort_keys=True).encode() if req.extra else b""
    body = PAUSE.pack(version=VERSION, kind=KINDS.index(req.kind), seq=req.seq, slot=req.slot, level=req.level,
                      flags=FLAG_ZERO_FREE if req.zero_free else 0, offset=req.offset, capacity=req.capacity,
                      store_uuid=uuidlib.UUID(req.store_uuid).bytes, store_generation=req.store_generation,
                      ram_digest=req.ram_digest, boot_id=uuidlib.UUID(req.boot_id).bytes, deadline=req.deadline,
                      extra_length=len(extra))
    return pack_raw(PAUSE_KIND, uuidlib.UUID(req.image).bytes, body + extra)


def unpack(page: bytes) -> PauseRequest:
    """The request in a mailbox page; MailboxError saying what is wrong when the page holds none or a damaged one."""
    kind, image, data = unpack_raw(page)
    if kind != PAUSE_KIND:
        raise MailboxError(f"the mailbox holds a record of kind {kind}, not a pause request")
    f = PAUSE.unpack(data, error=MailboxError, what="the pause request")
    if f["version"] != VERSION:
        raise MailboxError(f"pause request version {f['version']} (this capture kernel reads {VERSION}): arm again "
                           "with the same khibernate")
    if f["kind"] >= len(KINDS):
        raise MailboxError(f"pause request of unknown kind {f['kind']}")
    if f["flags"] & ~_FLAGS:
        raise MailboxError(f"pause request with unknown flags {f['flags']:#x}")
    if not (math.isfinite(f["deadline"]) and 0 < f["deadline"] <= _MAX_DEADLINE):
        raise MailboxError(f"pause request with a deadline of {f['deadline']!r} s")
    if f["offset"] + f["capacity"] >= 1 << 63:
        raise MailboxError("pause request with a slot beyond any device")
    extra_bytes = data[PAUSE.size:]
    if len(extra_bytes) != f["extra_length"]:
        raise MailboxError(f"pause request's extra JSON is {len(extra_bytes)} bytes, its record says "
                           f"{f['extra_length']}")
    extra = _extra(extra_bytes)
    return PauseRequest(KINDS[f["kind"]], f["seq"], str(uuidlib.UUID(bytes=image)), f["slot"], f["offset"],
                        f["capacity"], f["level"], str(uuidlib.UUID(bytes=f["store_uuid"])), f["store_generation"],
                        f["ram_digest"], str(uuidlib.UUID(bytes=f["boot_id"])), f["deadline"],
                        bool(f["flags"] & FLAG_ZERO_FREE), extra)


def _extra(data: bytes) -> dict[str, JsonValue]:
    if not data:
        return {}
    try:
        extra = json.loads(data)
    except ValueError:
        raise MailboxError("the pause request's extra JSON is not valid JSON") from None
    if not isinstance(extra, dict):
        raise MailboxError("the pause request's extra JSON is not an object")
    return extra
