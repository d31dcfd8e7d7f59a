"""The ``khibernate image`` commands through click: output, --json, and one-line errors without traceback."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from khibernate.cli import cli


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["image", *args])
    return r.exit_code, r.stdout, r.stderr


def test_save_info_verify_read(synth_elf: Path, tmp_path: Path) -> None:
    dest = tmp_path / "a.khi"
    code, out, err = run("save", str(synth_elf), str(dest), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["dump_level"] == 17 and res["restorable"] and res["classes"]["free"] > 0
    code, out, _ = run("info", str(dest), "--json")
    info = json.loads(out)
    assert info["osrelease"] == "6.12.0-synth" and info["dump_level"] == 17
    code, out, _ = run("verify", str(dest))
    assert code == 0 and "OK" in out
    code, out, _ = run("read", str(dest), "--paddr", "0x4b0000", "--size", "32")
    assert code == 0 and out.startswith("00000000004b0000")
    code, out, err = run("read", str(dest), "--paddr", str(3072 * 4096), "--size", "8")
    assert code != 0 and err.startswith("error: ") and "excluded" in err and "Traceback" not in err


def test_errors_are_one_line(tmp_path: Path, synth_elf: Path) -> None:
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    code, out, err = run("info", str(tmp_path / "junk"))
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    code, _, err = run("save", str(synth_elf), str(tmp_path / "b.khi"), "-d", "31", "--restorable")
    assert code == 2 and "restor" in err
    assert not (tmp_path / "b.khi").exists() and not list(tmp_path.glob(".*.partial"))
    code, _, err = run("save", str(synth_elf), str(tmp_path / "c.khi"), "-d", "40")
    assert code == 2 and "0<=x<=31" in err


def test_help_says_what_restorable_drops() -> None:
    code, out, _ = run("save", "--help")
    assert code == 0 and "only zero and free pages" in " ".join(out.split())


def test_export_and_dmesg_commands(synth_elf: Path, tmp_path: Path) -> None:
    code, _, err = run("export", str(synth_elf), str(tmp_path / "o.kdump"), "--format", "kdump", "--compress",
                       "zlib", "-d", "31")
    assert code == 0, err
    code, out, _ = run("info", str(tmp_path / "o.kdump"), "--json")
    assert json.loads(out)["format"] == "kdump"
    code, _, err = run("export", str(synth_elf), str(tmp_path / "o.elf"), "--format", "elf", "--flat")
    assert code == 2 and "--flat" in err


def test_os_errors_are_one_line(synth_elf: Path, tmp_path: Path) -> None:
    code, _, err = run("save", str(synth_elf), str(tmp_path / "no" / "such" / "dir" / "x.khi"))
    assert code == 1 and err.startswith("error: ") and "No such file" in err and "Traceback" not in err
    locked = tmp_path / "locked"
    locked.write_bytes(b"\x7fELF")
    locked.chmod(0)
    code, _, err = run("info", str(locked))
    assert code == 1 and err.startswith("error: ")


def test_python_m_khibernate_image(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "khibernate.image", "info", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
