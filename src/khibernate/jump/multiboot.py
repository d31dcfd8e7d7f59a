"""Multiboot (version 1): the header of a kernel like Xen, the boot information a loader hands it, and the 32-bit
entry stub that does so (https://www.gnu.org/software/grub/manual/multiboot/multiboot.html).

Pure: ``parse_kernel`` reads the header and the ELF32 load segments of the image; ``build_info`` writes the
multiboot_info structure with its command line, boot loader name, module list and memory map (addresses inside
the block are absolute, for the block placed at ``base``); ``parse_info`` reads one back (tests, --dry-run);
``entry_stub`` is the code Xen's kexec enters (32-bit protected mode, paging off, flat segments) that loads
EAX = 0x2BADB002 and EBX = the info block and jumps to the kernel's entry.
"""

from __future__ import annotations

import dataclasses
import struct

from khibernate.elfcore import EHDR32, PHDR32, PT_LOAD
from khibernate.jump.errors import NotMultiboot as NotMultiboot
from khibernate.layout import Layout
from khibernate.ranges import E820_ACPI, E820_NVS, E820_RAM, E820_RESERVED, Range

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH = 8192  # the header lies 4-aligned in the image's first 8 KiB
HEADER = Layout("multiboot_header", "<", [("magic", "I"), ("flags", "I"), ("checksum", "I"), ("header_addr", "I"),
                                          ("load_addr", "I"), ("load_end_addr", "I"), ("bss_end_addr", "I"),
                                          ("entry_addr", "I")])
AOUT_KLUDGE = 1 << 16
# multiboot_info: v1 fields up to boot_loader_name are used; the rest (APM, VBE, framebuffer) stays zero
INFO = Layout("multiboot_info", "<", [("flags", "I"), ("mem_lower", "I"), ("mem_upper", "I"), ("boot_device", "I"),
                                      ("cmdline", "I"), ("mods_count", "I"), ("mods_addr", "I"), ("syms", "4I"),
                                      ("mmap_length", "I"), ("mmap_addr", "I"), ("drives_length", "I"),
                                      ("drives_addr", "I"), ("config_table", "I"), ("boot_loader_name", "I"),
                                      ("apm_table", "I"), ("rest", "44x")])
MODULE = Layout("multiboot_module", "<", [("mod_start", "I"), ("mod_end", "I"), ("string", "I"), ("reserved", "I")])
MMAP_ENTRY = Layout("multiboot_mmap_entry", "<", [("size", "I"), ("addr", "Q"), ("len", "Q"), ("type", "I")])
INFO_MEMORY, INFO_CMDLINE, INFO_MODS, INFO_MEM_MAP, INFO_BOOT_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9
LOADER_NAME = "khibernate"
MMAP_TYPES = {E820_RAM: 1, E820_ACPI: 3, E820_NVS: 4}  # everything else is reserved (2)


@dataclasses.dataclass(frozen=True)
class LoadSegment:
    """One piece of the kernel image: bytes copied to ``paddr``, ``memsz`` long (the rest zero)."""

    paddr: int
    data: bytes
    memsz: int


@dataclasses.dataclass(frozen=True)
class MultibootKernel:
    """What loading a multiboot kernel needs: its entry point and its load segments."""

    entry: int
    segments: list[LoadSegment]
    flags: int


@dataclasses.dataclass(frozen=True)
class Module:
    """A boot module: its bytes and its command line (by convention its file name first, then arguments)."""

    data: bytes
    cmdline: str


def find_header(image: bytes) -> tuple[int, dict[str, int]] | None:
    """(offset, fields) of the multiboot header in the first 8 KiB (magic + flags + checksum == 0 mod 2^32)."""
    for off in range(0, min(len(image), SEARCH) - 12 + 1, 4):
        fields = HEADER.unpack(image[off:off + HEADER.size].ljust(HEADER.size, b"\0"))
        magic, flags, checksum = fields["magic"], fields["flags"], fields["checksum"]
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, dict(fields)
    return None


def parse_kernel(image: bytes, name: str = "hypervisor") -> MultibootKernel:
    """The entry and load segments of a multiboot kernel given as an ELF32 file (Xen's gunzipped xen.gz)."""
    found = find_header(image)
    if found is None:
        raise NotMultiboot(f"{name} has no multiboot header in its first 8 KiB: give the hypervisor image (for "
                           "Xen: /boot/xen-*.gz, gunzipped or not; not the .efi or xen-syms)")
    _, hdr = found
    if image[:4] != b"\x7fELF" or image[4] != 1:
        raise NotMultiboot(f"{name} is not a 32-bit ELF file; only ELF multiboot kernels are loaded")
    e = EHDR32.unpack(image, error=NotMultiboot, what=f"{name} ELF header")
    segs = []
    for i in range(e["e_phnum"]):
        p = PHDR32.unpack(image, e["e_phoff"] + i * e["e_phentsize"], error=NotMultiboot, what=f"{name} phdr")
        if p["p_type"] != PT_LOAD or p["p_memsz"] == 0:
            continue
        if p["p_offset"] + p["p_filesz"] > len(image):
            raise NotMultiboot(f"{name}: a load segment runs past the end of the file (truncated?)")
        segs.append(LoadSegment(p["p_paddr"], image[p["p_offset"]:p["p_offset"] + p["p_filesz"]], p["p_memsz"]))
    if not segs:
        raise NotMultiboot(f"{name} has no loadable segment")
    return MultibootKernel(e["e_entry"], segs, hdr["flags"])


