"""Failures of `khibernate setup`, one class per kind, each saying what to do."""

from __future__ import annotations

from khibernate.errors import KhibernateError


class SetupError(KhibernateError):
    """setup cannot proceed: the message says what to fix first (nothing was changed)."""


class ConfigError(KhibernateError):
    """/etc/khibernate.conf cannot be read: the message names the line; `khibernate setup --target` rewrites it."""
