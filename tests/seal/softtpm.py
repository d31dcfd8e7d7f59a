"""A real software TPM 2.0 for the host tests: Debian's swtpm on two free local TCP ports, its state in a temporary
directory, reached through tpm2-tools' swtpm TCTI; killed after the test.  Missing swtpm or tpm2-tools: the test
skips with the reason, or fails under KHIBERNATE_RUN_VM_TESTS=1 (tests/tiers.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.tiers import unavailable

TOOLS = ("swtpm", "tpm2_createprimary", "tpm2_pcrextend")


def _free_port_pair() -> int:
    """A free local TCP port whose successor is free too (the swtpm TCTI finds the control port at port + 1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free local TCP ports for swtpm")


class SoftTpm:
    """One running swtpm; ``tcti`` is what KHIBERNATE_TPM_TCTI takes."""

    def __init__(self, state: Path):
        self.state = state
        self.port = _free_port_pair()
        ctrl = self.port + 1
        self.tcti = f"swtpm:host=127.0.0.1,port={self.port}"
        state.mkdir(parents=True, exist_ok=True)
        self.log = (state / "swtpm.log").open("wb")
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"swtpm did not start: {(state / 'swtpm.log').read_text()}") from None
                time.sleep(0.05)

    def extend(self, pcr: int, data: bytes = b"another boot chain") -> None:
        """Extend SHA-256 PCR ``pcr`` (what a changed boot loader or kernel command line does)."""
        import hashlib

        subprocess.run(["tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}"], check=True,
                       env={**os.environ, "TPM2TOOLS_TCTI": self.tcti}, capture_output=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def require_tools() -> None:
    """Skip (or, under KHIBERNATE_RUN_VM_TESTS=1, fail) when swtpm or tpm2-tools is missing."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        unavailable(f"software TPM test: {', '.join(missing)} not installed (scripts/setup.sh installs swtpm, "
                    "swtpm-tools and tpm2-tools)")


@contextmanager
def soft_tpm(state: Path) -> Iterator[SoftTpm]:
    """A running swtpm with its state in ``state``, stopped on exit."""
    require_tools()
    tpm = SoftTpm(state)
    try:
        yield tpm
    finally:
        tpm.stop()
