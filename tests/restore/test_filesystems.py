"""The disks at hibernate time: the ext superblock reader against real mkfs.ext4 filesystems (e2fsprogs' own tools
set and print the fields), mountinfo parsing, the record and the resume-time comparison that names a changed
filesystem."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from khibernate.restore import extsuper, filesystems
from khibernate.restore.extsuper import ExtState, NotExtError
from khibernate.restore.filesystems import FsRecord, MountedFs

E2FS = "/usr/sbin:/sbin:" + os.environ.get("PATH", "")


def e2(*args: str) -> str:
    tool = shutil.which(args[0], path=E2FS)
    assert tool, f"{args[0]} (e2fsprogs, in every Debian) not found"
    return subprocess.run([tool, *args[1:]], check=True, capture_output=True, text=True).stdout


def mkfs(path: Path, *opts: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    e2("mkfs.ext4", "-q", "-F", *opts, str(path))
    return path


def dumpe2fs(path: Path) -> dict[str, str]:
    out = e2("dumpe2fs", "-h", str(path))
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def test_reader_agrees_with_e2fsprogs(tmp_path: Path) -> None:
    img = mkfs(tmp_path / "a.img")
    e2("tune2fs", "-C", "7", str(img))  # the mount count a mount would have made
    e2("debugfs", "-w", "-R", "ssv mtime 20240102030405", str(img))  # last mount time
    e2("debugfs", "-w", "-R", "feature needs_recovery", str(img))  # mounted read-write with its journal
    d = dumpe2fs(img)
    st = filesystems.read_state(str(img))
    assert st.uuid == d["Filesystem UUID"] and st.mount_count == int(d["Mount count"]) == 7
    assert st.mount_time == 1704164645 and "needs_recovery" in d["Filesystem features"]
    assert st.needs_recovery and st.journal
    e2("debugfs", "-w", "-R", "feature -needs_recovery", str(img))  # a clean unmount, a replay or e2fsck
    assert not filesystems.read_state(str(img)).needs_recovery
    ext2 = mkfs(tmp_path / "b.img", "-t", "ext2", "-O", "^has_journal")
    assert not filesystems.read_state(str(ext2)).journal
    (tmp_path / "zero").write_bytes(bytes(8192))
    with pytest.raises(NotExtError):
        filesystems.read_state(str(tmp_path / "zero"))


def test_writer_round_trip() -> None:
    st = ExtState("12345678-1234-5678-1234-567812345678", 65535, (3 << 32) + 17, True, True)
    assert extsuper.parse(extsuper.build(st)) == st
    assert len(extsuper.build(st)) == extsuper.READ_BYTES
    with pytest.raises(NotExtError, match="journal device"):
        extsuper.parse(extsuper.build(st, s_feature_incompat=extsuper.INCOMPAT_JOURNAL_DEV))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=extsuper.READ_BYTES + 16), st.integers(0, extsuper.READ_BYTES))
def test_fuzzed_superblocks_give_state_or_not_ext(data: bytes, cut: int) -> None:
    base = extsuper.build(ExtState("12345678-1234-5678-1234-567812345678", 3, 99, True, True))
    for blob in (data, base[:cut], base[:cut] + data):
        try:
            extsuper.parse(blob)
        except NotExtError:
            pass


MOUNTINFO = """\
1 1 0:2 / / rw - rootfs rootfs rw
22 1 0:21 / /proc rw,relatime - proc proc rw
30 1 254:16 / /mnt rw,relatime shared:5 - ext4 /dev/vdb rw
31 1 254:16 /sub /srv/bind rw,relatime shared:5 - ext4 /dev/vdb rw
32 1 254:32 / /mnt/read\\040only ro,relatime - ext4 /dev/vdc ro
33 1 0:40 / /data rw,relatime - btrfs /dev/vdd rw,space_cache=v2
34 1 254:48 / /a\\040b rw - xfs /dev/vde rw,attr2
35 1 0:50 / /net rw - nfs4 srv:/x rw,vers=4.2
"""


def test_mountinfo_rw_filesystems_once_each() -> None:
    fss = filesystems.parse_mountinfo(MOUNTINFO)
    assert [(f.mount, f.fstype, f.devno) for f in fss] == [
        ("/", "rootfs", "0:2"), ("/proc", "proc", "0:21"), ("/mnt", "ext4", "254:16"), ("/data", "btrfs", "0:40"),
        ("/a b", "xfs", "254:48"), ("/net", "nfs4", "0:50")]  # the bind mount and the read-only mount are not here


def _tree(tmp_path: Path, states: dict[str, ExtState | None]) -> tuple[Path, Path]:
    """A /sys with block devices and a /dev whose files hold their first bytes."""
    sys_root, dev = tmp_path / "root", tmp_path / "dev"
    (sys_root / "sys/dev/block").mkdir(parents=True)
    dev.mkdir()
    for i, (name, state) in enumerate(states.items()):
        (sys_root / "sys/dev/block" / f"254:{16 * (i + 1)}").symlink_to(f"../../devices/virtio{i}/block/{name}")
        (dev / name).write_bytes(extsuper.build(state) if state else bytes(extsuper.READ_BYTES))
        blk = sys_root / "sys/class/block" / name
        blk.mkdir(parents=True)
        (blk / "size").write_text("16384\n")
    return sys_root, dev


def test_record_then_find_what_changed(tmp_path: Path) -> None:
    """Recorded at hibernate; the same state passes; a mount since (count, time, journal), a move to another device
    name and a missing filesystem are each named."""
    vdb = ExtState("11111111-1111-1111-1111-111111111111", 3, 1000, True, True)
    sys_root, dev = _tree(tmp_path, {"vdb": vdb, "vdc": None, "vdd": None, "vde": None})
    records = filesystems.record(MOUNTINFO, dev_dir=dev, sys_root=sys_root)
    assert [(r.mount, r.fstype, r.device, r.state) for r in records] == [("/mnt", "ext4", "vdb", vdb),
                                                                         ("/a b", "xfs", "vdd", None)]
    assert [FsRecord.from_json(r.to_json()) for r in records] == records
    assert filesystems.records_from_json(None) is None and filesystems.records_from_json([]) == ()
    (warning,) = filesystems.unchecked(records)
    assert "xfs /a b on /dev/vdd" in warning and "cannot tell" in warning

    def find(r: FsRecord) -> tuple[str, ExtState] | str:
        return filesystems.find_on_disks(r, dev_dir=dev, sys_root=sys_root)

    assert filesystems.differences(records, find) == []
    for changed in (ExtState(vdb.uuid, 4, 2000, True, True), ExtState(vdb.uuid, 3, 1000, False, True)):
        (dev / "vdb").write_bytes(extsuper.build(changed))
        (msg,) = filesystems.differences(records, find)
        assert msg.startswith(f"ext4 /mnt on /dev/vdb, UUID {vdb.uuid} changed since hibernate"), msg
    # the same filesystem under another name: found by its UUID, unchanged
    (dev / "vdb").write_bytes(bytes(extsuper.READ_BYTES))
    (dev / "vdc").write_bytes(extsuper.build(vdb))
    assert filesystems.differences(records, find) == []
    (dev / "vdc").write_bytes(bytes(extsuper.READ_BYTES))
    (msg,) = filesystems.differences(records, find)
    assert "cannot be checked: no block device holds UUID 11111111" in msg


def test_btrfs_counts_by_its_source_device(tmp_path: Path) -> None:
    """btrfs shows an anonymous device number; a source that is no block device means no block filesystem."""
    assert filesystems.block_device_name(MountedFs("/data", "btrfs", "0:40", str(tmp_path / "nodev"))) is None
    assert filesystems.block_device_name(MountedFs("/net", "nfs4", "0:50", "srv:/x")) is None
