"""x86 bzImage: the setup header (Documentation/arch/x86/boot.rst) and the protected-mode payload.

Pure: ``parse_bzimage(bytes)`` checks what the 64-bit boot protocol needs and returns a ``BzImage``.
"""

from __future__ import annotations

import dataclasses
import struct

from khibernate.jump.errors import NotABzImage

SETUP_HEADER_OFFSET = 0x1F1
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, XLF_KERNEL_64, 64-bit entry at +0x200

LOADED_HIGH = 1 << 0
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_5LEVEL = 1 << 5
ENTRY64_OFFSET = 0x200
MAX_KERNEL_SIZE = 1 << 30  # no bzImage needs more than 1 GiB to decompress, or an alignment above it


@dataclasses.dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: header fields the loader uses, the raw setup header and the payload."""

    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    relocatable: bool
    kernel_alignment: int
    min_alignment: int
    initrd_addr_max: int
    cmdline_size: int
    pref_address: int
    init_size: int
    setup_header: bytes
    payload: bytes

    @property
    def version_str(self) -> str:
        """The boot protocol version as 'major.minor'."""
        return f"{self.version >> 8}.{self.version & 0xFF}"

    @property
    def entry64_offset(self) -> int:
        """Offset of the 64-bit entry point from the load address (ABI: 0x200)."""
        return ENTRY64_OFFSET

    @property
    def can_load_above_4g(self) -> bool:
        """Whether kernel, initrd, boot_params and command line may sit above 4 GiB."""
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    @property
    def memsz(self) -> int:
        """Bytes the kernel needs at its load address while it decompresses: max(init_size, payload), page-rounded."""
        return (max(self.init_size, len(self.payload)) + 0xFFF) & ~0xFFF


def _u8(b: bytes, off: int) -> int:
    return b[off]


def _u16(b: bytes, off: int) -> int:
    value: int = struct.unpack_from("<H", b, off)[0]
    return value


def _u32(b: bytes, off: int) -> int:
    value: int = struct.unpack_from("<I", b, off)[0]
    return value


def _u64(b: bytes, off: int) -> int:
    value: int = struct.unpack_from("<Q", b, off)[0]
    return value


def parse_bzimage(data: bytes, name: str = "kernel") -> BzImage:
    """Parse and check a bzImage for the 64-bit boot protocol; raise NotABzImage saying what is wrong."""
    if len(data) < 0x400:
        raise NotABzImage(f"{name}: {len(data)} bytes is too small for a bzImage (give e.g. /boot/vmlinuz-*)")
    if _u16(data, 0x1FE) != 0xAA55 or data[0x202:0x206] != b"HdrS":
        hint = " (this looks like an ELF vmlinux: give the bzImage)" if data[:4] == b"\x7fELF" else ""
        raise NotABzImage(f"{name}: not an x86 bzImage: no boot sector signature 0xAA55 / 'HdrS' magic{hint}")
    version = _u16(data, 0x206)
    if version < MIN_PROTOCOL:
        raise NotABzImage(f"{name}: boot protocol {version >> 8}.{version & 0xFF} is too old, need >= 2.12 "
                          "(kernel 3.8 or later)")
    setup_sects = _u8(data, 0x1F1) or 4
    hdr_end = 0x202 + _u8(data, 0x201)
    if hdr_end <= 0x268 or hdr_end > len(data):
        raise NotABzImage(f"{name}: setup header length {hdr_end - SETUP_HEADER_OFFSET} is implausible")
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise NotABzImage(f"{name}: setup_sects={setup_sects} leaves no protected-mode payload")
    xloadflags = _u16(data, 0x236)
    if not xloadflags & XLF_KERNEL_64:
        raise NotABzImage(f"{name}: XLF_KERNEL_64 not set: not a 64-bit kernel with a 64-bit entry point")
    relocatable = bool(_u8(data, 0x234))
    if not relocatable:
        raise NotABzImage(f"{name}: kernel is not relocatable (CONFIG_RELOCATABLE=n): it can only run at its "
                          "pref_address, which is the first kernel's memory")
    loadflags = _u8(data, 0x211)
    if not loadflags & LOADED_HIGH:
        raise NotABzImage(f"{name}: zImage (LOADED_HIGH not set): only bzImage is supported")
    kernel_alignment, min_shift, init_size = _u32(data, 0x230), _u8(data, 0x235), _u32(data, 0x260)
    if kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1) or kernel_alignment > MAX_KERNEL_SIZE:
        raise NotABzImage(f"{name}: kernel_alignment {kernel_alignment:#x} is not a power of two up to 1 GiB; "
                          "the setup header is corrupt")
    if 1 << min_shift > kernel_alignment:
        raise NotABzImage(f"{name}: min_alignment 2^{min_shift} is above kernel_alignment {kernel_alignment:#x}; "
                          "the setup header is corrupt")
    if init_size > MAX_KERNEL_SIZE:
        raise NotABzImage(f"{name}: init_size {init_size:#x} is over 1 GiB; the setup header is corrupt")
    return BzImage(
        version=version,
        setup_sects=setup_sects,
        loadflags=loadflags,
        xloadflags=xloadflags,
        relocatable=relocatable,
        kernel_alignment=kernel_alignment,
        min_alignment=1 << min_shift,
        initrd_addr_max=_u32(data, 0x22C),
        cmdline_size=_u32(data, 0x238),
        pref_address=_u64(data, 0x258),
        init_size=init_size,
        setup_header=bytes(data[SETUP_HEADER_OFFSET:hdr_end]),
        payload=bytes(data[setup_size:]),
    )


def kernel_release(data: bytes) -> str | None:
    """The release (``uname -r``) in the setup header's kernel_version string (protocol >= 2.00: a pointer at 0x20e
    to a NUL-terminated string at +0x200, e.g. "6.1.0-28-amd64 (debian-kernel@...) #1 SMP ..."); None if absent."""
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        return None
    ptr = _u16(data, 0x20E)
    if not ptr:
        return None
    start = ptr + 0x200
    end = data.find(b"\0", start, start + 256)
    if start >= len(data) or end < 0:
        return None
    words = data[start:end].decode("ascii", "replace").split()
    return words[0] if words else None
