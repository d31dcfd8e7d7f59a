"""filedev.attach in a kernel without udev (the capture and restore kernels): dmsetup must neither wait for udev nor
leave the /dev/mapper node to it — found by the distro VM test, where `dmsetup create` succeeded in the capture
kernel and /dev/mapper/khibernate-store never appeared, so the hibernation into a store file failed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from khibernate.store import filedev
from khibernate.store.errors import FileTargetError
from khibernate.store.extentmap import MAP_OFFSET, ExtentMap
from khibernate.store.fiemap import Extent

MiB = 1 << 20
OFFSET = 16 * MiB


def disk_with_map(dev: Path) -> None:
    """A stand-in for the disk node (a regular file): the store file's extent map where its first byte lies."""
    m = ExtentMap(b"\x11" * 16, 6 * MiB, 1 << 30, (Extent(0, OFFSET, 4 * MiB), Extent(4 * MiB, 100 * MiB, 2 * MiB)))
    with open(dev / "khibernate-disk-254-1", "wb") as f:
        f.seek(OFFSET + MAP_OFFSET)
        f.write(m.pack())


def fake_dmsetup(calls: list[list[str]], dev: Path, make_node: bool):
    def run(cmd, **kw):
        calls.append(list(cmd))
        if cmd[:2] == ["dmsetup", "mknodes"] and make_node:
            assert kw["env"]["DM_DEV_DIR"] == str(dev)
            (dev / "mapper").mkdir(exist_ok=True)
            (dev / "mapper" / cmd[2]).touch()
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_attach_creates_without_udev_and_makes_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    disk_with_map(tmp_path)
    calls: list[list[str]] = []
    monkeypatch.setattr(filedev.subprocess, "run", fake_dmsetup(calls, tmp_path, make_node=True))
    path = filedev.attach(filedev.TargetMap(254, 1, OFFSET), "khibernate-store", dev_dir=str(tmp_path))
    assert path == os.path.join(tmp_path, "mapper", "khibernate-store")
    assert calls == [["dmsetup", "create", "--noudevsync", "khibernate-store"],
                     ["dmsetup", "mknodes", "khibernate-store"]]


def test_attach_refuses_when_no_node_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    disk_with_map(tmp_path)
    monkeypatch.setattr(filedev.subprocess, "run", fake_dmsetup([], tmp_path, make_node=False))
    with pytest.raises(FileTargetError, match="made no .*mapper/khibernate-store"):
        filedev.attach(filedev.TargetMap(254, 1, OFFSET), "khibernate-store", dev_dir=str(tmp_path))
