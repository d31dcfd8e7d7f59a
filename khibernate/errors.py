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
