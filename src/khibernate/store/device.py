"""The store's I/O edge: superblock copies, slot regions, fsync and page-cache dropping on a device or file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import zlib
from collections.abc import Iterator

from khibernate.store import usage
from khibernate.store.errors import DeviceInUseError, SlotFullError, StoreError
from khibernate.store.superblock import BLOCK, COPY_OFFSETS, Superblock, copy_to_write, newest

BLKFLSBUF = 0x1261
BLKROGET = 0x125E  # int: 1 when the block device is read-only (blockdev --setro, a write-protected disk)
CHUNK = 1 << 20


def target_mode(path: str) -> int:
    """The target's st_mode; StoreError when it is missing or neither a block device nor a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreError(f"target {path} does not exist: give the partition or disk (e.g. /dev/vdb)") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise StoreError(f"target {path} is neither a block device nor a regular file")
    return st.st_mode


def open_device(path: str, write: bool = False) -> int:
    """An fd on the target; StoreError saying what to do when it is missing, read-only or not a device/file.

    For writing, a block device is opened O_EXCL and refused when anything uses it or one of its partitions
    (mount, swap, LVM/md/dm-crypt holder): DeviceInUseError naming the user.  A regular file is refused when
    something else has it open for writing (another program, a loop device backed by it), as far as a read lease
    can tell; the caller's own other descriptors count too, so open one writer at a time."""
    mode = target_mode(path)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
    if write and stat.S_ISBLK(mode):
        check_unused(path)
        flags |= os.O_EXCL
    elif write:
        check_no_other_writer(path)
    try:
        return os.open(path, flags)
    except OSError as e:
        if write and e.errno == errno.EBUSY:
            raise DeviceInUseError(f"target {path} is in use: " + "; ".join(
                usage.users(path) or ["a program holds it open exclusively (a mount, swap, LVM, md, dm-crypt, or "
                                      "another khibernate writer)"]) + "; a store needs a device nothing else uses") \
                from None
        if write and e.errno == errno.ETXTBSY:
            raise DeviceInUseError(f"target {path} is an active swap file; a store needs a file nothing else uses") \
                from None
        hint = " (is it read-only? run as root)" if e.errno in (13, 30) else ""
        raise StoreError(f"cannot open target {path} for {'writing' if write else 'reading'}: {e.strerror}{hint}") \
            from None


def check_unused(path: str) -> None:
    """DeviceInUseError naming every user of the block device ``path`` or of one of its partitions (a whole disk
    whose partition is mounted is as busy as the partition)."""
    found = usage.users(path)
    if found:
        raise DeviceInUseError(f"target {path} is in use: {'; '.join(found)}; a store needs a device nothing else "
                               "uses (unmount it, swapoff, or remove the LVM/md/dm-crypt volume first)")


