"""The key slots' format (khibernate/seal/keyring.py) on its own: round trip of any keyring of version 1 (no blobs)
and 2 (a blob area: the TPM's sealed object), any mutation refused with a KeyringError (never another exception),
a version-1 keyring as the first writer wrote it still read, the TPM slot's blob (khibernate/seal/tpmblob.py) the
same way, and the store's two copies (khibernate/store/keyslots.py)."""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khibernate.seal import keyring
from khibernate.seal.errors import KeyringError
from khibernate.seal.keyring import Keyring, KeySlot
from khibernate.seal.tpmblob import TpmSealed, parse_pcrs
from khibernate.store import keyslots
from khibernate.store.superblock import KEYRING_OFFSETS
from tests.image.fuzzing import Mutation
from tests.image.test_fuzz import PROFILE, mutations

slots = st.builds(KeySlot, st.sampled_from([keyring.KIND_KEY_FILE, keyring.KIND_PASSPHRASE, keyring.KIND_TPM]),
                  st.integers(0, 3), st.binary(min_size=32, max_size=32), st.binary(min_size=48, max_size=48),
                  st.integers(0, 40), st.integers(0, 64), st.integers(0, 16))
rings_v1 = st.builds(Keyring, st.binary(min_size=16, max_size=16),
                     st.lists(slots, min_size=1, max_size=keyring.MAX_SLOTS).map(tuple))
blob_slots = st.builds(lambda s, b: dataclasses.replace(s, blob=b), slots, st.binary(max_size=400))
rings_v2 = st.builds(lambda kid, ss: Keyring(kid, ss, keyring.VERSION_BLOBS), st.binary(min_size=16, max_size=16),
                     st.lists(blob_slots, min_size=1, max_size=keyring.MAX_SLOTS).map(tuple)
                     .filter(lambda ss: any(s.blob for s in ss) and sum(len(s.blob) for s in ss) < 2800))
rings = st.one_of(rings_v1, rings_v2)
tpm_blobs = st.integers(1, (1 << 24) - 1).flatmap(lambda mask: st.builds(
    TpmSealed, st.just(tuple(p for p in range(24) if mask >> p & 1)),
    st.just(tuple(bytes([p]) * 32 for p in range(24) if mask >> p & 1)), st.binary(min_size=1, max_size=120),
    st.binary(min_size=1, max_size=200)))


@settings(settings.get_profile(PROFILE))
@given(rings)
def test_any_keyring_round_trips(ring: Keyring) -> None:
    raw = ring.pack()
    assert len(raw) == ring.packed_size() <= keyring.MAX_BYTES
    assert raw[8:12] == struct.pack("<I", ring.version)
    assert Keyring.unpack(raw + os.urandom(7)) == ring  # what follows it (padding, notes) is not its


@settings(settings.get_profile(PROFILE))
@given(rings, mutations(Keyring.size(keyring.MAX_SLOTS, 2800)))
def test_a_mutated_keyring_is_refused_or_unchanged(ring: Keyring, muts: list[Mutation]) -> None:
    raw = ring.pack()
    data = raw
    for m in muts:
        data = m.apply(data)
    try:
        got = Keyring.unpack(data)
    except KeyringError as e:
        assert str(e)
        return
    assert data[:len(raw)] == raw and got == ring  # only a change past the keyring leaves it readable


def test_a_version_1_keyring_as_first_written_is_read_and_written_the_same() -> None:
    """Bytes laid out by hand as keyring version 1 was specified (header, 104-byte slots with a zero reserved word,
    CRC-32): read, and a keyring without blobs is still written as exactly these bytes (older readers read it)."""
    kid, salt, wrapped = bytes(range(16)), bytes(range(32)), bytes(range(100, 148))
    body = b"KHIKEYS\0" + struct.pack("<II16s", 1, 2, kid)
    body += struct.pack("<6I32s48s", keyring.KIND_KEY_FILE, keyring.KDF_HKDF_SHA256, 0, 0, 0, 0, salt, wrapped)
    body += struct.pack("<6I32s48s", keyring.KIND_PASSPHRASE, keyring.KDF_SCRYPT, 16, 8, 1, 0, salt, wrapped)
    raw = body + struct.pack("<I", zlib.crc32(body))
    ring = Keyring.unpack(raw)
    assert ring.version == 1 and ring.slots[1] == KeySlot(keyring.KIND_PASSPHRASE, keyring.KDF_SCRYPT, salt, wrapped,
                                                          16, 8, 1)
    assert ring.pack() == raw
    with pytest.raises(KeyringError, match="version 1 cannot hold"):
        Keyring(kid, (dataclasses.replace(ring.slots[0], blob=b"x"),)).pack()


