"""The key to the restoring kernel (issue 24), on a store in a regular file holding a sealed hibernation image:

- the resume boot (A') derives the image key in a child process from a key file, a passphrase file or a passphrase
  typed on a terminal (a pty here, standing for /dev/console; no echo) and refuses — after the tried mark, before
  anything is loaded — a wrong key, an unsealed image while a key is given, a sealed image without a key;
- the restore job in the capture kernel takes the handed key from the mailbox page (a file standing for /dev/mem),
  wipes it from the page at once, and opens the slot with it, every block authenticated before the first write;
  a changed block, a missing or foreign key: refused, memory untouched.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from khibernate.capture import mailbox
from khibernate.capture.jobspec import CaptureContext, Job
from khibernate.cli import cli
from khibernate.image.errors import NotAVmcoreError
from khibernate.restore import resume
from khibernate.restore.resume import Options, ResumeError
from khibernate.restore.run import prepare_job
from khibernate.seal import askpass
from khibernate.seal.errors import KeyRequiredError, KeySourceError, TamperedError, UnsealedRefusedError, WrongKeyError
from khibernate.seal.handoff import hand_image_key
from khibernate.seal.keysource import KeyFile, KeySource, Passphrase
from khibernate.seal.sealing import HandedKey, Sealing
from khibernate.store import api, keyslots
from khibernate.store.handle import Store
from khibernate.store.superblock import FLAG_HIBERNATE, SlotState
from khibernate.system import SystemRoot
from tests.image import basefiles
from tests.seal.conftest import PASSPHRASE, key_file
from tests.seal.test_sealed_store import init, put_image

MiB = 1 << 20
INITRD_MOUNTINFO = "1 1 0:2 / / rw - rootfs rootfs rw\n"
MAILBOX = 4096  # the mailbox page's address in the file standing for /dev/mem


@pytest.fixture(scope="module")
def memfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return basefiles.build(tmp_path_factory.mktemp("mem"))["elf64"]


@dataclasses.dataclass
class Sealed:
    dev: str
    key: KeyFile
    passfile: str
    image: bytes  # the hibernation image's UUID (slot 0)


def _store(tmp_path: Path, *init_args: str) -> str:
    dev = tmp_path / "store.img"
    with open(dev, "wb") as f:
        f.truncate(64 * MiB)
    code, out = init(str(dev), *init_args)
    assert code == 0, out
    return str(dev)


def _hibernated(dev: str, memfile: Path, source: KeySource | None) -> bytes:
    """Slot 0 holds a complete hibernation image, sealed as a hibernate seals it (a handed image key) unless
    ``source`` is None; its image UUID."""
    image = uuid.uuid4().bytes
    sealing = None
    if source is not None:
        with Store.open(dev) as st:
            ring = keyslots.read(st.fd, dev)
        sealing = Sealing.from_handed(hand_image_key(lambda: source, ring, image), ring, 0)
    put_image(dev, 0, memfile, sealing)
    rec = api.read(dev).slot(0)
    api.set_slot(dev, dataclasses.replace(rec, flags=FLAG_HIBERNATE, image_uuid=image, osrelease="6.12-test"))
    return image


@pytest.fixture
def sealed(tmp_path: Path, memfile: Path) -> Sealed:
    """A store sealed to a key file and a passphrase, its slot 0 a sealed hibernation image."""
    key = key_file(tmp_path / "store.key")
    passfile = tmp_path / "passphrase"
    passfile.write_bytes(PASSPHRASE + b"\n")
    dev = _store(tmp_path, "--key-file", key.path, "--passphrase-file", str(passfile))
    return Sealed(dev, key, str(passfile), _hibernated(dev, memfile, key))


def _initrd(tmp_path: Path) -> SystemRoot:
    (tmp_path / "root/proc/1").mkdir(parents=True)
    (tmp_path / "root/proc/1/mountinfo").write_text(INITRD_MOUNTINFO)
    return SystemRoot(tmp_path / "root")


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the restore kernel fails the test: the refusals below must come before it."""
    from khibernate.capture import roundtrip

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the restore kernel was being prepared for loading")

    monkeypatch.setattr(roundtrip.RoundTrip, "prepare", refuse)


def _resume(s: Sealed, tmp_path: Path, key: Callable[[], KeySource] | None, said: list[str],
            again: bool = False) -> ResumeError:
    with pytest.raises(ResumeError) as e:
        resume.run(Options(target=s.dev, key=key, again=again), say=said.append, system=_initrd(tmp_path))
    assert api.read(s.dev).slot(0).state == SlotState.TRIED  # marked before any check, as for any refusal
    return e.value


