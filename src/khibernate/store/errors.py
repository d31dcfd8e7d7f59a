"""Failures of the target store, one class per kind, each saying what to do."""

from __future__ import annotations

from khibernate.errors import KhibernateError


class StoreError(KhibernateError):
    """Base of every store failure."""


class NotAStoreError(StoreError):
    """The device holds no valid khibernate superblock."""


class StoreCorruptError(StoreError):
    """Both superblock copies are damaged, or a slot's bytes disagree with its record."""


class SlotError(StoreError):
    """The slot asked for does not exist or is not in the state the operation needs."""


class NoSpaceError(StoreError):
    """No slot can take a new image, or the image would not fit."""


class SlotFullError(NoSpaceError):
    """A write ran past the end of its slot."""


class DeviceInUseError(StoreError):
    """The target is mounted, swap, held by LVM/md/dm-crypt, has a partition in use, or is a file open for writing
    elsewhere: a store never goes there, --force or not."""


class FileTargetError(StoreError):
    """The file cannot be a store target (or its extent map changed): the message says why and what to use instead."""


class ForeignDataError(StoreError):
    """The target holds a filesystem, swap, LVM/RAID/LUKS or partition-table signature; --force erases it."""


class ProbeError(StoreError):
    """What the target holds cannot be checked (blkid missing or failing)."""


class StoreBusyError(StoreError):
    """Another process kept the store's writer lock for longer than the wait allowed."""