def check_no_other_writer(path: str) -> None:
    """DeviceInUseError when the regular file ``path`` is open for writing elsewhere (read lease refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # cannot look (a file this user may write but not read): the open for writing says the rest
    try:
        busy = usage.open_for_writing(fd)
    finally:
        os.close(fd)
    if busy:
        who = usage.file_writers(path) or ["another program (not visible to this user)"]
        raise DeviceInUseError(f"target {path} is open for writing elsewhere: {'; '.join(who)}; a store needs a "
                               "file nothing else writes")


def check_writable(path: str) -> None:
    """StoreError unless writes to the target can succeed: a read-only block device opens for writing as root and
    fails only at the first write (EPERM), a file on a read-only mount the same way, so ask before anything is done.
    Also refuses a target in use (open_device for writing)."""
    fd = open_device(path, write=False)
    try:
        check_read_only(fd, path)
    finally:
        os.close(fd)
    os.close(open_device(path, write=True))


def open_window(device_path: str) -> int:
    """An fd for writing on the device under a store file whose filesystem is mounted read-only (the resume in the
    initramfs: the root mounted without journal replay), for the file's superblock copies only, which lie in the
    file's first MiB, one piece on the device (its extent map proven first: filetarget.raw_window).  Not O_EXCL:
    the filesystem holds the device; the writes stay inside the file's own blocks."""
    fd = os.open(device_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        check_read_only(fd, device_path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_read_only(fd: int, path: str) -> None:
    """StoreError when the target open at ``fd`` is a read-only block device or lies on a read-only filesystem."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        ro = bytearray(4)
        fcntl.ioctl(fd, BLKROGET, ro)
        if int.from_bytes(ro, "little"):
            raise StoreError(f"target {path} is read-only (write-protected, or `blockdev --setro`); make it "
                             f"writable (`blockdev --setrw {path}`) or give another target")
    elif os.fstatvfs(fd).f_flag & os.ST_RDONLY:
        raise StoreError(f"target {path} lies on a read-only filesystem; remount it read-write or give another "
                         "target")


def size(fd: int) -> int:
    """Size of the device or file in bytes."""
    return os.lseek(fd, 0, os.SEEK_END)


def drop_cache(fd: int) -> None:
    """Write back and forget this kernel's cached blocks of fd, so the next read sees what the other kernel wrote."""
    with contextlib.suppress(OSError):
        os.fsync(fd)
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BLKFLSBUF)
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_superblock(fd: int, base: int = 0) -> Superblock:
    """The newest valid superblock copy (cache dropped first); ``base``: where the store begins in ``fd`` (a store
    file's first byte on the device under it, see open_window)."""
    drop_cache(fd)
    return newest([os.pread(fd, BLOCK, base + off) for off in COPY_OFFSETS])


def write_superblock(fd: int, current: Superblock, new: Superblock, base: int = 0) -> Superblock:
    """Write ``new`` into the copy not holding ``current`` and fsync; returns it as read back."""
    idx = copy_to_write(current)
    data = new.pack(idx)
    if os.pwrite(fd, data, base + COPY_OFFSETS[idx]) != len(data):
        raise StoreError("short write of the superblock; the device may be failing")
    os.fsync(fd)
    return Superblock.unpack(data)


def write_both(fd: int, sb: Superblock) -> None:
    """Write ``sb`` to both copies (store creation only) and fsync."""
    for idx, off in enumerate(COPY_OFFSETS):
        os.pwrite(fd, sb.pack(idx), off)
    os.fsync(fd)


ERASE = 1 << 20  # signatures live in a device's first and last MiB (md 0.90/1.0 and the GPT backup at the end)


def erase_signatures(fd: int) -> None:
    """Zero the first and last MiB of the target (store creation only, before write_both): no filesystem, RAID,
    LVM, LUKS or partition-table signature survives for blkid, udev or mdadm to act on, as wipefs would do."""
    end = size(fd)
    zeros = bytes(min(ERASE, end))
    for off in sorted({0, max(0, end - ERASE)}):
        os.pwrite(fd, zeros[:min(ERASE, end - off)], off)
    os.fsync(fd)


class RegionWriter:
    """A write-only file object over [offset, offset + capacity) of fd that counts bytes and their CRC32.

    A write past the end raises SlotFullError (nothing beyond the slot is touched); ``sync()`` fsyncs.  With
    ``sync_every`` the written bytes are fsynced and dropped from the page cache every that many bytes, so a
    kernel with little RAM never holds much of the image in its cache.
    """

    def __init__(self, fd: int, offset: int, capacity: int, sync_every: int = 0):
        self.fd, self.offset, self.capacity = fd, offset, capacity
        self.length = 0
        self.crc32 = 0
        self.sync_every = sync_every
        self._synced = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append data at the current position; SlotFullError if it would leave the region."""
        view = memoryview(data).cast("B")
        n = len(view)
        if self.length + n > self.capacity:
            raise SlotFullError(f"the image outgrew its slot ({self.capacity / 2**20:.0f} MiB): use a bigger target "
                                "or a higher dump level")
        done = 0
        while done < n:
            done += os.pwrite(self.fd, view[done:], self.offset + self.length + done)
        self.crc32 = zlib.crc32(view, self.crc32)
        self.length += n
        if self.sync_every and self.length - self._synced >= self.sync_every:
            self.sync()
        return n

    def flush(self) -> None:
        """Nothing is buffered here."""

    def sync(self) -> None:
        """fsync: every byte written so far is on the device (and no longer in this kernel's cache)."""
        os.fsync(self.fd)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, self.offset + self._synced, self.length - self._synced,
                             os.POSIX_FADV_DONTNEED)
        self._synced = self.length

    def tell(self) -> int:
        return self.length


def read_region(fd: int, offset: int, length: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of [offset, offset + length) in chunks; StoreError if the device ends early."""
    pos = 0
    while pos < length:
        data = os.pread(fd, min(chunk, length - pos), offset + pos)
        if not data:
            raise StoreError(f"the target ends at {offset + pos:#x}, inside a slot; it was truncated")
        yield data
        pos += len(data)
