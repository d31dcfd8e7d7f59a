"""The restore package's failures (resume in the first kernel, the restore job in the capture kernel): one class
per kind, each message saying what to do."""

from __future__ import annotations

from collections.abc import Sequence

from khibernate.errors import KhibernateError


class AttemptRefused(KhibernateError):
    """The attempt token does not name the store's current, not yet continued attempt; nothing was changed."""


class RestoreRefused(KhibernateError):
    """The image does not belong to this boot (or is not restorable); nothing was written."""

    def __init__(self, differences: Sequence[str]):
        self.differences = list(differences)
        super().__init__("refusing to restore, nothing was written: " + "; ".join(self.differences))


class NotExtError(KhibernateError):
    """The bytes hold no ext2/3/4 superblock."""


class RestoreError(KhibernateError):
    """Writing the image back failed; after the first write the system must power off."""


class OldMemoryError(KhibernateError):
    """The first kernel's memory cannot be opened, mapped, or the address is outside what may be written."""


class NothingToResume(KhibernateError):
    """The store holds no hibernation image to resume: boot normally."""


class ResumeError(KhibernateError):
    """The resume was refused or failed before any write to memory: this boot continues normally.

    ``attempt`` is the token (32 hex digits) of the attempt this run started or continued — the slot is marked tried
    under it — or None when the refusal came before any slot was marked; a boot that re-enters this kernel for the
    same attempt passes it on as ``khibernate.resume_attempt=TOKEN``.  ``differences`` lists what did not fit this
    boot (RestoreRefused's list; empty for other failures)."""

    def __init__(self, message: str, attempt: str | None = None, differences: Sequence[str] = ()):
        super().__init__(message)
        self.attempt = attempt
        self.differences = list(differences)
