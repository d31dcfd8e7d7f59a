"""The store key wrapped by each key source and read back: round trips, wrong keys, damaged key slots, unsafe key
files (khibernate/seal/keyring.py, keysource.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from khibernate.seal import keyring
from khibernate.seal.cipher import ImageCipher, key_id
from khibernate.seal.errors import KeyringError, KeySourceError, TamperedError, WrongKeyError
from khibernate.seal.keyring import Keyring
from khibernate.seal.keysource import KeyFile, Passphrase, make_keyring, new_store_key, open_keyring
from tests.seal.conftest import PASSPHRASE, key_file


@pytest.mark.parametrize("source", ["key file", "passphrase"])
def test_store_key_round_trips_through_each_source(tmp_path: Path, source: str) -> None:
    src = key_file(tmp_path / "k") if source == "key file" else Passphrase(PASSPHRASE)
    key = new_store_key()
    ring = Keyring.unpack(make_keyring(key, [src]).pack())
    assert ring.key_id == key_id(key) and len(ring.slots) == 1 and ring.slots[0].kind == src.kind
    assert open_keyring(ring, src, "img") == key
    # a second copy of the source (the same file read again, the passphrase typed again) opens it as well
    again = KeyFile(tmp_path / "k") if source == "key file" else Passphrase(PASSPHRASE)
    assert open_keyring(ring, again, "img") == key


def test_both_sources_open_one_keyring(tmp_path: Path) -> None:
    kf, pw = key_file(tmp_path / "k"), Passphrase(PASSPHRASE)
    key = new_store_key()
    ring = make_keyring(key, [kf, pw])
    assert open_keyring(ring, kf, "img") == open_keyring(ring, pw, "img") == key


def test_wrong_key_file_and_passphrase_are_refused(tmp_path: Path) -> None:
    ring = make_keyring(new_store_key(), [key_file(tmp_path / "k"), Passphrase(PASSPHRASE)])
    with pytest.raises(WrongKeyError, match="wrong key.*--key-file FILE or --passphrase-file FILE"):
        open_keyring(ring, key_file(tmp_path / "other"), "img")
    with pytest.raises(WrongKeyError, match="wrong key"):
        open_keyring(ring, Passphrase(PASSPHRASE + b"!"), "img")


def test_a_source_of_another_kind_is_told_what_opens_the_image(tmp_path: Path) -> None:
    ring = make_keyring(new_store_key(), [Passphrase(PASSPHRASE)])
    with pytest.raises(WrongKeyError, match="sealed to a passphrase, not to a key file; give --passphrase-file"):
        open_keyring(ring, key_file(tmp_path / "k"), "img")


def test_a_changed_key_slot_does_not_open(tmp_path: Path) -> None:
    """A slot whose salt or KDF parameters changed (CRC recomputed, as an attacker would) opens with no key."""
    kf = key_file(tmp_path / "k")
    ring = make_keyring(new_store_key(), [kf])
    s = ring.slots[0]
    for changed in (keyring.KeySlot(s.kind, s.kdf, bytes(32), s.wrapped),
                    keyring.KeySlot(s.kind, s.kdf, s.salt, s.wrapped[:-1] + bytes([s.wrapped[-1] ^ 1]))):
        forged = Keyring.unpack(Keyring(ring.key_id, (changed,)).pack())
        with pytest.raises(WrongKeyError):
            open_keyring(forged, kf, "img")


def test_damaged_keyring_is_refused_by_its_checksum(tmp_path: Path) -> None:
    raw = bytearray(make_keyring(new_store_key(), [key_file(tmp_path / "k")]).pack())
    raw[40] ^= 1
    with pytest.raises(KeyringError, match="checksum mismatch"):
        Keyring.unpack(bytes(raw))
    with pytest.raises(KeyringError, match="bad magic"):
        Keyring.unpack(bytes(64))
    with pytest.raises(KeyringError, match="cut short"):
        Keyring.unpack(raw[:20])


def test_key_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(bytes(32))
    p.chmod(0o644)
    with pytest.raises(KeySourceError, match="readable by others.*chmod 600"):
        KeyFile(p)
    p.chmod(0o600)
    p.write_bytes(bytes(16))
    with pytest.raises(KeySourceError, match="16 bytes.*head -c 32 /dev/urandom"):
        KeyFile(p)
    with pytest.raises(KeySourceError, match="cannot open"):
        KeyFile(tmp_path / "missing")


def test_passphrase_file_first_line(tmp_path: Path) -> None:
    p = tmp_path / "pw"
    p.write_bytes(PASSPHRASE + b"\nignored\n")
    ring = make_keyring(key := new_store_key(), [Passphrase(PASSPHRASE)])
    assert open_keyring(ring, Passphrase.from_file(p), "img") == key
    p.write_bytes(b"\n")
    with pytest.raises(KeySourceError, match="empty"):
        Passphrase.from_file(p)


def test_blocks_are_bound_to_number_image_and_associated_data() -> None:
    """The AEAD alone: a block opens only as the block number, image and associated data it was sealed with."""
    key, a, b = new_store_key(), bytes(range(16)), bytes(range(1, 17))
    sealed = ImageCipher(key, a).seal_block(3, b"frame", b"ad")
    assert ImageCipher(key, a).open_block(3, sealed, b"ad", "b") == b"frame"
    for cipher, n, ad in ((ImageCipher(key, a), 4, b"ad"), (ImageCipher(key, b), 3, b"ad"),
                          (ImageCipher(key, a), 3, b"aD"), (ImageCipher(new_store_key(), a), 3, b"ad")):
        with pytest.raises(TamperedError, match="fails authentication"):
            cipher.open_block(n, sealed, ad, "b")


def test_a_passphrase_slot_asking_for_too_much_memory_is_refused() -> None:
    """A hostile slot cannot make scrypt allocate more than 128 MiB (the capture kernel's memory is small)."""
    pw = Passphrase(PASSPHRASE)
    slot = pw.new_slot()
    for log2_n, r, p in ((17, 16, 1), (21, 8, 1), (16, 8, 5)):
        with pytest.raises(WrongKeyError, match="beyond what khibernate writes"):
            pw.kek(keyring.KeySlot(slot.kind, slot.kdf, slot.salt, slot.wrapped, log2_n, r, p))
