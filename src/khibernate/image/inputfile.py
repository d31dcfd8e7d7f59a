"""Opening inputs safely: regular files and memory devices only, sizes known, every read bounded by the file size."""

from __future__ import annotations

import os
import stat

from khibernate.image.errors import CorruptImageError, FileAccessError, NotAVmcoreError, TruncatedError


def open_input(path: str | os.PathLike[str]) -> int:
    """A read-only fd of ``path``; refuses FIFOs, sockets and directories before anything blocks on them."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotAVmcoreError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise NotAVmcoreError(f"{p} is a directory; give a vmcore file") from None
    except OSError as e:
        raise FileAccessError(f"{p}: {e.strerror}" + (" (run as root?)" if e.errno == 13 else "")) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise NotAVmcoreError(f"{p} is a directory; give a vmcore file")
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise NotAVmcoreError(f"{p} is a FIFO or socket, not a file; save the stream to a file first "
                                  "(makedumpfile -R for a flattened stream)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def input_size(fd: int) -> int:
    """Size of a regular file or block device; 0 for a character device (/dev/mem) whose size is unknown."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return 0


def check_span(what: str, offset: int, size: int, file_size: int) -> None:
    """CorruptImageError/TruncatedError unless [offset, offset+size) lies inside a file of ``file_size`` bytes."""
    if offset < 0 or size < 0:
        raise CorruptImageError(f"{what}: negative offset or size ({offset}, {size}); the file is corrupt")
    if file_size and offset + size > file_size:
        raise TruncatedError(f"{what}: needs file bytes {offset}..{offset + size}, the file has {file_size}; "
                             "it is truncated or corrupt")


def pread_exact(fd: int, offset: int, size: int, file_size: int, what: str) -> bytes:
    """Exactly ``size`` bytes at ``offset``, checked against the file size before anything is allocated."""
    check_span(what, offset, size, file_size)
    if not file_size and size > 1 << 30:
        raise CorruptImageError(f"{what}: {size} bytes is more than any header holds; the file is corrupt")
    data = os.pread(fd, size, offset) if size else b""
    if len(data) != size:
        raise TruncatedError(f"{what}: file ends at {offset + len(data)}, before {offset + size}; it is truncated")
    return data
