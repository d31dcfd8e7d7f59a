"""The only module that calls kexec_load(2), kexec_file_load(2) and reboot(2) (cffi, ABI mode, libc's syscall()).

Every failure becomes a ``KexecSyscallError`` whose message says what to do; ``explain`` holds that mapping and is
pure (tests call it with fake facts).
"""

from __future__ import annotations

import dataclasses
import errno as E
import os
from pathlib import Path

from khibernate.jump.errors import KexecSyscallError, NotRoot

SYS_KEXEC_LOAD = 246
SYS_REBOOT = 169
SYS_KEXEC_FILE_LOAD = 320
KEXEC_ON_CRASH = 0x1
KEXEC_PRESERVE_CONTEXT = 0x2
KEXEC_ARCH_X86_64 = 62 << 16
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_KEXEC = 0x45584543

_CDEF = """
struct kexec_segment { const void *buf; size_t bufsz; const void *mem; size_t memsz; };
long syscall(long number, ...);
"""
_ffi = None
_lib = None


def _libc():
    global _ffi, _lib
    if _lib is None:
        import cffi

        _ffi = cffi.FFI()
        _ffi.cdef(_CDEF)
        _lib = _ffi.dlopen(None)
    return _ffi, _lib


@dataclasses.dataclass(frozen=True)
class Context:
    """Facts that turn an errno into advice: who we are and what the kernel allows."""

    euid: int
    lockdown: str | None = None
    kexec_load_disabled: bool = False
    segments: tuple[str, ...] = ()


def current_context(segments: tuple[str, ...] = ()) -> Context:
    """The Context of this process and kernel."""
    lock = None
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
        lock = text[text.index("[") + 1:text.index("]")] if "[" in text else None
    except (OSError, ValueError):
        pass
    try:
        disabled = Path("/proc/sys/kernel/kexec_load_disabled").read_text().strip() == "1"
    except OSError:
        disabled = False
    return Context(os.geteuid(), lock, disabled, segments)


def explain(call: str, err: int, flags: int, ctx: Context) -> KexecSyscallError:
    """The error to raise for ``call`` failing with ``err`` (pure)."""
    name = E.errorcode.get(err, str(err))
    what = f"{call} failed ({name}: {os.strerror(err)})"
    jump = call == "kexec_load" and flags & KEXEC_PRESERVE_CONTEXT
    if err == E.EPERM:
        if ctx.euid != 0:
            return NotRoot(f"{what}: needs root (CAP_SYS_BOOT); run it with sudo", err)
        if ctx.kexec_load_disabled:
            return KexecSyscallError(f"{what}: kernel.kexec_load_disabled=1 — loading kexec images is switched off "
                                     "until the next reboot", err)
        if ctx.lockdown and ctx.lockdown != "none":
            if call == "kexec_load":
                return KexecSyscallError(f"{what}: kexec_load is blocked by kernel lockdown ({ctx.lockdown}); "
                                         "kexec jump needs kexec_load (boot without lockdown / Secure Boot, or with "
                                         "lockdown=none)", err)
            return KexecSyscallError(f"{what}: kernel lockdown ({ctx.lockdown}) requires a signed kernel for "
                                     "kexec_file_load", err)
        return KexecSyscallError(f"{what}: not permitted (kexec load limit reached? see "
                                 "/proc/sys/kernel/kexec_load_limit_reboot and _panic)", err)
    if err == E.EBUSY:
        return KexecSyscallError(f"{what}: another kexec load or exec is in progress, or the loaded image is in "
                                 "use; wait and retry", err)
    if err == E.EINVAL:
        if call == "reboot":
            return KexecSyscallError(f"{what}: no kexec image is loaded; load one first "
                                     "(khibernate kexec load / jump load / jump back)", err)
        if jump:
            return KexecSyscallError(f"{what}: the kernel refused the image. If it was built without "
                                     "CONFIG_KEXEC_JUMP it refuses KEXEC_PRESERVE_CONTEXT; otherwise a segment was "
                                     "refused (overlap, more than half of RAM, > 16 segments): "
                                     + "; ".join(ctx.segments), err)
        return KexecSyscallError(f"{what}: the kernel refused the image or the flags (overlapping segments, more "
                                 "than half of RAM, > 16 segments, or an unsupported flag) — segments: "
                                 + "; ".join(ctx.segments), err)
    if err == E.EADDRNOTAVAIL:
        return KexecSyscallError(f"{what}: a segment lies outside the allowed memory (for kdump: outside the "
                                 "'Crash kernel' region) — segments: " + "; ".join(ctx.segments), err)
    if err == E.ENOMEM:
        return KexecSyscallError(f"{what}: not enough free memory to stage the image (a kexec_load image pins as "
                                 "much RAM as its segments); free memory or use a smaller initrd", err)
    if err == E.ENOEXEC:
        return KexecSyscallError(f"{what}: the kernel does not accept this image for kexec_file_load (not a 64-bit "
                                 "bzImage with the 64-bit entry, or signature policy); try --syscall load", err)
    if err in (E.EKEYREJECTED, E.EBADMSG, E.ENOKEY):
        return KexecSyscallError(f"{what}: the kernel's signature check rejected the image; use a signed kernel "
                                 "or --syscall load", err)
    if err == E.ENOSYS:
        return KexecSyscallError(f"{what}: this kernel has no {call} (CONFIG_KEXEC / CONFIG_KEXEC_FILE off)", err)
    if err == E.ENOENT and call == "kexec_file_load":
        return KexecSyscallError(f"{what}: nothing is loaded to unload", err)
    return KexecSyscallError(what, err)


