"""What the disks were at hibernate time, and whether they are still that at resume.

A resume writes back a kernel whose page cache, inode and block-allocation state describe its filesystems as they
were when it hibernated.  If any boot mounted one of them read-write in between — a normal boot whose initramfs
lacks the resume hook, another kernel, a rescue system — the resumed kernel writes its stale view over the other
boot's work (lost files, reused inodes, a corrupt block bitmap).  swsusp cannot tell; khibernate records, at
hibernate time, every filesystem mounted read-write on a block device, and ``resume`` refuses when one changed.

Claimed: ext2/ext3/ext4 — identity (UUID) plus the mount count, last mount time and journal-in-use flag, which no
running kernel changes while the filesystem stays mounted and every read-write mount changes
(:mod:`khibernate.restore.extsuper`).  Not claimed: xfs, btrfs and every other type.  xfs has no mount counter (its
log and ``sb_lsn`` move while mounted, log covering every 30 s even when idle) and btrfs's ``generation`` moves with
every transaction commit, so no value read before the freeze is sure to be the one on disk at the jump; they are
recorded by type and device only, a warning says so at hibernate and at resume, and only the tried-once rule
protects them.  Network and FUSE filesystems and swap are not recorded.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from khibernate.errors import KhibernateError
from khibernate.restore import extsuper
from khibernate.restore.extsuper import ExtState, NotExtError

CLAIMED = ("ext2", "ext3", "ext4")


@dataclasses.dataclass(frozen=True)
class MountedFs:
    """One filesystem mounted read-write on a block device, as mountinfo shows it."""

    mount: str
    fstype: str
    devno: str  # "major:minor" of the block device
    source: str


@dataclasses.dataclass(frozen=True)
class FsRecord:
    """A filesystem at hibernate time: where it was, and (claimed types) its on-disk state then."""

    mount: str
    fstype: str
    device: str  # kernel name under /dev ("vdb", "sda2", "dm-1")
    state: ExtState | None = None  # None: a type whose changes khibernate cannot see

    def name(self) -> str:
        uuid = f", UUID {self.state.uuid}" if self.state else ""
        return f"{self.fstype} {self.mount} on /dev/{self.device}{uuid}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mount": self.mount, "fstype": self.fstype, "device": self.device}
        if self.state is not None:
            out["state"] = dataclasses.asdict(self.state)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FsRecord:
        st = d.get("state")
        return cls(mount=str(d["mount"]), fstype=str(d["fstype"]), device=str(d["device"]),
                   state=ExtState(**st) if isinstance(st, dict) else None)


def records_from_json(value: Any) -> tuple[FsRecord, ...] | None:
    """The records an image's note carries; None when it carries none (saved before they were recorded)."""
    if not isinstance(value, list):
        return None
    try:
        return tuple(FsRecord.from_json(d) for d in value)
    except (KeyError, TypeError):
        return None


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (\\040 for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountedFs]:
    """The read-write filesystems of /proc/self/mountinfo, one per superblock (bind mounts dropped), in order."""
    out: list[MountedFs] = []
    seen: set[tuple[str, str]] = set()
    for line in text.splitlines():
        f = line.split()
        if len(f) < 10 or "-" not in f[6:]:
            continue
        sep = f.index("-", 6)
        fstype, source, superopts = f[sep + 1], _unescape(f[sep + 2]), f[sep + 3] if len(f) > sep + 3 else ""
        if superopts.split(",")[0] != "rw" or (f[2], source) in seen:
            continue
        seen.add((f[2], source))
        out.append(MountedFs(mount=_unescape(f[4]), fstype=fstype, devno=f[2], source=source))
    return out


def block_device_name(fs: MountedFs, sys_root: Path = Path("/")) -> str | None:
    """The kernel name of the block device a filesystem lives on, None if it lives on none (tmpfs, nfs, fuse).
    btrfs shows an anonymous device number in mountinfo: its source path's device counts then."""
    devno = fs.devno
    if devno.startswith("0:"):
        try:
            st = os.stat(fs.source)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    link = sys_root / "sys/dev/block" / devno
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def read_state(path: str) -> ExtState:
    """The ext state on a device (NotExtError / OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return extsuper.parse(os.pread(fd, extsuper.READ_BYTES, 0))
    finally:
        os.close(fd)


def record(mountinfo: str, dev_dir: Path = Path("/dev"), sys_root: Path = Path("/")) -> list[FsRecord]:
    """Every read-write block filesystem now, with the on-disk state of the claimed types (hibernate time);
    KhibernateError when a claimed one cannot be read."""
    out = []
    for fs in parse_mountinfo(mountinfo):
        name = block_device_name(fs, sys_root)
        if name is None:
            continue
        state = None
        if fs.fstype in CLAIMED:
            try:
                state = read_state(str(dev_dir / name))
            except (OSError, NotExtError) as e:
                raise KhibernateError(f"cannot read the superblock of {fs.fstype} {fs.mount} on /dev/{name} ({e}): "
                                      "its state at hibernate time would be unknown, not hibernating") from None
        out.append(FsRecord(fs.mount, fs.fstype, name, state))
    return out


def unchecked(records: Iterable[FsRecord]) -> list[str]:
    """One warning per recorded filesystem whose changes cannot be seen."""
    return [f"{r.name()} is mounted read-write, and khibernate cannot tell at resume whether another boot mounted "
            f"it in between ({r.fstype} has no mount counter): only the tried-once rule protects it — do not boot "
            "another system that mounts it before the resume" for r in records if r.state is None]


Finder = Callable[[FsRecord], tuple[str, ExtState] | str]


def differences(records: Sequence[FsRecord], find: Finder) -> list[str]:
    """Every claimed filesystem that is missing or was mounted since it was recorded, named, in words a user can act
    on; ``find(record)`` gives (device path, its state now) or why it was not found."""
    out = []
    for r in records:
        if r.state is None:
            continue
        found = find(r)
        if isinstance(found, str):
            out.append(f"{r.name()} cannot be checked: {found} (make it available in the initramfs, or unmount it "
                       "before hibernating)")
            continue
        path, now = found
        if (now.mount_count, now.mount_time, now.needs_recovery) != (r.state.mount_count, r.state.mount_time,
                                                                      r.state.needs_recovery):
            out.append(f"{r.name()} changed since hibernate (then: {r.state.describe()}; now on {path}: "
                       f"{now.describe()}): another boot mounted it, replayed its journal or checked it, and may have "
                       "written it — resuming would write the hibernated kernel's stale view over that")
    return out


def candidate_devices(sys_root: Path = Path("/")) -> list[str]:
    """Block devices worth probing for a filesystem: not empty, no floppy or optical drive."""
    out = []
    for d in sorted((sys_root / "sys/class/block").glob("*")):
        if d.name.startswith(("fd", "sr", "ram", "zram")):
            continue
        try:
            if int((d / "size").read_text()) == 0:
                continue
        except (OSError, ValueError):
            continue
        out.append(d.name)
    return out


def find_on_disks(r: FsRecord, dev_dir: Path = Path("/dev"), sys_root: Path = Path("/")) -> tuple[str, ExtState] | str:
    """The device that holds ``r``'s filesystem now (its recorded name first, then every block device by UUID)."""
    assert r.state is not None
    names = [r.device] + [n for n in candidate_devices(sys_root) if n != r.device]
    for name in names:
        path = str(dev_dir / name)
        try:
            now = read_state(path)
        except (OSError, NotExtError, KhibernateError):
            continue
        if now.uuid == r.state.uuid:
            return path, now
    return f"no block device holds UUID {r.state.uuid} now"
