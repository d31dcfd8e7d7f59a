"""Exclusive flock()s, waited for within a bound, and who holds one (/proc/locks): the store's writer lock and the
capture lock share this.

flock() is what the kernel releases by itself when the holder exits or is killed, so a lock is never stale; it works
on any file or device node, in the first kernel and in the capture kernel alike.  Two opens of one file in one
process are two lock owners: never take a lock twice in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from khibernate.errors import CaptureBusyError as CaptureBusyError

COMMAND_CHARS = 160
POLL_FIRST, POLL_MAX = 0.001, 0.05  # a store update holds the lock for milliseconds: look again soon, then back off


@dataclasses.dataclass(frozen=True)
class Holder:
    """A process holding a flock: its pid and command line."""

    pid: int
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command})" if self.command else f"pid {self.pid}"


def parse_proc_locks(text: str, dev: tuple[int, int], ino: int) -> list[int]:
    """Pids holding a FLOCK on inode ``ino`` of filesystem ``dev`` (major, minor), from /proc/locks text (lines
    "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INO START END"; waiters, marked "->", are left out)."""
    want = f"{dev[0]:02x}:{dev[1]:02x}:{ino}"
    pids: list[int] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == want and f[4].lstrip("-").isdigit():
            pids.append(int(f[4]))
    return pids


def command_of(pid: int, proc: str = "/proc") -> str:
    """The command line of ``pid`` on one line (at most ``COMMAND_CHARS``), "" when it cannot be read."""
    try:
        raw = Path(f"{proc}/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    line = " ".join(raw.decode(errors="replace").replace("\0", " ").split())
    return line if len(line) <= COMMAND_CHARS else line[:COMMAND_CHARS - 3] + "..."


def holders(fd: int, proc: str = "/proc") -> list[Holder]:
    """Processes holding a flock on the file open at ``fd`` (empty when /proc/locks cannot tell)."""
    st = os.fstat(fd)
    try:
        text = Path(f"{proc}/locks").read_text()
    except OSError:
        return []
    pids = parse_proc_locks(text, (os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)
    return [Holder(p, command_of(p, proc)) for p in dict.fromkeys(pids) if p > 0]


def describe_holders(fd: int) -> str:
    """"pid N (command)" of whoever holds the lock on ``fd``, or a phrase saying it is unknown."""
    found = holders(fd)
    return ", ".join(h.describe() for h in found) if found else "another process (/proc/locks does not say which)"


def acquire(fd: int, wait: float, on_wait: Callable[[str], None] | None = None, tell_after: float = 1.0) -> bool:
    """Take an exclusive flock on ``fd``, waiting at most ``wait`` seconds; False if it is still held then.
    ``on_wait`` is told once who holds it when the wait has lasted ``tell_after`` seconds."""
    start = time.monotonic()
    told = False
    poll = POLL_FIRST
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if waited >= wait:
            return False
        if not told and on_wait is not None and waited >= tell_after:
            on_wait(describe_holders(fd))
            told = True
        time.sleep(min(poll, wait - waited))
        poll = min(2 * poll, POLL_MAX)


CAPTURE_LOCK = "capture.lock"


@contextlib.contextmanager
def capture_lock(run_dir: Path) -> Iterator[bool]:
    """Hold the capture lock (flock on run_dir/capture.lock) for the body; yields False when another capture
    (`snapshot`, `hibernate`, a watcher) or a store change that must not meet one (`target drop`, `target init
    --force`) holds it: the body must then not go on (capture_lock_holder names the holder)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / CAPTURE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not acquire(fd, 0):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def capture_lock_holder(run_dir: Path) -> str:
    """Who holds run_dir/capture.lock, for a refusal's message."""
    try:
        fd = os.open(run_dir / CAPTURE_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "another process"
    try:
        return describe_holders(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def capture_or_refuse(run_dir: Path, doing: str) -> Iterator[None]:
    """The capture lock for the body, or CaptureBusyError naming its holder (pid, command): ``doing`` ("snapshot",
    "target drop" ...) waits for no capture, which can take minutes.  A user other than root who cannot create the
    lock cannot run a capture either and goes on without it (the store's writer lock, which a capture holds
    throughout, still keeps the two apart on one target)."""
    if os.geteuid() != 0 and not _may_lock(run_dir):
        yield
        return
    with capture_lock(run_dir) as got:
        if not got:
            raise CaptureBusyError(f"another capture is running: {capture_lock_holder(run_dir)} holds "
                                   f"{run_dir / CAPTURE_LOCK}; run {doing} again when it has finished")
        yield


def _may_lock(run_dir: Path) -> bool:
    """Whether this user can create and open run_dir/capture.lock."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.close(os.open(run_dir / CAPTURE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except PermissionError:
        return False
    return True
