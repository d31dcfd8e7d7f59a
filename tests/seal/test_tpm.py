"""The TPM 2.0 key source against a real software TPM (swtpm, started per test; tests/seal/softtpm.py): a store's
TPM slot round trip, a PCR extended after `target init` refused with one clear error and nothing written, a slot
of another TPM refused, a blob sealed by someone else opening nothing, a sealed image opened with --tpm, the
resume trying the TPM slot before it asks for the passphrase.  Missing swtpm/tpm2-tools: skipped with the reason,
a failure under KHIBERNATE_RUN_VM_TESTS=1."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.restore import resume
from khibernate.restore.resume import Options, ResumeError
from khibernate.seal import keyring
from khibernate.seal.errors import TpmForeignError, TpmPolicyError, WrongKeyError
from khibernate.seal.keysource import open_keyring
from khibernate.seal.tpm import TCTI_ENV, TpmKey
from khibernate.seal.tpmblob import TpmSealed
from khibernate.store import api, keyslots
from khibernate.store.handle import Store
from khibernate.store.superblock import SlotState
from tests.seal.conftest import PASSPHRASE
from tests.seal.softtpm import SoftTpm, soft_tpm
from tests.seal.test_sealed_resume import _hibernated, _initrd, _store, _typist, console, memfile, no_load

__all__ = ["console", "memfile", "no_load"]  # fixtures shared with test_sealed_resume

POLICY_REFUSAL = "the TPM does not release the key: the boot chain changed since target init (PCRs 7 changed"


@pytest.fixture
def tpm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftTpm]:
    """A fresh swtpm, made this process's TPM (KHIBERNATE_TPM_TCTI)."""
    with soft_tpm(tmp_path / "tpm") as t:
        monkeypatch.setenv(TCTI_ENV, t.tcti)
        yield t


def cli_run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout + r.stderr


def ring_of(dev: str) -> keyring.Keyring:
    with Store.open(dev) as st:
        return keyslots.read(st.fd, dev)


def test_init_seals_a_tpm_slot_that_this_tpm_opens(tpm: SoftTpm, tmp_path: Path) -> None:
    passfile = tmp_path / "pw"
    passfile.write_bytes(PASSPHRASE + b"\n")
    dev = _store(tmp_path, "--tpm", "--passphrase-file", str(passfile))
    ring = ring_of(dev)
    assert ring.version == keyring.VERSION_BLOBS and [s.kind for s in ring.slots] == [keyring.KIND_PASSPHRASE,
                                                                                      keyring.KIND_TPM]
    sealed = TpmSealed.unpack(ring.slots[1].blob)
    assert sealed.pcrs == (0, 7) and len(sealed.public) > 40 and len(sealed.private) > 100
    from khibernate.seal.keysource import Passphrase

    store_key = open_keyring(ring, TpmKey(), "the store")
    assert store_key == open_keyring(ring, Passphrase(PASSPHRASE), "the store")
    assert store_key not in Path(dev).read_bytes()
    code, out = cli_run("target", "init", dev, "--force", "--tpm", "--tpm-pcrs", "7,0,4")
    assert code == 0, out
    assert TpmSealed.unpack(ring_of(dev).slots[0].blob).pcrs == (0, 4, 7)
    code, out = cli_run("target", "init", dev, "--force", "--tpm-pcrs", "0,7")
    assert code == 2 and "--tpm-pcrs goes with --tpm" in out
    code, out = cli_run("target", "init", dev, "--force", "--tpm", "--tpm-pcrs", "0,24")
    assert code == 2 and "numbers 0..23" in out


def test_a_changed_pcr_is_refused_with_one_clear_error_and_nothing_written(tpm: SoftTpm, tmp_path: Path,
                                                                           memfile: Path, no_load: None) -> None:
    dev = _store(tmp_path, "--tpm")
    _hibernated(dev, memfile, TpmKey())
    out = tmp_path / "v.elf"
    code, said = cli_run("target", "export", dev, "0", str(out), "--format", "elf", "--tpm")
    assert code == 0 and out.exists(), said  # the same boot chain: released
    out.unlink()
    tpm.extend(7)  # another Secure Boot state or key measured
    code, said = cli_run("target", "export", dev, "0", str(out), "--format", "elf", "--tpm")
    assert code == 1 and POLICY_REFUSAL in said and said.count("\n") == 1 and "Traceback" not in said, said
    assert not out.exists()
    with pytest.raises(ResumeError) as e:  # the resume, with --tpm: refused before anything is loaded
        resume.run(Options(target=dev, key=TpmKey), say=lambda m: None, system=_initrd(tmp_path))
    assert isinstance(e.value.__cause__, TpmPolicyError) and POLICY_REFUSAL in str(e.value), e.value
    assert api.read(dev).slot(0).state == SlotState.TRIED  # tried, as every refused resume


