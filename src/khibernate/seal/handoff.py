"""The first kernel's half of sealing in the capture kernel: the image key for one image, derived in a child
process that exits before the jump.

Why a child: the snapshot saves all of this kernel's memory.  Reading the key file (or passphrase file) and
unwrapping the store key in this process would leave the store key in its heap — freed Python objects are not
wiped — and so in the image, sealed with itself and in clear in any export.  The child reads the secret, unwraps
the store key, derives the one image key, writes it to a pipe and exits: its pages are free memory by the time of
the jump, which the capture's page filter drops (dump levels with bit 16; hibernation always).  What this process
keeps is the image key of the image being saved — the key that image's reader needs anyway.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from khibernate.errors import KhibernateError
from khibernate.seal import errors
from khibernate.seal.cipher import image_key, key_id
from khibernate.seal.keyring import Keyring
from khibernate.seal.keysource import KeySource, open_keyring
from khibernate.seal.sealing import HandedKey

MAX_ANSWER = 4096


def _derive(make_source: Callable[[], KeySource], ring: Keyring, image_uuid: bytes, what: str) -> dict[str, str]:
    """The child's work: the handed key as JSON, or the error's class name and message."""
    try:
        store_key = open_keyring(ring, make_source(), what)
        return HandedKey(image_uuid, image_key(store_key, image_uuid), key_id(store_key)).to_json()
    except KhibernateError as e:
        return {"error": type(e).__name__, "message": str(e)}


def hand_image_key(make_source: Callable[[], KeySource], ring: Keyring, image_uuid: bytes,
                   what: str = "the store") -> HandedKey:
    """The key of image ``image_uuid`` under the store key that ``make_source()`` (called in a child process)
    unwraps from ``ring``; the child's WrongKeyError / KeySourceError re-raised here with its message."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return, no exception handler of the parent's runs here
        code = 1
        try:
            os.close(rfd)
            os.write(wfd, json.dumps(_derive(make_source, ring, image_uuid, what)).encode()[:MAX_ANSWER])
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        data = b""
        while chunk := os.read(rfd, MAX_ANSWER):
            data += chunk
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise errors.KeySourceError(f"the process that unwraps the key of {what} failed (status {status}); nothing "
                                    "was written")
    try:
        answer = json.loads(data)
    except ValueError:
        raise errors.KeySourceError(f"the process that unwraps the key of {what} answered garbage; nothing was "
                                    "written") from None
    if "error" in answer:
        cls = getattr(errors, str(answer["error"]), errors.KeySourceError)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.SealError) else errors.KeySourceError)(
            str(answer["message"]))
    return HandedKey.from_json(answer)
