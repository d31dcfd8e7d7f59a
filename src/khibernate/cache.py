"""Where khibernate keeps what it builds once (test kernels, initramfs, pyc batches, workload dumps)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$KHIBERNATE_CACHE``, default ``~/.cache/khibernate``; everything below it can be deleted and is rebuilt."""
    return Path(os.environ.get("KHIBERNATE_CACHE", Path.home() / ".cache" / "khibernate"))
