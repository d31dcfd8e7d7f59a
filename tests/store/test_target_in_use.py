"""A device in use is never a target (issue 18): mounted partitions of a whole disk, mounted devices, files open for
writing elsewhere or backing a loop device, and foreign signatures unless --force.

Files prove what they can for any user; loop devices (root) prove the block-device rules: a partitioned loop device
(sfdisk, losetup -P, mkfs.ext4, mount) is the issue's reproduction, where `target init /dev/vda` succeeded while
/dev/vda1 was mounted and the first image destroyed its filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.store import api, usage
from khibernate.store.errors import DeviceInUseError, ForeignDataError
from tests.tiers import unavailable

MiB = 1 << 20


def blank(tmp_path: Path, name: str = "disk.img", size: int = 64 * MiB) -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return str(p)


def tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/sbin/{name}", f"/usr/sbin/{name}") if os.path.exists(p)), None)
    if found is None:
        unavailable(f"{name} is missing (scripts/setup.sh installs it)")
    return found


def init(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["target", "init", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


# ------------------------------------------------------------------------------------------------ files


def test_file_open_for_writing_elsewhere_is_refused_naming_the_process(tmp_path: Path) -> None:
    dev = blank(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'r+b'); "
                               "print('open', flush=True); time.sleep(60)", dev], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        code, out = init(dev)
        assert code == 1 and "open for writing elsewhere" in out and f"pid {holder.pid}" in out, out
        with pytest.raises(DeviceInUseError):
            api.init(dev, force=True)  # --force does not make a file in use a target
    finally:
        holder.kill()
        holder.wait()
    assert init(dev)[0] == 0  # nothing writes it any more
    assert api.read(dev).generation == 1


def test_foreign_signature_is_refused_unless_forced_and_then_erased(tmp_path: Path) -> None:
    """A file holding an ext4 filesystem or a swap area: refused, naming it; --force erases it so that blkid no
    longer sees it (udev, mdadm or a mount would otherwise still take the store for a filesystem)."""
    for what, cmd in (("a filesystem of type ext4 (LABEL=precious", [tool("mkfs.ext4"), "-q", "-F", "-L", "precious"]),
                      ("a swap area", [tool("mkswap")])):
        dev = blank(tmp_path, f"{what[:8]}.img")
        subprocess.run([*cmd, dev], check=True, capture_output=True)
        code, out = init(dev)
        assert code == 1 and what in out and "--force" in out, out
        assert usage.signatures(dev)  # nothing was written
        code, out = init(dev, "--force")
        assert code == 0, out
        assert usage.signatures(dev) == [] and api.read(dev).generation == 1


def test_a_store_is_not_foreign(tmp_path: Path) -> None:
    dev = blank(tmp_path)
    api.init(dev)
    assert usage.signatures(dev) == []
    code, out = init(dev)
    assert code == 1 and "already holds store" in out and "--force" in out
    assert init(dev, "--force")[0] == 0


def test_describe_holder_names_lvm_crypt_and_md(tmp_path: Path) -> None:
    for name, dm_name, uuid, said in (("dm-0", "vg-root", "LVM-abc", "LVM logical volume vg-root (dm-0)"),
                                      ("dm-1", "luks-1234", "CRYPT-LUKS2-1234-luks", "dm-crypt mapping luks-1234"),
                                      ("md127", None, None, "md RAID array md127")):
        d = tmp_path / name
        (d / "dm").mkdir(parents=True)
        if dm_name:
            (d / "dm" / "name").write_text(dm_name + "\n")
            (d / "dm" / "uuid").write_text(uuid + "\n")
        assert said in usage.describe_holder(d)


def test_parsers() -> None:
    mi = ("36 35 7:1 / /mnt/with\\040space rw,relatime shared:1 - ext4 /dev/loop0p1 rw\n"
          "40 35 0:52 / /srv rw - btrfs /dev/vdb rw\n")
    m = usage.parse_mountinfo(mi)
    assert m[0].dev == (7, 1) and m[0].mountpoint == "/mnt/with space" and m[0].fstype == "ext4"
    assert m[1].source == "/dev/vdb"
    assert usage.parse_swaps("Filename Type Size Used Priority\n/dev/vdc partition 1 0 -2\n") == ["/dev/vdc"]
    assert usage.describe_signature({"TYPE": "LVM2_member", "USAGE": "raid"}) == "a RAID/LVM member of type LVM2_member"
    assert usage.describe_signature({"TYPE": "crypto_LUKS", "USAGE": "crypto"}) == \
        "an encrypted volume of type crypto_LUKS"
    assert usage.describe_signature({"PTTYPE": "gpt", "PTUUID": "x"}) == "a partition table of type gpt (PTUUID=x)"


# ------------------------------------------------------------------------------------------------ loop devices


def _root() -> None:
    if os.geteuid() != 0:
        unavailable("loop devices need root")


@contextlib.contextmanager
def loop(image: str, *, partitions: bool = False) -> Iterator[str]:
    """``losetup -f`` on ``image`` (with its partitions when asked) for the body; always detached."""
    args = [tool("losetup"), "-f", "--show"] + (["-P"] if partitions else []) + [image]
    dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    try:
        if partitions and not os.path.exists(dev + "p1"):  # a kernel without the table's parser: add it by hand
            subprocess.run([tool("partx"), "-a", dev], check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while partitions and not os.path.exists(dev + "p1"):
            assert time.monotonic() < deadline, f"{dev}p1 did not appear"
            time.sleep(0.05)
        yield dev
    finally:
        subprocess.run([tool("losetup"), "-d", dev], check=False, capture_output=True)


@contextlib.contextmanager
def mounted(dev: str, where: Path) -> Iterator[None]:
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", dev, str(where)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


def test_whole_disk_with_a_mounted_partition_is_refused(tmp_path: Path) -> None:
    """Issue 18's reproduction on a partitioned loop device: `target init DISK` while DISKp1 is mounted is
    refused naming the partition and its mount point, --force or not; the filesystem is untouched."""
    _root()
    img = blank(tmp_path)
    subprocess.run([tool("sfdisk"), "-q", img], input="start=2048, size=40M, type=83\n", check=True,
                   capture_output=True, text=True)
    with loop(img, partitions=True) as disk:
        part = disk + "p1"
        subprocess.run([tool("mkfs.ext4"), "-q", part], check=True, capture_output=True)
        with mounted(part, tmp_path / "mnt"):
            (tmp_path / "mnt" / "data").write_bytes(b"precious" * 1000)
            for target in (disk, part):
                for force in ([], ["--force"]):
                    code, out = init(target, *force)
                    name = os.path.basename(part)
                    assert code == 1 and f"{name} is mounted on {tmp_path / 'mnt'}" in out, (target, force, out)
        fsck = subprocess.run([tool("e2fsck"), "-fn", part], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        # unmounted: the partition table and the filesystem are foreign signatures, refused without --force
        code, out = init(disk)
        assert code == 1 and "a partition table of type dos" in out, out
        code, out = init(part)
        assert code == 1 and "a filesystem of type ext4" in out, out


def test_mounted_device_is_refused_and_a_slot_write_too(tmp_path: Path) -> None:
    """A store whose device got mounted meanwhile (here: a filesystem made over it) is never written: every
    writer (snapshot's reservation, drop, the capture kernel's job) opens the device O_EXCL."""
    _root()
    img = blank(tmp_path)
    with loop(img) as dev:
        api.init(dev)
        with mounted_over(dev, tmp_path / "mnt"):
            code, out = init(dev, "--force")
            assert code == 1 and "is mounted on" in out, out
            with pytest.raises(DeviceInUseError, match="is mounted on"):
                api.drop(dev, 0)


@contextlib.contextmanager
def mounted_over(dev: str, where: Path) -> Iterator[None]:
    """An ext4 made over the store on ``dev`` and mounted, for the body."""
    subprocess.run([tool("mkfs.ext4"), "-q", "-F", dev], check=True, capture_output=True)
    with mounted(dev, where):
        yield


def test_file_backing_a_loop_device_is_refused(tmp_path: Path) -> None:
    _root()
    img = blank(tmp_path)
    with loop(img) as dev:
        code, out = init(img)
        assert code == 1 and f"loop device {dev} is backed by it" in out, out
    assert init(img)[0] == 0


def test_ext4_on_a_whole_device_is_refused_unless_forced(tmp_path: Path) -> None:
    _root()
    img = blank(tmp_path)
    with loop(img) as dev:
        subprocess.run([tool("mkfs.ext4"), "-q", "-L", "home", dev], check=True, capture_output=True)
        code, out = init(dev)
        assert code == 1 and "a filesystem of type ext4 (LABEL=home" in out, out
        with pytest.raises(ForeignDataError):
            api.init(dev)
        assert init(dev, "--force")[0] == 0
        assert usage.signatures(dev) == [] and api.read(dev).generation == 1

