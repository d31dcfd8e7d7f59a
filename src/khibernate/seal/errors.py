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


class TpmError(SealError):
    """The TPM did not release the key of a TPM slot (the message carries what tpm2-tools said)."""

    def __init__(self, message: str, rc: int | None = None):
        super().__init__(message)
        self.rc = rc  # the TPM's response code, when tpm2-tools named one


class TpmUnavailableError(TpmError):
    """No TPM to ask (no device, the TCTI does not connect) or no tpm2-tools to ask it with."""

    exit_code = 2


class TpmPolicyError(TpmError):
    """The TPM refuses the slot's PCR policy (TPM error 0x99d): the boot chain changed since the slot was sealed."""


class TpmForeignError(TpmError):
    """The TPM refuses to load the slot's sealed object: another TPM sealed it, or this one was cleared since."""
