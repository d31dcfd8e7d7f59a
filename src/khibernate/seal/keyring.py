"""The wrapped store key, byte by byte: a keyring of key slots, each holding the store key wrapped
(ChaCha20-Poly1305) by one key source (a key file, a passphrase, the TPM).  Reader and writer
side by side, every struct declared once by field name; pure (no I/O).  ``docs/sealed.md`` describes every byte.

Where it lives: (1) in the store, a 4 KiB block at offsets 8192 and 12288 (two identical copies written by
``target init``; between the superblock copies and the first slot at 1 MiB), so a capture can seal for the store;
(2) in every sealed image's header (a copy of the store's), so a sealed image, in a slot or exported to a file, is
opened with the same key file or passphrase as its store and needs nothing else.

Wrapping: ``KEK = scrypt(passphrase, salt, N, r, p)`` or ``HKDF-SHA256(key file bytes, salt)``; the salt is 32
fresh random bytes per slot, so every KEK wraps one key once and the slot's zero nonce is never reused under it.
The associated data is the keyring's magic, version, key id and the slot's own fields (and, version 2, its blob),
so a slot moved to another keyring or with changed KDF parameters does not open.

Versions: 1 is header, slots, CRC-32.  2 (written only when a slot has a blob: the TPM's sealed object) is the
same header and slot table, each slot's ``reserved`` word become ``blob_size``, then every slot's blob in slot
order, then the CRC-32 over all of it.  Both are read.
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
VERSION = 1  # no slot carries a blob
VERSION_BLOBS = 2  # a blob area after the slot table (the TPM's sealed object)
VERSIONS = (VERSION, VERSION_BLOBS)
MAX_SLOTS = 8
MAX_BLOB = 1024  # per slot: a TPM sealed object with every PCR's value recorded is < 1 KiB
MAX_BYTES = 4096  # a keyring fits the store's one block (store/keyslots.py)
KIND_KEY_FILE = 1
KIND_PASSPHRASE = 2
KIND_TPM = 3  # the TPM 2.0 (a KEK sealed to a PCR policy, seal/tpm.py)
KIND_NAMES = {KIND_KEY_FILE: "a key file", KIND_PASSPHRASE: "a passphrase", KIND_TPM: "the TPM"}
KDF_HKDF_SHA256 = 1
KDF_SCRYPT = 2
KDF_TPM2_PCR = 3  # the KEK itself, released by the TPM under the PCR policy of the slot's blob

HEAD = Layout("khi_keyring", "<", [("magic", "8s"), ("version", "I"), ("nr_slots", "I"), ("key_id", "16s")])
SLOT = Layout("khi_key_slot", "<", [("kind", "I"), ("kdf", "I"), ("log2_n", "I"), ("r", "I"), ("p", "I"),
                                    ("reserved", "I"), ("salt", "32s"), ("wrapped", f"{KEY_BYTES + TAG_BYTES}s")])
SLOT_V2 = Layout("khi_key_slot_v2", "<", [("kind", "I"), ("kdf", "I"), ("log2_n", "I"), ("r", "I"), ("p", "I"),
                                         ("blob_size", "I"), ("salt", "32s"),
                                         ("wrapped", f"{KEY_BYTES + TAG_BYTES}s")])
CRC = Layout("khi_keyring_crc", "<", [("crc32", "I")])
assert HEAD.size == 32 and SLOT.size == SLOT_V2.size == 104
WRAP_NONCE = bytes(12)  # one wrap per KEK: the KEK's salt is fresh for every slot


@dataclasses.dataclass(frozen=True)
class KeySlot:
    """One wrapped copy of the store key: how its KEK is derived (kind, KDF and parameters, salt, and for the TPM
    the sealed object: ``blob``, keyring version 2 only) and the ciphertext + tag of the store key under it."""

    kind: int
    kdf: int
    salt: bytes
    wrapped: bytes = b""
    log2_n: int = 0
    r: int = 0
    p: int = 0
    blob: bytes = b""

    def fields(self, version: int) -> bytes:
        """The slot's bytes without its ciphertext (version 2: and its blob): the associated data of its wrap."""
        if version == VERSION:
            return SLOT.pack(kind=self.kind, kdf=self.kdf, log2_n=self.log2_n, r=self.r, p=self.p, salt=self.salt)
        return SLOT_V2.pack(kind=self.kind, kdf=self.kdf, log2_n=self.log2_n, r=self.r, p=self.p,
                            blob_size=len(self.blob), salt=self.salt) + self.blob

    def pack(self, version: int) -> bytes:
        """The slot's table entry (its blob goes to the blob area)."""
        layout, extra = (SLOT, {}) if version == VERSION else (SLOT_V2, {"blob_size": len(self.blob)})
        return layout.pack(kind=self.kind, kdf=self.kdf, log2_n=self.log2_n, r=self.r, p=self.p, salt=self.salt,
                           wrapped=self.wrapped, **extra)


def version_for(slots: tuple[KeySlot, ...] | list[KeySlot]) -> int:
    """The keyring version ``slots`` are written in: 2 when a slot has a blob, else 1 (what older readers read)."""
    return VERSION_BLOBS if any(s.blob for s in slots) else VERSION


