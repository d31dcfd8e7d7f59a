"""A file as a store target, like a swap file with ``resume_offset=``: where its bytes lie on the block device
(FS_IOC_FIEMAP), and whether the capture kernel may write them there directly.

The capture kernel has no filesystem mounted: it writes the device under the file, inside the file's extents only.
That is safe only for a file whose every byte has one fixed place on one device that nothing else shares and that
the filesystem writes in place.  ``check_extents`` (pure) refuses everything else with the reason; ``read_extents``,
``filesystem_facts`` and ``device_of`` are the I/O edge (ioctl, statfs, sysfs).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from khibernate.layout import Layout
from khibernate.store.errors import FileTargetError

FS_IOC_FIEMAP = 0xC020660B
FS_IOC_GETFLAGS = 0x80086601
FIEMAP_FLAG_SYNC = 0x1
FIEMAP = Layout("fiemap", "<", [("fm_start", "Q"), ("fm_length", "Q"), ("fm_flags", "I"),
                                ("fm_mapped_extents", "I"), ("fm_extent_count", "I"), ("fm_reserved", "I")])
FIEMAP_EXTENT = Layout("fiemap_extent", "<", [("fe_logical", "Q"), ("fe_physical", "Q"), ("fe_length", "Q"),
                                              ("fe_reserved64", "16x"), ("fe_flags", "I"), ("fe_reserved", "12x")])
assert FIEMAP.size == 32 and FIEMAP_EXTENT.size == 56

# fiemap_extent.fe_flags that make an extent unusable for raw writes, with the reason (linux/fiemap.h)
REFUSED_FLAGS = {
    0x2: "its location is not known yet (FIEMAP_EXTENT_UNKNOWN)",
    0x4: "it is still delayed allocation, not on disk (FIEMAP_EXTENT_DELALLOC)",
    0x8: "it is stored encoded/compressed (FIEMAP_EXTENT_ENCODED)",
    0x80: "it is encrypted by the filesystem (FIEMAP_EXTENT_DATA_ENCRYPTED)",
    0x100: "it is not block-aligned (FIEMAP_EXTENT_NOT_ALIGNED)",
    0x200: "it is stored inline in the metadata (FIEMAP_EXTENT_DATA_INLINE)",
    0x400: "it is packed into a shared tail block (FIEMAP_EXTENT_DATA_TAIL)",
    0x800: "it is allocated but unwritten (FIEMAP_EXTENT_UNWRITTEN): the filesystem would zero it on read",
    0x2000: "it is shared with another file (FIEMAP_EXTENT_SHARED: a reflink copy or snapshot)",
}
FIEMAP_EXTENT_LAST = 0x1

# statfs f_type of the filesystems a file target may live on: they write a file's data in place once allocated
EXT4_MAGIC = 0xEF53
XFS_MAGIC = 0x58465342
BTRFS_MAGIC = 0x9123683E
IN_PLACE_FILESYSTEMS = {EXT4_MAGIC: "ext4", XFS_MAGIC: "xfs"}
FS_COMPR_FL = 0x4
FS_ENCRYPT_FL = 0x800
FS_NOCOW_FL = 0x00800000


@dataclasses.dataclass(frozen=True, order=True)
class Extent:
    """``length`` bytes of the file from ``logical`` lie on the device from ``physical``."""

    logical: int
    physical: int
    length: int
    flags: int = 0


def parse_fiemap(data: bytes) -> tuple[list[Extent], bool]:
    """(extents, last seen) from a filled FIEMAP buffer (header + fm_mapped_extents records)."""
    head = FIEMAP.unpack(data, 0, what="fiemap header")
    out = []
    last = False
    for i in range(head["fm_mapped_extents"]):
        e = FIEMAP_EXTENT.unpack(data, FIEMAP.size + i * FIEMAP_EXTENT.size, what="fiemap extent")
        out.append(Extent(e["fe_logical"], e["fe_physical"], e["fe_length"], e["fe_flags"]))
        last = last or bool(e["fe_flags"] & FIEMAP_EXTENT_LAST)
    return out, last


def read_extents(fd: int, batch: int = 256) -> list[Extent]:
    """Every extent of the open file (FIEMAP with FIEMAP_FLAG_SYNC, in batches); FileTargetError when the
    filesystem has no FIEMAP."""
    out: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(FIEMAP.pack(fm_start=start, fm_length=(1 << 64) - 1 - start, fm_flags=FIEMAP_FLAG_SYNC,
                                    fm_extent_count=batch) + bytes(batch * FIEMAP_EXTENT.size))
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as e:
            raise FileTargetError(f"the filesystem cannot say where the file lies (FIEMAP: {e.strerror}): a file "
                                  "target needs ext4 or xfs; use a partition instead") from None
        got, last = parse_fiemap(bytes(buf))
        out.extend(got)
        if last or not got:
            return out
        start = got[-1].logical + got[-1].length


def check_extents(extents: Sequence[Extent], size: int, block: int = 4096) -> list[Extent]:
    """The file's extents merged where they continue on the device, if every byte of [0, size) is in one usable
    extent; FileTargetError naming the first problem (a hole, a refused flag, an unaligned or short map)."""
    if size <= 0 or size % block:
        raise FileTargetError(f"the file is {size} bytes, not a positive multiple of {block}")
    merged: list[Extent] = []
    pos = 0
    for e in sorted(extents):
        bad = [why for bit, why in REFUSED_FLAGS.items() if e.flags & bit]
        if bad:
            raise FileTargetError(f"the file's bytes {e.logical:#x}+{e.length:#x} cannot be written raw: {bad[0]}")
        if e.logical != pos:
            raise FileTargetError(f"the file has a hole at {pos:#x} (sparse or not fully written): write it "
                                  "completely (`khibernate target init FILE --size S` does)")
        if e.physical % block or e.length % block:
            raise FileTargetError(f"extent at {e.logical:#x} is not {block}-byte aligned on the device")
        if merged and merged[-1].physical + merged[-1].length == e.physical:
            m = merged[-1]
            merged[-1] = Extent(m.logical, m.physical, m.length + e.length)
        else:
            merged.append(Extent(e.logical, e.physical, e.length))
        pos = e.logical + e.length
    if pos < size:
        raise FileTargetError(f"only {pos} of the file's {size} bytes are allocated: write it completely")
    return [e for e in merged if e.logical < size]


@dataclasses.dataclass(frozen=True)
class FilesystemFacts:
    """What decides whether a file's data is written in place: the filesystem and the file's attributes."""

    fs_type: int
    attr_flags: int | None  # FS_IOC_GETFLAGS, None where the filesystem has none


def check_filesystem(facts: FilesystemFacts) -> str:
    """The filesystem's name when a file on it can be a target; FileTargetError with the reason otherwise."""
    flags = facts.attr_flags or 0
    if facts.fs_type == BTRFS_MAGIC:
        if not flags & FS_NOCOW_FL:
            raise FileTargetError("the file is on btrfs without nodatacow (copy-on-write moves every rewritten "
                                  "block): create it empty in a `chattr +C` directory, or use a partition")
        raise FileTargetError("the file is on btrfs, whose FIEMAP addresses are btrfs-logical, not device "
                              "offsets (several devices may lie under it): use a partition or ext4/xfs")
    name = IN_PLACE_FILESYSTEMS.get(facts.fs_type)
    if name is None:
        raise FileTargetError(f"the file is on a filesystem (type {facts.fs_type:#x}) that is not ext4 or xfs: the "
                              "capture kernel can only write a file there by device offsets on those")
    if flags & FS_COMPR_FL:
        raise FileTargetError("the file has the compression attribute (chattr +c): `chattr -c` it or use another")
    if flags & FS_ENCRYPT_FL:
        raise FileTargetError("the file is encrypted by the filesystem (fscrypt): its blocks on disk are "
                              "ciphertext; use an unencrypted directory or a partition")
    return name


