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
