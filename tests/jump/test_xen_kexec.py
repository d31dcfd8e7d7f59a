"""Issue 25, fast tier: kexec through Xen — the ABI layouts, the hypercall errors, the plans, multiboot."""

from __future__ import annotations

import errno
import shutil
import subprocess

import pytest

from khibernate.jump import bootparams, elfcorehdr, multiboot, purgatory, xen, xen_hypercalls
from khibernate.jump.elfcorehdr import Note
from khibernate.jump.errors import NoCrashRegion
from khibernate.jump.xen_abi import (
    E820_ENTRY,
    EM_386,
    EM_X86_64,
    IOCTL_PRIVCMD_HYPERCALL,
    KEXEC_LOAD,
    KEXEC_RANGE,
    KEXEC_SEGMENT,
    KEXEC_TYPE_CRASH,
    KEXEC_TYPE_DEFAULT,
    MEMORY_MAP,
)
from khibernate.ranges import E820_ACPI, E820_RAM, E820_RESERVED, Range

# the machine map Xen 4.17 reported in the 1.5 GiB QEMU guest (XENMEM_machine_memory_map), its crash region
MACHINE = [Range(0, 0x9FC00), Range(0x9FC00, 0xA0000, E820_RESERVED), Range(0xF0000, 0x100000, E820_RESERVED),
           Range(0x100000, 0x5FFE0000), Range(0x5FFE0000, 0x60000000, E820_RESERVED),
           Range(0xFEC00000, 0xFEC01000, E820_RESERVED), Range(0xFEE00000, 0xFEF00000, E820_RESERVED),
           Range(0xFFFC0000, 0x100000000, E820_RESERVED), Range(0xFD00000000, 0x10000000000, E820_RESERVED)]
CRASH = Range(0x48D43000, 0x58D43000)


@pytest.fixture
def xen_facts() -> xen.XenFacts:
    return xen.XenFacts(MACHINE, CRASH, [Note(0x5FC00000, 0x3C8, "Xen crash note cpu0")],
                        Note(0x5FB00000, 0x1000, "VMCOREINFO_XEN"), Note(0x3D472000, 0x1000, "VMCOREINFO (dom0)"))


def test_abi_layouts_match_xen_public_headers():
    """Sizes and offsets of the structures as xen/include/public/{kexec,memory}.h and privcmd.h lay them out."""
    assert (KEXEC_RANGE.size, KEXEC_SEGMENT.size, KEXEC_LOAD.size, MEMORY_MAP.size, E820_ENTRY.size) == \
        (24, 32, 24, 16, 20)
    assert KEXEC_LOAD.offsets["arch"] == 2 and KEXEC_LOAD.offsets["segments"] == 8
    assert KEXEC_RANGE.offsets["size"] == 8 and MEMORY_MAP.offsets["buffer"] == 8
    assert IOCTL_PRIVCMD_HYPERCALL == 0x305000  # _IOC(_IOC_NONE, 'P', 0, sizeof(struct privcmd_hypercall))


def test_hypercall_errors_say_what_to_do():
    assert "crash region" in str(xen_hypercalls.explain("kexec_load(crash image)", errno.EADDRNOTAVAIL))
    assert "dom0" in str(xen_hypercalls.explain("kexec_load(default image)", errno.EPERM))
    assert "without CONFIG_KEXEC" in str(xen_hypercalls.explain("kexec_get_range(0, 0)", errno.ENOSYS))
    assert xen_hypercalls.explain("x", errno.EBUSY).errno == errno.EBUSY


