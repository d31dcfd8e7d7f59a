"""Run ``khibernate view mount`` as a child process and wait for its mount (test helper)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

MOUNT = [sys.executable, "-m", "khibernate.cli", "view", "mount"]


def wait_mounted(proc: subprocess.Popen[str], directory: Path, timeout: float = 120) -> None:
    """Return once ``directory`` is a mount point; AssertionError with the child's output if it exits first."""
    deadline = time.monotonic() + timeout
    while not os.path.ismount(directory):
        if proc.poll() is not None:
            raise AssertionError(f"view mount exited {proc.returncode}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{directory} not mounted after {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def mounted(directory: Path, source: Path, sig: int = signal.SIGTERM,
            options: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[str]]:
    """``view mount [options] directory source`` for the body; ends it with ``sig`` and checks a clean unmount."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*MOUNT, *options, str(directory), str(source)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_mounted(proc, directory)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert not os.path.ismount(directory), f"{directory} still mounted after signal {sig}"
    assert proc.returncode == 0, err
    assert "unmounted" in err, err
