"""x86 bzImage: the setup header (Documentation/arch/x86/boot.rst) and the protected-mode payload.

Pure: ``parse_bzimage(bytes)`` checks what the 64-bit boot protocol needs and returns a ``BzImage``.
"""

from __future__ import annotations

import dataclasses

from khibernate.jump.errors import NotABzImage
from khibernate.layout import Layout, Record

SETUP_HEADER_OFFSET = 0x1F1
# struct setup_header (Documentation/arch/x86/boot.rst, arch/x86/include/uapi/asm/bootparam.h), at 0x1F1 of a
# bzImage and of the zero page; through protocol 2.15's kernel_info_offset
SETUP_HEADER = Layout("setup_header", "<", [
    ("setup_sects", "B"), ("root_flags", "H"), ("syssize", "I"), ("ram_size", "H"), ("vid_mode", "H"),
    ("root_dev", "H"), ("boot_flag", "H"), ("jump", "H"), ("header", "4s"), ("version", "H"),
    ("realmode_swtch", "I"), ("start_sys_seg", "H"), ("kernel_version", "H"), ("type_of_loader", "B"),
    ("loadflags", "B"), ("setup_move_size", "H"), ("code32_start", "I"), ("ramdisk_image", "I"),
    ("ramdisk_size", "I"), ("bootsect_kludge", "I"), ("heap_end_ptr", "H"), ("ext_loader_ver", "B"),
    ("ext_loader_type", "B"), ("cmd_line_ptr", "I"), ("initrd_addr_max", "I"), ("kernel_alignment", "I"),
    ("relocatable_kernel", "B"), ("min_alignment", "B"), ("xloadflags", "H"), ("cmdline_size", "I"),
    ("hardware_subarch", "I"), ("hardware_subarch_data", "Q"), ("payload_offset", "I"), ("payload_length", "I"),
    ("setup_data", "Q"), ("pref_address", "Q"), ("init_size", "I"), ("handover_offset", "I"),
    ("kernel_info_offset", "I")])
SETUP_HEADER_END = SETUP_HEADER_OFFSET + SETUP_HEADER.size
assert SETUP_HEADER_END == 0x26C and SETUP_HEADER.offsets["header"] == 0x202 - SETUP_HEADER_OFFSET
HDRS = b"HdrS"
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


def parse_bzimage(data: bytes, name: str = "kernel") -> BzImage:
    """Parse and check a bzImage for the 64-bit boot protocol; raise NotABzImage saying what is wrong."""
    if len(data) < 0x400:
        raise NotABzImage(f"{name}: {len(data)} bytes is too small for a bzImage (give e.g. /boot/vmlinuz-*)")
    h = SETUP_HEADER.unpack(data, SETUP_HEADER_OFFSET)
    if h["boot_flag"] != 0xAA55 or h["header"] != HDRS:
        hint = " (this looks like an ELF vmlinux: give the bzImage)" if data[:4] == b"\x7fELF" else ""
        raise NotABzImage(f"{name}: not an x86 bzImage: no boot sector signature 0xAA55 / 'HdrS' magic{hint}")
    version = h["version"]
    if version < MIN_PROTOCOL:
        raise NotABzImage(f"{name}: boot protocol {version >> 8}.{version & 0xFF} is too old, need >= 2.12 "
                          "(kernel 3.8 or later)")
    setup_sects = h["setup_sects"] or 4
    hdr_end = SETUP_HEADER_OFFSET + SETUP_HEADER.offsets["header"] + (h["jump"] >> 8)  # the jump's byte offset
    if hdr_end <= 0x268 or hdr_end > len(data):
        raise NotABzImage(f"{name}: setup header length {hdr_end - SETUP_HEADER_OFFSET} is implausible")
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise NotABzImage(f"{name}: setup_sects={setup_sects} leaves no protected-mode payload")
    if not h["xloadflags"] & XLF_KERNEL_64:
        raise NotABzImage(f"{name}: XLF_KERNEL_64 not set: not a 64-bit kernel with a 64-bit entry point")
    if not h["relocatable_kernel"]:
        raise NotABzImage(f"{name}: kernel is not relocatable (CONFIG_RELOCATABLE=n): it can only run at its "
                          "pref_address, which is the first kernel's memory")
    if not h["loadflags"] & LOADED_HIGH:
        raise NotABzImage(f"{name}: zImage (LOADED_HIGH not set): only bzImage is supported")
    kernel_alignment, min_shift, init_size = h["kernel_alignment"], h["min_alignment"], h["init_size"]
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
        loadflags=h["loadflags"],
        xloadflags=h["xloadflags"],
        relocatable=True,
        kernel_alignment=kernel_alignment,
        min_alignment=1 << min_shift,
        initrd_addr_max=h["initrd_addr_max"],
        cmdline_size=h["cmdline_size"],
        pref_address=h["pref_address"],
        init_size=init_size,
        setup_header=bytes(data[SETUP_HEADER_OFFSET:hdr_end]),
        payload=bytes(data[setup_size:]),
    )


def setup_header(data: bytes) -> Record | None:
    """The setup header fields of ``data`` if it has the 'HdrS' magic (any protocol), else None; unchecked."""
    if len(data) < SETUP_HEADER_END:
        return None
    h = SETUP_HEADER.unpack(data, SETUP_HEADER_OFFSET)
    return h if h["header"] == HDRS else None


def kernel_release(data: bytes) -> str | None:
    """The release (``uname -r``) in the setup header's kernel_version string (protocol >= 2.00: a pointer at 0x20e
    to a NUL-terminated string at +0x200, e.g. "6.1.0-28-amd64 (debian-kernel@...) #1 SMP ..."); None if absent."""
    h = setup_header(data)
    ptr: int = h["kernel_version"] if h else 0
    if not ptr:
        return None
    start = ptr + 0x200
    end = data.find(b"\0", start, start + 256)
    if start >= len(data) or end < 0:
        return None
    words = data[start:end].decode("ascii", "replace").split()
    return words[0] if words else None