def test_plan_crash(debian_bzimage, xen_facts):
    """The capture kernel, its initrd, boot_params, purgatory, the low-memory backup and the elfcorehdr all lie in
    Xen's crash region; the elfcorehdr reads the low memory from the backup and has Xen's and dom0's notes."""
    initrd = bytes(range(256)) * 4096
    p = xen.plan_crash(debian_bzimage, initrd, "console=ttyS0 nr_cpus=1", xen_facts, "vmlinuz")
    assert (p.image_type, p.arch) == (KEXEC_TYPE_CRASH, EM_X86_64)
    assert all(CRASH.start <= s.mem and s.end <= CRASH.end for s in p.segments), p.describe()
    assert CRASH.start <= p.entry < CRASH.end  # Xen refuses a crash entry outside the region
    backup = next(s for s in p.segments if s.what.startswith("backup"))
    hdr = next(s for s in p.segments if s.what.startswith("elfcorehdr"))
    assert hdr.end == CRASH.end and f"elfcorehdr={hdr.mem:#x}" in p.cmdline.split()
    notes, ram = elfcorehdr.parse(hdr.data)
    assert [n.paddr for n in notes] == [0x5FC00000, 0x5FB00000, 0x3D472000]
    # the low RAM's whole pages come from the backup, its last partial page is read in place
    assert ram == [Range(0, 0x9F000), Range(0x9F000, 0x9FC00), Range(0x100000, CRASH.start),
                   Range(CRASH.end, 0x5FFE0000)]
    low = elfcorehdr.EHDR.unpack(hdr.data)
    first_load = elfcorehdr.PHDR.unpack(hdr.data, low["e_phoff"] + 3 * elfcorehdr.PHDR.size)
    assert (first_load["p_paddr"], first_load["p_offset"]) == (0, backup.mem)  # read from the backup
    pg = next(s for s in p.segments if s.what.startswith("purgatory"))
    assert purgatory.SIZE <= pg.memsz and pg.data[purgatory.OFF_BACKUP_SRC:purgatory.OFF_BACKUP_LEN + 8] == \
        (0).to_bytes(8, "little") + backup.mem.to_bytes(8, "little") + (0x9F000).to_bytes(8, "little")
    # the capture kernel's e820: RAM only in low memory and the region, the backup and the header reserved
    zp = next(s for s in p.segments if s.what.startswith("boot_params"))
    e820 = bootparams.parse_e820_table(zp.data)
    assert [r for r in e820 if r.type == E820_RAM] == [Range(0x1000, 0x9F000), Range(CRASH.start, backup.mem),
                                                       Range(backup.end, hdr.mem)]
    # Xen identity-maps the rest of the low 1 MiB for the image (the backup copy reads it)
    assert p.identity == [Range(0, 0x100000)]
    segs = p.xen_segments()
    assert [s.mem for s in segs] == sorted(s.mem for s in segs) and sum(s.map_only for s in segs) == 1


def test_plan_crash_needs_xen_crash_region(debian_bzimage, xen_facts):
    facts = xen.XenFacts(MACHINE, None)
    with pytest.raises(NoCrashRegion, match="Xen's command line"):
        xen.plan_crash(debian_bzimage, None, "", facts)


def test_plan_kexec_boots_on_the_whole_machine(debian_bzimage, xen_facts):
    """Xen→Linux: a default EM_X86_64 image whose kernel gets the machine's e820 (not dom0's)."""
    p = xen.plan_kexec(debian_bzimage, None, "console=ttyS0", xen_facts)
    assert (p.image_type, p.arch) == (KEXEC_TYPE_DEFAULT, EM_X86_64)
    zp = next(s for s in p.segments if s.what.startswith("boot_params"))
    assert bootparams.parse_e820_table(zp.data) == MACHINE


def _multiboot_elf(entry: int = 0x100000) -> bytes:
    """A minimal 32-bit ELF multiboot kernel: one load segment at 1 MiB holding the header and some code."""
    from khibernate.elfcore import EHDR32, ELFCLASS32, EV_CURRENT, PHDR32, PT_LOAD, ident

    flags = 0x3  # page align modules, memory information
    header = multiboot.HEADER.pack(magic=multiboot.HEADER_MAGIC, flags=flags,
                                   checksum=(-(multiboot.HEADER_MAGIC + flags)) & 0xFFFFFFFF)
    body = header + b"\x90" * 0x100
    off = EHDR32.size + PHDR32.size
    ehdr = EHDR32.pack(e_ident=ident(ELFCLASS32), e_type=2, e_machine=3, e_version=EV_CURRENT,
                       e_entry=entry, e_phoff=EHDR32.size, e_ehsize=EHDR32.size, e_phentsize=PHDR32.size, e_phnum=1)
    phdr = PHDR32.pack(p_type=PT_LOAD, p_offset=off, p_vaddr=0x100000, p_paddr=0x100000, p_filesz=len(body),
                       p_memsz=0x3000, p_flags=7, p_align=0x1000)
    return ehdr + phdr + body


