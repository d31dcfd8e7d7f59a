"""The initramfs builder: deterministic output, expected content, CLI."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.initramfs import build, cpio
from khibernate.initramfs import python as pybundle


def test_two_builds_byte_identical(tmp_path, monkeypatch):
    extra = tmp_path / "hello.sh"
    extra.write_text("#!/bin/sh\necho hello\n")
    # separate .pyc caches: both builds really compile (the cache must not hide non-determinism)
    monkeypatch.setattr(pybundle, "PYC_CACHE", tmp_path / "pyc-a")
    a = build.build(tmp_path / "a.img", [(extra, "/usr/bin/hello")], compression="gzip")
    monkeypatch.setattr(pybundle, "PYC_CACHE", tmp_path / "pyc-b")
    b = build.build(tmp_path / "b.img", [(extra, "/usr/bin/hello")], compression="gzip")
    assert (tmp_path / "pyc-b").is_dir()
    assert a.output.read_bytes() == b.output.read_bytes()
    assert a.compressed_bytes < a.uncompressed_bytes
    got = {e.path: e for e in cpio.read(a.output.read_bytes())}
    assert got["init"].kind == "file" and got["init"].perm & 0o111
    assert got["usr/bin/hello"].data == b"#!/bin/sh\necho hello\n" and got["usr/bin/hello"].perm == 0o755
    assert got["bin/sh"].kind == "symlink" and got["bin/sh"].data == b"/bin/busybox"
    assert got["dev/console"].kind == "chardev" and got["dev/console"].rdev == (5, 1)
    assert got["usr/sbin/kexec"].data.startswith(b"\x7fELF")
    assert any(p.endswith("libc.so.6") for p in got)
    assert f"{pybundle.GUEST_LIB.lstrip('/')}/python{sys.version_info.major}{sys.version_info.minor}.zip" in got
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = pybundle.guest_site().lstrip("/")
    assert f"{site}/khibernate/cli.py" in got
    assert any(p.startswith(f"{site}/_cffi_backend") for p in got)
    assert f"{site}/zstandard/__init__.py" in got
    assert f"{site}/elftools/__init__.py" in got
    assert f"{site}/click/__init__.py" in got
    lib = pybundle.GUEST_LIB.lstrip("/")
    assert f"{lib}/python{v}/os.py" in got and f"{lib}/python{v}/lib-dynload" in got
    assert got["usr/bin/khibernate"].perm == 0o755


def test_cli_build_and_list_no_python(tmp_path):
    out = tmp_path / "small.img"
    r = CliRunner().invoke(cli, ["initramfs", "build", "-o", str(out), "--no-python", "--compress", "zstd",
                                 "--add", f"{__file__}:/t/test.py"])
    assert r.exit_code == 0, r.output
    assert "MiB zstd" in r.output
    entries = {e.path: e for e in cpio.read(out.read_bytes())}
    assert "t/test.py" in entries and not any("python" in p for p in entries)
    r = CliRunner().invoke(cli, ["initramfs", "list", str(out)])
    assert r.exit_code == 0, r.output
    assert "/t/test.py" in r.output and stat.filemode(0o20600) + " " in r.output


def test_bad_add_says_what_to_do(tmp_path):
    r = CliRunner().invoke(cli, ["initramfs", "build", "-o", str(tmp_path / "x"), "--add", "nocolon"])
    assert r.exit_code != 0 and "SRC:DST" in r.output


def _unpack(entries, root):
    """Write the archive's dirs, files and symlinks below root (device nodes left out: a chroot needs none)."""
    for e in sorted(entries, key=lambda e: e.path):
        dst = root / e.path
        if e.kind == "dir":
            dst.mkdir(parents=True, exist_ok=True)
        elif e.kind == "file":
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(e.data)
            dst.chmod(e.perm)
        elif e.kind == "symlink":
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(e.data.decode())


