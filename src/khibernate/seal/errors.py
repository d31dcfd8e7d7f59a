"""Failures of sealed images and their keys: one class per kind, each message says what to do.

They are image errors (:class:`khibernate.image.errors.ImageError`), so every command that reads an image reports
them as one line without a traceback, and every caller that refuses a bad image refuses a tampered one too."""

from __future__ import annotations

from khibernate.image.errors import CorruptImageError, ImageError


class SealError(ImageError):
    """Base of every failure about sealing: keys, key slots, authenticity."""


class KeyRequiredError(SealError):
    """The image is sealed and no key was given: nothing in it can be read or trusted without one."""

    exit_code = 2


class WrongKeyError(SealError):
    """No key slot of the image (or store) opens with the key given."""


class KeySourceError(SealError):
    """A key file or passphrase file cannot be used (missing, unreadable, readable by others, too short)."""

    exit_code = 2


class KeyringError(SealError):
    """The wrapped keys (key slots) are damaged or of an unknown kind."""


class TamperedError(SealError, CorruptImageError):
    """An authenticated byte of a sealed image changed since it was sealed (ciphertext, tag, header, bitmap, index,
    trailer), or a block or image sits where it was not sealed (another position, image or slot)."""


class UnsealedRefusedError(SealError):
    """An unauthenticated (unsealed) image where only sealed ones are accepted."""
