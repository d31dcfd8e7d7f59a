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


def test_openssl_providers_are_found_from_the_modulesdir_compiled_into_libcrypto(tmp_path):
    moddir = tmp_path / "ossl-modules"
    moddir.mkdir()
    (moddir / "legacy.so").write_bytes(b"\x7fELF legacy")
    lib = tmp_path / "libcrypto.so.3"
    lib.write_bytes(b"\x7fELF...\0OpenSSL 3.0.17\0MODULESDIR: \"" + str(moddir).encode() + b"\"\0...")
    other = tmp_path / "libz.so.1"
    other.write_bytes(b"MODULESDIR: \"" + str(moddir).encode() + b"\"\0")
    assert collect.dlopened_plugins([lib, other]) == {str(moddir / "legacy.so"): moddir / "legacy.so"}
    assert collect.dlopened_plugins([other]) == {}


SYSTEM_LIBCRYPTO = Path("/usr/lib/x86_64-linux-gnu/libcrypto.so.3")


@pytest.mark.skipif(not SYSTEM_LIBCRYPTO.is_file(), reason="no shared OpenSSL 3 (Debian's libssl3) on this machine")
def test_a_tree_with_the_system_libcrypto_carries_its_legacy_provider():
    """Debian's python3-cryptography links the system libcrypto and loads the legacy provider at import: the capture
    environment built on a Debian system failed with "DSO support routines::could not load the shared library"."""
    from khibernate.initramfs.build import Tree

    m = collect.OPENSSL_MODULESDIR.search(SYSTEM_LIBCRYPTO.read_bytes())
    assert m, "libcrypto.so.3 without a compiled-in MODULESDIR"
    legacy = Path(m.group(1).decode()) / "legacy.so"
    tree = Tree()
    tree.add_file(SYSTEM_LIBCRYPTO, "usr/lib/x86_64-linux-gnu/libcrypto.so.3")
    tree.add_libraries()
    entry = tree.entries[str(legacy).lstrip("/")]
    assert entry.kind == "file" and entry.data.startswith(b"\x7fELF")
