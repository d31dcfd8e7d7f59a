import struct

import pytest

from khibernate.jump import bootparams, elfcorehdr, purgatory
from khibernate.jump.errors import JumpBackEntryError, MemoryMapError, NoCrashRegion, NotABzImage, PlacementError
from khibernate.jump.loader import (
    KEXEC_ARCH_X86_64,
    KEXEC_PRESERVE_CONTEXT,
    Segment,
    SystemFacts,
    build_cmdline,
    check_segments,
    parse_jump_back_entry,
    plan_jump,
    plan_jump_back,
    plan_kexec,
    swapped_ranges,
)
from khibernate.ranges import Range
from khibernate.system import parse_iomem

INITRD = b"\x1f\x8b" + bytes(5 * 2**20)


def _seg(plan, word):
    return next(s for s in plan.segments if s.what.startswith(word))


def test_plan_jump(debian_bzimage, facts):
    plan = plan_jump(debian_bzimage, INITRD, "console=ttyS0 role=B --", facts)
    assert plan.flags == KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_X86_64
    window = Range(0x2F000000, 0x3F000000)
    assert plan.window == window
    low = _seg(plan, "low RAM")
    assert (low.mem, low.memsz, low.data) == (0x1000, 0x9E000, None)
    for s in plan.segments:
        assert s is low or (window.start <= s.mem and s.end <= window.end), s.what
    kernel, pg = _seg(plan, "kernel"), _seg(plan, "purgatory")
    bp, hdr = _seg(plan, "boot_params"), _seg(plan, "elfcore")
    assert kernel.mem % 0x200000 == 0 and kernel.memsz >= 0x3F98000
    assert plan.entry == pg.mem
    assert hdr.end == window.end
    # command line: ours before the user's "--"
    assert plan.cmdline.startswith("console=ttyS0 role=B nokaslr iomem=relaxed elfcorehdr=")
    assert plan.cmdline.endswith(purgatory.JUMP_BACK_PLACEHOLDER + " --")
    assert f"elfcorehdr={hdr.mem:#x}" in plan.cmdline
    # zero page: e820 = plan.e820, cmdline right after it, initrd pointer
    zp = bp.data
    assert bootparams.parse_e820_table(zp) == plan.e820
    cmd_addr = struct.unpack_from("<I", zp, 0x228)[0]
    assert cmd_addr == bp.mem + 0x1000
    assert zp[0x1000:].rstrip(b"\0").decode() == plan.cmdline
    ini = _seg(plan, "initrd")
    assert struct.unpack_from("<II", zp, 0x218) == (ini.mem, len(INITRD))
    # purgatory parameter block points at the kernel's 64-bit entry, zero page and the placeholder's digits
    kentry, bpaddr, digits = struct.unpack_from("<QQQ", pg.data, 8)
    assert (kentry, bpaddr) == (kernel.mem + 0x200, bp.mem)
    off = digits - bp.mem
    assert zp[off - len(purgatory.JUMP_BACK_PARAM):off + 16].decode() == purgatory.JUMP_BACK_PLACEHOLDER
    # e820: RAM only in low RAM and the window minus the elfcorehdr
    assert [r for r in plan.e820 if r.type == 1] == [Range(0x1000, 0x9F000), Range(0x2F000000, hdr.mem)]
    # elfcorehdr: the first kernel's RAM outside the window and the low RAM, notes first
    notes, ram = elfcorehdr.parse(hdr.data)
    assert ram == [Range(0x9F000, 0x9FC00), Range(0x100000, 0x2F000000), Range(0x3F000000, 0x3FFE0000)]
    assert [n.paddr for n in notes] == [n.paddr for n in facts.notes]
    check_segments(plan.segments, 1 << 30)
    text = plan.describe()
    assert "KEXEC_PRESERVE_CONTEXT" in text and "purgatory" in text and "command line: console=ttyS0" in text


def test_jump_refusals(debian_bzimage, facts):
    nocrash = SystemFacts(parse_iomem("00001000-0009fbff : System RAM\n00100000-3ffdffff : System RAM\n"),
                          facts.firmware, facts.notes)
    with pytest.raises(NoCrashRegion, match="crashkernel=256M"):
        plan_jump(debian_bzimage, INITRD, "", nocrash)
    with pytest.raises(PlacementError, match="kernel .* does not fit"):
        plan_jump(debian_bzimage, INITRD, "", facts, 0x3C000000, 0x3EFFFFFF)
    with pytest.raises(NotABzImage):
        plan_jump(b"\x7fELF" + bytes(4096), INITRD, "", facts)


def test_window_outside_crash_region_gets_backup(debian_bzimage, facts):
    plan = plan_jump(debian_bzimage, INITRD, "", facts, 0x8000000, 0xFFFFFFF)
    backups = [s for s in plan.segments if s.what.startswith("backup")]
    assert backups and all(s.data is None for s in backups)
    covered = sum(s.memsz for s in plan.segments if s.mem >= 0x8000000)
    assert covered == 0x8000000  # the whole window is swapped, nothing of the first kernel is overwritten


def test_plan_kexec(debian_bzimage, facts):
    plan = plan_kexec(debian_bzimage, INITRD, "console=ttyS0", facts)
    assert plan.flags == KEXEC_ARCH_X86_64
    pg = _seg(plan, "purgatory")
    assert struct.unpack_from("<Q", pg.data, 0x18)[0] == 0  # no jump-back entry to write
    assert plan.e820 == facts.firmware


