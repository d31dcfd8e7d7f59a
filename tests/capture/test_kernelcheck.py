"""Can the capture kernel jump back?  Proven by its embedded config, by being the running kernel's own build, or by
an earlier round trip with the very image; anything else is refused before a slot is reserved, and `doctor
--kernel` says which."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from click.testing import CliRunner

from khibernate.capture import kernelcheck
from khibernate.capture.kernelcheck import CaptureKernelError, judge
from khibernate.cli import cli
from khibernate.elfcore import Note, pack_notes
from khibernate.system import SystemRoot
from tests.jump.test_payload import BUILD_ID, CONFIG, fake_bzimage, fake_vmlinux
from tests.test_doctor import make_tree

NO_JUMP = "CONFIG_KEXEC=y\n# CONFIG_KEXEC_JUMP is not set\nCONFIG_IKCONFIG=y\n"


def _kernel(tmp_path: Path, name: str, config: str | None) -> str:
    vmlinux = fake_vmlinux(config)
    p = tmp_path / name
    p.write_bytes(fake_bzimage(gzip.compress(vmlinux), len(vmlinux)))
    return str(p)


def test_judge_each_proof() -> None:
    assert judge({"CONFIG_KEXEC_JUMP": "y"}, "", "", None, False).can_jump_back is True
    assert judge({"CONFIG_KEXEC": "y"}, "", "", None, False).can_jump_back is False
    assert judge(None, "ab", "ab", {"CONFIG_KEXEC_JUMP": "y"}, False).can_jump_back is True
    assert judge(None, "ab", "ab", {}, False).can_jump_back is False
    assert judge(None, "ab", "cd", {"CONFIG_KEXEC_JUMP": "y"}, False).can_jump_back is None
    assert judge(None, "", "", None, True).can_jump_back is True
    assert "CONFIG_IKCONFIG" in judge(None, "ab", "cd", None, False).why


def test_refused_without_proof_accepted_with_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KHIBERNATE_STATE_DIR", str(tmp_path / "state"))
    good = _kernel(tmp_path, "good", CONFIG)
    kernelcheck.check(good)
    with pytest.raises(CaptureKernelError, match="no CONFIG_KEXEC_JUMP.*nothing was reserved or frozen"):
        kernelcheck.check(_kernel(tmp_path, "nojump", NO_JUMP))
    unknown = _kernel(tmp_path, "unknown", None)
    with pytest.raises(CaptureKernelError, match="nothing proves"):
        kernelcheck.check(unknown)
    # the running kernel's own build (same build id in /sys/kernel/notes) with KEXEC_JUMP in its config
    tree = make_tree(tmp_path / "root")
    (tmp_path / "root/sys/kernel/notes").write_bytes(pack_notes([Note("GNU", 3, BUILD_ID)]))
    assert kernelcheck.assess(unknown, SystemRoot(tmp_path / "root")).can_jump_back is True
    assert tree.kernel_config()[0] is not None
    # an earlier round trip with this very image
    kernelcheck.remember(unknown)
    kernelcheck.check(unknown)
    assert (tmp_path / "state/jumped-back").read_text().count("\n") == 1
    kernelcheck.remember(unknown)
    assert (tmp_path / "state/jumped-back").read_text().count("\n") == 1


def test_doctor_says_so_for_a_given_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KHIBERNATE_STATE_DIR", str(tmp_path / "state"))
    make_tree(tmp_path / "root")
    root = str(tmp_path / "root")
    res = CliRunner().invoke(cli, ["doctor", "--root", root, "--kernel", _kernel(tmp_path, "nojump", NO_JUMP)])
    assert "no CONFIG_KEXEC_JUMP" in res.output and "jump  : NOT possible" in res.output, res.output
    res = CliRunner().invoke(cli, ["doctor", "--root", root, "--kernel", _kernel(tmp_path, "good", CONFIG)])
    assert "can jump back: its embedded config" in res.output, res.output


def test_debian_kernel_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's 6.1 kernel (no KEXEC_JUMP, no IKCONFIG) is never jumped into (here: not the running build)."""
    from tests.tiers import debian_vmlinuz

    monkeypatch.setenv("KHIBERNATE_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(CaptureKernelError, match="nothing proves"):
        kernelcheck.check(str(debian_vmlinuz()))
