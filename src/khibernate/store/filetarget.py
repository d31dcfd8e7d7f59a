"""`target init FILE --size S`: a store in a regular file on ext4/xfs, with its extent map (I/O edge).

read (filesystem, the file) -> check (fiemap.check_filesystem) -> write the whole file (no unwritten or delayed
extents remain) -> map (FIEMAP, fiemap.check_extents) -> store superblock + extent map into the file -> verify:
the map is read again and must be unchanged, and the device read raw at the map's offsets (O_DIRECT) must hold what
the file holds there.  `check_unmoved` is what hibernate and resume call before trusting the map.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from khibernate.store import api, device, extentmap, fiemap
from khibernate.store.errors import FileTargetError, StoreError
from khibernate.store.extentmap import MAP_OFFSET, ExtentMap
from khibernate.store.handle import RawWindow
from khibernate.store.superblock import Superblock

ZERO_CHUNK = 8 << 20


def device_bytes(device: str) -> int:
    """Size of a block device node in bytes."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _fill(fd: int, size: int) -> None:
    """Write every byte of the file (zeros) and fsync: real, written extents, never unwritten or delayed ones."""
    zeros = bytes(ZERO_CHUNK)
    pos = 0
    while pos < size:
        n = os.pwrite(fd, zeros[:min(ZERO_CHUNK, size - pos)], pos)
        pos += n
    os.fsync(fd)


def read_raw(device: str, offset: int, length: int) -> bytes:
    """``length`` bytes of the device at ``offset`` read with O_DIRECT (the disk, not a page cache)."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
        try:
            n = os.preadv(fd, [buf], offset)
            return bytes(buf[:n])
        finally:
            buf.close()
    finally:
        os.close(fd)


def init_file(path: str, size: int, nr_slots: int = 2, force: bool = False) -> tuple[Superblock, ExtentMap]:
    """Create the store file ``path`` of ``size`` bytes; FileTargetError (nothing left behind) when the file
    cannot be written by device offsets."""
    p = Path(path)
    if size % (1 << 20) or size <= 0:
        raise FileTargetError(f"--size must be a positive multiple of 1 MiB (got {size})")
    if not p.parent.is_dir():
        raise FileTargetError(f"{p.parent} does not exist: create it first (mkdir -p {p.parent}); nothing was "
                              "written")
    if p.exists() and not force:
        raise FileTargetError(f"{path} exists: `target init FILE --size S --force` replaces it (its images are lost)")
    if p.exists() and not p.is_file():
        raise FileTargetError(f"{path} exists and is not a regular file")
    p.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            fiemap.check_filesystem(fiemap.filesystem_facts(fd))
            device = fiemap.device_of(path)
            _fill(fd, size)
            extents = fiemap.check_extents(fiemap.read_extents(fd), size)
        finally:
            os.close(fd)
        sb = api.init(path, nr_slots, force=True)
        m = ExtentMap(sb.uuid, size, device_bytes(device), tuple(extents))
        m.check_fits()
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, m.pack(), MAP_OFFSET)
            os.fsync(fd)
        finally:
            os.close(fd)
        check_unmoved(path)
        return sb, m
    except BaseException:
        p.unlink(missing_ok=True)
        raise


def read_map(path: str) -> ExtentMap:
    """The extent map kept in the store file (through the filesystem)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return extentmap.parse(os.pread(fd, extentmap.MAP_BYTES_MAX, MAP_OFFSET))
    finally:
        os.close(fd)


def check_unmoved(path: str) -> ExtentMap:
    """The recorded map, after proving it true: FIEMAP now equals it, and the device read raw at the file's first
    piece holds the file's superblock and map byte for byte (the file's cached blocks dropped first: the resume
    writes its superblock through the device under a read-only mount, RawWindow, so the cache can be stale).
    FileTargetError otherwise."""
    m = read_map(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fiemap.check_filesystem(fiemap.filesystem_facts(fd))
        now = fiemap.check_extents(fiemap.read_extents(fd), m.file_bytes)
        device.drop_cache(fd)
        head = os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)
    extentmap.same_place(m, now)
    raw = read_raw(fiemap.device_of(path), m.resume_offset, 1 << 20)
    if raw != head:
        raise FileTargetError(f"the device under {path} does not hold the file's first MiB at offset "
                              f"{m.resume_offset:#x}: the extent map is not true here; recreate the file")
    if api.read(path).uuid != m.store_uuid:
        raise StoreError(f"{path}'s extent map belongs to another store: recreate it with `target init --force`")
    return m


def raw_window(target: str) -> RawWindow | None:
    """For a store file on a read-only mounted filesystem (the root in the initramfs, mounted without journal
    replay): where its superblock copies lie on the device under it, after proving the extent map (check_unmoved),
    so the resume can mark its image tried there.  None for a device, or a file that can be written as a file."""
    import stat

    if not stat.S_ISREG(os.stat(target).st_mode) or not os.statvfs(target).f_flag & os.ST_RDONLY:
        return None
    m = check_unmoved(target)
    return RawWindow(fiemap.device_of(target), m.resume_offset)
