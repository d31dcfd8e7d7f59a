"""`khibernate capture build`: the capture initramfs for this machine, built by khibernate.initramfs, cached by key.

The cache key hashes everything the archive is made of (khibernate's sources and the initramfs/ content by
content, the interpreter and host binaries by path, size and mtime), so a cached file is reused exactly while
nothing it contains has changed.  The build itself is deterministic (sorted entries, zero mtimes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("KHIBERNATE_CACHE", Path.home() / ".cache" / "khibernate")) / "capture"


def cache_key() -> str:
    """Hash of what the capture initramfs would contain."""
    from khibernate.initramfs import build as builder

    h = hashlib.sha256(b"capture-initrd-v1\0")
    builder.hash_inputs(h)
    return h.hexdigest()[:16]


def ensure(output: Path | None = None, log: object = None) -> tuple[Path, bool]:
    """(path, reused): the cached capture initramfs, built first if absent; copied to ``output`` if given."""
    from khibernate.initramfs import build as builder

    path = CACHE / f"capture-{cache_key()}.cpio.zst"
    reused = path.is_file()
    if not reused:
        CACHE.mkdir(parents=True, exist_ok=True)
        builder.build(path, compression="zstd")
    if output is not None:
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(output)
        return output, reused
    return path, reused
