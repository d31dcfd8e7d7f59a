"""Small parsers for what the guest prints (/proc/iomem, /proc/cmdline), shared by the VM tests and the demo."""

from __future__ import annotations

import re

from vmtest.vm import BASE_APPEND


def iomem_ranges(iomem: str, name: str, top_level: bool = True) -> list[tuple[int, int]]:
    """(start, end inclusive) of the /proc/iomem lines called name (only unindented ones if top_level)."""
    out = []
    for line in iomem.splitlines():
        if top_level and line.startswith(" "):
            continue
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : (.*)$", line)
        if m and m.group(3).strip() == name:
            out.append((int(m.group(1), 16), int(m.group(2), 16)))
    return out


def crash_region(iomem: str) -> tuple[int, int]:
    """The 'Crash kernel' range reserved by crashkernel=; ValueError if the kernel reserved none."""
    found = iomem_ranges(iomem, "Crash kernel", top_level=False)
    if not found:
        raise ValueError("no 'Crash kernel' range in /proc/iomem: boot with crashkernel=256M")
    return found[0]


def jump_append(base: int, end: int, extra: str = "", elfcorehdr: tuple[int, int] | None = None) -> str:
    """Command line for a kernel jumped to with kexec-tools --load-preserve-context into [base, end]:
    our memmap= confines it to the crash region (+ low RAM for its trampoline) minus the ELF core header
    [start, end) if given (elfcorehdr= must point outside its own RAM), and the trailing '--' hands what
    kexec-tools and purgatory append (a later memmap=, elfcorehdr=) to init instead of the kernel."""
    usable = [(base, end + 1)]
    hdr = ""
    if elfcorehdr is not None:
        hs, he = elfcorehdr
        usable = [r for r in ((base, hs), (he, end + 1)) if r[1] > r[0]]
        hdr = f" elfcorehdr={hs >> 10}K"
    maps = " ".join(f"memmap={(e - s) >> 10}K@{s:#x}" for s, e in usable)
    return " ".join(p for p in (BASE_APPEND, extra, "memmap=exactmap memmap=639K@0", maps) if p) + hdr + " --"


def jump_back_entry(cmdline: str) -> int | None:
    """kexec_jump_back_entry=0x... from a jumped-to kernel's /proc/cmdline."""
    m = re.search(r"kexec_jump_back_entry=(0x[0-9a-fA-F]+)", cmdline)
    return int(m.group(1), 16) if m else None


def load_jump(vm, base: int, end: int, extra: str = "", kernel: str = "/boot/bzImage",
              initrd: str = "/boot/initrd.img", timeout: float = 180) -> str:
    """In the guest: kexec-tools --load-preserve-context of kernel into the crash region [base, end]; return the
    command line used.  Loaded twice: kexec-tools appends elfcorehdr= after our '--' (where the kernel ignores it),
    so the first load tells where it puts the ELF core header; the second passes elfcorehdr= before '--' and keeps
    that segment out of the new kernel's RAM, so the jumped-to kernel offers the first kernel's memory as
    /proc/vmcore."""
    cmd = (f"kexec -d --load-preserve-context --mem-min={base:#x} --mem-max={end:#x} {kernel} --initrd={initrd}"
           " --append='{}' > /tmp/kexec-d.log 2>&1; st=$?; "
           "grep -oE 'elfcorehdr=[0-9]+K|segment\\[[0-9]+\\]\\.mem(sz)? *= *0x[0-9a-f]+' /tmp/kexec-d.log; "
           "[ $st = 0 ] || tail -n 20 /tmp/kexec-d.log; exit $st")

    def header(out: str) -> tuple[int, int]:
        m = re.search(r"elfcorehdr=(\d+)K", out)
        if not m:
            raise ValueError(f"kexec -d did not report elfcorehdr= (got {out[-500:]!r})")
        start = int(m.group(1)) << 10
        mems = dict(re.findall(r"segment\[(\d+)\]\.mem *= *(0x[0-9a-f]+)", out))
        sizes = dict(re.findall(r"segment\[(\d+)\]\.memsz *= *(0x[0-9a-f]+)", out))
        for i, mem in mems.items():
            if int(mem, 16) == start:
                return start, start + int(sizes[i], 16)
        raise ValueError(f"no kexec segment at elfcorehdr {start:#x} in {out[-800:]!r}")

    first = header(vm.run(cmd.format(jump_append(base, end, extra)), timeout=timeout))
    append = jump_append(base, end, extra, first)
    second = header(vm.run(cmd.format(append), timeout=timeout))
    if second != first:
        raise ValueError(f"kexec-tools moved the ELF core header between loads ({first} then {second})")
    return append