def _ad(key_id: bytes, slot: KeySlot, version: int) -> bytes:
    return HEAD.pack(magic=MAGIC, version=version, key_id=key_id) + slot.fields(version)


def wrap(kek: bytes, store_key: bytes, key_id: bytes, slot: KeySlot, version: int = VERSION) -> KeySlot:
    """``slot`` with the store key wrapped under ``kek``, for a keyring of ``version``."""
    ad = _ad(key_id, slot, version)
    return dataclasses.replace(slot, wrapped=ChaCha20Poly1305(kek).encrypt(WRAP_NONCE, store_key, ad))


def unwrap(kek: bytes, key_id: bytes, slot: KeySlot, version: int = VERSION) -> bytes | None:
    """The store key if ``kek`` opens ``slot`` (of a keyring of ``version``), else None."""
    try:
        return ChaCha20Poly1305(kek).decrypt(WRAP_NONCE, slot.wrapped, _ad(key_id, slot, version))
    except InvalidTag:
        return None


@dataclasses.dataclass(frozen=True)
class Keyring:
    """The key id of the store key and its wrapped copies, in keyring format ``version``."""

    key_id: bytes
    slots: tuple[KeySlot, ...]
    version: int = VERSION

    def pack(self) -> bytes:
        """Header, slots (version 2: and their blobs), CRC-32 of all (catches a damaged keyring before any key is
        tried)."""
        if not 1 <= len(self.slots) <= MAX_SLOTS:
            raise KeyringError(f"a keyring holds 1..{MAX_SLOTS} key slots, not {len(self.slots)}")
        if self.version not in VERSIONS or (self.version == VERSION and any(s.blob for s in self.slots)):
            raise KeyringError(f"a keyring of version {self.version} cannot hold these slots")
        if any(len(s.blob) > MAX_BLOB for s in self.slots):
            raise KeyringError(f"a key slot's blob is longer than {MAX_BLOB} bytes")
        body = HEAD.pack(magic=MAGIC, version=self.version, nr_slots=len(self.slots), key_id=self.key_id)
        body += b"".join(s.pack(self.version) for s in self.slots) + b"".join(s.blob for s in self.slots)
        if len(body) + CRC.size > MAX_BYTES:
            raise KeyringError(f"the key slots take {len(body) + CRC.size} bytes, more than the store's "
                               f"{MAX_BYTES}; make fewer slots")
        return body + CRC.pack(crc32=zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes | memoryview, what: str = "keyring") -> Keyring:
        """The keyring at the start of ``data``; KeyringError naming ``what`` when it is absent or damaged."""
        raw = bytes(data)
        f = HEAD.unpack(raw, error=KeyringError, what=what)
        if f["magic"] != MAGIC:
            raise KeyringError(f"{what}: no key slots (bad magic)")
        version = f["version"]
        if version not in VERSIONS:
            raise KeyringError(f"{what}: keyring version {version} is unknown (this khibernate reads "
                               f"{', '.join(map(str, VERSIONS))}); use the khibernate that wrote it")
        n = f["nr_slots"]
        if not 1 <= n <= MAX_SLOTS:
            raise KeyringError(f"{what}: {n} key slots (1..{MAX_SLOTS}); it is damaged")
        layout = SLOT if version == VERSION else SLOT_V2
        end = HEAD.size + n * layout.size
        table = [layout.unpack(raw, HEAD.size + i * layout.size, error=KeyringError, what=what) for i in range(n)]
        sizes = [s["blob_size"] if version == VERSION_BLOBS else 0 for s in table]
        if any(size > MAX_BLOB for size in sizes):
            raise KeyringError(f"{what}: a key slot's blob of {max(sizes)} bytes (at most {MAX_BLOB}); it is damaged")
        blobs_at, end = end, end + sum(sizes)
        crc = CRC.unpack(raw, end, error=KeyringError, what=what)["crc32"]
        if zlib.crc32(raw[:end]) != crc:
            raise KeyringError(f"{what}: checksum mismatch; the key slots are damaged")
        if version == VERSION_BLOBS and not any(sizes):
            raise KeyringError(f"{what}: a version-2 keyring without a blob; it is damaged")
        slots = []
        for s, size in zip(table, sizes, strict=True):
            slots.append(KeySlot(kind=s["kind"], kdf=s["kdf"], salt=s["salt"], wrapped=s["wrapped"],
                                 log2_n=s["log2_n"], r=s["r"], p=s["p"], blob=raw[blobs_at:blobs_at + size]))
            blobs_at += size
        return cls(f["key_id"], tuple(slots), version)

    @staticmethod
    def size(nr_slots: int, blob_bytes: int = 0) -> int:
        """Packed bytes of a keyring of ``nr_slots`` slots whose blobs take ``blob_bytes`` in all."""
        return HEAD.size + nr_slots * SLOT.size + blob_bytes + CRC.size

    def packed_size(self) -> int:
        """Packed bytes of this keyring."""
        return self.size(len(self.slots), sum(len(s.blob) for s in self.slots))

    def kinds(self) -> str:
        """What opens this keyring, for messages: "a key file or a passphrase"."""
        names = list(dict.fromkeys(KIND_NAMES.get(s.kind, f"kind {s.kind}") for s in self.slots))
        return " or ".join(names)
