"""``khibernate view`` on both sides of a kexec jump on the test kernel: inside the jump target the first kernel's
memory (open_previous() and /dev/mem) equals /proc/vmcore page for page on a sample across all ranges and the CLI
shows its release and log; back in the first kernel, the view is the frozen jump target (its release and its own
log); the first kernel with nothing loaded and a mount without FUSE are refused with one error.

Never skipped: without root, qemu or the test kernel these tests fail and say what is missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.vm.test_jump import BACK, JUMP_LOAD, K, _vm, grun, resync

pytestmark = pytest.mark.vm

COMPARE = (Path(__file__).resolve().parents[1] / "view" / "guest_compare.py", "/guest/view_compare.py")
V = "python3 -m khibernate.cli view"


KERNEL_CODE_SHA = ("python3 -c \"import hashlib, re; from khibernate.view.frozen import Kcore; "
                   "a = int(re.search(r'([0-9a-f]+)-[0-9a-f]+ : Kernel code', open('/proc/iomem').read())[1], 16); "
                   "print(hex(a), hashlib.sha256(Kcore().read_phys(a, 1 << 20)).hexdigest())\"")


@pytest.mark.parametrize(("line", "smp"), [("6.12", 1), ("6.12", 2), ("7.3", 1)],
                         ids=["6.12-smp1", "6.12-smp2", "7.3-smp1"])
def test_view_from_both_sides_of_a_jump(line: str, smp: int) -> None:
    from vmtest.kernel import ensure_kernel
    from vmtest.vm import check_host

    check_host()
    kernel = ensure_kernel(line)
    with _vm(kernel, f"view-{line}-smp{smp}", smp=smp, extra=[COMPARE]) as vm:
        a_release = vm.release
        status, out = vm.run_status(f"{V} info")
        assert status != 0 and "no elfcorehdr=" in out and "give SOURCE" in out, out
        vm.run("echo KHB-VIEW-MARK-IN-A > /dev/kmsg")
        assert "loaded jump image" in vm.run(JUMP_LOAD, timeout=120)
        vm.mark()
        vm.send(f"{K} jump exec")
        vm.wait_for(r"Run /init as init process", timeout=180)
        vm.wait_for_shell(timeout=180, new_boot=True)
        resync(vm)
        assert "elfcorehdr=" in grun(vm, "cat /proc/cmdline")

        m = re.search(r"VIEW-COMPARE (.*)", vm.run(f"python3 {COMPARE[1]} 48", timeout=600))
        assert m, "the compare helper printed nothing"
        res = json.loads(m.group(1))
        assert res["default"] == "ElfSource"  # /proc/vmcore is there: open_previous() takes it
        assert res["ranges_devmem"] == res["ranges_ref"] and len(res["ranges_ref"]) >= 2
        assert res["vmcoreinfo_equal"] and res["osrelease"] == a_release
        assert res["n_differ"] == 0, res["differ"]
        assert res["compared"] >= 48 and res["nonzero"] >= 10, json.dumps(res)[-600:]
        # read() of /dev/mem (x86) stops at the jump target's own end of RAM (high_memory), where most of the first
        # kernel and its elfcorehdr are: the fallback maps /dev/mem, and every sampled page, above high_memory too,
        # equals /proc/vmcore; the whole fallback (elfcorehdr, notes, data through /dev/mem) opens
        assert res["refused"] == [], res["refused"]
        assert res["compared_above_high"] >= 16, json.dumps(res)[-600:]
        assert res["fallback"] == "ok", res["fallback"]
        # its ranges are the elfcorehdr's: /proc/vmcore rounds a partial page (0x9f000-0x9fc00) out to a whole one
        pages = [[a, -(-b // 4096) * 4096] for a, b in res["ranges_fallback"]]
        assert pages == res["ranges_ref"] and res["vmcoreinfo_fallback_equal"], json.dumps(res)[-600:]

        info = json.loads(vm.run(f"{V} info --json", timeout=120))
        assert info["osrelease"] == a_release and info["ranges"] == [[hex(a), hex(b)] for a, b in res["ranges_ref"]]
        assert "KHB-VIEW-MARK-IN-A" in vm.run(f"{V} dmesg", timeout=300)
        assert vm.run(f"{V} read --paddr 0x100000 --size 64", timeout=120).startswith("0000000000100000  ")

        vm.run("mkdir -p /tmp/m")
        status, out = vm.run_status(f"{V} mount /tmp/m", timeout=120)
        assert status != 0 and "no FUSE" in out and out.count("error:") == 1, out  # CONFIG_FUSE_FS is off
        assert "/tmp/m" not in vm.run("cat /proc/mounts")

        # back in the first kernel: the view is the frozen jump target (crash region + the kimage's swapped pages)
        vm.run("echo KHB-VIEW-MARK-IN-B > /dev/kmsg")
        code_at, code_sha = grun(vm, KERNEL_CODE_SHA).split()  # the target's own kernel text, read by itself
        vm.mark()
        vm.send(f"{K} jump back")
        vm.wait_for(BACK, timeout=180)
        vm.wait_for_shell(timeout=60, new_boot=False)
        resync(vm)
        assert "elfcorehdr=" not in grun(vm, "cat /proc/cmdline")
        info = json.loads(vm.run(f"{V} info --json", timeout=300))
        assert info["format"] == "frozen" and info["osrelease"] == a_release, info
        crash = re.search(r"([0-9a-f]+)-([0-9a-f]+) : Crash kernel", grun(vm, "cat /proc/iomem"))
        assert crash and [hex(int(crash.group(1), 16)), hex(int(crash.group(2), 16) + 1)] in info["ranges"], info
        log = vm.run(f"{V} dmesg", timeout=300)
        assert "KHB-VIEW-MARK-IN-B" in log and "khb.role=B" in log and "elfcorehdr=" in log
        assert "KHB-VIEW-MARK-IN-A" not in log  # the target's own log, not the first kernel's
        # its kernel text sits in a segment destination: the first kernel reads it from the swapped-back page
        viewed = vm.run(f"{V} read --paddr {code_at} --size 0x100000 --raw | sha256sum", timeout=300).split()[0]
        assert viewed == code_sha, (code_at, viewed, code_sha)
