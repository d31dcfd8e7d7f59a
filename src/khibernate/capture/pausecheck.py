"""What a resident capture kernel checks before it saves anything in a pause (pure: no I/O here).

It booted once, at `khibernate arm`, and kept what it was told then (:class:`Armed`).  Each pause brings a
:class:`~khibernate.capture.pauserequest.PauseRequest`; before a byte is written the request must be the next one of
the same first kernel, that kernel's memory map must be the one the capture kernel was booted for (its elfcorehdr
and so /proc/vmcore describe that map), and the store on the target — read again, cache dropped — must be the armed
one at exactly the generation the first kernel wrote last, with the slot reserved for this image.  Any mismatch is
a refusal (docs/resident.md): the capture kernel answers ``refused``, writes nothing, jumps back, and the first
kernel falls back to a fresh load.
"""

from __future__ import annotations

import dataclasses

from khibernate.capture.errors import JobError
from khibernate.capture.pauserequest import PER_PAUSE, PauseRequest
from khibernate.store.superblock import Superblock


class PauseRefused(JobError):
    """The resident capture kernel's state does not match the pause's request: nothing was written."""


@dataclasses.dataclass(frozen=True)
class Armed:
    """What the resident capture kernel was told at its boot: the target and its store, the first kernel's boot and
    RAM-map digest, the mailbox; ``seq``: the last pause it ran (0 before the first)."""

    target: str
    store_uuid: str
    boot_id: str
    ram_digest: bytes
    mailbox: int
    seq: int = 0

    def after(self, req: PauseRequest) -> Armed:
        """This state once ``req`` ran (whatever its outcome: a request is never run twice)."""
        return dataclasses.replace(self, seq=req.seq)


def pause_problems(armed: Armed, req: PauseRequest) -> list[str]:
    """What makes ``req`` not the next request of the first kernel this capture kernel was armed for."""
    problems = []
    if req.boot_id != armed.boot_id:
        problems.append(f"the request comes from boot {req.boot_id}, this capture kernel was armed by {armed.boot_id}")
    if req.seq != armed.seq + 1:
        problems.append(f"the request is pause #{req.seq}, the next one here is #{armed.seq + 1} (replayed or lost)")
    if req.ram_digest != armed.ram_digest:
        problems.append("the first kernel's memory map changed since arm (memory hotplug?): this capture kernel's "
                        "/proc/vmcore describes the old one")
    words = req.extra.get("append", "")
    if not isinstance(words, str) or any(not w.startswith(PER_PAUSE) for w in words.split()):
        problems.append(f"the request adds command line words other than {PER_PAUSE}...: {words!r}")
    if req.store_uuid != armed.store_uuid:
        problems.append(f"the request is for store {req.store_uuid}, this capture kernel was armed for "
                        f"{armed.store_uuid}")
    return problems


def store_problems(armed: Armed, req: PauseRequest, sb: Superblock) -> list[str]:
    """What makes the store as read now (``sb``) not the one the first kernel wrote last for ``req``."""
    from khibernate.capture.save import check_reserved_in

    if sb.uuid_str != armed.store_uuid:
        return [f"{armed.target} holds store {sb.uuid_str} now, not {armed.store_uuid} (re-initialised or another "
                "disk under the same name)"]
    if sb.generation != req.store_generation:
        return [f"the store on {armed.target} is at generation {sb.generation}, the first kernel wrote "
                f"{req.store_generation}: it changed under this capture kernel (or a stale cache)"]
    reserved = check_reserved_in(sb, req.job(armed.target, armed.mailbox))
    return [reserved] if reserved else []


def check_pause(armed: Armed, req: PauseRequest, sb: Superblock) -> None:
    """PauseRefused naming every problem, unless ``req`` may run on the store as read now."""
    problems = pause_problems(armed, req) or store_problems(armed, req, sb)
    if problems:
        raise PauseRefused("the resident capture kernel refuses this pause: " + "; ".join(problems)
                           + "; nothing written (the first kernel falls back to a fresh capture kernel)")
