"""Guest workload for the filter oracle: page cache, tmpfs, anonymous memory with mixed content; holds it forever.

Usage (in the guest): ``python3 workload.py MB_ANON MB_TMPFS MB_BDEV`` -> daemonises, writes /tmp/workload.ready.
"""

import os
import random
import sys
import time

PAGE = 4096


def mixed_page(i: int, rnd: random.Random) -> bytes:
    kind = i % 4
    if kind == 0:
        return bytes(PAGE)  # touched but zero
    if kind == 1:
        return rnd.randbytes(PAGE)  # incompressible
    if kind == 2:
        return (f"line {i} of some compressible text. " * 200).encode()[:PAGE]
    return bytes([i & 0xFF]) * PAGE


def main() -> None:
    anon_mb, tmpfs_mb, bdev_mb = (int(x) for x in sys.argv[1:4])
    if os.fork():
        return
    os.setsid()
    rnd = random.Random(42)
    os.makedirs("/mnt/t", exist_ok=True)
    os.system("mount -t tmpfs -o size=512m tmpfs /mnt/t")
    with open("/mnt/t/data", "wb") as f:
        for i in range(tmpfs_mb * 256):
            f.write(mixed_page(i + 1, rnd))
    if bdev_mb:
        with open("/dev/vda", "rb") as f:
            for _ in range(bdev_mb):
                f.read(1 << 20)
    anon = bytearray(anon_mb << 20)
    for i in range(anon_mb * 256):
        anon[i * PAGE:(i + 1) * PAGE] = mixed_page(i, rnd)
    with open("/tmp/workload.ready", "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(3600)


main()