def test_a_wrong_key_is_refused_before_anything_is_loaded(sealed: Sealed, tmp_path: Path, no_load: None) -> None:
    said: list[str] = []
    other = key_file(tmp_path / "other.key")
    e = _resume(sealed, tmp_path, lambda: KeyFile(other.path), said)
    assert "does not open the store" in str(e) and "wrong key" in str(e) and e.attempt
    assert not any("its key derived" in m for m in said)


def test_the_right_key_gets_past_the_key_checks(sealed: Sealed, tmp_path: Path, no_load: None) -> None:
    """With the store's key file or passphrase file the image is opened and authenticated in A'; what stops this
    host then is the image's fit (no crash region, another kernel), not the key."""
    for n, key in enumerate((lambda: KeyFile(sealed.key.path), lambda: Passphrase.from_file(sealed.passfile))):
        said: list[str] = []
        with pytest.raises(ResumeError) as e:
            resume.run(Options(target=sealed.dev, key=key, again=n > 0), say=said.append,
                       system=_initrd(tmp_path / str(n)))
        assert any("the image is sealed: its key derived" in m for m in said), said
        assert "key" not in str(e.value) and "sealed" not in str(e.value), str(e.value)


def test_an_unsealed_image_is_refused_when_a_key_is_given(tmp_path: Path, memfile: Path, no_load: None) -> None:
    """An unsealed store (and image) given a key: refused (the image should be sealed, it may have been replaced);
    likewise an unsealed image put into a sealed store."""
    key = key_file(tmp_path / "store.key")
    (tmp_path / "u").mkdir()
    dev = _store(tmp_path / "u", "--unsealed")
    _hibernated(dev, memfile, None)
    s = Sealed(dev, key, "", b"")
    e = _resume(s, tmp_path / "u", lambda: KeyFile(key.path), [])
    assert isinstance(e.__cause__, UnsealedRefusedError) and "a key was given" in str(e)
    (tmp_path / "s").mkdir()
    dev = _store(tmp_path / "s", "--key-file", key.path)
    _hibernated(dev, memfile, None)  # unsealed, into the sealed store
    e = _resume(Sealed(dev, key, "", b""), tmp_path / "s", lambda: KeyFile(key.path), [])
    assert isinstance(e.__cause__, UnsealedRefusedError), e


def test_a_sealed_image_without_a_key_is_refused(tmp_path: Path, memfile: Path, no_load: None) -> None:
    """A store sealed only to a key file, no key given: nothing to type, refused naming --key-file; a sealed image
    in a store that says unsealed, no key: refused (KeyRequiredError from the image)."""
    key = key_file(tmp_path / "store.key")
    dev = _store(tmp_path, "--key-file", key.path)
    _hibernated(dev, memfile, key)
    e = _resume(Sealed(dev, key, "", b""), tmp_path, None, [])
    assert isinstance(e.__cause__, KeyRequiredError) and "--key-file FILE" in str(e), e
    from khibernate.store.superblock import STORE_UNSEALED

    with Store.open(dev, write=True) as st:  # the unauthenticated flags rewritten
        st.update(lambda sb: sb.with_flags(STORE_UNSEALED))
    e = _resume(Sealed(dev, key, "", b""), tmp_path / "again", None, [], again=True)
    assert isinstance(e.__cause__, KeyRequiredError) and "is sealed: give the key" in str(e), e


# ------------------------------------------------------------------ the passphrase typed on the console


