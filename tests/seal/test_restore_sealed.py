"""Restore of a sealed image into a file standing in for /dev/mem (as tests/restore/test_restore.py): nothing is
written when the check pass finds a change, and a block changed between the check pass and the write pass never
reaches memory (each block is authenticated again as it is written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from khibernate.image.sources.khi import KhiSource
from khibernate.ranges import Range
from khibernate.restore.krestore import write_image
from khibernate.restore.oldmem import OldMemory
from khibernate.restore.run import prepare_file
from khibernate.seal.errors import TamperedError, UnsealedRefusedError
from khibernate.seal.keysource import KeyFile, Passphrase
from khibernate.seal.sealing import Sealing
from tests.image import basefiles
from tests.seal import forge

GARBAGE = 0xA5
Keys = tuple[KeyFile, Passphrase, Sealing]


def _memory(tmp_path: Path) -> Path:
    mem = tmp_path / "mem"
    mem.write_bytes(bytes([GARBAGE]) * basefiles.RANGES[-1][1])
    return mem


def test_a_changed_image_is_refused_before_the_first_write(sealed: Path, keys: Keys, tmp_path: Path) -> None:
    """restore's check pass (prepare_file) refuses a sealed image with a changed block; memory is never opened."""
    data = sealed.read_bytes()
    e = forge.entries(data)[2]
    bad = tmp_path / "bad.khi"
    bad.write_bytes(forge.rechecksum(forge.flip(data, e.offset + 10)))
    with pytest.raises(TamperedError):
        prepare_file(str(bad), vmcore=str(tmp_path / "no-vmcore"), key=keys[0])


def test_unsealed_file_needs_allow_unsealed(base: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsealedRefusedError, match="unsealed"):
        prepare_file(str(base["khi"]), vmcore=str(tmp_path / "no-vmcore"))


def test_a_block_changed_between_the_passes_never_reaches_memory(sealed: Path, keys: Keys, tmp_path: Path) -> None:
    img = tmp_path / "img.khi"
    img.write_bytes(sealed.read_bytes())
    mem = _memory(tmp_path)
    ram = [Range(a, b) for a, b in basefiles.RANGES]
    with KhiSource(img, key=keys[0]) as src:
        src.verify(decompress=False)  # the check pass: every tag good
        victim = src.index[3]
        with open(img, "r+b") as f:  # then the device changes under the restore
            f.seek(victim.offset + 7)
            b = f.read(1)
            f.seek(victim.offset + 7)
            f.write(bytes([b[0] ^ 1]))
        with OldMemory(ram, path=str(mem)) as om, pytest.raises(TamperedError):
            write_image(src, om, ram=ram)
        pfns = src.block_pfns(victim)
        earlier = src.block_pfns(src.index[0])
    out = mem.read_bytes()
    for pfn in pfns:  # the changed block's pages keep the old bytes
        assert out[pfn * 4096:(pfn + 1) * 4096] == bytes([GARBAGE]) * 4096, hex(pfn)
    want = basefiles.memory()
    for pfn in earlier:  # the blocks before it were authentic and written
        assert out[pfn * 4096:(pfn + 1) * 4096] == bytes(want[pfn * 4096:(pfn + 1) * 4096]), hex(pfn)


def test_allow_unsealed_lets_an_unsealed_file_through_the_policy(base: dict[str, Path], tmp_path: Path) -> None:
    from khibernate.image.errors import NotAVmcoreError

    with pytest.raises(NotAVmcoreError, match="no-vmcore: no such file"):  # past the image checks
        prepare_file(str(base["khi"]), vmcore=str(tmp_path / "no-vmcore"), allow_unsealed=True)
