"""Run by Debian's python3 with python3-libkdumpfile: sha256 of the given pages as libkdumpfile reads them.

usage: kdumpfile_digest.py DUMP PFNS   (PFNS: little-endian uint64 page frame numbers)
prints: <number of pages> <sha256 hex>

Machine physical addresses (= kernel physical on x86_64): Debian 12's libkdumpfile 0.5.1 cannot set up Linux 6.12
address translation ("Cannot determine 5-level paging", also on the kernel's own /proc/vmcore), which
KDUMP_KPHYSADDR reads need.
"""

import hashlib
import sys
from array import array

import kdumpfile

dump, pfn_file = sys.argv[1], sys.argv[2]
pfns = array("Q")
with open(pfn_file, "rb") as f:
    pfns.frombytes(f.read())
k = kdumpfile.kdumpfile(dump)
h = hashlib.sha256()
for pfn in pfns:
    h.update(k.read(kdumpfile.KDUMP_MACHPHYSADDR, pfn * 4096, 4096))
print(len(pfns), h.hexdigest())