def test_a_slot_of_another_tpm_is_refused(tpm: SoftTpm, tmp_path: Path, memfile: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dev = _store(tmp_path, "--tpm")
    _hibernated(dev, memfile, TpmKey())
    with soft_tpm(tmp_path / "other-tpm") as other:
        monkeypatch.setenv(TCTI_ENV, other.tcti)
        with pytest.raises(TpmForeignError, match="another TPM sealed it"):
            open_keyring(ring_of(dev), TpmKey(), "the store")
        code, said = cli_run("target", "export", dev, "0", str(tmp_path / "v.elf"), "--format", "elf", "--tpm")
    assert code == 1 and "cannot load the key slot's sealed key" in said and "Traceback" not in said, said


def test_a_blob_sealed_by_someone_else_opens_nothing(tpm: SoftTpm, tmp_path: Path) -> None:
    """Anyone can seal a secret of their own to this TPM and these PCRs; put into the store's TPM slot, the TPM
    releases it, and the KEK it makes does not open the wrapped store key (AEAD): WrongKeyError."""
    dev = _store(tmp_path, "--tpm")
    ring = ring_of(dev)
    foreign = TpmKey().new_slot()  # a fresh secret, sealed to the same TPM and PCRs
    forged = dataclasses.replace(ring.slots[0], blob=foreign.blob)
    with pytest.raises(WrongKeyError, match="does not open"):
        open_keyring(dataclasses.replace(ring, slots=(forged,)), TpmKey(), "the store")
    forged = dataclasses.replace(foreign, wrapped=ring.slots[0].wrapped)  # with its own salt too
    with pytest.raises(WrongKeyError, match="does not open"):
        open_keyring(dataclasses.replace(ring, slots=(forged,)), TpmKey(), "the store")


def test_a_sealed_image_file_opens_with_tpm(tpm: SoftTpm, tmp_path: Path, memfile: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "s.khi"
    code, said = cli_run("image", "save", str(memfile), str(dest), "--tpm", "--block-pages", "8", "-d", "1")
    assert code == 0, said
    code, said = cli_run("image", "verify", str(dest), "--tpm")
    assert code == 0 and "sealed: authentic" in said, said
    code, said = cli_run("image", "verify", str(dest))
    assert code == 2 and "--tpm" in said, said
    with soft_tpm(tmp_path / "other-tpm") as other:
        monkeypatch.setenv(TCTI_ENV, other.tcti)
        code, said = cli_run("image", "verify", str(dest), "--tpm")
    assert code == 1 and "another TPM" in said and "Traceback" not in said, said


def test_no_tpm_is_one_clear_error_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No TPM device (or no tpm2-tools): `target init --tpm` says so, exit 2, and the device is untouched."""
    monkeypatch.setenv(TCTI_ENV, f"device:{tmp_path}/no-tpmrm0")
    dev = tmp_path / "store.img"
    dev.write_bytes(bytes(4 << 20))
    code, said = cli_run("target", "init", str(dev), "--tpm")
    assert code == 2 and ("no TPM" in said or "tpm2-tools is not installed" in said), said
    assert "Traceback" not in said and said.count("\n") == 1 and dev.read_bytes() == bytes(4 << 20)


def test_resume_without_a_key_tries_the_tpm_then_asks_the_passphrase(tpm: SoftTpm, tmp_path: Path, memfile: Path,
                                                                     console: tuple[int, str], no_load: None) -> None:
    passfile = tmp_path / "pw"
    passfile.write_bytes(PASSPHRASE + b"\n")
    dev = _store(tmp_path, "--tpm", "--passphrase-file", str(passfile))
    _hibernated(dev, memfile, TpmKey())
    said: list[str] = []
    with pytest.raises(ResumeError) as e:  # the TPM releases the key: nothing asked (no typist: it would hang)
        resume.run(Options(target=dev), say=said.append, system=_initrd(tmp_path / "a"))
    assert any("its key derived" in m for m in said) and "key" not in str(e.value), (said, e.value)
    tpm.extend(7)
    master, _ = console
    typist = _typist(master, PASSPHRASE)
    said = []
    with pytest.raises(ResumeError) as e:
        resume.run(Options(target=dev, again=True), say=said.append, system=_initrd(tmp_path / "b"))
    screen, _ = typist.communicate(timeout=30)
    assert any(POLICY_REFUSAL in m and "asking for the passphrase instead" in m for m in said), said
    assert any("its key derived" in m for m in said) and "key" not in str(e.value), (said, e.value)
    assert "passphrase of the hibernation image in " in screen


def test_a_tpm_slot_the_tpm_refuses_does_not_hide_another_that_opens(tpm: SoftTpm) -> None:
    """Two TPM slots, sealed to PCR 7 and to PCR 0: after PCR 7 changed, the second opens the keyring; after PCR 0
    changed too, the first slot's refusal is the error."""
    from khibernate.seal.keysource import make_keyring, new_store_key

    store_key = new_store_key()
    ring = make_keyring(store_key, [TpmKey((7,)), TpmKey((0,))])
    tpm.extend(7)
    assert open_keyring(ring, TpmKey(), "the store") == store_key
    tpm.extend(0)
    with pytest.raises(TpmPolicyError, match=r"\(PCRs 7 changed"):
        open_keyring(ring, TpmKey(), "the store")
