"""Raw disk image files for test guests, kept sparse: the host's disk is shared, and a 640 MiB store that holds a
100 MiB image should cost 100 MiB, in the guest's file and in every copy a test makes of it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def blank(path: Path, size_mb: int) -> Path:
    """Create (or replace) ``path`` as a sparse file of ``size_mb`` MiB of zeros; returns ``path``."""
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    return path


def copy_sparse(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` byte for byte, leaving runs of zeros as holes (shutil.copyfile writes every zero,
    which turned each copy of a mostly empty store into a full-size file); returns ``dst``."""
    subprocess.run(["cp", "--sparse=always", "--", str(src), str(dst)], check=True)
    return dst
