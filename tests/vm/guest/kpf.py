"""Guest side of the filter oracle: snapshot /proc/kpageflags into memory allocated beforehand, then either
(default) announce it on the console, wait for the host's QMP dump (until /tmp/go exists) and write the snapshot to
the start of /dev/vda; or (``--kdump OFFSET``) write it with O_DIRECT (no page cache) at OFFSET of /dev/vda and
crash the kernel at once, so kdump captures the pages the snapshot describes.

Nothing is allocated between the snapshot and the dump. In the QMP mode a second snapshot is taken right after the
dump (the host lets the guest go on): pages whose flags differ between the two changed state while the dump was being
taken (e.g. per-CPU free lists drained into the buddy allocator by another CPU), so the oracle leaves them out.
"""

import mmap
import os
import sys
import time

kdump_offset = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[1] == "--kdump" else None

size = os.stat("/proc/kpageflags").st_size or (os.sysconf("SC_PHYS_PAGES") + (1 << 18)) * 8
buf = mmap.mmap(-1, 8 + 8 * (1 << 22))  # page aligned (O_DIRECT); up to 16 GiB of pfns
after = mmap.mmap(-1, 8 * (1 << 22)) if kdump_offset is None else None
for b in (buf, after):
    for i in range(0, len(b) if b is not None else 0, 4096):
        b[i] = 1  # touched now so reading does not fault pages in later
sysrq = open("/proc/sysrq-trigger", "w") if kdump_offset is not None else None
vda = os.open("/dev/vda", os.O_WRONLY | os.O_DIRECT) if kdump_offset is not None else -1
with open("/dev/kmsg", "w") as kmsg, open("/proc/kpageflags", "rb", buffering=0) as f:
    n = 0
    mv = memoryview(buf)[8:]
    while True:
        got = f.readinto(mv[n:n + (1 << 20)])
        if not got:
            break
        n += got
    if sysrq is not None:
        buf[:8] = n.to_bytes(8, "little")
        os.pwrite(vda, memoryview(buf)[:(8 + n + 4095) & ~4095], kdump_offset)
        sysrq.write("c")
        sysrq.flush()
    kmsg.write(f"KHB-KPF-READY {n}\n")
    kmsg.flush()
    while not os.path.exists("/tmp/go"):
        time.sleep(0.05)
    f.seek(0)
    m = 0
    while m < n:
        got = f.readinto(memoryview(after)[m:min(n, m + (1 << 20))])
        if not got:
            break
        m += got
fd = os.open("/dev/vda", os.O_WRONLY)
# after the dump: allocations no longer matter. Layout: n, snapshot before, snapshot after
os.pwrite(fd, n.to_bytes(8, "little") + bytes(mv[:n]) + bytes(memoryview(after)[:n]), 0)
os.fsync(fd)
os.close(fd)
open("/tmp/kpf.done", "w").close()