def _fail(call: str, flags: int, segments: tuple[str, ...] = ()) -> KexecSyscallError:
    ffi, _ = _libc()
    return explain(call, ffi.errno, flags, current_context(segments))


def kexec_load(entry: int, segments: list[tuple[bytes | None, int, int]], flags: int,
               labels: tuple[str, ...] = ()) -> None:
    """kexec_load(entry, segments as (data, mem, memsz), flags); nothing loaded when segments is empty (unload)."""
    ffi, lib = _libc()
    n = len(segments)
    segs = ffi.new("struct kexec_segment[]", max(n, 1))
    keep = []
    for i, (data, mem, memsz) in enumerate(segments):
        if data:
            buf = ffi.from_buffer(data)
            keep.append(buf)
            segs[i].buf = buf
            segs[i].bufsz = len(data)
        else:
            segs[i].buf = ffi.NULL
            segs[i].bufsz = 0
        segs[i].mem = ffi.cast("void *", mem)
        segs[i].memsz = memsz
    rc = lib.syscall(ffi.cast("long", SYS_KEXEC_LOAD), ffi.cast("unsigned long", entry), ffi.cast("unsigned long", n),
                     segs if n else ffi.NULL, ffi.cast("unsigned long", flags))
    if rc != 0:
        raise _fail("kexec_load", flags, labels)


def kexec_unload(crash: bool = False) -> None:
    """Unload the kexec (or crash) image loaded by either syscall."""
    flags = KEXEC_ARCH_X86_64 | (KEXEC_ON_CRASH if crash else 0)
    kexec_load(0, [], flags)


def kexec_file_load(kernel: str | os.PathLike | None, initrd: str | os.PathLike | None, cmdline: str,
                    flags: int) -> None:
    """kexec_file_load(kernel_fd, initrd_fd, cmdline, flags); with KEXEC_FILE_UNLOAD no files are needed."""
    ffi, lib = _libc()
    fds = []
    try:
        kfd = os.open(kernel, os.O_RDONLY) if kernel is not None else -1
        fds.append(kfd)
        ifd = -1
        if initrd is not None:
            ifd = os.open(initrd, os.O_RDONLY)
            fds.append(ifd)
        elif not flags & KEXEC_FILE_UNLOAD:
            flags |= KEXEC_FILE_NO_INITRAMFS
        raw = cmdline.encode() + b"\0"
        buf = ffi.from_buffer(raw)
        rc = lib.syscall(ffi.cast("long", SYS_KEXEC_FILE_LOAD), ffi.cast("int", kfd), ffi.cast("int", ifd),
                         ffi.cast("unsigned long", len(raw) if not flags & KEXEC_FILE_UNLOAD else 0),
                         buf if not flags & KEXEC_FILE_UNLOAD else ffi.NULL, ffi.cast("unsigned long", flags))
        if rc != 0:
            raise _fail("kexec_file_load", flags)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def reboot_kexec() -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC): does not return for a plain kexec; returns when a jump comes back."""
    ffi, lib = _libc()
    rc = lib.syscall(ffi.cast("long", SYS_REBOOT), ffi.cast("unsigned int", LINUX_REBOOT_MAGIC1),
                     ffi.cast("unsigned int", LINUX_REBOOT_MAGIC2), ffi.cast("unsigned int", LINUX_REBOOT_CMD_KEXEC),
                     ffi.NULL)
    if rc != 0:
        raise _fail("reboot", 0)
