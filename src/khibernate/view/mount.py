"""``view mount``: the view's files as a read-only FUSE filesystem (mfusepy over libfuse3), in the foreground.

Checks come first (DIR usable, FUSE in the kernel, /dev/fuse, libfuse), the source is opened and its files built
before anything is mounted; libfuse unmounts on SIGINT/SIGTERM (or ``umount DIR``) and the call returns.

The files hold a kernel's whole memory - keys, passwords, every process's data - so they are served like
/proc/kcore and /proc/vmcore: mode 0400, owned by whoever mounts (root), and the kernel checks that mode
(``default_permissions``), so ``allow_other`` alone lets other users see the mount but read nothing.  Another mode
is the mounting user's explicit choice.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from khibernate.errors import KhibernateError
from khibernate.view.errors import MountError
from khibernate.view.files import ViewFile


def check_mountpoint(directory: str, *, proc: str = "/proc", dev_fuse: str = "/dev/fuse") -> None:
    """MountError with what to do unless ``directory`` can take a FUSE mount here."""
    if not os.path.isdir(directory):
        raise MountError(f"{directory}: not a directory; create it first (mkdir -p {directory})")
    if os.path.ismount(directory):
        raise MountError(f"{directory} is busy: something is already mounted there; umount it or pick another DIR")
    try:
        with open(os.path.join(proc, "filesystems")) as f:
            kinds = {line.split()[-1] for line in f if line.strip()}
    except OSError:
        kinds = set()
    if "fuse" not in kinds:
        raise MountError("the kernel has no FUSE (no 'fuse' in /proc/filesystems); modprobe fuse or build "
                         "CONFIG_FUSE_FS, or use `khibernate view info|read|dmesg` instead")
    if not os.path.exists(dev_fuse):
        raise MountError(f"{dev_fuse} is missing; modprobe fuse (or mknod {dev_fuse} c 10 229)")


def load_binding() -> Any:
    """The mfusepy module; MountError naming the packages to install when it or libfuse is missing."""
    try:
        import mfusepy  # type: ignore[import-untyped]
    except ImportError:
        raise MountError("the FUSE binding is missing: pip install mfusepy") from None
    except OSError as e:  # mfusepy raises OSError('Unable to find libfuse') at import
        raise MountError(f"{e}: install libfuse3 (Debian: apt-get install fuse3)") from None
    return mfusepy


DEFAULT_MODE = 0o400  # /proc/kcore's and /proc/vmcore's: the owner (root) only


def check_mode(mode: int) -> int:
    """``mode`` when it holds read bits only (0400, 0440, 0444 ...); MountError otherwise (the files are read-only)."""
    if not 0 <= mode <= 0o777 or mode & ~0o444 or not mode & 0o400:
        raise MountError(f"--mode {mode:o}: give read bits for the owner and whom else may read, e.g. 0400 (the "
                         "default), 0440 or 0444; the view is read-only")
    return mode


def dir_mode(mode: int) -> int:
    """The directory's mode for files of ``mode``: read and search for exactly those who may read the files."""
    return mode | (mode & 0o444) >> 2


def fuse_options(*, allow_other: bool) -> dict[str, bool | str]:
    """The mount options: read-only, foreground, and the kernel checking the files' modes (default_permissions)."""
    opts: dict[str, bool | str] = {"foreground": True, "nothreads": True, "ro": True,
                                   "fsname": "khibernate-view", "subtype": "khibernate", "default_permissions": True}
    if allow_other:
        opts["allow_other"] = True
    return opts


def make_operations(files: Mapping[str, ViewFile], binding: Any, mode: int = DEFAULT_MODE) -> Any:
    """An mfusepy Operations object serving ``files`` read-only in one flat directory, with ``mode`` (checked by
    the kernel under default_permissions), owned by the mounting user."""
    now = time.time()
    uid, gid = os.getuid(), os.getgid()
    mode = check_mode(mode)

    class ViewOperations(binding.Operations):  # type: ignore[misc]
        """Read-only flat directory of the view's files."""

        def __init__(self) -> None:
            self.on_mount: Callable[[], None] | None = None
            self.mounted = False

        def init(self, path: str) -> None:
            self.mounted = True
            if self.on_mount is not None:
                self.on_mount()

        def _file(self, path: str) -> ViewFile:
            f = files.get(path.lstrip("/"))
            if f is None or "/" in path.lstrip("/"):
                raise binding.FuseOSError(errno.ENOENT)
            return f

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            base = {"st_uid": uid, "st_gid": gid, "st_atime": now, "st_mtime": now, "st_ctime": now}
            if path == "/":
                return {**base, "st_mode": stat.S_IFDIR | dir_mode(mode), "st_nlink": 2}
            return {**base, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": self._file(path).size}

        def readdir(self, path: str, fh: int) -> list[str]:
            if path != "/":
                raise binding.FuseOSError(errno.ENOTDIR)
            return [".", "..", *files]

        def open(self, path: str, flags: int) -> int:
            self._file(path)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise binding.FuseOSError(errno.EROFS)
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            try:
                return self._file(path).read(offset, size)
            except KhibernateError as e:
                print(f"khibernate view: read of {path} at {offset}: {e}", file=sys.stderr)
                raise binding.FuseOSError(errno.EIO) from None

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0,
                    "f_files": len(files), "f_ffree": 0, "f_namemax": 255}

    return ViewOperations()


def serve(directory: str, files: Mapping[str, ViewFile], *, allow_other: bool = False, mode: int = DEFAULT_MODE,
          on_mount: Callable[[], None] | None = None) -> None:
    """Mount ``files`` at ``directory`` and serve until SIGINT/SIGTERM or umount; nothing stays mounted after.

    Returns normally when a mounted session ends; MountError when the mount could not be made."""
    check_mountpoint(directory)
    binding = load_binding()
    ops = make_operations(files, binding, mode)
    ops.on_mount = on_mount
    try:
        binding.FUSE(ops, directory, **fuse_options(allow_other=allow_other))
    except RuntimeError as e:
        if ops.mounted:
            return  # libfuse reports the signal that ended the session (SIGINT/SIGTERM): a clean end
        raise MountError(f"mounting {directory} failed (libfuse status {e}); see libfuse's message above - as "
                         "non-root install fuse3 (fusermount3), or run as root") from None
    finally:
        if os.path.ismount(directory):
            _force_unmount(directory)


def _force_unmount(directory: str) -> None:
    """Lazy unmount of a mount libfuse left behind (it normally unmounts itself)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(directory.encode(), 2) != 0:  # MNT_DETACH
        import subprocess

        subprocess.run(["fusermount3", "-uz", directory], check=False, capture_output=True)  # non-root fallback