def test_capture_image_carries_the_native_kernel_and_no_numpy(tmp_path):
    """numpy is no runtime dependency: not in the capture image; the native _pages extension and cffi's backend
    are, without build-time files, and (as root, in a chroot of the unpacked image) import and run there."""
    out = tmp_path / "capture.img"
    build.build(out, compression="none")
    entries = cpio.read(out.read_bytes())
    paths = {e.path: e for e in entries}
    site = pybundle.guest_site().lstrip("/")
    assert not [p for p in paths if "numpy" in p], "numpy is in the capture image"
    native = [p for p in paths if p.startswith(f"{site}/khibernate/native/_pages.") and p.endswith(".so")]
    assert len(native) == 1 and paths[native[0]].data.startswith(b"\x7fELF"), native
    assert paths[native[0]].perm & 0o111
    assert any(p.startswith(f"{site}/_cffi_backend.") and p.endswith(".so") for p in paths)
    assert f"{site}/khibernate/native/__init__.py" in paths
    # build-time files of the native kernel stay out (C sources, cffi's generated C, objects, the builder)
    assert not [p for p in paths if p.startswith(f"{site}/khibernate/") and p.endswith((".c", ".o"))]
    assert f"{site}/khibernate/native/build.py" not in paths
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        pytest.skip("importing inside the unpacked image needs root (chroot)")
    root = tmp_path / "root"
    _unpack(entries, root)
    code = ("import khibernate.native as n, _cffi_backend\n"
            "assert n.popcount(b'\\xff\\x01') == 9 and n.pack_bits(bytearray([1, 0, 1])) == b'\\x05'\n"
            "try:\n    import numpy\nexcept ImportError:\n    print('no numpy')\n")
    r = subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", "/usr/bin/python3", "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "no numpy\n", r.stderr[-2000:]


def test_unbuilt_native_kernel_refuses_the_bundle():
    """A checkout whose _pages extension was never compiled cannot make a capture image (the job would fail there)."""
    files = dict(pybundle._package_files("khibernate"))
    files = {rel: src for rel, src in files.items() if "/native/_pages." not in rel}
    with pytest.raises(pybundle.PythonBundleError, match="khibernate/native/build.py"):
        pybundle.check_native(files)


def test_a_system_without_the_fuse_binding_still_gets_its_capture_bundle(monkeypatch):
    """Debian has no mfusepy package (only `view mount` imports it, in the first kernel): the capture bundle is made
    without it; a missing dependency the jobs import is still refused with what to install."""
    import importlib.metadata as md

    real = md.distribution

    def without(*missing: str):
        def distribution(name: str):
            if name.lower() in missing:
                raise md.PackageNotFoundError(name)
            return real(name)
        return distribution

    monkeypatch.setattr(md, "distribution", without("mfusepy"))
    files = dict(pybundle.site_files("khibernate"))
    assert not any(rel.startswith("mfusepy") for rel in files) and any(rel.startswith("click/") for rel in files)
    monkeypatch.setattr(md, "distribution", without("mfusepy", "click"))
    with pytest.raises(pybundle.PythonBundleError, match="needs 'click'.*pip install click"):
        pybundle.site_files("khibernate")


def test_a_debian_packaged_dependency_without_record_is_bundled_by_its_modules(tmp_path):
    """dh_python installs dist-info/egg-info without RECORD (python3-click, python3-cffi-backend's _cffi_backend):
    the bundle takes the modules top_level.txt names, packages and single extension modules alike."""
    import importlib.metadata as md

    import _cffi_backend
    import click

    info = tmp_path / "click-8.1.3.egg-info"
    info.mkdir()
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: click\nVersion: 8.1.3\n")
    (info / "top_level.txt").write_text("click\n_cffi_backend\n")
    files = dict(pybundle._dist_files(md.PathDistribution(info)))
    assert "click/__init__.py" in files and files["click/__init__.py"].samefile(click.__file__)
    backend = os.path.basename(_cffi_backend.__file__)
    assert backend in files and files[backend].samefile(_cffi_backend.__file__)
    (info / "top_level.txt").write_text("no_such_module_here\n")
    with pytest.raises(pybundle.PythonBundleError, match="cannot tell which files make up click"):
        list(pybundle._dist_files(md.PathDistribution(info)))
