"""``view mount`` of a synthetic core: files, signals, and one clear error with nothing mounted on bad input.

Needs root and FUSE (marked vm like every test that needs root)."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from khibernate.elfcore import parse_headers
from khibernate.image.sources import open_source
from tests.image.synthkernel import SynthKernel
from tests.vm.view_mounting import MOUNT, mounted

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_mount_serves_the_files_and_unmounts_on_signal(synth_elf: Path, tmp_path: Path, sig: int) -> None:
    d = tmp_path / "mnt"
    with mounted(d, synth_elf, sig), open_source(synth_elf) as src:
        assert sorted(os.listdir(d)) == ["info.json", "oldmem", "vmcore", "vmcoreinfo"]
        assert (d / "vmcoreinfo").read_text() == src.vmcoreinfo_text
        with open(d / "oldmem", "rb") as f:
            for r in src.ranges:
                for paddr in (r.start, r.end - 4096):
                    f.seek(paddr)
                    assert f.read(4096) == src.read(paddr, 4096)
        h = parse_headers((d / "vmcore").read_bytes()[:65536])
        assert [(p.paddr, p.memsz) for p in h.loads if p.vaddr < 0xFFFFFFFF80000000] == \
            [(r.start, r.size) for r in src.ranges]
        with open_source(d / "vmcore") as again:
            for r in src.ranges:
                assert again.read(r.start, 8192) == src.read(r.start, 8192)
        with pytest.raises(OSError):
            open(d / "vmcore", "r+b")


def _mount_fails(d: Path, source: Path | str, match: str, *, busy: bool = False) -> None:
    r = subprocess.run([*MOUNT, str(d), str(source)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and re.search(match, r.stderr), r.stderr
    assert r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert os.path.ismount(d) == busy  # a refused mount leaves nothing behind, nor unmounts what was there


def test_bad_input_is_one_error_and_nothing_mounted(synth: SynthKernel, synth_elf: Path, tmp_path: Path) -> None:
    d = tmp_path / "mnt"
    d.mkdir()
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a dump at all" * 100)
    _mount_fails(d, junk, "not a vmcore")
    cut = tmp_path / "cut"
    cut.write_bytes(synth_elf.read_bytes()[:1 << 20])
    _mount_fails(d, cut, "truncated|cut short")
    _mount_fails(tmp_path / "absent", synth_elf, "not a directory")
    _mount_fails(d, tmp_path / "nofile", "no such file")
    with mounted(d, synth_elf):
        _mount_fails(d, synth_elf, "busy", busy=True)
        assert (d / "vmcoreinfo").read_text().startswith("OSRELEASE=")


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), user=65534, group=65534, extra_groups=[], capture_output=True, text=True,
                          timeout=60)


def test_memory_stays_with_root_even_with_allow_other(synth_elf: Path) -> None:
    """Issue 18: with --allow-other alone, `nobody` can neither list the mount nor read the memory (files 0400,
    default_permissions, like /proc/kcore); --mode 0444 shares it on purpose.  Before, every user read it."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="khibernate-view-"))  # reachable by nobody (pytest's tmp_path is not)
    try:
        base.chmod(0o755)
        d = base / "mnt"
        with mounted(d, synth_elf, options=("--allow-other",)):
            assert stat.S_IMODE(os.stat(d / "vmcore").st_mode) == 0o400
            for cmd in (["cat", str(d / "vmcoreinfo")], ["ls", str(d)], ["head", "-c", "64", str(d / "oldmem")]):
                r = _as_nobody(*cmd)
                assert r.returncode != 0 and "Permission denied" in r.stderr and not r.stdout, (cmd, r)
            assert (d / "vmcoreinfo").read_text().startswith("OSRELEASE=")  # the owner (root) reads
        with mounted(d, synth_elf, options=("--allow-other", "--mode", "0444")):
            r = _as_nobody("cat", str(d / "vmcoreinfo"))
            assert r.returncode == 0 and r.stdout.startswith("OSRELEASE="), r
    finally:
        shutil.rmtree(base, ignore_errors=True)
