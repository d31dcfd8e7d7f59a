"""Issue 25, fast tier: reading a Xen host's vmcore — the hypervisor's notes, the dump-level guard, the frame filter
(makedumpfile -X's rules) over a synthetic Xen memory with real 4-level page tables."""

from __future__ import annotations

import struct

import pytest

from khibernate.elfcore import Note
from khibernate.image.errors import UsageErrorImage
from khibernate.image.layouts import xen as xen_notes
from khibernate.image.sources import xen
from khibernate.image.sources.base import MemorySource, MemRange

PAGE = 4096
XEN_VIRT = 0xFFFF82D040000000
XEN_PHYS = 0x3F000000  # where the hypervisor image lies in machine memory
FRAMES = 0xFFFF82E000000000  # FRAMETABLE_VIRT_START
RAM = 0x40000000  # 1 GiB machine: 262144 frames


class BytesSource(MemorySource):
    """A sparse in-memory machine: pages written by the test, zeros elsewhere; notes as given."""

    def __init__(self, notes: tuple[Note, ...]):
        self.pages: dict[int, bytearray] = {}
        self._notes = notes

    @property
    def ranges(self) -> tuple[MemRange, ...]:
        return (MemRange(0, RAM),)

    @property
    def notes(self) -> tuple[Note, ...]:
        return self._notes

    def write(self, paddr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.pages.setdefault((paddr + i) // PAGE, bytearray(PAGE))[(paddr + i) % PAGE] = b

    def read(self, paddr: int, size: int) -> bytes:
        out = bytearray()
        while size:
            n = min(size, PAGE - paddr % PAGE)
            page = self.pages.get(paddr // PAGE, bytes(PAGE))
            out += page[paddr % PAGE:paddr % PAGE + n]
            paddr, size = paddr + n, size - n
        return bytes(out)


VMCOREINFO_XEN = (f"PAGESIZE=4096\nSYMBOL(domain_list)={XEN_VIRT + 0x100000:x}\nSYMBOL(frame_table)="
                  f"{XEN_VIRT + 0x100008:x}\nSYMBOL(max_page)={XEN_VIRT + 0x100010:x}\nSIZE(page_info)=32\n"
                  "SIZE(domain)=2304\nOFFSET(page_info.count_info)=8\nOFFSET(page_info._domain)=24\n"
                  "OFFSET(domain.domain_id)=0\nOFFSET(domain.next_in_list)=136\n"
                  f"SYMBOL(dom_xen)={XEN_VIRT + 0x100018:x}\n"
                  f"SYMBOL(dom_io)={XEN_VIRT + 0x100020:x}\nSYMBOL(pgd_l4)={XEN_VIRT + 0x200000:x}\n")


def _info_note(extra_version_at: int) -> Note:
    desc = xen_notes.CRASH_INFO.pack(xen_major_version=4, xen_minor_version=17, xen_extra_version=extra_version_at,
                               xen_phys_start=XEN_PHYS, dom0_pfn_to_mfn_frame_list_list=0x1234)
    return Note("Xen", xen_notes.XEN_ELFNOTE_CRASH_INFO, desc)


def _xen_machine() -> tuple[BytesSource, dict[str, int]]:
    """A machine whose Xen has dom0 (id 0) and a guest (id 1); frames 0x100-0x103 dom0's, 0x200-0x201 the guest's,
    0x300 a Xen heap frame, 0x301 free, 0x302 dom_xen's, 0x303 in use without owner."""
    notes = (Note("CORE", 1, bytes(336)),
             Note("Xen", xen_notes.XEN_ELFNOTE_CRASH_REGS, struct.pack("<4Q", 0, 0, 0x1000, 0)),
             _info_note(XEN_PHYS + 0x300000), Note("VMCOREINFO_XEN", 0, VMCOREINFO_XEN.encode()))
    src = BytesSource(notes)
    text = lambda va: va - XEN_VIRT + XEN_PHYS  # noqa: E731
    src.write(text(XEN_VIRT + 0x300000), b".7+13-g2445b30a44\0")
    # struct domains in the direct map (machine 0x1000000 + ...), linked from domain_list
    dm = xen.DIRECTMAP_VIRT_START
    dom0, dom1, dom_xen, dom_io = (0x1000000, 0x1001000, 0x1002000, 0x1003000)
    src.write(dom0, struct.pack("<H", 0))
    src.write(dom0 + 136, struct.pack("<Q", dm + dom1))
    src.write(dom1, struct.pack("<H", 1))
    src.write(dom_xen, struct.pack("<H", 0x7FF2))
    src.write(dom_io, struct.pack("<H", 0x7FF1))
    src.write(text(XEN_VIRT + 0x100000), struct.pack("<QQQQQ", dm + dom0, FRAMES, RAM // PAGE, dm + dom_xen,
                                                     dm + dom_io))
    # idle_pg_table maps frame-table pages 0, 2, 3, 4 and 6 (128 page_infos each); page 5 (frames 0x280-0x2ff)
    # is a hole
    l4, l3, l2, l1 = text(XEN_VIRT + 0x200000), 0x3000000, 0x3001000, 0x3002000
    src.write(l4 + ((FRAMES >> 39) & 0x1FF) * 8, struct.pack("<Q", l3 | 3))
    src.write(l3 + ((FRAMES >> 30) & 0x1FF) * 8, struct.pack("<Q", l2 | 3))
    src.write(l2 + ((FRAMES >> 21) & 0x1FF) * 8, struct.pack("<Q", l1 | 3))
    src.write(l1 + 0 * 8, struct.pack("<Q", 0x2000000 | 3))
    for k, page in ((2, 0x2001000), (3, 0x2002000), (4, 0x2003000), (6, 0x2004000)):
        src.write(l1 + k * 8, struct.pack("<Q", page | 3))

    def frame(mfn: int, count_info: int, owner: int) -> None:
        base = {0: 0x2000000, 2: 0x2001000, 3: 0x2002000, 4: 0x2003000, 6: 0x2004000}[mfn // 128]
        src.write(base + (mfn % 128) * 32 + 8, struct.pack("<Q", count_info))
        src.write(base + (mfn % 128) * 32 + 24, struct.pack("<I", owner))

    pick = lambda paddr: paddr >> 12  # noqa: E731  (direct-map pointer -> page_info._domain)
    alloc = xen.PGC_ALLOCATED | 1
    for mfn in range(0x100, 0x104):
        frame(mfn, alloc, pick(dom0))
    for mfn in (0x200, 0x201):
        frame(mfn, alloc, pick(dom1))
    frame(0x300, xen.PGC_XEN_HEAP | 1, 0)
    frame(0x301, 3 << 58, 0)  # PGC_state_free of Xen 4.17
    frame(0x302, alloc, pick(dom_xen))
    frame(0x303, 1, 0)
    return src, {"dom0": dom0}


def test_notes_and_info():
    src, _ = _xen_machine()
    assert xen.is_xen_dump(src)
    d = xen.read(src)
    assert d is not None and d.version == "4.17.7+13-g2445b30a44" and d.xen_phys_start == XEN_PHYS
    assert d.cpus == 1 and d.cr3 == (0x1000,) and d.dom0_p2m_frame_list_list == 0x1234
    facts = d.describe()
    assert facts["xen_vmcoreinfo"]["SYMBOL(pgd_l4)"] == f"{XEN_VIRT + 0x200000:x}"


def test_linux_dump_levels_refused_on_a_xen_dump():
    src, _ = _xen_machine()
    xen.check_level(src, 1)
    with pytest.raises(UsageErrorImage, match="pseudo-physical"):
        xen.check_level(src, 17)
    xen.check_level(BytesSource(()), 31)  # not a Xen dump: not this guard's business


def test_frame_filter_like_makedumpfile_x():
    src, _ = _xen_machine()
    dom0 = xen.frame_filter(src, "dom0")
    assert sorted(dom0.domains) == [0, 1]
    keep = dom0.keep(0x100, 0x204)
    kept = {0x100 + i for i, k in enumerate(keep) if k}
    # dom0's frames, the Xen heap's and in-use frames no domain owns (a zeroed page_info is one) are kept; the
    # guest's, free ones and those of other owners (dom_xen: makedumpfile selects dom0 only) are dropped, and so
    # are frames without a page_info (the frame table's hole)
    assert {0x100, 0x101, 0x102, 0x103, 0x300, 0x303} <= kept and set(range(0x180, 0x200)) <= kept
    assert not kept & ({0x200, 0x201, 0x301, 0x302} | set(range(0x280, 0x300)))
    hyp = xen.frame_filter(src, "hypervisor").keep(0x100, 0x204)
    kept_h = {0x100 + i for i, k in enumerate(hyp) if k}
    assert {0x300, 0x302, 0x303} <= kept_h and not kept_h & {0x100, 0x101, 0x200, 0x301}


def test_filtered_source_hides_dropped_frames():
    src, _ = _xen_machine()
    f = xen.XenFilteredSource(src, xen.frame_filter(src, "dom0"))
    mask = f.page_present_mask(0x200, 4)
    assert list(mask) == [0, 0, 1, 1]  # the guest's two frames; 0x202-3 have a zeroed page_info: in use, no owner
    with pytest.raises(UsageErrorImage, match="Xen host"):
        xen.frame_filter(BytesSource(()), "dom0")


def test_count_info_layout_follows_the_xen_version():
    """Xen 4.17 moved PGC_state and PGC_broken; a 4.17 dump's free frame is dropped with the 4.17 layout and kept
    with the old one (which makedumpfile 1.7.2 applies to every Xen 4)."""
    assert xen.pgc_layout("4.17.7") is xen.PGC_SINCE_4_17 and xen.pgc_layout("4.16.2") is xen.PGC_BEFORE_4_17
    src, _ = _xen_machine()
    assert xen.frame_filter(src, "dom0").keep(0x301, 1) == bytearray([0])
    assert xen.frame_filter(src, "dom0", xen.PGC_BEFORE_4_17).keep(0x301, 1) == bytearray([1])
