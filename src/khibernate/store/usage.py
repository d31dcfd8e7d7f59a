"""Is a target in use, and what is on it: mounts, swap, holders (LVM, md, dm-crypt) and partitions of a block device
from /proc and /sys; foreign signatures from ``blkid -p``; who has a target file open for writing.

The parsers are pure; the readers take the /proc and /sys roots so that nothing here needs the real machine to be
tested.  The kernel's own refusal (O_EXCL -> EBUSY, a lease refused) is the authority: these only name the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

DevNum = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: the device number, mount point, filesystem type and source."""

    dev: DevNum
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of /proc/self/mountinfo text."""
    out: list[Mount] = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        f, t = head.split(), tail.split()
        if not sep or len(f) < 5 or len(t) < 2 or ":" not in f[2]:
            continue
        major, _, minor = f[2].partition(":")
        if major.isdigit() and minor.isdigit():
            out.append(Mount((int(major), int(minor)), _unescape(f[4]), t[0], _unescape(t[1])))
    return out


def parse_swaps(text: str) -> list[str]:
    """The file names of /proc/swaps text (devices and files in use as swap)."""
    return [_unescape(line.split()[0]) for line in text.splitlines()[1:] if line.split()]


def parse_blkid_export(text: str) -> dict[str, str]:
    """``blkid -p -o export`` output as KEY -> value."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def describe_signature(fields: dict[str, str]) -> str:
    """What a blkid probe found, for a refusal: "a filesystem of type ext4 (LABEL=data, UUID=...)", "a swap area",
    "a RAID/LVM member of type LVM2_member", "a partition table of type dos" ..."""
    ids = ", ".join(f"{k}={fields[k]}" for k in ("LABEL", "UUID", "PTUUID") if fields.get(k))
    ids = f" ({ids})" if ids else ""
    kind = fields.get("TYPE", "")
    if kind == "swap":
        return f"a swap area{ids}"
    if kind:
        what = {"filesystem": "a filesystem", "crypto": "an encrypted volume", "raid": "a RAID/LVM member"}
        return f"{what.get(fields.get('USAGE', ''), 'a signature')} of type {kind}{ids}"
    if fields.get("PTTYPE"):
        return f"a partition table of type {fields['PTTYPE']}{ids}"
    return "a signature blkid recognises" + ids


@dataclasses.dataclass(frozen=True)
class BlockDevice:
    """A block device as the kernel names it: ``loop0``, ``loop0p1``, ``dm-0``; its number and sysfs directory."""

    name: str
    dev: DevNum
    sysdir: Path

    @property
    def is_partition(self) -> bool:
        return (self.sysdir / "partition").exists()

    def read(self, rel: str) -> str:
        """A sysfs attribute of the device, "" when absent."""
        try:
            return (self.sysdir / rel).read_text().strip()
        except OSError:
            return ""


def block_device(rdev: int, sys: str = "/sys") -> BlockDevice | None:
    """The block device with number ``rdev`` from /sys/dev/block, None without sysfs."""
    link = Path(sys) / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        real = link.resolve(strict=True)
    except OSError:
        return None
    return BlockDevice(real.name, (os.major(rdev), os.minor(rdev)), real)


def partitions(disk: BlockDevice) -> list[BlockDevice]:
    """The partitions of a whole disk (subdirectories of its sysfs directory with a ``partition`` file)."""
    out: list[BlockDevice] = []
    with contextlib.suppress(OSError):
        for d in sorted(disk.sysdir.iterdir()):
            if d.name.startswith(disk.name) and (d / "partition").exists():
                major, _, minor = (d / "dev").read_text().strip().partition(":")
                out.append(BlockDevice(d.name, (int(major), int(minor)), d))
    return out


def describe_holder(holder: Path) -> str:
    """What the holder whose sysfs directory is ``holder`` is: an LVM volume, a dm-crypt mapping, an md array."""
    name = holder.name
    dm_name, dm_uuid = _read(holder / "dm" / "name"), _read(holder / "dm" / "uuid")
    if dm_uuid.startswith("LVM-"):
        return f"LVM logical volume {dm_name} ({name})"
    if dm_uuid.startswith("CRYPT-"):
        return f"dm-crypt mapping {dm_name} ({name})"
    if dm_name:
        return f"device-mapper device {dm_name} ({name})"
    if name.startswith("md"):
        return f"md RAID array {name}"
    return name


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class System:
    """Where to read the machine's state (the real /proc and /sys by default)."""

    proc: str = "/proc"
    sys: str = "/sys"

    def text(self, rel: str) -> str:
        return _read(Path(self.proc) / rel)


