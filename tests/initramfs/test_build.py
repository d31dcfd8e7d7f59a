"""The initramfs builder: deterministic output, expected content, CLI."""

from __future__ import annotations

import stat
import sys

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
