"""Ask for a passphrase at early boot, without echo: on the controlling terminal when the process has one, else
on /dev/console — what cryptsetup's askpass does in an initramfs (its console method: /dev/console, ECHO off,
one line).  A resume into a sealed store given no key asks here (khibernate.restore.resume).

Called only in the child process that derives the image key (:mod:`khibernate.seal.handoff`), so the typed
passphrase is never in the process that goes on to load the restore kernel.
"""

from __future__ import annotations

import errno
import os
import select
import termios
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from khibernate.seal.errors import KeySourceError

if TYPE_CHECKING:
    from khibernate.seal.keysource import KeySource

TERMINALS = ("/dev/tty", "/dev/console")  # the controlling terminal first; PID 1's children have none
ASK_SECONDS = 300.0  # then the boot goes on (the image stays tried: `khibernate resume --again` by hand)
MAX_LINE = 4096


def open_terminal(paths: Sequence[str] = TERMINALS) -> tuple[int, str]:
    """(fd, path) of the first of ``paths`` that opens read-write as a terminal; KeySourceError when none does."""
    why = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as e:  # /dev/tty without a controlling terminal: ENXIO
            why.append(f"{path}: {e.strerror or errno.errorcode.get(e.errno or 0, e)}")
            continue
        if os.isatty(fd):
            return fd, path
        os.close(fd)
        why.append(f"{path}: not a terminal")
    raise KeySourceError(f"no terminal to ask the passphrase on ({'; '.join(why)}): give --passphrase-file FILE or "
                         "--key-file FILE")


def _read_line(fd: int, timeout: float, path: str) -> bytes:
    """One line from the terminal (canonical mode: the kernel hands over whole lines), without its line end."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise KeySourceError(f"no passphrase typed on {path} within {timeout:g} s")
        chunk = os.read(fd, MAX_LINE)
        if not chunk:
            raise KeySourceError(f"{path} closed before a passphrase was typed")
        data += chunk
        if len(data) > MAX_LINE:
            raise KeySourceError(f"the passphrase typed on {path} is longer than {MAX_LINE} bytes")
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def ask(prompt: str, paths: Sequence[str] = TERMINALS, timeout: float = ASK_SECONDS) -> bytes:
    """The line typed after ``prompt`` on the first terminal of ``paths``, echo off while it is typed (restored
    after); KeySourceError when there is no terminal, nothing is typed within ``timeout`` seconds, or it is
    empty."""
    fd, path = open_terminal(paths)
    try:
        old = termios.tcgetattr(fd)
        quiet = list(old)
        quiet[3] = (quiet[3] & ~termios.ECHO) | termios.ICANON  # lflags: no echo, whole lines
        termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)  # (and drop what was typed before the prompt)
        try:
            os.write(fd, prompt.encode())
            line = _read_line(fd, timeout, path)
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, old)
            os.write(fd, b"\n")
    finally:
        os.close(fd)
    if not line:
        raise KeySourceError(f"an empty passphrase was typed on {path}")
    return line


def console_passphrase(target: str, timeout: float = ASK_SECONDS) -> Callable[[], KeySource]:
    """A key-source factory (for :func:`khibernate.seal.handoff.hand_image_key`, which calls it in its child) that
    asks for the passphrase of the store ``target`` on the console (the first of :data:`TERMINALS` that opens)."""

    def make() -> KeySource:
        from khibernate.seal.keysource import Passphrase

        typed = ask(f"khibernate: passphrase of the hibernation image in {target}: ", TERMINALS, timeout)
        return Passphrase(typed, "passphrase typed on the console")

    return make
