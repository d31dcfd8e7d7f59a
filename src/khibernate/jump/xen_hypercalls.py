"""The only module that calls the Xen hypervisor: kexec_op and memory_op through /dev/xen/privcmd (dom0 only).

On a Xen host the hypervisor, not dom0's kernel, owns the machine, its memory map and the crash region: kexec
images are loaded into and executed by Xen (``KEXEC_CMD_kexec_load`` / ``_kexec``), as kexec-tools does through
libxenctrl. Here the hypercalls go straight through ``IOCTL_PRIVCMD_HYPERCALL``; every buffer Xen reads or writes
lives in pages of ``/dev/xen/hypercall`` (kernel pages mapped into this process, never swapped or moved), as
libxencall places them. Failures become ``XenHypercallError`` with advice; ``explain`` is pure.
"""

from __future__ import annotations

import dataclasses
import errno as E
import fcntl
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from khibernate.jump.errors import NotXenDom0, XenHypercallError
from khibernate.jump.xen_abi import (
    E820_ENTRY,
    E820_MAX_XEN,
    HYPERVISOR_KEXEC_OP,
    HYPERVISOR_MEMORY_OP,
    IOCTL_PRIVCMD_HYPERCALL,
    KEXEC_CMD_GET_RANGE,
    KEXEC_CMD_KEXEC,
    KEXEC_CMD_LOAD,
    KEXEC_CMD_STATUS,
    KEXEC_CMD_UNLOAD,
    KEXEC_EXEC,
    KEXEC_LOAD,
    KEXEC_RANGE,
    KEXEC_SEGMENT,
    KEXEC_TYPE_NAMES,
    KEXEC_UNLOAD,
    MEMORY_MAP,
    PRIVCMD_HYPERCALL,
    XENMEM_MACHINE_MEMORY_MAP,
)

PRIVCMD = "/dev/xen/privcmd"
HYPERCALL_BUF = "/dev/xen/hypercall"
PAGE = 4096


@dataclasses.dataclass(frozen=True)
class XenSegment:
    """One xen_kexec_segment: ``data`` is copied to ``mem`` and the rest of ``memsz`` zeroed; a ``map_only``
    segment loads nothing and only makes [mem, mem+memsz) identity-mapped for the image (kexec-tools' low 1 MiB)."""

    mem: int
    memsz: int
    data: bytes | None
    map_only: bool = False


def explain(what: str, err: int) -> XenHypercallError:
    """The error to raise when hypercall ``what`` failed with ``err`` (pure)."""
    name = E.errorcode.get(err, str(err))
    msg = f"Xen {what} failed ({name}: {os.strerror(err)})"
    advice = {
        E.EPERM: "only dom0 (the control domain) may load kexec images into Xen; run as root in dom0",
        E.EACCES: "only dom0 (the control domain) may load kexec images into Xen; run as root in dom0",
        E.ENOSYS: "this Xen has no kexec (built without CONFIG_KEXEC) or is older than 4.4",
        E.EADDRNOTAVAIL: "a crash image segment or its entry lies outside Xen's crash region (crashkernel= on "
                         "Xen's command line sets it)",
        E.EBUSY: "Xen is loading or executing another image of this type; retry",
        E.ENOMEM: "Xen has not enough free memory for the image's pages (give dom0 less with dom0_mem=)",
        E.EINVAL: "Xen refused the arguments (an unknown image type or range, or no crash region: boot Xen with "
                  "crashkernel=256M)",
        E.EFAULT: "Xen could not read a hypercall buffer",
    }.get(err)
    return XenHypercallError(f"{msg}: {advice}" if advice else msg, err)


class _Arena:
    """Hypercall-safe memory: one mapping of /dev/xen/hypercall; ``put`` places bytes and returns their address."""

    def __init__(self, size: int):
        from khibernate.jump._kexec_cffi import ffi

        self._ffi = ffi
        self.size = max(PAGE, (size + PAGE - 1) & ~(PAGE - 1))
        try:
            self._fd = os.open(HYPERCALL_BUF, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise NotXenDom0(f"cannot open {HYPERCALL_BUF} ({e.strerror}): not a Xen dom0, or xen-privcmd is not "
                             "loaded (modprobe xen-privcmd)") from e
        try:
            self.map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self._fd)
            raise XenHypercallError(f"cannot map {self.size} bytes of {HYPERCALL_BUF}: {e.strerror}", e.errno or 0) \
                from e
        self._ptr: Any = ffi.from_buffer("char[]", self.map)
        self.base = int(ffi.cast("uintptr_t", self._ptr))
        self.used = 0

    def put(self, data: bytes, reserve: int = 0) -> int:
        """Copy data (plus ``reserve`` zero bytes) to the next 8-aligned place; return its address."""
        off = (self.used + 7) & ~7
        end = off + max(len(data), reserve)
        if end > self.size:
            raise XenHypercallError(f"internal: hypercall arena of {self.size} bytes overflows ({end} needed)")
        self.map[off:off + len(data)] = data
        self.used = end
        return self.base + off

    def read(self, addr: int, n: int) -> bytes:
        """n bytes at an address ``put`` returned."""
        off = addr - self.base
        return bytes(self.map[off:off + n])

    def close(self) -> None:
        self._ffi.release(self._ptr)
        self.map.close()
        os.close(self._fd)


@contextmanager
def _arena(size: int) -> Iterator[_Arena]:
    a = _Arena(size)
    try:
        yield a
    finally:
        a.close()


