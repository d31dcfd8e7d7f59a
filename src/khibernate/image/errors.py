"""Failures of the image side: one class per kind, each message says what to do."""

from __future__ import annotations

from khibernate.elfcore import ElfErrors
from khibernate.errors import KhibernateError


class ImageError(KhibernateError):
    """Base of every failure while reading, filtering, saving or exporting memory images."""


class NotAVmcoreError(ImageError):
    """The input is not in any format we read (wrong magic, not a core file)."""


class TruncatedError(ImageError):
    """The input ends before the data its headers describe."""


class UnsupportedError(ImageError):
    """The input is valid but uses a version, architecture or feature we do not handle."""


class CorruptImageError(ImageError):
    """A checksum or an internal consistency check failed."""


class IncompleteImageError(ImageError):
    """The image has no trailer: its save was interrupted."""


class MissingVmcoreinfoError(ImageError):
    """VMCOREINFO (or an entry in it) is needed but absent."""


class AddressError(ImageError):
    """A physical or virtual address is not backed by the image."""


class CompressionError(ImageError):
    """A page or block could not be compressed or decompressed."""


class UsageErrorImage(ImageError):
    """Options that contradict each other or the input (bad dump level, --restorable with -d 31)."""

    exit_code = 2


class FileAccessError(ImageError):
    """A file or device could not be opened, read or written (permissions, missing, disk full)."""


class MappingRefusedError(FileAccessError):
    """The kernel refused to map a /dev/mem window; ``errno`` says how (EPERM: STRICT_DEVMEM, EINVAL: memory type)."""

    def __init__(self, message: str, err: int):
        super().__init__(message)
        self.errno = err


# how the ELF-core codecs (khibernate/elfcore.py, shared with jump/) report bad input on the image side
ELF_ERRORS = ElfErrors(not_core=NotAVmcoreError, unsupported=UnsupportedError, truncated=TruncatedError,
                       corrupt=CorruptImageError)
