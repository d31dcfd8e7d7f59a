"""Failures of the view side: each message says what to do."""

from __future__ import annotations

from khibernate.errors import KhibernateError


class ViewError(KhibernateError):
    """Base of every failure while finding, opening or mounting the previous kernel's memory."""


class NoPreviousKernelError(ViewError):
    """The running kernel cannot tell where the previously booted kernel's memory is."""


class MountError(ViewError):
    """The FUSE mount cannot be made (no FUSE, DIR busy or missing, libfuse absent)."""