def _hypercall(what: str, op: int, *args: int) -> int:
    """IOCTL_PRIVCMD_HYPERCALL(op, args): the hypercall's non-negative result, XenHypercallError otherwise."""
    try:
        fd = os.open(PRIVCMD, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise NotXenDom0(f"cannot open {PRIVCMD} ({e.strerror}): not a Xen dom0, or xen-privcmd is not loaded "
                         "(modprobe xen-privcmd)") from e
    try:
        req = bytearray(PRIVCMD_HYPERCALL.pack(op=op, arg=tuple(args) + (0,) * (5 - len(args))))
        return int(fcntl.ioctl(fd, IOCTL_PRIVCMD_HYPERCALL, req, True))
    except OSError as e:
        raise explain(what, e.errno or 0) from e
    finally:
        os.close(fd)


def kexec_get_range(range_id: int, nr: int = 0) -> tuple[int, int] | None:
    """(start, size) of one of Xen's kexec ranges (crash region, CPU note nr, VMCOREINFO), None when Xen has none."""
    with _arena(KEXEC_RANGE.size) as a:
        addr = a.put(KEXEC_RANGE.pack(range=range_id, nr=nr))
        try:
            _hypercall(f"kexec_get_range({range_id}, {nr})", HYPERVISOR_KEXEC_OP, KEXEC_CMD_GET_RANGE, addr)
        except XenHypercallError as e:
            if e.errno in (E.EINVAL, E.ERANGE):  # no such range, or a CPU number past the last one
                return None
            raise
        r = KEXEC_RANGE.unpack(a.read(addr, KEXEC_RANGE.size))
    return (r["start"], r["size"]) if r["size"] else None


def machine_memory_map() -> list[tuple[int, int, int]]:
    """The machine's e820 as Xen saw it at boot: (addr, size, type) entries (XENMEM_machine_memory_map)."""
    with _arena(MEMORY_MAP.size + E820_MAX_XEN * E820_ENTRY.size + 8) as a:
        buf = a.put(b"", reserve=E820_MAX_XEN * E820_ENTRY.size)
        arg = a.put(MEMORY_MAP.pack(nr_entries=E820_MAX_XEN, buffer=buf))
        _hypercall("memory_op(XENMEM_machine_memory_map)", HYPERVISOR_MEMORY_OP, XENMEM_MACHINE_MEMORY_MAP, arg)
        n = MEMORY_MAP.unpack(a.read(arg, MEMORY_MAP.size))["nr_entries"]
        raw = a.read(buf, n * E820_ENTRY.size)
    return [E820_ENTRY.unpack_from(raw, i * E820_ENTRY.size) for i in range(n)]


def kexec_load(image_type: int, arch: int, entry: int, segments: list[XenSegment]) -> None:
    """KEXEC_CMD_kexec_load: hand the segments to Xen, which copies them now (crash) or at kexec time (default)."""
    data_bytes = sum((len(s.data) + 8) if s.data else 8 for s in segments)
    with _arena(data_bytes + (len(segments) + 1) * KEXEC_SEGMENT.size + KEXEC_LOAD.size + 64) as a:
        zero = a.put(bytes(8))  # a valid, non-NULL source for segments that are all zeros
        table = b""
        for s in segments:
            buf = 0 if s.map_only else (a.put(s.data) if s.data else zero)
            table += KEXEC_SEGMENT.pack(buf=buf, buf_size=len(s.data) if s.data and not s.map_only else 0,
                                        dest_maddr=s.mem, dest_size=s.memsz)
        segs = a.put(table)
        arg = a.put(KEXEC_LOAD.pack(type=image_type, arch=arch, nr_segments=len(segments), segments=segs,
                                    entry_maddr=entry))
        _hypercall(f"kexec_load({KEXEC_TYPE_NAMES.get(image_type, image_type)} image)", HYPERVISOR_KEXEC_OP,
                   KEXEC_CMD_LOAD, arg)


def kexec_unload(image_type: int) -> None:
    """KEXEC_CMD_kexec_unload of the default or crash image."""
    with _arena(KEXEC_UNLOAD.size) as a:
        arg = a.put(KEXEC_UNLOAD.pack(type=image_type))
        _hypercall(f"kexec_unload({KEXEC_TYPE_NAMES.get(image_type, image_type)})", HYPERVISOR_KEXEC_OP,
                   KEXEC_CMD_UNLOAD, arg)


def kexec_status(image_type: int) -> bool:
    """KEXEC_CMD_kexec_status: True when Xen holds an image of that type."""
    with _arena(KEXEC_UNLOAD.size) as a:
        arg = a.put(KEXEC_UNLOAD.pack(type=image_type))
        return _hypercall(f"kexec_status({KEXEC_TYPE_NAMES.get(image_type, image_type)})", HYPERVISOR_KEXEC_OP,
                          KEXEC_CMD_STATUS, arg) == 1


def kexec_exec(image_type: int) -> None:
    """KEXEC_CMD_kexec: Xen stops every CPU and enters the loaded image; returns only if Xen refuses."""
    os.sync()
    with _arena(KEXEC_EXEC.size) as a:
        arg = a.put(KEXEC_EXEC.pack(type=image_type))
        _hypercall(f"kexec({KEXEC_TYPE_NAMES.get(image_type, image_type)})", HYPERVISOR_KEXEC_OP, KEXEC_CMD_KEXEC,
                   arg)
