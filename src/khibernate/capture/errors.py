"""The capture package's failures: one class per kind, each message saying what to do."""

from __future__ import annotations

from khibernate.errors import KhibernateError


class JobError(KhibernateError):
    """The job on the command line is malformed, or the capture job failed."""


class DeadlineError(JobError):
    """The capture job ran past its deadline."""


class SnapshotError(KhibernateError):
    """The snapshot was refused before the jump, or failed in the capture kernel."""


class RoundTripError(KhibernateError):
    """The jump round trip failed before the capture kernel ran or brought no result back (load refused, mailbox
    page moved, the jump refused, no result in the mailbox)."""


class CaptureKernelError(KhibernateError):
    """The capture kernel cannot jump back (or nothing proves it can); nothing was reserved or frozen."""


class MailboxError(KhibernateError):
    """The mailbox page cannot be set up, or holds no valid record."""


class WatchError(KhibernateError):
    """The watcher cannot start (bad options, no /dev/kmsg, nothing left to watch)."""
