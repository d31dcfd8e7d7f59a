"""The first kernel's view of a resident capture kernel: armed only in the boot that armed it and while its image is
loaded; a capture it cannot serve is said (and falls back to a fresh capture kernel); a pause's request carries
the next sequence number and the armed RAM digest; `arm` and `disarm` on a machine without one."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest

from khibernate.capture import arm
from khibernate.capture.jobspec import Job
from khibernate.capture.pauserequest import ram_digest
from khibernate.capture.roundtrip import CaptureKernel
from khibernate.system import SystemRoot

BOOT = str(uuid.uuid4())
IOMEM = "00001000-0009efff : System RAM\n00100000-3ffdffff : System RAM\n  2f000000-3effffff : Crash kernel\n"


def machine(tmp_path: Path, loaded: int = 1, iomem: str = IOMEM) -> SystemRoot:
    root = tmp_path / "root"
    for rel, text in {"proc/sys/kernel/random/boot_id": BOOT + "\n", "sys/kernel/kexec_loaded": f"{loaded}\n",
                      "proc/iomem": iomem}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return SystemRoot(root)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from khibernate.jump import api as jump

    d = tmp_path / "run"
    monkeypatch.setattr(jump, "RUN_DIR", d)
    return d


def armed_state(system: SystemRoot, **over: object) -> arm.Armed:
    a = arm.Armed(BOOT, "/boot/bzImage", "/boot/initrd.img", "/dev/vda", str(uuid.uuid4()), 0x12345000,
                  ram_digest(system.system_ram()).hex(), seq=2, armed_at=1.0)
    return dataclasses.replace(a, **over)  # type: ignore[arg-type]


def write_state(run_dir: Path, a: arm.Armed) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / arm.STATE).write_text(json.dumps(dataclasses.asdict(a)))


def test_armed_only_in_its_boot_and_while_loaded(tmp_path: Path, run_dir: Path) -> None:
    system = machine(tmp_path)
    assert arm.read_state(system) is None  # nothing armed
    a = armed_state(system)
    write_state(run_dir, a)
    assert arm.read_state(system) == a
    assert "2 pause(s)" in a.describe() and "/dev/vda" in a.describe()
    assert arm.read_state(machine(tmp_path, loaded=0)) is None  # unloaded behind its back (kexec -u)
    write_state(run_dir, armed_state(system, boot_id=str(uuid.uuid4())))
    assert arm.read_state(system) is None  # another boot's state (a resumed image of another boot)
    (run_dir / arm.STATE).write_text("{not json")
    assert arm.read_state(system) is None


def test_what_it_cannot_serve_is_said(tmp_path: Path) -> None:
    system = machine(tmp_path)
    a = armed_state(system)
    same = CaptureKernel("/boot/bzImage", "/boot/initrd.img")
    assert arm.unusable_reason(a, same, "/dev/vda", system) is None
    assert "another capture kernel" in str(arm.unusable_reason(a, CaptureKernel("/boot/other", "/boot/initrd.img"),
                                                                  "/dev/vda", system))
    assert "another capture kernel" in str(arm.unusable_reason(a, dataclasses.replace(same, mem_min=0x3c000000),
                                                                  "/dev/vda", system))
    assert "armed for /dev/vda" in str(arm.unusable_reason(a, same, "/dev/vdb", system))
    hotplugged = machine(tmp_path / "b", iomem=IOMEM + "100000000-13fffffff : System RAM\n")
    assert "memory map changed" in str(arm.unusable_reason(a, same, "/dev/vda", hotplugged))


def test_the_pause_request_is_the_next_one(tmp_path: Path, run_dir: Path) -> None:
    system = machine(tmp_path)
    a = armed_state(system)
    trip = arm.ResidentTrip(a, box=None)  # type: ignore[arg-type]  # request() does not touch the mailbox
    job = Job("snapshot", "/dev/vda", a.store_uuid, 1, 0x1000, 0x2000, 17, str(uuid.uuid4()), BOOT, 600.0, 0)
    req = trip.request(job, 7, None)
    assert (req.seq, req.store_generation, req.ram_digest.hex(), req.image, req.deadline, req.extra) == \
        (3, 7, a.ram_digest, job.image, 600.0, {})
    faulty = trip.request(job, 7, {"request": "snapshot"}, "khibernate.fault=hang")
    assert faulty.extra == {"request": "snapshot", "append": "khibernate.fault=hang"}


def test_only_fault_words_may_differ_per_pause(tmp_path: Path) -> None:
    a = armed_state(machine(tmp_path), append="loglevel=4")
    assert arm.pause_words("loglevel=4 khibernate.fault=raise", a) == ["khibernate.fault=raise"]
    assert arm.pause_words("loglevel=4", a) == []
    assert arm.pause_words("loglevel=7", a) is None  # another command line: a fresh capture kernel


def test_disarm_without_an_armed_kernel_unloads_nothing(tmp_path: Path, run_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from khibernate.jump import api as jump

    monkeypatch.setattr(jump, "unload", lambda crash=False: pytest.fail("nothing is armed: nothing to unload"))
    run_dir.mkdir()
    (run_dir / arm.MAILBOX_FILE).write_bytes(bytes(4096))  # a stale mailbox of an earlier arm is cleared
    assert arm.disarm() is False
    assert not (run_dir / arm.MAILBOX_FILE).exists()


def test_arm_refuses_when_armed_or_another_image_is_loaded(tmp_path: Path, run_dir: Path) -> None:
    system = machine(tmp_path)
    kernel = CaptureKernel("/boot/bzImage", "/boot/initrd.img")
    with pytest.raises(arm.ArmError, match="another kexec image is loaded"):
        arm.arm(kernel, "/dev/vda", print, system=system)
    write_state(run_dir, armed_state(system))
    with pytest.raises(arm.ArmError, match="armed already"):
        arm.arm(kernel, "/dev/vda", print, system=system)
