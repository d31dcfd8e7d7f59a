"""A hibernation that comes back (its capture kernel completed the image, then did not power off) leaves no
resumable image, and the failure path says so loudly when it cannot make sure."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from khibernate.capture.jobspec import Job
from khibernate.capture.save import withdraw_hibernation
from khibernate.capture.snapshot import Options, mark_failed
from khibernate.restore.resume import choose
from khibernate.store import api
from khibernate.store.superblock import FLAG_HIBERNATE, SlotState

MiB = 1 << 20


def _store(tmp_path: Path) -> tuple[str, Job]:
    dev = tmp_path / "store.img"
    with open(dev, "wb") as f:
        f.truncate(32 * MiB)
    sb = api.init(str(dev))
    image = uuid.uuid4()
    rec = dataclasses.replace(sb.slots[1], state=SlotState.COMPLETE, seq=1, flags=FLAG_HIBERNATE, length=4096,
                              image_uuid=image.bytes)
    api.set_slot(str(dev), rec)
    job = Job("hibernate", str(dev), sb.uuid_str, 1, rec.offset, rec.capacity, 17, str(image), str(uuid.uuid4()),
              60.0, 0x1234000)
    return str(dev), job


def test_capture_kernel_withdraws_a_completed_hibernation_before_jumping_back(tmp_path: Path) -> None:
    dev, job = _store(tmp_path)
    assert choose(api.read(dev)) is not None
    assert "slot 1 is bad" in withdraw_hibernation(job)
    rec = api.read(dev).slot(1)
    assert rec.state == SlotState.BAD and not rec.flags & FLAG_HIBERNATE and choose(api.read(dev)) is None
    other = dataclasses.replace(job, image=str(uuid.uuid4()))  # another image in the slot: left alone
    api.set_slot(dev, dataclasses.replace(rec, state=SlotState.COMPLETE, flags=FLAG_HIBERNATE))
    withdraw_hibernation(other)
    assert api.read(dev).slot(1).state == SlotState.COMPLETE
    gone = dataclasses.replace(job, target=str(tmp_path / "absent"))
    assert "FAILED" in withdraw_hibernation(gone)


def test_first_kernel_failure_path_does_not_swallow_its_own_error(tmp_path: Path) -> None:
    """Marking the slot bad works: the plain message; it fails: the error says the image may be resumable and how
    to drop it (before, the failure was suppressed and 'marked bad' was claimed)."""
    from khibernate.store.handle import Store

    dev, job = _store(tmp_path)
    rec = api.read(dev).slot(1)
    opts = Options(target=dev, kind="hibernate")
    with Store.open(dev, write=True) as st:  # the handle snapshot holds through the capture
        err = mark_failed(opts, st, rec, st.sb.uuid, "the capture kernel came back without powering off")
        assert "slot 1 is marked bad" in str(err) and st.refresh().slot(1).state == SlotState.BAD
        st.set_slot(rec)
        err = mark_failed(opts, st, rec, uuid.uuid4().bytes, "the capture kernel came back without powering off")
    assert "marking slot 1 bad FAILED" in str(err) and f"khibernate target drop {dev} 1" in str(err)
    assert "resumable hibernation image" in str(err)


def test_capture_kernel_words_reset_a_panic() -> None:
    """The capture kernel gets panic=N (a panic resets the machine instead of hanging with the first kernel
    frozen), before the user's words so --append can change it, with this kernel's console words."""
    from khibernate.capture.roundtrip import CAPTURE_PANIC_SECONDS, capture_args

    words = capture_args("BOOT_IMAGE=/vmlinuz root=/dev/sda1 console=ttyS0,115200 quiet loglevel=7")
    assert words == ["console=ttyS0,115200", "loglevel=7", f"panic={CAPTURE_PANIC_SECONDS}"]
    assert 0 < CAPTURE_PANIC_SECONDS <= 30



def test_the_watchdog_says_whether_the_job_ran_or_never_started(tmp_path: Path) -> None:
    """capture/job.timed_out: a job killed at its deadline says so; one that never started (a capture kernel that
    booted slower than the deadline, /init's claim taken by the watchdog) says that instead, not 'killed'."""
    from khibernate.capture.job import timed_out

    _, job = _store(tmp_path)
    snap = dataclasses.replace(job, kind="snapshot")
    killed, never = timed_out(snap).message, timed_out(snap, started=False).message
    assert "still running at its deadline (60 s" in killed and "killed by the watchdog" in killed
    assert "had not started at its deadline (60 s" in never and "killed" not in never
    assert "nothing was written" in never
