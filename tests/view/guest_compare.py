"""Guest helper for tests/vm/test_view.py, run inside the jump target: the first kernel's memory through
open_previous() and through /dev/mem (the data path of the fallback without /proc/vmcore) against /proc/vmcore,
page by page on a sample across every range (above this kernel's high_memory too: the fallback maps /dev/mem);
also what the full fallback (elfcorehdr via /dev/mem) says.
Prints one JSON line."""

import hashlib
import json
import sys

from khibernate.image.errors import MappingRefusedError
from khibernate.image.sources import open_source
from khibernate.image.sources.raw import DevMemSource
from khibernate.view import NoPreviousKernelError, open_previous
from khibernate.view.previous import open_running_side

PER_RANGE = int(sys.argv[1]) if len(sys.argv) > 1 else 48


def main() -> None:
    out = {}
    fallback = None
    try:  # the fallback without /proc/vmcore: /dev/mem plus the elfcorehdr read through /dev/mem
        fallback = open_running_side(vmcore="/nonexistent")
        out["fallback"] = "ok"
    except NoPreviousKernelError as e:
        out["fallback"] = str(e)
    with open_source("/proc/vmcore") as ref, open_previous() as default:
        devmem = DevMemSource("/dev/mem", ref.ranges)  # the fallback's data path (mmap windows) over the same ranges
        out["default"] = type(default).__name__
        out["ranges_ref"] = [[r.start, r.end] for r in ref.ranges]
        out["ranges_devmem"] = [[r.start, r.end] for r in devmem.ranges]
        out["vmcoreinfo_equal"] = ref.vmcoreinfo_text is not None and ref.vmcoreinfo_text == default.vmcoreinfo_text
        if fallback is not None:
            out["ranges_fallback"] = [[r.start, r.end] for r in fallback.ranges]
            out["vmcoreinfo_fallback_equal"] = fallback.vmcoreinfo_text == ref.vmcoreinfo_text
        out["osrelease"] = next((line.split("=", 1)[1] for line in (ref.vmcoreinfo_text or "").splitlines()
                                 if line.startswith("OSRELEASE=")), None)
        # x86 /dev/mem read() stops at the running kernel's high_memory (valid_phys_addr_range): the end of its RAM;
        # the fallback maps /dev/mem instead, which reaches above it
        high = max(int(line.split("-")[1].split()[0], 16) + 1 for line in open("/proc/iomem")
                   if line.strip().endswith(": System RAM"))
        compared, differ, nonzero, refused, above_high = 0, [], 0, [], 0
        loads = sorted((p.paddr, p.paddr + p.memsz) for p in ref.headers.loads if p.vaddr < 0xFFFFFFFF80000000)
        for r in ref.ranges:
            first, last = r.start // 4096, (r.end - 1) // 4096
            step = max(1, (last - first) // PER_RANGE)
            for pfn in sorted({*range(first, last + 1, step), last}):
                # compare only bytes a PT_LOAD holds (a partial page like 0x9f000-0x9fc00 is padded with zeros
                # by the reader, while /dev/mem shows the running kernel's BIOS area there)
                lo = pfn * 4096
                n = min(lo + 4096, next(e for s, e in loads if s <= lo < e)) - lo
                a = ref.read(lo, n)
                try:
                    b = devmem.read(lo, n)
                except MappingRefusedError as e:  # /dev/mem refuses a page the running kernel owns (STRICT_DEVMEM)
                    refused.append([hex(lo), e.errno])
                    continue
                c = default.read(lo, n)
                if fallback is not None and fallback.read(lo, n) != a:
                    differ.append([hex(lo), "fallback"])
                compared += 1
                above_high += lo >= high
                nonzero += any(a)
                if not a == b == c:
                    differ.append([hex(pfn * 4096), hashlib.sha1(a).hexdigest()[:8], hashlib.sha1(b).hexdigest()[:8]])
        out["high_memory"] = high
        out["refused"] = refused[:20]
        out["compared_above_high"] = above_high
        out.update(compared=compared, nonzero=nonzero, differ=differ[:20], n_differ=len(differ))
    if fallback is not None:
        fallback.close()
    print("VIEW-COMPARE " + json.dumps(out))


if __name__ == "__main__":
    main()