def test_multiboot_kernel_and_info_round_trip():
    k = multiboot.parse_kernel(_multiboot_elf(0x100020))
    assert k.entry == 0x100020 and k.segments[0].paddr == 0x100000 and k.segments[0].memsz == 0x3000
    info = multiboot.build_info(0x9000000, "xen console=com1", [(0x1000000, 0x1800000, "vmlinuz console=hvc0"),
                                                             (0x1800000, 0x1900000, "initrd")], MACHINE)
    got = multiboot.parse_info(info, 0x9000000)
    assert got["cmdline"] == "xen console=com1" and got["loader"] == "khibernate"
    assert got["modules"] == [(0x1000000, 0x1800000, "vmlinuz console=hvc0"), (0x1800000, 0x1900000, "initrd")]
    assert got["mmap"][0] == (0, 0x9FC00, 1) and got["mmap"][1][2] == 2
    assert (got["mem_lower"], got["mem_upper"]) == (0x9FC00 >> 10, (0x5FFE0000 - 0x100000) >> 10)
    assert len(info) == multiboot.info_size("xen console=com1", [multiboot.Module(b"", "vmlinuz console=hvc0"),
                                                                 multiboot.Module(b"", "initrd")], MACHINE)
    with pytest.raises(multiboot.NotMultiboot, match="no multiboot header"):
        multiboot.parse_kernel(b"\x7fELF" + bytes(9000))


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils objdump not installed")
def test_multiboot_entry_stub_disassembles_as_documented(tmp_path):
    stub = tmp_path / "stub.bin"
    stub.write_bytes(multiboot.entry_stub(0x9000000, 0x100020))
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386", str(stub)], capture_output=True, text=True,
                         check=True).stdout
    assert "mov    $0x2badb002,%eax" in out and "mov    $0x9000000,%ebx" in out
    assert "mov    $0x100020,%ecx" in out and "jmp    *%ecx" in out


def test_plan_multiboot(debian_bzimage, xen_facts):
    """Xen→Xen: the hypervisor's segments, dom0's kernel and initrd as modules below 4 GiB, the command lines split
    at '--', entered in 32-bit mode (EM_386) through the stub."""
    p = xen.plan_multiboot(_multiboot_elf(), debian_bzimage, b"initrd" * 1000, "dom0_mem=640M loglvl=all -- "
                           "console=hvc0 root=/dev/ram0", xen_facts, "xen-4.17-amd64.gz", "vmlinuz", "initrd.img")
    assert (p.image_type, p.arch) == (KEXEC_TYPE_DEFAULT, EM_386)
    info_seg = next(s for s in p.segments if s.what.startswith("multiboot information"))
    info = multiboot.parse_info(info_seg.data, info_seg.mem)
    assert info["cmdline"] == "xen-4.17-amd64.gz dom0_mem=640M loglvl=all"
    assert [m[2] for m in info["modules"]] == ["vmlinuz console=hvc0 root=/dev/ram0", "initrd.img"]
    kseg = next(s for s in p.segments if s.mem == info["modules"][0][0])
    assert kseg.data == debian_bzimage and all(s.end <= 1 << 32 for s in p.segments)
    stub = next(s for s in p.segments if s.mem == p.entry)
    assert stub.data[:5] == b"\xb8\x02\xb0\xad\x2b"
    assert xen.split_vmm_cmdline("a b") == ("a b", "") and xen.split_vmm_cmdline("a -- b --c") == ("a", "b --c")


def test_crash_notes_order_and_dom0_vmcoreinfo_cut_at_page(tmp_path):
    f = tmp_path / "vmcoreinfo"
    f.write_text("3d472f00 1024\n")
    note = xen._dom0_vmcoreinfo(f)
    assert note is not None and (note.paddr, note.size) == (0x3D472F00, 0x100)
    facts = xen.XenFacts(MACHINE, CRASH, [Note(1, 2, "cpu0")], Note(3, 4, "x"), note)
    assert [n.paddr for n in xen.crash_notes(facts)] == [1, 3, 0x3D472F00]
    assert E820_ACPI != E820_RAM  # the machine map's ACPI entries stay reserved-for-ACPI in the e820
