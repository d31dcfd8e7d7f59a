"""ELF dependency resolution with pyelftools, checked against real binaries of this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from khibernate.initramfs import collect


def _ldd_names(binary: str) -> set[str]:
    """Library file names ldd reports (used only as an independent cross-check in the test)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and parts[parts.index("=>") + 1].startswith("/"):
            names.add(Path(parts[parts.index("=>") + 1]).name)
        elif parts and parts[0].startswith("/"):
            names.add(Path(parts[0]).name)
    return names


def test_ls():
    ls = shutil.which("ls")
    assert ls
    deps = collect.resolve([Path(ls)])
    names = {Path(k).name for k in deps}
    assert "libc.so.6" in names
    assert any(n.startswith("ld-linux") for n in names)
    for guest, host in deps.items():
        assert guest.startswith("/") and host.is_file()
    if shutil.which("ldd"):
        assert _ldd_names(ls) <= names


def test_python_interpreter_with_runpath():
    exe = Path(os.path.realpath(sys.executable))
    info = collect.elf_info(exe)
    deps = collect.resolve([exe])
    names = {Path(k).name for k in deps}
    assert "libc.so.6" in names
    for lib in info.needed:
        assert lib in names, f"{lib} (DT_NEEDED of {exe}) not resolved"
    if shutil.which("ldd"):
        assert _ldd_names(str(exe)) <= names


def test_extension_modules_need_libffi():
    import _ctypes

    deps = collect.resolve([Path(_ctypes.__file__)])
    assert any(Path(k).name.startswith("libffi.so") for k in deps)


def test_origin_and_missing(tmp_path):
    exe = Path(os.path.realpath(sys.executable))
    assert collect._expand("$ORIGIN/../lib:${ORIGIN}/x", exe.parent) == [
        str(exe.parent.parent / "lib"), str(exe.parent / "x")]
    with pytest.raises(collect.DependencyError):
        collect.elf_info(tmp_path / "nope")
    fake = tmp_path / "notelf"
    fake.write_text("hello")
    assert not collect.is_elf(fake)
