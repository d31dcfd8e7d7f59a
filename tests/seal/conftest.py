"""Sealed images of the small fuzzing memory (tests/image/basefiles.py), a key file and a passphrase."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from khibernate.image import vmcoreinfo
from khibernate.image.sources import open_source
from khibernate.image.sources.khi import save_file
from khibernate.seal.keysource import KeyFile, Passphrase
from khibernate.seal.sealing import Sealing
from tests.image import basefiles

PASSPHRASE = b"correct horse battery staple"


def key_file(path: Path, data: bytes | None = None) -> KeyFile:
    """A key file of 32 random bytes (or ``data``), mode 0600."""
    path.write_bytes(data if data is not None else __import__("os").urandom(32))
    path.chmod(0o600)
    return KeyFile(path)


def seal_image(elf: Path, dest: Path, sealing: Sealing | None, block_pages: int = 8) -> Path:
    """``elf`` saved as a restorable .khi at ``dest`` (sealed with ``sealing`` unless None)."""
    with open_source(elf) as src:
        save_file(src, dest, vmci=vmcoreinfo.from_source(src), level=1, restorable=True, block_pages=block_pages,
                  sync=False, seal=sealing)
    return dest


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    yield basefiles.build(tmp_path_factory.mktemp("sealbase"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyFile, Passphrase, Sealing]:
    """A key file, a passphrase and one store key wrapped by both."""
    kf = key_file(tmp_path_factory.mktemp("keys") / "store.key")
    pw = Passphrase(PASSPHRASE)
    return kf, pw, Sealing.new([kf, pw])


@pytest.fixture(scope="module")
def sealed(base: dict[str, Path], keys: tuple[KeyFile, Passphrase, Sealing],
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fuzzing memory as a sealed image for a file (no slot)."""
    return seal_image(base["elf64"], tmp_path_factory.mktemp("sealed") / "sealed.khi", keys[2])
