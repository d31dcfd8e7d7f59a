"""`view mount` keeps a kernel's memory with root (issue 18): files 0400 and the kernel checking modes
(default_permissions) unless the user gives another --mode; --allow-other alone hands nothing to other users.

The FUSE operations' attributes and options here; a real mount read as `nobody`: tests/vm/test_view_mount_synthetic.py.
"""

from __future__ import annotations

import stat

import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.view.errors import MountError
from khibernate.view.files import ViewFile
from khibernate.view.mount import check_mode, fuse_options, load_binding, make_operations


@pytest.fixture(scope="module")
def binding() -> object:
    try:
        return load_binding()
    except MountError as e:
        pytest.skip(f"{e} (scripts/setup.sh installs fuse3 and mfusepy)")


def modes(ops: object) -> tuple[int, int]:
    return (stat.S_IMODE(ops.getattr("/")["st_mode"]),  # type: ignore[attr-defined]
            stat.S_IMODE(ops.getattr("/vmcore")["st_mode"]))  # type: ignore[attr-defined]


def test_files_are_the_owners_alone_by_default_and_the_kernel_checks(binding: object) -> None:
    files = {"vmcore": ViewFile.of_bytes(b"secret" * 100)}
    assert modes(make_operations(files, binding)) == (0o500, 0o400)
    assert fuse_options(allow_other=True) == {**fuse_options(allow_other=False), "allow_other": True}
    assert fuse_options(allow_other=True)["default_permissions"] is True
    assert modes(make_operations(files, binding, 0o440)) == (0o550, 0o440)
    assert modes(make_operations(files, binding, 0o444)) == (0o555, 0o444)


@pytest.mark.parametrize("bad", [0o644, 0o044, 0o1444, 0])
def test_mode_is_read_bits_with_the_owner(bad: int) -> None:
    with pytest.raises(MountError, match="read bits"):
        check_mode(bad)


def test_help_says_what_the_image_holds() -> None:
    r = CliRunner().invoke(cli, ["view", "mount", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "whole memory in clear" in text and "0400" in text and "--mode" in text
    r = CliRunner().invoke(cli, ["view", "mount", "/nonexistent-dir", "--mode", "9"])
    assert r.exit_code == 2 and "octal" in r.output
