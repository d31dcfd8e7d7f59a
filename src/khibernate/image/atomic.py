"""Writing a file so that an interrupted or concurrent write never leaves DEST looking complete or wrong.

The temporary file is created exclusively (``mkstemp``: O_CREAT|O_EXCL, mode 0600, no link followed) in DEST's
directory; DEST must be absent or a regular file (a device, FIFO or directory is refused, never replaced); the
rename is atomic and the directory is fsync'd after it, so a crash leaves either the old DEST or the new one.
SIGTERM while the file is written ends the program like SIGINT does (the temporary file removed, exit status 143):
`systemctl stop` of the watch service, `timeout`, or a shutdown never leave a ``.partial`` file behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import FrameType
from typing import BinaryIO

from khibernate.image.errors import FileAccessError


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``path`` (not following a symlink), None if absent; refuses non-regular files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise FileAccessError(f"{path} is a symbolic link; give the file it points to, or another DEST")
    if not stat.S_ISREG(st.st_mode):
        raise FileAccessError(f"{path} exists and is not a regular file (a device, FIFO or directory); "
                              "khibernate does not replace it - give a file name")
    return st.st_dev, st.st_ino


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SIGTERM_STATUS = 128 + signal.SIGTERM


@contextlib.contextmanager
def sigterm_exits(what: str) -> Iterator[None]:
    """For the body, SIGTERM raises SystemExit(143) in the main thread (as SIGINT raises KeyboardInterrupt), so
    the body's cleanup runs; ``what`` is said on stderr.  Leaves a handler someone else installed alone, and does
    nothing outside the main thread (Python runs signal handlers only there)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        print(f"khibernate: terminated (SIGTERM) while writing {what}; removing the incomplete file",
              file=sys.stderr, flush=True)
        raise SystemExit(SIGTERM_STATUS)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike[str], *, sync: bool = True) -> Iterator[BinaryIO]:
    """Yield a new temporary file beside DEST; on success fsync it (if ``sync``), rename it to DEST and fsync the
    directory; on failure, SIGINT or SIGTERM remove it.  Refuses a DEST that is not a regular file, or that changed
    meanwhile."""
    dest = os.fspath(dest)
    before = _identity(dest)
    d = os.path.dirname(os.path.abspath(dest))
    with sigterm_exits(dest):
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".partial", dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            if _identity(dest) != before:
                raise FileAccessError(f"{dest} was created or replaced by someone else while this write ran "
                                      "(two writers to one DEST?); nothing was renamed - check it and run again")
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    if sync:
        fsync_dir(d)