def test_a_slot_wrapped_in_one_version_does_not_open_in_the_other() -> None:
    """The keyring's version is part of each slot's associated data."""
    kek, store_key, kid = bytes(32), bytes(range(32)), bytes(16)
    slot = keyring.wrap(kek, store_key, kid, KeySlot(keyring.KIND_KEY_FILE, keyring.KDF_HKDF_SHA256, bytes(32)))
    assert keyring.unwrap(kek, kid, slot) == store_key
    assert keyring.unwrap(kek, kid, slot, keyring.VERSION_BLOBS) is None
    tpm = keyring.wrap(kek, store_key, kid, dataclasses.replace(slot, blob=b"sealed"), keyring.VERSION_BLOBS)
    assert keyring.unwrap(kek, kid, tpm, keyring.VERSION_BLOBS) == store_key
    assert keyring.unwrap(kek, kid, dataclasses.replace(tpm, blob=b"Sealed"), keyring.VERSION_BLOBS) is None


def test_a_keyring_larger_than_the_store_block_is_refused() -> None:
    s = KeySlot(keyring.KIND_TPM, keyring.KDF_TPM2_PCR, bytes(32), bytes(48), blob=bytes(keyring.MAX_BLOB))
    with pytest.raises(KeyringError, match="more than the store's 4096"):
        Keyring(bytes(16), (s,) * 4, keyring.VERSION_BLOBS).pack()


@settings(settings.get_profile(PROFILE))
@given(tpm_blobs)
def test_any_tpm_blob_round_trips(sealed: TpmSealed) -> None:
    assert TpmSealed.unpack(sealed.pack()) == sealed


@settings(settings.get_profile(PROFILE))
@given(tpm_blobs, mutations(1200))
def test_a_mutated_tpm_blob_is_refused_or_unchanged_in_meaning(sealed: TpmSealed, muts: list[Mutation]) -> None:
    data = sealed.pack()
    for m in muts:
        data = m.apply(data)
    try:
        got = TpmSealed.unpack(data)
    except KeyringError as e:
        assert str(e)
        return
    assert got.pack() == data  # it reads as what it says (the TPM then refuses a changed area: fixedtpm, integrity)


def test_pcr_lists() -> None:
    assert parse_pcrs("7,0, 7") == (0, 7)
    for bad in ("", "a", "24", "-1", "0;7"):
        with pytest.raises(ValueError, match="like 0,7"):
            parse_pcrs(bad)


def test_too_many_or_no_slots_are_refused() -> None:
    s = KeySlot(keyring.KIND_KEY_FILE, keyring.KDF_HKDF_SHA256, bytes(32), bytes(48))
    for n in (0, keyring.MAX_SLOTS + 1):
        with pytest.raises(KeyringError, match="key slots"):
            Keyring(bytes(16), (s,) * n).pack()


def test_the_store_keeps_two_copies_and_reads_the_good_one(tmp_path: Path) -> None:
    dev = tmp_path / "disk"
    dev.write_bytes(bytes(1 << 20))
    ring = Keyring(bytes(range(16)), (KeySlot(keyring.KIND_KEY_FILE, keyring.KDF_HKDF_SHA256, bytes(32), bytes(48)),))
    fd = os.open(dev, os.O_RDWR)
    try:
        keyslots.write(fd, ring)
        os.pwrite(fd, b"\xff" * 64, KEYRING_OFFSETS[0])  # the first copy damaged
        assert keyslots.read(fd, str(dev)) == ring
        os.pwrite(fd, b"\xff" * 64, KEYRING_OFFSETS[1])  # both
        with pytest.raises(KeyringError, match="key slots are lost"):
            keyslots.read(fd, str(dev))
    finally:
        os.close(fd)
