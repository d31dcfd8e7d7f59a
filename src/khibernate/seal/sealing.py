"""What the ``.khi`` writer seals with and how the reader gets its key back: the seam between the image format
(``khibernate/image/sources/khi.py``) and the keys (keyring, key sources).  Pure apart from drawing random keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from khibernate.image.layouts.khi import NO_SLOT
from khibernate.seal.cipher import KEY_BYTES, ImageCipher
from khibernate.seal.errors import KeyRequiredError, TamperedError, WrongKeyError
from khibernate.seal.keyring import Keyring
from khibernate.seal.keysource import KeySource, make_keyring, new_store_key, open_keyring


@dataclasses.dataclass(frozen=True)
class HandedKey:
    """The key of one image, handed from the first kernel to the capture kernel through the mailbox page instead of
    the store key: the capture kernel can seal (or open) that one image and no other.  ``key_id`` names the store
    key it was derived from (checked against the store's keyring).  One image, written once: a new save draws a new
    image UUID and so a new key (block numbers are nonces)."""

    image_uuid: bytes
    image_key: bytes
    key_id: bytes

    def to_json(self) -> dict[str, str]:
        return {"image": self.image_uuid.hex(), "key": self.image_key.hex(), "key_id": self.key_id.hex()}

    @classmethod
    def from_json(cls, d: object) -> HandedKey:
        """From the mailbox request's ``seal`` object; KeyRequiredError when it is missing or malformed."""
        try:
            assert isinstance(d, dict)
            key = cls(bytes.fromhex(d["image"]), bytes.fromhex(d["key"]), bytes.fromhex(d["key_id"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise KeyRequiredError("the first kernel handed no usable image key (the mailbox request's seal "
                                   "object is missing or malformed); nothing written") from None
        if len(key.image_uuid) != 16 or len(key.image_key) != KEY_BYTES or len(key.key_id) != 16:
            raise KeyRequiredError("the handed image key has the wrong size; nothing written")
        return key

    def cipher_for(self, image_uuid: bytes, key_id: bytes, what: str) -> ImageCipher:
        """The AEAD that opens the sealed image ``image_uuid`` whose header names the store key ``key_id`` (a
        restore handed this key instead of the store key); WrongKeyError when the key is for another store key or
        another image.  Whether it opens is then the tags' to say (the tables tag is checked next)."""
        if key_id != self.key_id:
            raise WrongKeyError(f"{what} is sealed under another store key than the image key handed over (the "
                                "store was made again since the key was derived); nothing written")
        if image_uuid != self.image_uuid:
            raise WrongKeyError(f"{what} holds image {image_uuid.hex()}, not {self.image_uuid.hex()} that the image "
                                "key was handed over for (the slot was rewritten since); nothing written")
        return ImageCipher.from_image_key(self.image_key)


@dataclasses.dataclass(frozen=True)
class Sealing:
    """A store key, its keyring (copied into every image's header) and the slot the image goes to (NO_SLOT: a
    file) — or, in the capture kernel, no store key but the one image's ``handed`` key."""

    store_key: bytes | None
    keyring: Keyring
    slot: int = NO_SLOT
    handed: HandedKey | None = None

    @classmethod
    def from_handed(cls, handed: HandedKey, ring: Keyring, slot: int) -> Sealing:
        """Seal the one image ``handed`` names, with the store's keyring ``ring`` in its header (WrongKeyError when
        the handed key belongs to another store key)."""
        if handed.key_id != ring.key_id:
            raise WrongKeyError("the image key handed by the first kernel belongs to another store key than this "
                                "store's: the store was made again since the capture began; nothing written")
        return cls(None, ring, slot, handed)

    @property
    def image_uuid(self) -> bytes | None:
        """The UUID the image must carry (a handed key is for one image), None: the writer draws one."""
        return self.handed.image_uuid if self.handed else None

    @classmethod
    def new(cls, sources: Sequence[KeySource], slot: int = NO_SLOT) -> Sealing:
        """A fresh random store key wrapped by each of ``sources`` (a standalone sealed file, or a new store)."""
        key = new_store_key()
        return cls(key, make_keyring(key, sources), slot)

    @classmethod
    def from_keyring(cls, ring: Keyring, source: KeySource, slot: int = NO_SLOT) -> Sealing:
        """Seal with a store's key, unwrapped from its keyring by ``source`` (WrongKeyError if it does not open)."""
        return cls(open_keyring(ring, source, "the store"), ring, slot)

    def for_slot(self, slot: int) -> Sealing:
        """The same key, sealing for store slot ``slot``."""
        return dataclasses.replace(self, slot=slot)

    def cipher(self, image_uuid: bytes) -> ImageCipher:
        """The AEAD of the image ``image_uuid`` (with a handed key: only of the image it was handed for)."""
        if self.handed is not None:
            if image_uuid != self.handed.image_uuid:
                raise ValueError("a handed image key seals only the image it was handed for")
            return ImageCipher.from_image_key(self.handed.image_key)
        assert self.store_key is not None
        return ImageCipher(self.store_key, image_uuid)


def unseal(keyring_bytes: bytes, key_id: bytes, source: KeySource | None, what: str) -> bytes:
    """The store key of a sealed image from the key slots in its header; KeyRequiredError without a source,
    WrongKeyError when the source opens no slot, TamperedError when the key slots are not the header's key's."""
    if source is None:
        raise KeyRequiredError(f"{what} is sealed: give the key it was sealed with (--key-file FILE or "
                               "--passphrase-file FILE, or --tpm; `khibernate target init --key-file` made it)")
    ring = Keyring.unpack(keyring_bytes, f"{what}: key slots")
    if ring.key_id != key_id:
        raise TamperedError(f"{what}: the key slots name another key than the header; the image was changed and "
                            "cannot be trusted")
    return open_keyring(ring, source, what)
