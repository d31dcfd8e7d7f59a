"""The x86 zero page (struct boot_params, Documentation/arch/x86/zero-page.rst) for the 64-bit boot protocol.

Pure: ``build_boot_params`` returns the 4096 bytes; ``jump_e820`` restricts a memory map for a jump target.
"""

from __future__ import annotations

import struct

from khibernate.jump.bzimage import SETUP_HEADER_OFFSET, BzImage
from khibernate.jump.errors import CommandLineError, MemoryMapError
from khibernate.ranges import E820_RAM, E820_RESERVED, Range, subtract

ZERO_PAGE_SIZE = 0x1000
SCREEN_INFO_SIZE = 0x40
OFF_ACPI_RSDP = 0x070
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_SENTINEL = 0x1EF
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")

LOADER_TYPE_UNDEFINED = 0xFF
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7


def jump_e820(firmware: list[Range], low: Range | None, region: Range, reserved: list[Range]) -> list[Range]:
    """The e820 for a jump target: firmware non-RAM entries, RAM only in low and region, ``reserved`` cut out of it.

    Every other RAM range of the first kernel is left out (a hole), so the second kernel never allocates there.
    """
    ram = [r for r in ([low] if low else []) + [region]]
    ram = subtract([Range(r.start, r.end, E820_RAM) for r in ram], reserved)
    covered = ([low] if low else []) + [region]
    other = subtract([r for r in firmware if r.type != E820_RAM], covered)
    res = [Range(r.start, r.end, E820_RESERVED) for r in reserved]
    table = sorted(ram + other + res)
    for a, b in zip(table, table[1:], strict=False):
        if b.start < a.end:
            raise MemoryMapError(f"e820 entries overlap: {a} and {b}")
    if len(table) > E820_MAX_ENTRIES_ZEROPAGE:
        raise MemoryMapError(f"{len(table)} e820 entries do not fit in the zero page (max 128)")
    return table


def build_boot_params(
    kernel: BzImage,
    cmdline_addr: int,
    cmdline_len: int,
    e820: list[Range],
    initrd: tuple[int, int] | None = None,
    acpi_rsdp: int | None = None,
    screen_info: bytes | None = None,
) -> bytes:
    """The 4 KiB zero page: setup header copied in, cmdline/initrd pointers, e820 table, acpi_rsdp, screen_info."""
    if kernel.cmdline_size and cmdline_len > kernel.cmdline_size:
        raise CommandLineError(f"command line is {cmdline_len} bytes, the kernel accepts at most {kernel.cmdline_size}")
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise MemoryMapError(f"{len(e820)} e820 entries do not fit in the zero page (max 128)")
    bp = bytearray(ZERO_PAGE_SIZE)
    if screen_info:
        bp[:SCREEN_INFO_SIZE] = screen_info[:SCREEN_INFO_SIZE].ljust(SCREEN_INFO_SIZE, b"\0")
    hdr = kernel.setup_header
    bp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(hdr)] = hdr
    bp[OFF_SENTINEL] = 0
    bp[OFF_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    bp[OFF_LOADFLAGS] = bp[OFF_LOADFLAGS] & ~(QUIET_FLAG | KEEP_SEGMENTS | CAN_USE_HEAP)
    struct.pack_into("<I", bp, OFF_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, OFF_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd:
        addr, size = initrd
        struct.pack_into("<I", bp, OFF_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", bp, OFF_RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", bp, OFF_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", bp, OFF_EXT_RAMDISK_SIZE, size >> 32)
    if acpi_rsdp:
        struct.pack_into("<Q", bp, OFF_ACPI_RSDP, acpi_rsdp)
    bp[OFF_E820_ENTRIES] = len(e820)
    for i, r in enumerate(e820):
        E820_ENTRY.pack_into(bp, OFF_E820_TABLE + i * E820_ENTRY.size, r.start, r.size, r.type)
    return bytes(bp)


def parse_e820_table(bp: bytes) -> list[Range]:
    """The e820 table of a zero page (for tests and --dry-run)."""
    n = bp[OFF_E820_ENTRIES]
    out = []
    for i in range(n):
        start, size, typ = E820_ENTRY.unpack_from(bp, OFF_E820_TABLE + i * E820_ENTRY.size)
        out.append(Range(start, start + size, typ))
    return out


def find_acpi_rsdp(bios: bytes, base: int = 0xE0000) -> int | None:
    """The physical address of a valid 'RSD PTR ' in a BIOS area dump (16-byte aligned, checksum 0), or None."""
    for off in range(0, len(bios) - 20, 16):
        if bios[off:off + 8] == b"RSD PTR " and sum(bios[off:off + 20]) & 0xFF == 0:
            return base + off
    return None


def parse_efi_systab(text: str) -> int | None:
    """ACPI20= (or ACPI=) from /sys/firmware/efi/systab, or None."""
    vals = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    for key in ("ACPI20", "ACPI"):
        if key in vals:
            return int(vals[key], 16)
    return None
