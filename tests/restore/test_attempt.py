"""An image is tried once: the tried mark, its attempt token, one continuation, and `resume`'s exit statuses —
on a store in a regular file holding a real (non-restorable) image."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.restore import attempt
from khibernate.restore.attempt import AttemptRefused
from khibernate.restore.checks import RestoreRefused
from khibernate.restore.resume import NothingToResume, Options, ResumeError, begin, choose, newest_image, run
from khibernate.restore.run import prepare_slot
from khibernate.store import api
from khibernate.store.errors import StoreCorruptError
from khibernate.store.superblock import FLAG_HIBERNATE, ResumeAttempt, SlotState, Superblock, new_superblock
from khibernate.system import SystemRoot, root_fstype
from tests.store.test_store import write_image

MiB = 1 << 20


@pytest.fixture
def memfile(tmp_path: Path) -> Path:
    p = tmp_path / "mem.raw"
    p.write_bytes(b"KHB-PATTERN-0123" * (MiB // 8))
    return p


def hibernation_store(tmp_path: Path, memfile: Path, state: SlotState = SlotState.COMPLETE) -> str:
    """A 2-slot store whose slot 0 holds a hibernation image (#1) in ``state``."""
    dev = tmp_path / "store.img"
    with open(dev, "wb") as f:
        f.truncate(64 * MiB)
    sb = api.init(str(dev))
    rec = sb.slots[0]
    w = write_image(str(dev), rec.offset, rec.capacity, memfile)
    api.set_slot(str(dev), dataclasses.replace(rec, state=state, seq=1, length=w.length, crc32=w.crc32,
                                               flags=FLAG_HIBERNATE, image_uuid=b"i" * 16, osrelease="6.12-test"))
    return str(dev)


def test_superblock_carries_the_attempt() -> None:
    sb = new_superblock(64 * MiB, 3, b"u" * 16, 1)
    assert Superblock.unpack(sb.pack(0)).attempt is None  # a zero token: no attempt (stores made before it)
    a = ResumeAttempt(2, b"t" * 16, 123, 1)
    back = Superblock.unpack(dataclasses.replace(sb, attempt=a).pack(1))
    assert back.attempt == a and back.attempt.continued and back.slots == sb.slots
    with pytest.raises(StoreCorruptError, match="resume attempt names slot 7"):
        Superblock.unpack(dataclasses.replace(sb, attempt=ResumeAttempt(7, b"t" * 16, 1)).pack(0))


def test_first_boot_marks_the_image_tried_before_any_check(tmp_path: Path, memfile: Path) -> None:
    """`begin` marks the slot tried under a fresh token; from then on no plain resume takes it."""
    dev = hibernation_store(tmp_path, memfile)
    att = begin(Options(target=dev))
    sb = api.read(dev)
    assert sb.slot(0).state == SlotState.TRIED and att.slot.state == SlotState.TRIED
    assert sb.attempt == ResumeAttempt(0, att.token, sb.attempt.started_ns, 0) and len(att.token_hex) == 32
    assert choose(sb) is None and choose(sb, again=True).index == 0  # type: ignore[union-attr]
    with pytest.raises(ResumeError, match="tried it before.*--again") as e:
        begin(Options(target=dev))
    assert e.value.attempt is None  # refused before marking anything
    again = begin(Options(target=dev, again=True))  # on purpose: a new attempt replaces the old one
    assert again.token != att.token and api.read(dev).attempt.token == again.token  # type: ignore[union-attr]


def test_an_attempt_continues_once(tmp_path: Path, memfile: Path) -> None:
    dev = hibernation_store(tmp_path, memfile)
    att = begin(Options(target=dev))
    cont = begin(Options(target=dev, attempt=att.token_hex))
    assert cont.continued and cont.slot.index == 0 and api.read(dev).attempt.continued  # type: ignore[union-attr]
    with pytest.raises(AttemptRefused, match="continued once already"):
        begin(Options(target=dev, attempt=att.token_hex))
    # a new attempt ends the old token; a resumed slot ends the attempt
    newer = begin(Options(target=dev, again=True))
    with pytest.raises(AttemptRefused, match="not this store's current"):
        begin(Options(target=dev, attempt=att.token_hex))
    api.set_slot(dev, dataclasses.replace(api.read(dev).slot(0), state=SlotState.RESUMED))
    with pytest.raises(AttemptRefused, match="resumed now"):
        begin(Options(target=dev, attempt=newer.token_hex))


def test_capture_kernel_restores_only_the_current_attempt(tmp_path: Path, memfile: Path) -> None:
    """The restore job's slot must be tried under the job's token; anything else is refused before a read."""
    dev = hibernation_store(tmp_path, memfile)
    with pytest.raises(RestoreRefused, match="not the store's current resume attempt"):
        prepare_slot(dev, 0, attempt=b"x" * 16)  # complete, never tried: no job may restore it
    att = begin(Options(target=dev))
    assert attempt.job_problems(api.read(dev), 0, att.token) == []
    with pytest.raises(RestoreRefused, match="not the store's current resume attempt"):
        prepare_slot(dev, 0, attempt=b"x" * 16)
    with pytest.raises(RestoreRefused, match="tried once already.*--again"):
        prepare_slot(dev, 0)  # by hand, a tried slot needs --again
    api.set_slot(dev, dataclasses.replace(api.read(dev).slot(0), state=SlotState.RESUMED))
    assert attempt.job_problems(api.read(dev), 0, att.token) == ["slot 0 is resumed, not tried by this attempt"]


def test_only_the_newest_hibernation_image_is_a_candidate(tmp_path: Path, memfile: Path) -> None:
    """An older complete image behind a newer tried one is staler still: it is never picked."""
    dev = hibernation_store(tmp_path, memfile, SlotState.TRIED)
    sb = api.read(dev)
    older = dataclasses.replace(sb.slot(1), state=SlotState.COMPLETE, seq=0, flags=FLAG_HIBERNATE, length=4096)
    sb = sb.with_slot(older)
    assert newest_image(sb).index == 0 and choose(sb) is None  # type: ignore[union-attr]


@pytest.mark.parametrize("token", ["", "abc", "g" * 32, "0" * 32])
def test_malformed_tokens_are_usage_errors(token: str) -> None:
    from khibernate.errors import UsageError

    with pytest.raises(UsageError):
        attempt.parse_token(token)


def test_resume_exit_statuses(tmp_path: Path, memfile: Path) -> None:
    """0 nothing to resume, 1 not resumed (refused, or tried/resumed before: was 0 for a resumed image), and the
    refusal after the mark names the attempt; --check: 0 would resume, 1 would be refused, 3 none."""
    r = CliRunner()
    empty = tmp_path / "empty.img"
    with open(empty, "wb") as f:
        f.truncate(16 * MiB)
    api.init(str(empty))
    res = r.invoke(cli, ["resume", "--target", str(empty)])
    assert res.exit_code == 0 and "no hibernation image" in res.output, res.output
    assert r.invoke(cli, ["resume", "--check", "--target", str(empty)]).exit_code == 3
    with pytest.raises(NothingToResume):
        begin(Options(target=str(empty)))

    (tmp_path / "r").mkdir()
    resumed = hibernation_store(tmp_path / "r", memfile, SlotState.RESUMED)
    res = r.invoke(cli, ["resume", "--target", resumed])
    assert res.exit_code == 1 and "resumed before" in res.output and "--again" in res.output, res.output
    assert r.invoke(cli, ["resume", "--check", "--target", resumed]).exit_code == 1

    (tmp_path / "c").mkdir()
    complete = hibernation_store(tmp_path / "c", memfile)
    res = r.invoke(cli, ["resume", "--check", "--target", complete])
    assert res.exit_code == 1 and "would not be resumed" in res.output, res.output  # checked, nothing marked
    assert api.read(complete).slot(0).state == SlotState.COMPLETE
    res = r.invoke(cli, ["resume", "--target", complete])  # marked tried, then refused (not a jump's image, no crash
    assert res.exit_code == 1 and "booting normally" in res.output, res.output  # region on this host: either way)
    token = re.search(r"attempt ([0-9a-f]{32})", res.output)
    assert token and api.read(complete).attempt.token.hex() == token.group(1)  # type: ignore[union-attr]
    assert api.read(complete).slot(0).state == SlotState.TRIED
    res = r.invoke(cli, ["resume", "--target", complete, "--attempt", "zz"])
    assert res.exit_code == 2, res.output


INITRD_MOUNTINFO = ("1 1 0:2 / / rw - rootfs rootfs rw,size=497440k,nr_inodes=124360\n"
                    "16 1 0:4 / /proc rw,relatime - proc proc rw\n")
BOOTED_MOUNTINFO = ("27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
                    "22 27 0:21 / /proc rw,relatime shared:12 - proc proc rw\n")


def _root(tmp_path: Path, mountinfo: str, initrd_release: bool = False) -> SystemRoot:
    (tmp_path / "proc/1").mkdir(parents=True)
    (tmp_path / "proc/1/mountinfo").write_text(mountinfo)
    if initrd_release:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc/initrd-release").write_text("NAME=initrd\n")
    return SystemRoot(tmp_path)


def test_in_initrd_reads_pid1_root() -> None:
    assert root_fstype(INITRD_MOUNTINFO) == "rootfs" and root_fstype(BOOTED_MOUNTINFO) == "ext4"
    # a chroot's view (initramfs-tools premount): PID 1's mountinfo still shows the initramfs root
    assert root_fstype(INITRD_MOUNTINFO + "40 1 8:1 / /run/khibernate-root ro - ext4 /dev/sda1 ro\n") == "rootfs"
    # over-mounted "/": the topmost mount counts
    assert root_fstype(INITRD_MOUNTINFO + "50 1 8:1 / / rw - ext4 /dev/sda1 rw\n") == "ext4"
    assert root_fstype("") is None


def test_resume_outside_an_initramfs_is_refused_after_the_mark(tmp_path: Path, memfile: Path) -> None:
    """The booted system (PID 1 on ext4) never resumes: the image is tried (a boot found it) and refused."""
    (tmp_path / "s").mkdir()
    dev = hibernation_store(tmp_path / "s", memfile)
    booted = _root(tmp_path / "booted", BOOTED_MOUNTINFO)
    assert not booted.in_initrd()
    with pytest.raises(ResumeError, match="not running in an initramfs .*ext4") as e:
        run(Options(target=dev), say=lambda m: None, system=booted)
    assert e.value.attempt == api.read(dev).attempt.token.hex()  # type: ignore[union-attr]
    assert api.read(dev).slot(0).state == SlotState.TRIED
    # from an initramfs the same image gets past this check (and on to the next: this host has no crash region)
    assert _root(tmp_path / "initrd", INITRD_MOUNTINFO).in_initrd()
    assert _root(tmp_path / "systemd-initrd", BOOTED_MOUNTINFO, initrd_release=True).in_initrd()
    with pytest.raises(ResumeError) as e:
        run(Options(target=dev, again=True), say=lambda m: None, system=_root(tmp_path / "i2", INITRD_MOUNTINFO))
    assert "initramfs" not in str(e.value)


def test_noresume_discards_the_image(tmp_path: Path, memfile: Path) -> None:
    """`resume --discard` (the scripts' answer to noresume): tried, never resumed by a later boot."""
    dev = hibernation_store(tmp_path, memfile)
    res = CliRunner().invoke(cli, ["resume", "--target", dev, "--discard"])
    assert res.exit_code == 1 and "marked tried without resuming" in res.output, res.output
    assert api.read(dev).slot(0).state == SlotState.TRIED
    res = CliRunner().invoke(cli, ["resume", "--target", dev, "--discard"])
    assert res.exit_code == 1 and "tried it before" in res.output
