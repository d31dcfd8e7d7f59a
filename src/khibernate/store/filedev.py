"""A file target seen from a kernel that mounts nothing (the capture and restore kernels): the store file's bytes
as one block device, built by device-mapper from the extent map the file keeps (``linear`` targets only, so the
kernel itself confines every write to the file's extents).

``TargetMap`` (pure) is what the first kernel passes on the capture kernel's command line —
``khibernate.target_map=MAJ:MIN:OFFSET``: the disk under the filesystem and the device offset of the file's first
byte, like swsusp's ``resume=`` + ``resume_offset=``.  ``attach`` (I/O edge) reads the map there and creates
``/dev/mapper/NAME``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess

from khibernate.store import extentmap
from khibernate.store.errors import FileTargetError
from khibernate.store.extentmap import MAP_OFFSET, ExtentMap

_SPEC = re.compile(r"(\d+):(\d+):(\d+)")


@dataclasses.dataclass(frozen=True)
class TargetMap:
    """Where a kernel without the filesystem finds a store file: device MAJ:MIN, the file's first byte's offset."""

    major: int
    minor: int
    offset: int

    def spec(self) -> str:
        return f"{self.major}:{self.minor}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> TargetMap:
        m = _SPEC.fullmatch(text.strip())
        if m is None:
            raise FileTargetError(f"khibernate.target_map={text!r} is not MAJ:MIN:OFFSET")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def read_map(device: str, offset: int) -> ExtentMap:
    """The extent map of the store file whose first byte is at ``offset`` of ``device`` (read raw)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        m = extentmap.parse(os.pread(fd, extentmap.MAP_BYTES_MAX, offset + MAP_OFFSET))
    finally:
        os.close(fd)
    if m.resume_offset != offset:
        raise FileTargetError(f"the extent map at {device} offset {offset:#x} says the file starts at "
                              f"{m.resume_offset:#x}: another store file, or a stale khibernate.target_map")
    return m


def attach(tm: TargetMap, name: str, dev_dir: str = "/dev") -> str:
    """Create ``/dev/mapper/NAME`` over the store file's extents (dmsetup); returns its path."""
    node = os.path.join(dev_dir, f"khibernate-disk-{tm.major}-{tm.minor}")
    if not os.path.exists(node):
        os.mknod(node, 0o600 | 0o060000, os.makedev(tm.major, tm.minor))
    m = read_map(node, tm.offset)
    # that kernel runs no udev: dmsetup neither waits for it (--noudevsync) nor leaves the node to it (mknodes)
    r = subprocess.run(["dmsetup", "create", "--noudevsync", name], input=m.dm_table(node), capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise FileTargetError(f"dmsetup create {name} failed ({r.stderr.strip()[-300:]}): the capture kernel "
                              "needs device-mapper (CONFIG_BLK_DEV_DM or dm_mod) to write a file target")
    path = os.path.join(dev_dir, "mapper", name)
    r = subprocess.run(["dmsetup", "mknodes", name], capture_output=True, text=True,
                       env={**os.environ, "DM_DEV_DIR": dev_dir})
    if r.returncode != 0 or not os.path.exists(path):
        raise FileTargetError(f"dmsetup mknodes {name} made no {path} ({r.stderr.strip()[-300:]}): the store "
                              "file's device-mapper device has no node to write through")
    return path


MAPPER_NAME = "khibernate-store"


def for_capture(target: str) -> tuple[str, str]:
    """(what the capture or restore kernel opens, ``target_map``): a device by its kernel name (that kernel has no
    udev, so no /dev/disk/by-* links; the job checks the store's UUID there) with no map; a store file as
    ``/dev/mapper/khibernate-store`` over its disk, after proving that the recorded map is still true."""
    import stat as stat_mod

    if not stat_mod.S_ISREG(os.stat(target).st_mode):
        return os.path.realpath(target), ""
    from khibernate.store import fiemap, filetarget

    m = filetarget.check_unmoved(target)
    rdev = os.stat(fiemap.device_of(target)).st_rdev
    return f"/dev/mapper/{MAPPER_NAME}", TargetMap(os.major(rdev), os.minor(rdev), m.resume_offset).spec()
