"""The store's key slots on the device: the keyring (``khibernate/seal/keyring.py``, its format) written at
``KEYRING_OFFSETS`` (8 and 12 KiB, between the superblock copies and the first slot), two identical copies so one
damaged block loses nothing.  Written once, by ``target init`` with a key; read by whoever seals or unseals for the
store.  The I/O edge for the key slots only."""

from __future__ import annotations

import os

from khibernate.seal.errors import KeyringError
from khibernate.seal.keyring import Keyring
from khibernate.store.errors import StoreError
from khibernate.store.superblock import BLOCK, KEYRING_OFFSETS


def write(fd: int, ring: Keyring) -> None:
    """Both copies of ``ring``, each padded to a block, then fsync."""
    data = ring.pack()
    data += bytes(BLOCK - len(data))
    for off in KEYRING_OFFSETS:
        if os.pwrite(fd, data, off) != len(data):
            raise StoreError("short write of the store's key slots; the device may be failing")
    os.fsync(fd)


def read(fd: int, path: str) -> Keyring:
    """The first valid copy; KeyringError naming both failures when neither is."""
    errors = []
    for off in KEYRING_OFFSETS:
        try:
            return Keyring.unpack(os.pread(fd, BLOCK, off), f"{path}: key slots at {off}")
        except KeyringError as e:
            errors.append(str(e))
    raise KeyringError("; ".join(errors) + " (the store's key slots are lost: its sealed images still open with "
                       "their own copy; `target init --force` with the key starts a new store)")