def mem_limits(e820: list[Range]) -> tuple[int, int]:
    """(mem_lower, mem_upper) in KiB: RAM from 0 (at most 640 KiB) and contiguous RAM from 1 MiB."""
    lower = next((min(r.end, 0xA0000) for r in e820 if r.type == E820_RAM and r.start == 0), 0)
    upper = next((r.end - 0x100000 for r in e820 if r.type == E820_RAM and r.start <= 0x100000 < r.end), 0)
    return lower >> 10, min(upper >> 10, 0xFFFFFFFF)


def info_size(cmdline: str, modules: list[Module], e820: list[Range]) -> int:
    """Bytes ``build_info`` returns for these inputs (to reserve its place before building it)."""
    strings = len(cmdline) + 1 + len(LOADER_NAME) + 1 + sum(len(m.cmdline) + 1 for m in modules)
    return (INFO.size + len(modules) * MODULE.size + len(e820) * MMAP_ENTRY.size + strings + 7) & ~7


def build_info(base: int, cmdline: str, modules: list[tuple[int, int, str]], e820: list[Range]) -> bytes:
    """The multiboot_info block for address ``base``: modules as (start, end, command line), e820 as the memory map.

    Layout: info, module list, memory map, then the strings (command line, loader name, module lines).
    """
    mods_at = base + INFO.size
    mmap_at = mods_at + len(modules) * MODULE.size
    strings_at = mmap_at + len(e820) * MMAP_ENTRY.size
    strings = bytearray()

    def string(text: str) -> int:
        addr = strings_at + len(strings)
        strings.extend(text.encode() + b"\0")
        return addr

    cmd_addr, loader_addr = string(cmdline), string(LOADER_NAME)
    mods = b"".join(MODULE.pack(mod_start=s, mod_end=e, string=string(c)) for s, e, c in modules)
    mmap = b"".join(MMAP_ENTRY.pack(size=MMAP_ENTRY.size - 4, addr=r.start, len=r.size,
                                    type=MMAP_TYPES.get(r.type, 2)) for r in e820)
    lower, upper = mem_limits(e820)
    info = INFO.pack(flags=INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME,
                     mem_lower=lower, mem_upper=upper, cmdline=cmd_addr, mods_count=len(modules),
                     mods_addr=mods_at, mmap_length=len(mmap), mmap_addr=mmap_at, boot_loader_name=loader_addr)
    out = info + mods + mmap + bytes(strings)
    if base + len(out) > 1 << 32:
        raise NotMultiboot(f"the multiboot information at {base:#x} does not fit below 4 GiB")
    return out.ljust((len(out) + 7) & ~7, b"\0")


def parse_info(block: bytes, base: int) -> dict[str, object]:
    """The fields of a block ``build_info`` made at ``base``: command line, loader, modules, memory map."""
    i = INFO.unpack(block, error=NotMultiboot, what="multiboot_info")

    def cstr(addr: int) -> str:
        off = addr - base
        return block[off:block.index(b"\0", off)].decode()

    mods = [MODULE.unpack(block, i["mods_addr"] - base + n * MODULE.size) for n in range(i["mods_count"])]
    mmap = [MMAP_ENTRY.unpack(block, i["mmap_addr"] - base + n * MMAP_ENTRY.size)
            for n in range(i["mmap_length"] // MMAP_ENTRY.size)]
    return {"flags": i["flags"], "mem_lower": i["mem_lower"], "mem_upper": i["mem_upper"],
            "cmdline": cstr(i["cmdline"]), "loader": cstr(i["boot_loader_name"]),
            "modules": [(m["mod_start"], m["mod_end"], cstr(m["string"])) for m in mods],
            "mmap": [(m["addr"], m["len"], m["type"]) for m in mmap]}


def entry_stub(info_addr: int, kernel_entry: int) -> bytes:
    """32-bit code: ``mov $0x2BADB002, %eax; mov $info, %ebx; mov $entry, %ecx; jmp *%ecx`` (17 bytes)."""
    for v, what in ((info_addr, "multiboot information"), (kernel_entry, "kernel entry")):
        if not 0 <= v < 1 << 32:
            raise NotMultiboot(f"the {what} at {v:#x} is not below 4 GiB")
    return (b"\xb8" + struct.pack("<I", BOOTLOADER_MAGIC) + b"\xbb" + struct.pack("<I", info_addr)
            + b"\xb9" + struct.pack("<I", kernel_entry) + b"\xff\xe1")


__all__ = ["MultibootKernel", "Module", "NotMultiboot", "parse_kernel", "build_info", "parse_info", "entry_stub",
           "E820_RESERVED"]
