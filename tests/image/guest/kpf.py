"""Guest side of the filter oracle: snapshot /proc/kpageflags into memory allocated beforehand, announce it on the
console, wait for the host's dump (until /tmp/go exists), then write the snapshot to the start of /dev/vda.

Nothing is allocated between the snapshot and the dump, so the dump sees the pages the snapshot describes.
"""

import os
import time

size = os.stat("/proc/kpageflags").st_size or (os.sysconf("SC_PHYS_PAGES") + (1 << 18)) * 8
buf = bytearray(8 * (1 << 22))  # up to 16 GiB of pfns; touched now so reading does not fault pages in later
for i in range(0, len(buf), 4096):
    buf[i] = 1
with open("/dev/kmsg", "w") as kmsg, open("/proc/kpageflags", "rb", buffering=0) as f:
    n = 0
    mv = memoryview(buf)
    while True:
        got = f.readinto(mv[n:n + (1 << 20)])
        if not got:
            break
        n += got
    kmsg.write(f"KHB-KPF-READY {n}\n")
    kmsg.flush()
    while not os.path.exists("/tmp/go"):
        time.sleep(0.05)
fd = os.open("/dev/vda", os.O_WRONLY)
os.pwrite(fd, n.to_bytes(8, "little") + bytes(mv[:n]), 0)
os.fsync(fd)
os.close(fd)
open("/tmp/kpf.done", "w").close()
