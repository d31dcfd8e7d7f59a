"""Error classes shared by every part of khibernate.

Each class is one kind of failure; its message says what the user should do.  The CLI prints
``error: <message>`` and exits non-zero for any ``KhibernateError``, without a traceback.
"""


class KhibernateError(Exception):
    """Base of every expected, user-facing failure."""

    exit_code = 1


class UsageError(KhibernateError):
    """The user asked for something impossible (bad option combination, missing input)."""

    exit_code = 2


class CaptureBusyError(KhibernateError):
    """Another capture, or a store change that must not meet one, holds the capture lock."""


class LayoutError(KhibernateError):
    """A buffer is shorter than the layout read from it (the default error of :meth:`Layout.unpack`)."""
