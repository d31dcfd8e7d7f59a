"""What the ``.khi`` writer seals with and how the reader gets its key back: the seam between the image format
(``khibernate/image/sources/khi.py``) and the keys (keyring, key sources).  Pure apart from drawing random keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from khibernate.image.layouts.khi import NO_SLOT
from khibernate.seal.cipher import ImageCipher
from khibernate.seal.errors import KeyRequiredError, TamperedError
from khibernate.seal.keyring import Keyring
from khibernate.seal.keysource import KeySource, make_keyring, new_store_key, open_keyring


@dataclasses.dataclass(frozen=True)
class Sealing:
    """A store key, its keyring (copied into every image's header) and the slot the image goes to (NO_SLOT: a
    file)."""

    store_key: bytes
    keyring: Keyring
    slot: int = NO_SLOT

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
        """The AEAD of the image ``image_uuid``."""
        return ImageCipher(self.store_key, image_uuid)


def unseal(keyring_bytes: bytes, key_id: bytes, source: KeySource | None, what: str) -> bytes:
    """The store key of a sealed image from the key slots in its header; KeyRequiredError without a source,
    WrongKeyError when the source opens no slot, TamperedError when the key slots are not the header's key's."""
    if source is None:
        raise KeyRequiredError(f"{what} is sealed: give the key it was sealed with (--key-file FILE or "
                               "--passphrase-file FILE; `khibernate target init --key-file` made it)")
    ring = Keyring.unpack(keyring_bytes, f"{what}: key slots")
    if ring.key_id != key_id:
        raise TamperedError(f"{what}: the key slots name another key than the header; the image was changed and "
                            "cannot be trusted")
    return open_keyring(ring, source, what)
