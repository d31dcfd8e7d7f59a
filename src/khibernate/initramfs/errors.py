"""The initramfs package's failures: one class per kind, each message saying what to install or run."""

from __future__ import annotations

from khibernate.errors import KhibernateError


class InitramfsError(KhibernateError):
    """The initramfs cannot be built from what is installed on this machine."""


class DependencyError(KhibernateError):
    """An executable's shared libraries cannot all be found."""


class CpioError(KhibernateError):
    """A cpio archive is malformed or cannot be represented."""


class ModuleError(KhibernateError):
    """A module the capture environment needs cannot be found or read: the message says what to install or run."""


class PythonBundleError(KhibernateError):
    """The running Python or one of khibernate's dependencies cannot be bundled."""