def _rdev_of(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def users(path: str, system: System = System()) -> list[str]:
    """What uses the block device ``path`` or, for a whole disk, one of its partitions: mounts, swap, holders.
    Each entry names the (partition) device and its user; empty when nothing does (or it is no block device)."""
    rdev = _rdev_of(path)
    if rdev is None:
        return []
    dev = block_device(rdev, system.sys)
    if dev is None:
        return []
    parts = [dev] + ([] if dev.is_partition else partitions(dev))
    mounts = parse_mountinfo(system.text("self/mountinfo"))
    swaps = parse_swaps(system.text("swaps"))
    out: list[str] = []
    for d in parts:
        for m in mounts:
            if m.dev == d.dev or (m.source.startswith("/dev/") and _rdev_of(m.source) == os.makedev(*d.dev)):
                out.append(f"{d.name} is mounted on {m.mountpoint} ({m.fstype})")
        out += [f"{d.name} is in use as swap" for s in swaps if _rdev_of(s) == os.makedev(*d.dev)]
        with contextlib.suppress(OSError):
            out += [f"{d.name} is held by {describe_holder((d.sysdir / 'holders' / h).resolve())}"
                    for h in sorted(os.listdir(d.sysdir / "holders"))]
    return list(dict.fromkeys(out))


def canonical_node(path: str, dev: str = "/dev", system: System = System()) -> str:
    """The kernel's own node of a block device (/dev/loop0 for /dev/disk/by-id/... or a second mknod), so that
    every name of one device locks the same inode; ``path`` itself for files or when there is no such node."""
    rdev = _rdev_of(path)
    if rdev is None:
        return path
    bd = block_device(rdev, system.sys)
    if bd is None:
        return path
    devname = next((line.partition("=")[2] for line in bd.read("uevent").splitlines()
                    if line.startswith("DEVNAME=")), bd.name)
    node = os.path.join(dev, devname)
    return node if _rdev_of(node) == rdev else path


def signatures(path: str) -> list[str]:
    """Foreign signatures on ``path`` (filesystem, swap, LVM/RAID/LUKS, partition table) as ``blkid -p`` finds
    them, described; empty when there is none.  ProbeError when blkid is missing or fails."""
    from khibernate.store.errors import ProbeError

    blkid = shutil.which("blkid") or next((p for p in ("/sbin/blkid", "/usr/sbin/blkid") if os.path.exists(p)), None)
    if blkid is None:
        raise ProbeError("blkid (util-linux) is missing, so what the target holds cannot be checked: install "
                         "util-linux, or give --force to erase the target whatever it holds")
    r = subprocess.run([blkid, "-p", "-o", "export", path], capture_output=True, text=True, check=False)
    if r.returncode == 2 and not r.stderr.strip():  # nothing found (2 with a message: it could not look)
        return []
    if r.returncode == 8:
        return ["more than one signature (blkid calls it ambivalent; `wipefs " + path + "` lists them)"]
    if r.returncode != 0:
        raise ProbeError(f"blkid -p {path} failed (status {r.returncode}): {r.stderr.strip()}; give --force to "
                         "erase the target whatever it holds")
    return [describe_signature(parse_blkid_export(r.stdout))]


def open_for_writing(fd: int) -> bool | None:
    """Whether the regular file open (read-only) at ``fd`` is open for writing anywhere else - a process, a loop
    device backed by it - by asking for a read lease, which the kernel refuses exactly then; None when leases
    cannot tell (a filesystem without them, a file of another user without CAP_LEASE)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return True if e.errno == errno.EAGAIN else None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def file_writers(path: str, system: System = System()) -> list[str]:
    """Who has the file ``path`` open for writing: loop devices backed by it, processes with a writable fd on it
    (those this user may look at).  Only called after a lease was refused, so the scan of /proc is rare."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    me = (st.st_dev, st.st_ino)

    def same(p: str) -> bool:
        try:
            s = os.stat(p)
        except OSError:
            return False
        return (s.st_dev, s.st_ino) == me

    out: list[str] = []
    with contextlib.suppress(OSError):
        for d in sorted(Path(system.sys, "block").glob("loop*")):
            backing = _read(d / "loop" / "backing_file")
            if backing and same(backing):
                out.append(f"loop device /dev/{d.name} is backed by it (losetup -d /dev/{d.name})")
    for pid in sorted((p for p in os.listdir(system.proc) if p.isdigit()), key=int):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{system.proc}/{pid}/fd"):
                if same(f"{system.proc}/{pid}/fd/{fd}") and _writable_fd(system, pid, fd):
                    from khibernate.lock import command_of

                    out.append(f"pid {pid} ({command_of(int(pid), system.proc)}) has it open for writing")
                    break
    return out


def _writable_fd(system: System, pid: str, fd: str) -> bool:
    """Whether /proc/PID/fdinfo/FD says the descriptor was opened for writing (O_WRONLY or O_RDWR)."""
    for line in _read(Path(system.proc) / pid / "fdinfo" / fd).splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8) & os.O_ACCMODE != os.O_RDONLY
    return False
