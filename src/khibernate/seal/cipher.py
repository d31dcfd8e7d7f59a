"""The AEAD of one sealed image: ChaCha20-Poly1305 (python ``cryptography``, OpenSSL inside) under a key of its own
(why not AES-256-GCM: docs/sealed.md, measured natively and in the capture kernel under TCG).

Keys: the store key (32 random bytes, wrapped in the key slots, :mod:`khibernate.seal.keyring`) is never used
directly.  Each image gets ``image key = HKDF-SHA256(store key, salt = image UUID, info = "khibernate image v3")``;
the UUID is 16 fresh random bytes drawn by the writer for every save, so no two images share an image key.

Nonces: 96 bits (RFC 8439), ``domain (u32) || counter (u64)``: domain 0 numbers the blocks (block ``n`` has
counter ``n``), domain 1 is the one tag over header, tables and trailer.  Under one image key every nonce is used
once: a save writes each block number once and the tables tag once, and a new save draws a new UUID, hence a new
key.

Associated data (built by the format, :mod:`khibernate.image.layouts.khi`) binds each block to its image UUID,
slot, block number and index entry; the tables tag authenticates every byte of the header (key slots included),
both bitmaps, the block index and the trailer.  Pure: no I/O.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from khibernate.layout import Layout
from khibernate.seal.errors import TamperedError

KEY_BYTES = 32
TAG_BYTES = 16
DOMAIN_BLOCK = 0
DOMAIN_TABLES = 1
NONCE = Layout("chacha20_poly1305_nonce", "<", [("domain", "I"), ("counter", "Q")])  # RFC 8439: 96 bits


def _hkdf(key: bytes, salt: bytes | None, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def key_id(store_key: bytes) -> bytes:
    """16 bytes naming a store key without revealing it (HKDF with its own label): written in every sealed image's
    header and in the key slots, so a wrong key is told apart from a changed image."""
    return _hkdf(store_key, None, b"khibernate key id", 16)


def image_key(store_key: bytes, image_uuid: bytes) -> bytes:
    """The key of the image ``image_uuid`` under ``store_key`` (what :class:`ImageCipher` encrypts with)."""
    if len(store_key) != KEY_BYTES or len(image_uuid) != 16:
        raise ValueError("a store key is 32 bytes and an image UUID 16")
    return _hkdf(store_key, image_uuid, b"khibernate image v3")


def nonce(domain: int, counter: int) -> bytes:
    """The 12-byte nonce ``domain || counter``."""
    return NONCE.pack(domain=domain, counter=counter)


class ImageCipher:
    """Seal and open the blocks and the tables tag of the image ``image_uuid``."""

    def __init__(self, store_key: bytes, image_uuid: bytes):
        self._aead = ChaCha20Poly1305(image_key(store_key, image_uuid))

    @classmethod
    def from_image_key(cls, key: bytes) -> ImageCipher:
        """The cipher of an image whose key (:func:`image_key`) was handed over instead of the store key."""
        if len(key) != KEY_BYTES:
            raise ValueError("an image key is 32 bytes")
        cipher = cls.__new__(cls)
        cipher._aead = ChaCha20Poly1305(key)
        return cipher

    def seal_block(self, number: int, frame: bytes | memoryview, ad: bytes) -> bytes:
        """Ciphertext of block ``number`` followed by its 16-byte tag (``len(frame) + TAG_BYTES`` bytes)."""
        return self._aead.encrypt(nonce(DOMAIN_BLOCK, number), bytes(frame), ad)

    def open_block(self, number: int, sealed: bytes, ad: bytes, what: str) -> bytes:
        """The plaintext frame of block ``number``; TamperedError (naming ``what``) if its ciphertext, tag or
        associated data (position, image, slot, index entry) differ from what was sealed."""
        try:
            return self._aead.decrypt(nonce(DOMAIN_BLOCK, number), sealed, ad)
        except InvalidTag:
            raise TamperedError(f"{what} fails authentication: it was changed, moved or taken from another image or "
                                "slot since it was sealed; the image cannot be trusted (nothing was written; "
                                "restore an older image or capture a new one)") from None

    def tables_tag(self, authenticated: bytes) -> bytes:
        """The 16-byte tag over ``authenticated`` (header, bitmaps, index and trailer bytes, in file order)."""
        return self._aead.encrypt(nonce(DOMAIN_TABLES, 0), b"", authenticated)

    def check_tables(self, authenticated: bytes, tag: bytes, what: str) -> None:
        """TamperedError unless ``tag`` is the tables tag of ``authenticated``."""
        try:
            self._aead.decrypt(nonce(DOMAIN_TABLES, 0), tag, authenticated)
        except InvalidTag:
            raise TamperedError(f"{what}: the header, page bitmaps, block index or trailer fail authentication: the "
                                "image was changed since it was sealed and cannot be trusted (nothing was written; "
                                "restore an older image or capture a new one)") from None
