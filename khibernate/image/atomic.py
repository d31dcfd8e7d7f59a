"""Writing a file so that an interrupted write never leaves DEST looking complete."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike[str], *, sync: bool = False) -> Iterator[BinaryIO]:
    """Yield ``DEST.partial`` open for writing; on success (fsync if ``sync``) rename it to DEST, else remove it."""
    dest = os.fspath(dest)
    tmp = dest + ".partial"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
