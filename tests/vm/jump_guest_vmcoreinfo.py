"""Guest helper for tests/vm/test_jump.py: print the VMCOREINFO note text.

`kcore`: the running kernel's own note (address from /sys/kernel/vmcoreinfo, read through /proc/kcore);
`vmcore`: the note in /proc/vmcore (the first kernel's, seen from a jump or kdump target).
"""

import struct
import sys


def notes(buf):
    off, out = 0, []
    while off + 12 <= len(buf):
        namesz, descsz, typ = struct.unpack_from("<III", buf, off)
        if namesz == 0:
            break
        name = buf[off + 12:off + 12 + namesz].rstrip(b"\0")
        doff = off + 12 + ((namesz + 3) & ~3)
        out.append((name, typ, buf[doff:doff + descsz]))
        off = doff + ((descsz + 3) & ~3)
    return out


def phdrs(f):
    f.seek(0)
    eh = f.read(64)
    phoff = struct.unpack_from("<Q", eh, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", eh, 54)
    f.seek(phoff)
    raw = f.read(phentsize * phnum)
    return [struct.unpack_from("<IIQQQQQQ", raw, i * phentsize) for i in range(phnum)]


def main(mode):
    if mode == "vmcore":
        with open("/proc/vmcore", "rb") as f:
            loads = []
            for ptype, _, off, _, paddr, filesz, _, _ in phdrs(f):
                if ptype == 4:
                    f.seek(off)
                    for name, _, desc in notes(f.read(filesz)):
                        if name == b"VMCOREINFO":
                            sys.stdout.write(desc.decode())
                elif ptype == 1:
                    loads.append(f"{paddr:#x}+{filesz:#x}")
            sys.stdout.write("PT_LOAD " + " ".join(loads) + "\n")
    else:
        addr, size = open("/sys/kernel/vmcoreinfo").read().split()
        pa, size = int(addr, 16), int(size, 16)
        with open("/proc/kcore", "rb") as f:
            # the direct map's PT_LOADs carry physical addresses (p_paddr): no need to know PAGE_OFFSET, which
            # RANDOMIZE_MEMORY moves on every boot (the distro flavour)
            for ptype, _, off, _, paddr, _, memsz, _ in phdrs(f):
                if ptype == 1 and paddr != 2**64 - 1 and paddr <= pa < paddr + memsz:
                    f.seek(off + pa - paddr)
                    for name, _, desc in notes(f.read(size)):
                        if name == b"VMCOREINFO":
                            sys.stdout.write(desc.decode())
                    return


if __name__ == "__main__":
    main(sys.argv[1])
