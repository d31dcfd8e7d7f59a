"""Fixtures: the synthetic kernel and its ELF cores (generated in-process, cached per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image import synthkernel


@pytest.fixture(scope="session")
def synth() -> synthkernel.SynthKernel:
    return synthkernel.build()


@pytest.fixture(scope="session")
def synth_elf(synth: synthkernel.SynthKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("synth") / "vmcore"
    synth.write_elf(p)
    return p
