"""scripts/test.sh's KHIBERNATE_SKIP_SETUP switch, run on a copy of the script beside stand-ins for setup.sh and the
venv's tools (each records that it ran), so nothing is installed or tested for real."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# each stand-in records its call; FAIL_ON makes the call whose "name args" contain it exit 3
RECORDER = ('#!/bin/sh\necho "$(basename "$0") $*" >> "$(dirname "$0")/{up}ran.log"\n'
            'case "$(basename "$0") $*" in *"${{FAIL_ON:-@nothing@}}"*) exit 3;; esac\n')


def _checkout(tmp_path: Path, venv: bool = True) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts/test.sh", root / "scripts/test.sh")
    tools = [(root / "scripts/setup.sh", "../")]
    if venv:
        (root / ".venv/bin").mkdir(parents=True)
        tools += [(root / ".venv/bin" / name, "../../") for name in ("python", "ruff", "mypy")]
    for path, up in tools:
        path.write_text(RECORDER.format(up=up))
        path.chmod(0o755)
    return root


def _run(root: Path, *args: str, skip: str | None, fail_on: str | None = None) -> tuple[int, list[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KHIBERNATE_SKIP_SETUP", "FAIL_ON")}
    if fail_on is not None:
        env["FAIL_ON"] = fail_on
    if skip is not None:
        env["KHIBERNATE_SKIP_SETUP"] = skip
    r = subprocess.run(["bash", str(root / "scripts/test.sh"), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    log = root / "ran.log"
    ran = log.read_text().splitlines() if log.is_file() else []
    return r.returncode, ran, r.stdout + r.stderr


def test_setup_runs_by_default(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    for args, first in (((), "setup.sh --xen"), (("--plain",), "setup.sh "), (("-k", "doctor"), "setup.sh "),
                        (("--distro",), "setup.sh "), (("--xen",), "setup.sh --xen")):
        (root / "ran.log").unlink(missing_ok=True)
        rc, ran, out = _run(root, *args, skip=None)
        assert rc == 0, out
        assert ran[0].strip() == first.strip(), ran


def test_skip_setup_leaves_setup_out_and_runs_the_tests(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    for args in ((), ("--plain",), ("--distro",), ("--xen",)):
        (root / "ran.log").unlink(missing_ok=True)
        rc, ran, out = _run(root, *args, skip="1")
        assert rc == 0, out
        assert not [line for line in ran if line.startswith("setup.sh")], ran
        assert any(line.startswith("python -m pytest") for line in ran), ran
        assert "scripts/setup.sh" in out and "skipped (KHIBERNATE_SKIP_SETUP=1)" in out


def test_skip_setup_without_a_venv_fails_and_says_what_to_run(tmp_path: Path) -> None:
    root = _checkout(tmp_path, venv=False)
    rc, ran, out = _run(root, "--distro", skip="1")
    assert rc == 2
    assert ran == []
    assert "run scripts/setup.sh" in out and "first" in out


def test_the_full_run_runs_every_part_in_order_and_keeps_the_first_failure(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    rc, ran, out = _run(root, skip=None, fail_on="test_distro.py --durations=0")
    assert rc == 3, out
    steps = [line.split()[0] + " " + " ".join(line.split()[1:3]) for line in ran]
    assert steps == ["setup.sh --xen", "ruff check .", "mypy ", "python -m pytest", "python -m vmtest.package",
                     "python -m vmtest.rootfs", "python -m pytest", "python -m pytest"], ran
    assert "test_distro.py" in ran[6] and "test_xen_host.py" in ran[7]  # the Xen part ran after the failure
    assert "--ignore=tests/vm/test_distro.py" in ran[3]
    assert "plain rc=0, Debian 12 machine rc=3, Xen host rc=0" in out


def test_a_failing_setup_stops_before_any_test(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    for args in ((), ("--plain",), ("--distro",), ("--xen",)):
        (root / "ran.log").unlink(missing_ok=True)
        rc, ran, out = _run(root, *args, skip=None, fail_on="setup.sh")
        assert rc == 3 and len(ran) == 1 and ran[0].startswith("setup.sh"), (args, rc, ran)
        assert "total wall time" in out
