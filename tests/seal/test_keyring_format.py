"""The key slots' format (khibernate/seal/keyring.py) on its own: round trip of any keyring, any mutation refused
with a KeyringError (never another exception), and the store's two copies (khibernate/store/keyslots.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khibernate.seal import keyring
from khibernate.seal.errors import KeyringError
from khibernate.seal.keyring import Keyring, KeySlot
from khibernate.store import keyslots
from khibernate.store.superblock import KEYRING_OFFSETS
from tests.image.fuzzing import Mutation
from tests.image.test_fuzz import PROFILE, mutations

slots = st.builds(KeySlot, st.sampled_from([keyring.KIND_KEY_FILE, keyring.KIND_PASSPHRASE, keyring.KIND_TPM]),
                  st.integers(0, 3), st.binary(min_size=32, max_size=32), st.binary(min_size=48, max_size=48),
                  st.integers(0, 40), st.integers(0, 64), st.integers(0, 16))
rings = st.builds(Keyring, st.binary(min_size=16, max_size=16),
                  st.lists(slots, min_size=1, max_size=keyring.MAX_SLOTS).map(tuple))


@settings(settings.get_profile(PROFILE))
@given(rings)
def test_any_keyring_round_trips(ring: Keyring) -> None:
    raw = ring.pack()
    assert len(raw) == Keyring.size(len(ring.slots))
    assert Keyring.unpack(raw + os.urandom(7)) == ring  # what follows it (padding, notes) is not its


@settings(settings.get_profile(PROFILE))
@given(rings, mutations(Keyring.size(keyring.MAX_SLOTS)))
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
