"""vmtest.diskfile: guest disks stay sparse, and a sparse copy is byte-identical."""

from __future__ import annotations

import os
from pathlib import Path

from vmtest.diskfile import blank, copy_sparse

MiB = 1 << 20


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def test_copy_sparse_is_identical_and_leaves_zeros_as_holes(tmp_path: Path) -> None:
    src = blank(tmp_path / "store.img", 64)
    with open(src, "r+b") as f:  # a written superblock, a dense run of zeros, an image at the end
        f.write(b"KHB" * 1000)
        f.seek(8 * MiB)
        f.write(bytes(4 * MiB))
        f.seek(60 * MiB)
        f.write(os.urandom(MiB))
    dst = copy_sparse(src, tmp_path / "copy.img")
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 64 * MiB
    # the written data (~1 MiB) is allocated; the 4 MiB of written zeros and the never-written rest are not
    assert _allocated(dst) < 3 * MiB, _allocated(dst)


def test_blank_allocates_nothing(tmp_path: Path) -> None:
    p = blank(tmp_path / "disk.img", 640)
    assert p.stat().st_size == 640 * MiB
    assert _allocated(p) < MiB