TYPIST = r"""
import os, select, sys, time
fd, answer = int(sys.argv[1]), sys.argv[2].encode()
seen, deadline = b"", time.monotonic() + 60
while b"passphrase" not in seen or not seen.endswith(b": "):
    if time.monotonic() > deadline:
        sys.exit("no prompt: " + seen.decode(errors="replace"))
    if not select.select([fd], [], [], 1)[0]:
        continue
    seen += os.read(fd, 4096)
os.write(fd, answer + b"\n")
end = time.monotonic() + 3
while time.monotonic() < end:
    if select.select([fd], [], [], 0.2)[0]:
        try:
            seen += os.read(fd, 4096)
        except OSError:
            break
sys.stdout.write(seen.decode(errors="replace"))
"""


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, str]]:
    """A pty standing for the console: (master fd, slave path); askpass asks there."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    monkeypatch.setattr(askpass, "TERMINALS", ("/nonexistent/tty", path))
    yield master, path
    os.close(master)
    os.close(slave)


def _typist(master: int, answer: bytes) -> subprocess.Popen[str]:
    """A process that waits for the prompt on the pty and types ``answer`` (another process: the asking side forks)."""
    return subprocess.Popen([sys.executable, "-c", TYPIST, str(master), answer.decode()], pass_fds=(master,),
                            stdout=subprocess.PIPE, text=True)


def test_askpass_reads_a_line_without_echo(console: tuple[int, str]) -> None:
    master, path = console
    typist = _typist(master, PASSPHRASE)
    assert askpass.ask("khibernate: passphrase: ", askpass.TERMINALS, timeout=30) == PASSPHRASE
    screen, _ = typist.communicate(timeout=30)
    assert "khibernate: passphrase: " in screen and PASSPHRASE.decode() not in screen, screen
    with pytest.raises(KeySourceError, match="no passphrase typed on .* within 0.2 s"):
        askpass.ask("p: ", (path,), timeout=0.2)
    with pytest.raises(KeySourceError, match="no terminal to ask the passphrase on .*not a terminal.*"
                                             "--passphrase-file"):
        askpass.ask("p: ", ("/nonexistent/tty", "/dev/null"))


def test_resume_asks_the_passphrase_of_a_sealed_store_on_the_console(sealed: Sealed, tmp_path: Path,
                                                                     console: tuple[int, str], no_load: None) -> None:
    """No key option, a sealed store: the passphrase is asked on the console (in the child that derives the image
    key); a wrong one is refused before anything is loaded, the right one opens the image."""
    master, _ = console
    typist = _typist(master, b"not the passphrase")
    e = _resume(sealed, tmp_path / "wrong", None, [])
    assert "does not open" in str(e) and "passphrase typed on the console" in str(e), e
    typist.communicate(timeout=30)
    typist = _typist(master, PASSPHRASE)
    said: list[str] = []
    with pytest.raises(ResumeError) as err:
        resume.run(Options(target=sealed.dev, again=True), say=said.append, system=_initrd(tmp_path / "right"))
    screen, _ = typist.communicate(timeout=30)
    assert any("its key derived" in m for m in said) and "key" not in str(err.value), (said, err.value)
    assert "passphrase of the hibernation image in " in screen and PASSPHRASE.decode() not in screen


def test_resume_check_takes_a_key(sealed: Sealed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`resume --check` with a key: the wrong one is named, the right one gets to this boot's checks; without one it
    asks nothing (it may run on a booted system, whose console is nobody's terminal) and names the options; nothing
    is marked either way."""
    monkeypatch.setattr(askpass, "TERMINALS", ("/nonexistent/tty",))  # an ask would fail, not wait
    r = CliRunner()
    res = r.invoke(cli, ["resume", "--check", "--target", sealed.dev])
    assert res.exit_code == 2 and "give its key to check its image" in res.output, res.output  # usage
    other = key_file(tmp_path / "other.key")
    res = r.invoke(cli, ["resume", "--check", "--target", sealed.dev, "--key-file", other.path])
    assert res.exit_code == 1 and "does not open" in res.output, res.output
    for opt in (["--key-file", sealed.key.path], ["--passphrase-file", sealed.passfile]):
        res = r.invoke(cli, ["resume", "--check", "--target", sealed.dev, *opt])
        assert res.exit_code == 1 and "would not be resumed" in res.output, res.output
        assert "does not open" not in res.output and "sealed" not in res.output, res.output
    res = r.invoke(cli, ["resume", "--check", "--target", sealed.dev, "--key-file", sealed.key.path,
                         "--passphrase-file", sealed.passfile])
    assert res.exit_code == 2 and "give one key" in res.output, res.output
    assert api.read(sealed.dev).slot(0).state == SlotState.COMPLETE


# ------------------------------------------------------------------ the restore job in the capture kernel


def _job(s: Sealed) -> Job:
    sb = api.read(s.dev)
    rec = sb.slot(0)
    return Job("restore", s.dev, sb.uuid_str, 0, rec.offset, rec.capacity, 1, str(uuid.UUID(bytes=s.image)),
               str(uuid.uuid4()), 600.0, MAILBOX)


def _handed(s: Sealed, source: KeySource | None = None) -> HandedKey:
    with Store.open(s.dev) as st:
        ring = keyslots.read(st.fd, s.dev)
    return hand_image_key(lambda: source or s.key, ring, s.image)


