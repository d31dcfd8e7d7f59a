"""Which images a store accepts: pure rules over the store's flags (``target init``), the image's header and the
key the resuming side was given.  The flags are not authenticated (whoever writes the device can change them), so
they guard against mistakes; against an attacker the rule that counts is the resuming side's own: given a key, it
accepts only images sealed under that key."""

from __future__ import annotations

from khibernate.seal.errors import SealError, UnsealedRefusedError
from khibernate.store.superblock import STORE_SEALED, STORE_UNSEALED


class SealedStoreCaptureError(SealError):
    """A capture into a sealed store without its key, or with a key into a store that is not sealed."""


def name(flags: int) -> str:
    """One word for a store's flags: sealed, unsealed, or legacy (made before sealing existed)."""
    return "sealed" if flags & STORE_SEALED else "unsealed" if flags & STORE_UNSEALED else "legacy"


def describe(flags: int) -> str:
    """What a store's flags say, for `target list` and `doctor`."""
    if flags & STORE_SEALED:
        return "sealed (images must be sealed with its key)"
    if flags & STORE_UNSEALED:
        return ("unsealed (made without a key, or with --unsealed: unauthenticated images are accepted; "
                "`target init` with --key-file, --passphrase-file or --tpm makes a sealed store)")
    return "made before sealing existed (unauthenticated images are refused)"


def check_restore(flags: int, image_sealed: bool, key_given: bool, where: str) -> None:
    """UnsealedRefusedError when an unsealed image may not be restored: the store is sealed, or was not made
    saying unauthenticated images are allowed, or the resuming side holds a key (so it expects a sealed image)."""
    if image_sealed:
        return
    if key_given:
        raise UnsealedRefusedError(f"{where} holds an unsealed image but a key was given: an image that should be "
                                   "sealed is not; it may have been replaced. Refused (nothing written)")
    if flags & STORE_SEALED or not flags & STORE_UNSEALED:
        raise UnsealedRefusedError(f"{where} holds an unsealed (unauthenticated) image and its store is "
                                   f"{describe(flags)}: refused (nothing written). Make the store with `target init "
                                   "--unsealed` to accept unauthenticated images, or with --key-file to seal them")


def check_capture(flags: int, target: str, kind: str, key_given: bool) -> None:
    """Whether a capture of ``kind`` (snapshot or hibernate) may go into a store with ``flags``: a sealed store
    needs its key (the capture kernel seals with the image key the first kernel hands it; a resume derives the same
    image key from the same key source and hands it to the restoring kernel), an unsealed one must not be given one
    (SealedStoreCaptureError)."""
    if not flags & STORE_SEALED:
        if key_given:
            raise SealedStoreCaptureError(f"{target} is not a sealed store: a key would seal nothing (make the store "
                                          "with `target init --key-file` to seal its images, or drop the key option)")
        return
    if not key_given:
        then = (" (the resume asks for the passphrase on the console after trying a TPM slot, or takes the same option)"
                if kind == "hibernate" else "")
        raise SealedStoreCaptureError(f"{target} is a sealed store: give its key to `{kind}` (--key-file FILE or "
                                      "--passphrase-file FILE, or --tpm) so the capture kernel can seal the "
                                      f"image{then}")
