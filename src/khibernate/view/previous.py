"""Find the previously booted kernel's memory, whichever side of a jump we run on, or open a file.

Read → decide → open: ``boot_side`` is pure over /proc/cmdline's text; ``open_previous`` does the I/O.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING

from khibernate.image.errors import ImageError
from khibernate.image.sources import MemorySource, open_source
from khibernate.view.errors import NoPreviousKernelError

if TYPE_CHECKING:
    from khibernate.seal.keysource import KeySource

_SIZE = r"(?:0x[0-9a-fA-F]+|\d+)[KMG]?"
_ELFCOREHDR = re.compile(rf"(?:^|\s)elfcorehdr=(?:({_SIZE})@)?({_SIZE})(?=\s|$)")
_JUMP_BACK = re.compile(r"(?:^|\s)kexec_jump_back_entry=(0x[0-9a-fA-F]+|\d+)(?=\s|$)")


def _size(text: str) -> int:
    """Kernel command-line number (decimal or 0x-hex, optional K/M/G suffix), like memparse()."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if mult > 1 else text, 0) * mult


@dataclasses.dataclass(frozen=True)
class BootSide:
    """What the command line says about how this kernel was started."""

    elfcorehdr: int | None  # physical address of the first kernel's ELF core header (kdump or jump target)
    jump_back_entry: int | None  # set when a kexec jump started us (we can jump back)

    @property
    def is_capture_kernel(self) -> bool:
        """True in a kdump or kexec-jump target: the previous kernel is the one that loaded us."""
        return self.elfcorehdr is not None


def boot_side(cmdline: str) -> BootSide:
    """Parse elfcorehdr= ([SIZE@]ADDR; the last one wins, as in the kernel) and kexec_jump_back_entry=."""
    hdrs = _ELFCOREHDR.findall(cmdline)
    jumps = _JUMP_BACK.findall(cmdline)
    return BootSide(_size(hdrs[-1][1]) if hdrs else None, int(jumps[-1], 0) if jumps else None)


def read_elfcorehdr(mem: str, paddr: int) -> bytes:
    """The ELF core header bytes at physical ``paddr`` of ``mem`` (/dev/mem, read by mmap): file header plus
    program headers. NoPreviousKernelError when /dev/mem refuses the page; PermissionError without root."""
    from khibernate.image.errors import MappingRefusedError
    from khibernate.image.sources.raw import PhysWindows
    from khibernate.image.sources.raw import read_elfcorehdr as read_header

    windows = PhysWindows(mem)
    try:
        return read_header(windows, paddr)
    except MappingRefusedError as e:
        raise NoPreviousKernelError(f"{mem} refuses the elfcorehdr page at {paddr:#x} ({e}); boot the jump target "
                                    "with CONFIG_PROC_VMCORE to see all of the first kernel") from None
    finally:
        windows.close()


def open_running_side(cmdline_path: str = "/proc/cmdline", vmcore: str = "/proc/vmcore",
                      mem: str = "/dev/mem") -> MemorySource:
    """The previous kernel seen from the one running: in a capture kernel /proc/vmcore, else /dev/mem +
    elfcorehdr; in a first kernel with a kexec-jump image loaded, the frozen jump target (root)."""
    with open(cmdline_path) as f:
        side = boot_side(f.read())
    if not side.is_capture_kernel:
        from khibernate.view.frozen import open_frozen

        try:
            return open_frozen()
        except NoPreviousKernelError as e:
            raise NoPreviousKernelError(
                "this kernel was not started by kdump or kexec jump (no elfcorehdr= on /proc/cmdline) and it has "
                f"no frozen jump target to show ({e}); give SOURCE (a khibernate image, a vmcore or a dump "
                "file)") from None
    assert side.elfcorehdr is not None
    if os.path.exists(vmcore):
        try:
            return open_source(vmcore)
        except PermissionError:
            raise NoPreviousKernelError(f"{vmcore}: permission denied; run as root") from None
    from khibernate.image.sources.raw import DevMemSource

    try:
        return DevMemSource.with_elfcorehdr(mem, read_elfcorehdr(mem, side.elfcorehdr))
    except PermissionError:
        raise NoPreviousKernelError(f"{mem}: permission denied; run as root") from None
    except ImageError as e:
        raise NoPreviousKernelError(f"no {vmcore} (CONFIG_PROC_VMCORE off) and the elfcorehdr at "
                                    f"{side.elfcorehdr:#x} in {mem} is not usable: {e}") from None


def open_previous(path: str | os.PathLike[str] | None = None, key: KeySource | None = None) -> MemorySource:
    """The previous kernel's memory as a MemorySource: the file at ``path`` (any format image/ reads; ``key`` for a
    sealed khibernate image), or with no path the other side of the jump (see open_running_side)."""
    if path is not None:
        return open_source(path, key=key)
    return open_running_side()
