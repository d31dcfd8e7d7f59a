"""`image save --key-file`, `image verify/info/export` of a sealed image: keys asked for, authenticity reported,
one-line errors that say what to give."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.seal.keysource import KeyFile, Passphrase
from khibernate.seal.sealing import Sealing
from tests.image import basefiles
from tests.seal import forge
from tests.seal.conftest import PASSPHRASE, key_file


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["image", *args])
    return r.exit_code, r.stdout, r.stderr


def test_save_sealed_then_verify_info_export(base: dict[str, Path], tmp_path: Path) -> None:
    key = key_file(tmp_path / "k")
    pw = tmp_path / "pw"
    pw.write_bytes(PASSPHRASE + b"\n")
    dest = tmp_path / "s.khi"
    code, out, err = run("save", str(base["elf64"]), str(dest), "--key-file", key.path, "--passphrase-file",
                         str(pw), "--block-pages", "8", "-d", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["sealed"] is True
    code, out, err = run("verify", str(dest))
    assert code == 2 and err.startswith("error: ") and "is sealed: give the key" in err and "Traceback" not in err
    for opts in (["--key-file", key.path], ["--passphrase-file", str(pw)]):
        code, out, err = run("verify", str(dest), *opts, "--json")
        assert code == 0, err
        assert json.loads(out)["authenticated"] is True
    code, out, err = run("info", str(dest), "--key-file", key.path, "--json")
    assert code == 0 and json.loads(out)["sealed"] is True, err
    code, out, err = run("export", str(dest), str(tmp_path / "v.elf"), "--format", "elf", "--key-file", key.path)
    assert code == 0, err
    code, out, err = run("verify", str(dest), "--key-file", key_file(tmp_path / "other").path)
    assert code == 1 and "wrong key" in err and err.count("\n") == 1


def test_verify_refuses_a_forged_image(base: dict[str, Path], tmp_path: Path) -> None:
    key = key_file(tmp_path / "k")
    dest = tmp_path / "s.khi"
    code, _, err = run("save", str(base["elf64"]), str(dest), "--key-file", key.path, "--block-pages", "8", "-d", "1")
    assert code == 0, err
    data = dest.read_bytes()
    e = forge.entries(data)[1]
    dest.write_bytes(forge.rechecksum(forge.flip(data, e.offset + 1)))
    code, out, err = run("verify", str(dest), "--key-file", key.path)
    assert code == 1 and "authentication" in err and "changed since it was sealed" in err and "Traceback" not in err


def test_a_key_for_an_image_that_cannot_be_sealed_is_refused(base: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("verify", str(base["elf64"]), "--key-file", key_file(tmp_path / "k").path)
    assert code == 2 and "not a sealed khibernate image" in err


def test_view_of_a_sealed_image_needs_the_key(sealed: Path, keys: tuple[KeyFile, Passphrase, Sealing]) -> None:
    """`view info/read` (and `view mount`, same options) say to give the key, and read with it."""
    r = CliRunner().invoke(cli, ["view", "info", str(sealed)])
    assert r.exit_code == 2 and "is sealed: give the key" in r.stderr and "Traceback" not in r.stderr
    key = keys[0]
    r = CliRunner().invoke(cli, ["view", "read", str(sealed), "--paddr", "0x2000", "--size", "16", "--raw",
                                 "--key-file", key.path])
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes == bytes(basefiles.memory()[0x2000:0x2010])


def test_save_of_a_sealed_source_opens_it_with_the_key_and_seals_the_copy(sealed: Path, tmp_path: Path,
                                                                          keys: tuple[KeyFile, Passphrase, Sealing]
                                                                          ) -> None:
    dest = tmp_path / "again.khi"
    code, _, err = run("save", str(sealed), str(dest), "--key-file", keys[0].path, "-d", "1", "--block-pages", "8")
    assert code == 0, err
    code, out, err = run("verify", str(dest), "--key-file", keys[0].path, "--json")
    assert code == 0 and json.loads(out)["authenticated"] is True, err