def filesystem_facts(fd: int) -> FilesystemFacts:
    """statfs f_type and FS_IOC_GETFLAGS of the open file."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is the first long on x86-64
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise FileTargetError(f"fstatfs failed: {os.strerror(err)}")
    fs_type = int.from_bytes(buf.raw[:8], "little")
    flags = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        attr: int | None = int.from_bytes(flags[:4], "little")
    except OSError:
        attr = None
    return FilesystemFacts(fs_type, attr)


def device_of(path: str, sys_root: str = "/sys") -> str:
    """The block device node whose offsets FIEMAP reports for ``path`` (``/dev/NAME``); FileTargetError
    when it is device-mapper or md (LVM, dm-crypt, RAID: the capture kernel would have to rebuild the mapping)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FileTargetError(f"{path} is not a regular file")
    maj, mi = os.major(st.st_dev), os.minor(st.st_dev)
    node = Path(sys_root) / "dev" / "block" / f"{maj}:{mi}"
    if not node.exists():
        raise FileTargetError(f"{path} is on device {maj}:{mi}, which is no block device (a network, FUSE or "
                              "memory filesystem): a file target must be on a local disk")
    if (node / "dm").exists() or (node / "md").exists():
        raise FileTargetError(f"{path} is on a device-mapper or md device ({maj}:{mi}: LVM, dm-crypt, RAID): the "
                              "capture kernel cannot write through that mapping; use a plain partition")
    for line in (node / "uevent").read_text().splitlines():
        if line.startswith("DEVNAME="):
            dev = "/dev/" + line.removeprefix("DEVNAME=")
            if os.path.exists(dev):
                return dev
    raise FileTargetError(f"{path} is on block device {maj}:{mi}, which has no node in /dev")
