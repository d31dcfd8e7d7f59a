"""A store file through the capture path: the job carries khibernate.target_map=, the capture kernel's target is
the dm device over the file's extents, and the capture initramfs gets the disk's modules, dm_mod and dmsetup."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from khibernate.capture import initrd
from khibernate.capture.job import attach_file_target
from khibernate.capture.jobspec import Job, parse
from khibernate.store import filedev

JOB = Job("hibernate", "/dev/mapper/khibernate-store", str(uuid.uuid4()), 0, 0x100000, 0x4000000, 17,
          str(uuid.uuid4()), str(uuid.uuid4()), 120.0, 0x1234000, target_map="254:1:16777216")


def test_the_target_map_round_trips_through_the_command_line() -> None:
    assert "khibernate.target_map=254:1:16777216" in JOB.args()
    assert parse(" ".join(JOB.args()) + " -- elfcorehdr=0x1") == JOB
    plain = dataclasses.replace(JOB, target="/dev/vdb", target_map="")
    assert not any("target_map" in a for a in plain.args())
    assert parse(" ".join(plain.args())) == plain


def test_a_device_target_is_passed_by_its_kernel_name(tmp_path: Path) -> None:
    assert filedev.for_capture("/dev/null") == ("/dev/null", "")
    link = tmp_path / "by-path-link"  # the capture kernel has no udev: no /dev/disk/by-* there
    link.symlink_to("/dev/null")
    assert filedev.for_capture(str(link)) == ("/dev/null", "")
    plain = dataclasses.replace(JOB, target="/dev/vdb", target_map="")
    assert attach_file_target(plain) is plain


def test_device_mapper_module_found_in_modules_dep(tmp_path: Path) -> None:
    rel = tmp_path / "6.12.0-distro"
    rel.mkdir()
    (rel / "modules.dep").write_text("kernel/drivers/md/dm-mod.ko:\nkernel/drivers/block/virtio_blk.ko:\n")
    assert initrd.dm_is_module("6.12.0-distro", tmp_path)
    (rel / "modules.dep").write_text("kernel/drivers/block/virtio_blk.ko:\n")
    assert not initrd.dm_is_module("6.12.0-distro", tmp_path)
    assert not initrd.dm_is_module("other", tmp_path)
