"""Guest helper for tests/vm/test_snapshot.py: a process whose anonymous pages hold a known pattern.

`pattern N`: map N pages, fill page i with `KHB-PATTERN-<i>-` repeated, mlock them, write their physical addresses
(from /proc/self/pagemap) to /tmp/pattern.json, then check the pattern every second and write the count of good
checks to /tmp/pattern.ok (a damaged page makes it write /tmp/pattern.bad and exit).
"""

import ctypes
import json
import mmap
import struct
import sys
import time

PAGE = 4096


def fill(i):
    unit = f"KHB-PATTERN-{i:06d}-".encode()
    return (unit * (PAGE // len(unit) + 1))[:PAGE]


def main(n):
    buf = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        buf[i * PAGE:(i + 1) * PAGE] = fill(i)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mlock(ctypes.c_void_p(base), ctypes.c_size_t(n * PAGE)) == 0
    addrs = []
    with open("/proc/self/pagemap", "rb") as f:
        for i in range(n):
            f.seek((base // PAGE + i) * 8)
            (e,) = struct.unpack("<Q", f.read(8))
            addrs.append((e & ((1 << 55) - 1)) * PAGE)
    with open("/tmp/pattern.json.tmp", "w") as f:
        json.dump(addrs, f)
    import os

    os.rename("/tmp/pattern.json.tmp", "/tmp/pattern.json")
    ok = 0
    while True:
        for i in range(n):
            if buf[i * PAGE:(i + 1) * PAGE] != fill(i):
                open("/tmp/pattern.bad", "w").write(f"page {i}\n")
                return
        ok += 1
        open("/tmp/pattern.ok", "w").write(f"{ok}\n")
        time.sleep(1)


if __name__ == "__main__":
    main(int(sys.argv[2]))
