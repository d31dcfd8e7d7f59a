"""`khibernate capture build`: the capture initramfs for this machine, built by khibernate.initramfs, cached by key.

The cache key hashes everything the archive is made of (khibernate's sources and the initramfs/ content by
content, the interpreter and host binaries by path, size and mtime), so a cached file is reused exactly while
nothing it contains has changed.  The build itself is deterministic (sorted entries, zero mtimes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

CACHE = Path(os.environ.get("KHIBERNATE_CACHE", Path.home() / ".cache" / "khibernate")) / "capture"


def _hash_tree(h: hashlib._Hash, root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
        for n in sorted(filenames):
            if not n.endswith(".pyc"):
                p = Path(dirpath) / n
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")


def cache_key() -> str:
    """Hash of what the capture initramfs would contain."""
    import khibernate
    from khibernate.initramfs import build as builder

    h = hashlib.sha256(b"capture-initrd-v1\0")
    _hash_tree(h, Path(khibernate.__file__).resolve().parent)
    _hash_tree(h, builder.CONTENT_DIR.resolve())
    exe = os.path.realpath(sys.executable)
    h.update(f"{exe}\0{sys.version}".encode())
    for p in (exe, *builder.BUSYBOX_CANDIDATES, *builder.KEXEC_CANDIDATES):
        if os.path.exists(p):
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
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
