"""A hibernation image is tried at most once (swsusp's rule), and one attempt is continued at most once.

The first boot that finds a hibernation image marks its slot ``tried`` in the store before any check can refuse
it (swsusp resets its signature in ``swsusp_check`` the same way): whatever happens next — a refusal, a failed
jump, a power cut — no later boot picks that image again, so a boot that goes on and changes the disks can never be
followed by a resume of the stale kernel.  Only ``resume --again`` takes a tried image, on purpose.

The mark carries an *attempt token* (16 random bytes, written as 32 hex digits) in the store's superblock.  A boot
that re-enters the same kernel to go on with the same attempt (another crash region than the image's: the resume
boot kexecs itself with the image's region) passes it on its command line as ``khibernate.resume_attempt=TOKEN``,
and ``resume --attempt TOKEN`` continues the attempt although the slot is tried.  Bounded: the continuation sets
the attempt's CONTINUED flag before anything else (a token works once), a new attempt replaces the record, and a
slot that is no longer ``tried`` (resumed, dropped, rewritten) ends it.  The capture kernel restores a slot only as
the store's current attempt with that same token.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import TYPE_CHECKING

from khibernate.errors import UsageError
from khibernate.restore.errors import AttemptRefused as AttemptRefused
from khibernate.store.superblock import ATTEMPT_CONTINUED, ResumeAttempt, SlotRecord, SlotState, Superblock

if TYPE_CHECKING:
    from khibernate.store.handle import Store

TOKEN_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Attempt:
    """A resume attempt under way: the slot as marked tried, and the token that names the attempt."""

    slot: SlotRecord
    token: bytes
    store_uuid: bytes
    continued: bool = False

    @property
    def token_hex(self) -> str:
        return self.token.hex()


def parse_token(text: str) -> bytes:
    """The token from its 32 hex digits; UsageError otherwise."""
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text or ""):
        raise UsageError(f"an attempt token is 32 hex digits, not {text!r}")
    token = bytes.fromhex(text)
    if not any(token):
        raise UsageError("an attempt token of zeros names no attempt")
    return token


def mark_tried(sb: Superblock, rec: SlotRecord, token: bytes, now_ns: int) -> Superblock:
    """The next superblock: ``rec``'s slot tried, and the store's attempt this one (any earlier attempt ends)."""
    return sb.with_attempt(dataclasses.replace(rec, state=SlotState.TRIED), ResumeAttempt(rec.index, token, now_ns))


def continue_attempt(sb: Superblock, token: bytes) -> tuple[Superblock, SlotRecord]:
    """(next superblock with the attempt marked continued, the tried slot); AttemptRefused when ``token`` is not the
    store's current attempt, the attempt was continued already, or its slot is no longer tried."""
    a = sb.attempt
    if a is None or a.token != token:
        raise AttemptRefused(f"attempt {token.hex()} is not this store's current resume attempt (a later attempt "
                             "replaced it, or the store was re-created): not resuming")
    if a.continued:
        raise AttemptRefused(f"attempt {token.hex()} was continued once already: a token is good for one "
                             "re-entered boot, not resuming")
    rec = sb.slot(a.slot)
    if rec.state != SlotState.TRIED:
        raise AttemptRefused(f"slot {a.slot} of attempt {token.hex()} is {rec.state.name.lower()} now, no longer "
                             "tried: the attempt is over, not resuming")
    return dataclasses.replace(sb, generation=sb.generation + 1,
                               attempt=dataclasses.replace(a, flags=a.flags | ATTEMPT_CONTINUED)), rec


def job_problems(sb: Superblock, index: int, token: bytes) -> list[str]:
    """Why a capture kernel must not restore slot ``index`` for the attempt ``token`` (empty: it may): the slot must
    be tried and the store's current attempt must be this one."""
    a = sb.attempt
    if a is None or a.token != token or a.slot != index:
        return [f"slot {index} is not the store's current resume attempt {token.hex()} (another attempt replaced it)"]
    state = sb.slot(index).state
    if state != SlotState.TRIED:
        return [f"slot {index} is {state.name.lower()}, not tried by this attempt"]
    return []


def start(st: Store, rec: SlotRecord, store_uuid: bytes) -> Attempt:
    """Mark ``rec``'s slot tried under a fresh token (one superblock write through the open store ``st``, re-checked
    against the store as it is now); StoreError / AttemptRefused when the slot changed since it was read."""
    target = st.path
    token = os.urandom(TOKEN_BYTES)

    def change(sb: Superblock) -> Superblock:
        cur = sb.slot(rec.index)
        if sb.uuid != store_uuid or cur.image_uuid != rec.image_uuid or cur.state != rec.state:
            raise AttemptRefused(f"slot {rec.index} of {target} changed while it was being tried; not resuming")
        return mark_tried(sb, cur, token, time.time_ns())

    new = st.update(change)
    return Attempt(new.slot(rec.index), token, new.uuid)


def resume_continued(st: Store, token: bytes) -> Attempt:
    """Continue the attempt ``token`` (once): its CONTINUED flag is written (through the open store ``st``) before
    anything else is done."""
    found: list[SlotRecord] = []

    def change(sb: Superblock) -> Superblock:
        new, rec = continue_attempt(sb, token)
        found.append(rec)
        return new

    new = st.update(change)
    return Attempt(found[-1], token, new.uuid, continued=True)
