"""The wrapped store key, byte by byte: a keyring of key slots, each holding the store key wrapped
(ChaCha20-Poly1305) by one key source (a key file, a passphrase; kind 3 is kept for the TPM).  Reader and writer
side by side, every struct declared once by field name; pure (no I/O).  ``docs/sealed.md`` describes every byte.

Where it lives: (1) in the store, a 4 KiB block at offsets 8192 and 12288 (two identical copies written by
``target init``; between the superblock copies and the first slot at 1 MiB), so a capture can seal for the store;
(2) in every sealed image's header (a copy of the store's), so a sealed image, in a slot or exported to a file, is
opened with the same key file or passphrase as its store and needs nothing else.

Wrapping: ``KEK = scrypt(passphrase, salt, N, r, p)`` or ``HKDF-SHA256(key file bytes, salt)``; the salt is 32
fresh random bytes per slot, so every KEK wraps one key once and the slot's zero nonce is never reused under it.
The associated data is the keyring's magic, version, key id and the slot's own fields, so a slot moved to another
keyring or with changed KDF parameters does not open.
"""

from __future__ import annotations

import dataclasses
import zlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from khibernate.layout import Layout
from khibernate.seal.cipher import KEY_BYTES, TAG_BYTES
from khibernate.seal.errors import KeyringError

MAGIC = b"KHIKEYS\0"
VERSION = 1
MAX_SLOTS = 8
KIND_KEY_FILE = 1
KIND_PASSPHRASE = 2
KIND_TPM = 3  # reserved for the TPM 2.0 source (sealed to a PCR policy)
KIND_NAMES = {KIND_KEY_FILE: "a key file", KIND_PASSPHRASE: "a passphrase", KIND_TPM: "the TPM"}
KDF_HKDF_SHA256 = 1
KDF_SCRYPT = 2

HEAD = Layout("khi_keyring", "<", [("magic", "8s"), ("version", "I"), ("nr_slots", "I"), ("key_id", "16s")])
SLOT = Layout("khi_key_slot", "<", [("kind", "I"), ("kdf", "I"), ("log2_n", "I"), ("r", "I"), ("p", "I"),
                                    ("reserved", "I"), ("salt", "32s"), ("wrapped", f"{KEY_BYTES + TAG_BYTES}s")])
CRC = Layout("khi_keyring_crc", "<", [("crc32", "I")])
assert HEAD.size == 32 and SLOT.size == 104
WRAP_NONCE = bytes(12)  # one wrap per KEK: the KEK's salt is fresh for every slot


@dataclasses.dataclass(frozen=True)
class KeySlot:
    """One wrapped copy of the store key: how its KEK is derived (kind, KDF and parameters, salt) and the
    ciphertext + tag of the store key under it."""

    kind: int
    kdf: int
    salt: bytes
    wrapped: bytes = b""
    log2_n: int = 0
    r: int = 0
    p: int = 0

    def fields(self) -> bytes:
        """The slot's bytes without its ciphertext: part of the associated data of its wrap."""
        return SLOT.pack(kind=self.kind, kdf=self.kdf, log2_n=self.log2_n, r=self.r, p=self.p, salt=self.salt)

    def pack(self) -> bytes:
        return SLOT.pack(kind=self.kind, kdf=self.kdf, log2_n=self.log2_n, r=self.r, p=self.p, salt=self.salt,
                         wrapped=self.wrapped)


def _ad(key_id: bytes, slot: KeySlot) -> bytes:
    return HEAD.pack(magic=MAGIC, version=VERSION, key_id=key_id) + slot.fields()


def wrap(kek: bytes, store_key: bytes, key_id: bytes, slot: KeySlot) -> KeySlot:
    """``slot`` with the store key wrapped under ``kek``."""
    return dataclasses.replace(slot, wrapped=ChaCha20Poly1305(kek).encrypt(WRAP_NONCE, store_key, _ad(key_id, slot)))


def unwrap(kek: bytes, key_id: bytes, slot: KeySlot) -> bytes | None:
    """The store key if ``kek`` opens ``slot``, else None."""
    try:
        return ChaCha20Poly1305(kek).decrypt(WRAP_NONCE, slot.wrapped, _ad(key_id, slot))
    except InvalidTag:
        return None


@dataclasses.dataclass(frozen=True)
class Keyring:
    """The key id of the store key and its wrapped copies."""

    key_id: bytes
    slots: tuple[KeySlot, ...]

    def pack(self) -> bytes:
        """Header, slots, CRC-32 of both (catches a damaged keyring before any key is tried)."""
        if not 1 <= len(self.slots) <= MAX_SLOTS:
            raise KeyringError(f"a keyring holds 1..{MAX_SLOTS} key slots, not {len(self.slots)}")
        body = HEAD.pack(magic=MAGIC, version=VERSION, nr_slots=len(self.slots), key_id=self.key_id)
        body += b"".join(s.pack() for s in self.slots)
        return body + CRC.pack(crc32=zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes | memoryview, what: str = "keyring") -> Keyring:
        """The keyring at the start of ``data``; KeyringError naming ``what`` when it is absent or damaged."""
        raw = bytes(data)
        f = HEAD.unpack(raw, error=KeyringError, what=what)
        if f["magic"] != MAGIC:
            raise KeyringError(f"{what}: no key slots (bad magic)")
        if f["version"] != VERSION:
            raise KeyringError(f"{what}: keyring version {f['version']} is unknown (this khibernate reads "
                               f"{VERSION}); use the khibernate that wrote it")
        n = f["nr_slots"]
        if not 1 <= n <= MAX_SLOTS:
            raise KeyringError(f"{what}: {n} key slots (1..{MAX_SLOTS}); it is damaged")
        end = HEAD.size + n * SLOT.size
        crc = CRC.unpack(raw, end, error=KeyringError, what=what)["crc32"]
        if zlib.crc32(raw[:end]) != crc:
            raise KeyringError(f"{what}: checksum mismatch; the key slots are damaged")
        slots = []
        for i in range(n):
            s = SLOT.unpack(raw, HEAD.size + i * SLOT.size)
            slots.append(KeySlot(kind=s["kind"], kdf=s["kdf"], salt=s["salt"], wrapped=s["wrapped"],
                                 log2_n=s["log2_n"], r=s["r"], p=s["p"]))
        return cls(f["key_id"], tuple(slots))

    @staticmethod
    def size(nr_slots: int) -> int:
        """Packed bytes of a keyring of ``nr_slots`` slots."""
        return HEAD.size + nr_slots * SLOT.size + CRC.size

    def kinds(self) -> str:
        """What opens this keyring, for messages: "a key file or a passphrase"."""
        names = list(dict.fromkeys(KIND_NAMES.get(s.kind, f"kind {s.kind}") for s in self.slots))
        return " or ".join(names)
