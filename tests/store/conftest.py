"""Store tests: the capture lock lives in the test's tmp_path, never in the machine's /run/khibernate."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from khibernate.jump import api as jump

    monkeypatch.setattr(jump, "RUN_DIR", tmp_path / "run")
    return tmp_path / "run"
