"""Where the store key comes from: a key source wraps the store key into a key slot and unwraps it again.

Sources: :class:`KeyFile` (a file of at least 32 random bytes, mode 0600 or stricter), :class:`Passphrase`
(scrypt, memory-hard) and the TPM 2.0 (``khibernate.seal.tpm.TpmKey``: a random KEK sealed to a PCR policy, its
sealed object in the slot's blob).  Whatever a source yields is only a candidate KEK: the store key it unwraps is
accepted only when the slot's AEAD tag and the keyring's key id say it is the store's.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Sequence
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from khibernate.seal import keyring
from khibernate.seal.cipher import KEY_BYTES, key_id
from khibernate.seal.errors import KeySourceError, SealError, WrongKeyError
from khibernate.seal.keyring import KeySlot

MIN_KEY_FILE = 32
MAX_KEY_FILE = 1 << 16
MAX_PASSPHRASE = 4096
# scrypt N = 2^16, r = 8: 64 MiB and ~0.5 s here, so it also runs in the capture kernel's small memory
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 16, 8, 1
MAX_SCRYPT_MEMORY = 128 << 20  # refuse a slot asking scrypt for more (a damaged or hostile slot): 2x what we write


class KeySource(Protocol):
    """A way to obtain the key-encryption key of a key slot of its own kind."""

    kind: int
    description: str  # for messages: "key file /etc/khibernate/store.key"

    def new_slot(self) -> KeySlot:
        """A fresh slot of this source (new random salt, this source's KDF parameters), not yet wrapped."""
        ...

    def kek(self, slot: KeySlot) -> bytes:
        """The key-encryption key this source derives for ``slot`` (a slot of its kind)."""
        ...


class KeyFile:
    """A key file: at least 32 bytes (`head -c 32 /dev/urandom`), not readable by group or others."""

    kind = keyring.KIND_KEY_FILE

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.description = f"key file {self.path}"
        self._secret = read_secret(self.path, "key file", MIN_KEY_FILE, MAX_KEY_FILE, private=True)

    def new_slot(self) -> KeySlot:
        return KeySlot(kind=self.kind, kdf=keyring.KDF_HKDF_SHA256, salt=secrets.token_bytes(32))

    def kek(self, slot: KeySlot) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=slot.salt,
                    info=b"khibernate key file").derive(self._secret)


class Passphrase:
    """A passphrase (from a file's first line, or typed): the KEK is scrypt's (memory-hard) of it."""

    kind = keyring.KIND_PASSPHRASE

    def __init__(self, secret: bytes, description: str = "passphrase"):
        if not secret or len(secret) > MAX_PASSPHRASE:
            raise KeySourceError(f"the {description} is empty or longer than {MAX_PASSPHRASE} bytes")
        self._secret = secret
        self.description = description

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Passphrase:
        """The passphrase in the first line of ``path`` (the newline is not part of it)."""
        raw = read_secret(os.fspath(path), "passphrase file", 1, MAX_PASSPHRASE + 1, private=False)
        return cls(raw.split(b"\n", 1)[0], f"passphrase from {os.fspath(path)}")

    def new_slot(self) -> KeySlot:
        return KeySlot(kind=self.kind, kdf=keyring.KDF_SCRYPT, salt=secrets.token_bytes(32), log2_n=SCRYPT_LOG2_N,
                       r=SCRYPT_R, p=SCRYPT_P)

    def kek(self, slot: KeySlot) -> bytes:
        if not (1 <= slot.log2_n <= 30 and 1 <= slot.r <= 32 and 1 <= slot.p <= 4
                and 128 * slot.r << slot.log2_n <= MAX_SCRYPT_MEMORY):
            raise WrongKeyError(f"a passphrase slot asks for scrypt N=2^{slot.log2_n}, r={slot.r}, p={slot.p}, "
                                "beyond what khibernate writes; the key slot is damaged")
        return Scrypt(salt=slot.salt, length=KEY_BYTES, n=1 << slot.log2_n, r=slot.r, p=slot.p).derive(self._secret)


def read_secret(path: str, what: str, least: int, most: int, *, private: bool) -> bytes:
    """The bytes of a key or passphrase file; KeySourceError when it is missing, not a regular file, too short or
    long, or (``private``) readable by group or others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise KeySourceError(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeySourceError(f"{what} {path} is not a regular file")
        if private and st.st_mode & 0o077:
            raise KeySourceError(f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                                 f"`chmod 600 {path}`, and treat the key as known to them")
        data = os.read(fd, most + 1)
        # out of the page cache again, so a snapshot taken now does not save the secret (pages of a file on a disk
        # are dropped and free; a tmpfs or ramfs file is memory and stays - keep key files on a disk)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if not least <= len(data) <= most:
        raise KeySourceError(f"{what} {path} holds {len(data)} bytes; it must hold {least}..{most} "
                             "(make a key file with `head -c 32 /dev/urandom > FILE; chmod 600 FILE`)")
    return data


def new_store_key() -> bytes:
    """32 random bytes from the kernel's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def make_keyring(store_key: bytes, sources: Sequence[KeySource]) -> keyring.Keyring:
    """A keyring wrapping ``store_key`` once per source."""
    kid = key_id(store_key)
    fresh = [(src, src.new_slot()) for src in sources]
    version = keyring.version_for([slot for _, slot in fresh])
    slots = tuple(keyring.wrap(src.kek(slot), store_key, kid, slot, version) for src, slot in fresh)
    return keyring.Keyring(kid, slots, version)


def open_keyring(ring: keyring.Keyring, source: KeySource, what: str) -> bytes:
    """The store key from the first slot of ``source``'s kind that it opens; WrongKeyError naming what would."""
    tried = False
    refused: SealError | None = None  # why a slot's KEK could not be had (a TPM that does not release it)
    for slot in ring.slots:
        if slot.kind != source.kind:
            continue
        tried = True
        try:
            kek = source.kek(slot)
        except SealError as e:  # another slot of the kind may still open (a TPM slot of other PCRs)
            refused = refused or e
            continue
        key = keyring.unwrap(kek, ring.key_id, slot, ring.version)
        if key is not None and key_id(key) == ring.key_id:
            return key
    if refused is not None:
        raise refused
    if not tried:
        raise WrongKeyError(f"{what} is sealed to {ring.kinds()}, not to {keyring.KIND_NAMES[source.kind]}; give "
                            f"{_options(ring)}")
    raise WrongKeyError(f"the {source.description} does not open {what} (sealed to {ring.kinds()}): wrong key (or "
                        f"its key slot was changed); give the one the store was made with ({_options(ring)})")


def _options(ring: keyring.Keyring) -> str:
    """The command-line options that can open ``ring``."""
    opts = {keyring.KIND_KEY_FILE: "--key-file FILE", keyring.KIND_PASSPHRASE: "--passphrase-file FILE",
            keyring.KIND_TPM: "--tpm"}
    return " or ".join(dict.fromkeys(opts.get(s.kind, f"a kind-{s.kind} key") for s in ring.slots))