def test_jump_back():
    page = bytes(range(256)) * 16
    plan = plan_jump_back(0x4060F2, page)
    assert plan.entry == 0x4060F2 and plan.flags == KEXEC_PRESERVE_CONTEXT | KEXEC_ARCH_X86_64
    assert plan.segments == [Segment(0x406000, 0x1000, page, plan.segments[0].what)]
    with pytest.raises(JumpBackEntryError):
        plan_jump_back(0, page)
    with pytest.raises(JumpBackEntryError):
        plan_jump_back(0x4060F2, page[:100])


def test_parse_entry():
    assert parse_jump_back_entry("a -- elfcorehdr=1K kexec_jump_back_entry=0x00000000004060f2") == 0x4060F2
    assert parse_jump_back_entry("kexec_jump_back_entry=0x0000000000000000 x") is None
    assert parse_jump_back_entry("console=ttyS0") is None


def test_build_cmdline():
    assert build_cmdline("console=ttyS0 -- a b", ["x", "y"]) == "console=ttyS0 x y -- a b"
    assert build_cmdline("console=ttyS0", ["x"]) == "console=ttyS0 x"
    assert build_cmdline("--", ["x"]) == "x --"


def test_check_segments():
    with pytest.raises(PlacementError, match="overlap"):
        check_segments([Segment(0x1000, 0x2000, None, "a"), Segment(0x2000, 0x1000, None, "b")])
    with pytest.raises(PlacementError, match="whole pages"):
        check_segments([Segment(0x1000, 0x10, None, "a")])
    with pytest.raises(PlacementError, match="half of RAM"):
        check_segments([Segment(0x1000, 0x10000000, None, "a")], 0x10000000)


def test_notes_in_a_swapped_window_travel_in_the_elfcorehdr(debian_bzimage, facts):
    """A window in the first kernel's own RAM is swapped out at the jump: a note buffer there would be read by the
    second kernel from its own pages, so it must carry a copy, which the elfcorehdr holds and points at."""
    import dataclasses

    window = (0x1C00000, 0x11BFFFFF)  # 256 MiB holding the VMCOREINFO buffer at 0x1e3c000, not the crash notes
    assert swapped_ranges(facts, *window) == [Range(0x1000, 0x9F000), Range(0x1C00000, 0x11C00000)]
    assert swapped_ranges(facts) == [Range(0x1000, 0x9F000)]  # the crash region is reserved: only low RAM
    with pytest.raises(MemoryMapError, match="VMCOREINFO lie in memory the jump swaps out"):
        plan_jump(debian_bzimage, INITRD, "", facts, *window)
    info = b"\x0b\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00VMCOREINFO\x00\x00OSRELEASE=6.12\n\x00"
    notes = [dataclasses.replace(n, data=info.ljust(n.size, b"\0")) if n.what == "VMCOREINFO" else n
             for n in facts.notes]
    plan = plan_jump(debian_bzimage, INITRD, "", dataclasses.replace(facts, notes=notes), *window)
    hdr = _seg(plan, "elfcore")
    assert hdr.end == 0x11C00000 and "1 copied into it" in hdr.what
    parsed, ram = elfcorehdr.parse(hdr.data)
    assert [n.paddr for n in parsed[:2]] == [0x3FC1A000, 0x3FC1B000]  # outside the window: read in place
    copy = parsed[2].paddr
    assert hdr.mem <= copy and copy + 0x1024 <= hdr.end
    assert hdr.data[copy - hdr.mem:copy - hdr.mem + len(info)] == info
    assert [r for r in plan.e820 if r.type == 1][-1] == Range(0x1C00000, hdr.mem)
    assert Range(0x1C00000, 0x11C00000) not in ram and all(not r.overlaps(Range(0x1C00000, 0x11C00000)) for r in ram)
    assert sum(s.memsz for s in plan.segments if s.mem >= 0x1C00000) == 0x10000000  # all of it swapped


def test_kcore_offset():
    from khibernate.elfcore import EHDR64, ELFCLASS64, ET_CORE, PHDR64, PT_LOAD, PT_NOTE, ident

    phdrs = [PHDR64.pack(p_type=PT_NOTE, p_offset=0x1000, p_filesz=0x200),
             PHDR64.pack(p_type=PT_LOAD, p_offset=0x7000_0000_0000, p_vaddr=0xFFFF_8880_0010_0000,
                         p_paddr=0x100000, p_memsz=0x3FEE0000),
             PHDR64.pack(p_type=PT_LOAD, p_offset=0x2000, p_vaddr=0xFFFF_C900_0000_0000, p_paddr=2**64 - 1,
                         p_memsz=0x1000)]
    header = EHDR64.pack(e_ident=ident(ELFCLASS64), e_type=ET_CORE, e_phoff=64, e_phentsize=56,
                         e_phnum=len(phdrs)) + b"".join(phdrs)
    assert elfcorehdr.kcore_offset(header, 0x1E3C000, 0x1024) == 0x7000_0000_0000 + 0x1E3C000 - 0x100000
    with pytest.raises(MemoryMapError, match="maps no memory at 0x40000000"):
        elfcorehdr.kcore_offset(header, 0x40000000, 0x1000)
    with pytest.raises(MemoryMapError, match="ELF header"):
        elfcorehdr.kcore_offset(b"\0" * 64 + header[64:], 0x1E3C000, 0x10)
