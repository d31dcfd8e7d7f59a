"""The x86 zero page (struct boot_params, Documentation/arch/x86/zero-page.rst) for the 64-bit boot protocol.

Pure: ``build_boot_params`` returns the 4096 bytes; ``jump_e820`` restricts a memory map for a jump target.
"""

from __future__ import annotations

from khibernate.jump.bzimage import SETUP_HEADER, SETUP_HEADER_END, SETUP_HEADER_OFFSET, BzImage
from khibernate.jump.errors import CommandLineError, MemoryMapError
from khibernate.layout import Layout
from khibernate.ranges import E820_RAM, E820_RESERVED, Range, subtract

ZERO_PAGE_SIZE = 0x1000
SCREEN_INFO_SIZE = 0x40
E820_MAX_ENTRIES_ZEROPAGE = 128


def _pad(name: str, start: int, end: int) -> tuple[str, str]:
    return name, f"{end - start}x"


# the fields of struct boot_params this loader writes or reads, at their offsets (arch/x86/include/uapi/asm/
# bootparam.h); the setup header (the bzImage's layout, at SETUP_HEADER_OFFSET) is copied in from the bzImage first
ZERO_PAGE = Layout("boot_params", "<", [
    ("screen_info", f"{SCREEN_INFO_SIZE}s"), _pad("_pad1", 0x040, 0x070),
    ("acpi_rsdp_addr", "Q"), _pad("_pad2", 0x078, 0x0C0),
    ("ext_ramdisk_image", "I"), ("ext_ramdisk_size", "I"), ("ext_cmd_line_ptr", "I"), _pad("_pad3", 0x0CC, 0x1E8),
    ("e820_entries", "B"), _pad("_pad4", 0x1E9, 0x1EF),
    ("sentinel", "B"), _pad("_pad5", 0x1F0, SETUP_HEADER_OFFSET),
    *SETUP_HEADER.fields, _pad("_pad6", SETUP_HEADER_END, 0x2D0),
    ("e820_table", f"{E820_MAX_ENTRIES_ZEROPAGE * 20}s")])
E820_ENTRY = Layout("boot_e820_entry", "<", [("addr", "Q"), ("size", "Q"), ("type", "I")])
OFF_ACPI_RSDP = ZERO_PAGE.offsets["acpi_rsdp_addr"]
OFF_E820_TABLE = ZERO_PAGE.offsets["e820_table"]
assert E820_ENTRY.size == 20 and OFF_E820_TABLE == 0x2D0 and ZERO_PAGE.offsets["cmd_line_ptr"] == 0x228

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
    zp = ZERO_PAGE
    zp.set(bp, "sentinel", 0)
    zp.set(bp, "type_of_loader", LOADER_TYPE_UNDEFINED)
    zp.set(bp, "loadflags", zp.get(bp, "loadflags") & ~(QUIET_FLAG | KEEP_SEGMENTS | CAN_USE_HEAP))
    zp.set(bp, "cmd_line_ptr", cmdline_addr & 0xFFFFFFFF)
    zp.set(bp, "ext_cmd_line_ptr", cmdline_addr >> 32)
    if initrd:
        addr, size = initrd
        zp.set(bp, "ramdisk_image", addr & 0xFFFFFFFF)
        zp.set(bp, "ramdisk_size", size & 0xFFFFFFFF)
        zp.set(bp, "ext_ramdisk_image", addr >> 32)
        zp.set(bp, "ext_ramdisk_size", size >> 32)
    if acpi_rsdp:
        zp.set(bp, "acpi_rsdp_addr", acpi_rsdp)
    zp.set(bp, "e820_entries", len(e820))
    for i, r in enumerate(e820):
        E820_ENTRY.pack_into(bp, OFF_E820_TABLE + i * E820_ENTRY.size, addr=r.start, size=r.size, type=r.type)
    return bytes(bp)


def parse_e820_table(bp: bytes) -> list[Range]:
    """The e820 table of a zero page (for tests and --dry-run)."""
    out = []
    for i in range(ZERO_PAGE.get(bp, "e820_entries")):
        e = E820_ENTRY.unpack(bp, OFF_E820_TABLE + i * E820_ENTRY.size, error=MemoryMapError, what="e820 entry")
        out.append(Range(e["addr"], e["addr"] + e["size"], e["type"]))
    return out


def acpi_rsdp_of(zero_page: bytes) -> int:
    """The acpi_rsdp_addr a zero page holds (/sys/kernel/boot_params/data), 0 when none or the page is short."""
    if len(zero_page) < OFF_ACPI_RSDP + 8:
        return 0
    addr: int = ZERO_PAGE.get(zero_page, "acpi_rsdp_addr")
    return addr


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