def _devmem(tmp_path: Path, s: Sealed, request: dict[str, object]) -> Path:
    """A file standing for the first kernel's memory: garbage, and the mailbox page holding ``request``."""
    mem = tmp_path / "mem"
    mem.write_bytes(b"\xa5" * MAILBOX + mailbox.pack(mailbox.REQUEST, s.image, request) + b"\xa5" * MAILBOX)
    return mem


def test_the_restore_job_takes_the_handed_key_wipes_it_and_authenticates_every_block(sealed: Sealed,
                                                                                      tmp_path: Path) -> None:
    handed = _handed(sealed)
    mem = _devmem(tmp_path, sealed, {"request": "restore", "seal": handed.to_json()})
    ctx = CaptureContext("", vmcore=str(tmp_path / "no-vmcore"))
    with pytest.raises(NotAVmcoreError, match="no-vmcore: no such file"):  # past the image's checks: authentic
        prepare_job(_job(sealed), ctx, devmem=str(mem))
    data = mem.read_bytes()
    page = data[MAILBOX:2 * MAILBOX]
    assert mailbox.read_request(MAILBOX, sealed.image, devmem=str(mem)) == {"request": "restore"}
    assert handed.image_key not in page and handed.image_key.hex().encode() not in page
    assert data[:MAILBOX] == data[2 * MAILBOX:] == b"\xa5" * MAILBOX  # nothing else of memory touched


def test_the_restore_job_refuses_before_any_write(sealed: Sealed, tmp_path: Path) -> None:
    """A changed block, no key in the request, a key of another store key: refused, memory untouched but the
    mailbox page (the key wiped from it at once, whatever follows)."""
    ctx = CaptureContext("", vmcore=str(tmp_path / "no-vmcore"))
    job = _job(sealed)
    handed = _handed(sealed)
    with pytest.raises(KeyRequiredError, match="handed no usable image key"):
        prepare_job(job, ctx, devmem=str(_devmem(tmp_path, sealed, {"request": "restore"})))
    with pytest.raises(WrongKeyError, match="another store key"):
        prepare_job(job, ctx, devmem=str(_devmem(tmp_path, sealed, {"request": "restore", "seal": dataclasses.replace(
            handed, key_id=bytes(16)).to_json()})))
    with pytest.raises(WrongKeyError, match="image key was handed over for"):  # a key for another image
        other = dataclasses.replace(handed, image_uuid=uuid.uuid4().bytes)
        with Store.open(sealed.dev) as st:
            st.open_slot(st.sb.slot(0), other)
    rec = api.read(sealed.dev).slot(0)
    with api.open_slot(sealed.dev, rec, sealed.key) as src:
        entry = src.index[len(src.index) // 2]
    with open(sealed.dev, "r+b") as f:
        f.seek(rec.offset + entry.offset + entry.csize // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    mem = _devmem(tmp_path, sealed, {"request": "restore", "seal": handed.to_json()})
    with pytest.raises(TamperedError):
        prepare_job(job, ctx, devmem=str(mem))
    data = mem.read_bytes()
    assert handed.image_key.hex().encode() not in data
    assert data[:MAILBOX] == data[2 * MAILBOX:] == b"\xa5" * MAILBOX


def test_a_sealed_restore_zeroes_the_free_pages(sealed: Sealed, tmp_path: Path, memfile: Path) -> None:
    """What the resume boot had in the pages the image dropped as free (its heap with the image key, the tty buffer
    the passphrase was typed into) must not stay in the resumed kernel: a sealed restore zeroes them; an unsealed
    one keeps the old rule (only for init_on_free kernels)."""
    from khibernate.restore.checks import SavedImage
    from khibernate.restore.run import Prepared, zero_free

    rec = api.read(sealed.dev).slot(0)
    with api.open_slot(sealed.dev, rec, sealed.key) as src:
        img = SavedImage.from_source(src)
        assert not img.zero_free and zero_free(Prepared(src, img, None))  # type: ignore[arg-type]
    (tmp_path / "u").mkdir()
    dev = _store(tmp_path / "u", "--unsealed")
    _hibernated(dev, memfile, None)
    with api.open_slot(dev, api.read(dev).slot(0)) as src:
        img = SavedImage.from_source(src)
        assert not zero_free(Prepared(src, img, None))  # type: ignore[arg-type]
        assert zero_free(Prepared(src, dataclasses.replace(img, zero_free=True), None))  # type: ignore[arg-type]
