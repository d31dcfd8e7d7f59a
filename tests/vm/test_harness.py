"""The VM harness itself: command protocol, errors, timeouts, QMP (a guest memory dump with VMCOREINFO)."""

from __future__ import annotations

import time

import pytest
from elftools.elf.elffile import ELFFile

from vmtest.vm import VM, GuestError, VMError

pytestmark = pytest.mark.vm


def test_commands_errors_timeouts_and_qmp_dump(test_kernel, tmp_path):
    with VM(kernel=test_kernel, name="test-harness", memory_mb=512, timeout=120) as vm:
        assert vm.release == test_kernel.info["release"] and vm.boot_id
        assert vm.run("echo out; echo err >&2") == "out\nerr\n"
        assert vm.run("printf 'no newline'") == "no newline"
        assert vm.run("true") == ""
        assert vm.run_status("exit 7") == (7, "")
        with pytest.raises(GuestError) as e:
            vm.run("echo why; false")
        assert e.value.status == 1 and e.value.output == "why\n"
        # long, multi-line commands with quotes survive the transport (base64 in chunks)
        script = "\n".join(f"echo 'line {i}: \"quoted\" $((i * 2))'" for i in range(300))
        out = vm.run(script).splitlines()
        assert len(out) == 300 and out[299] == 'line 299: "quoted" $((i * 2))'
        # a timeout raises VMError and the next command still works
        t = time.monotonic()
        with pytest.raises(VMError, match="timed out"):
            vm.run("sleep 30", timeout=2)
        assert time.monotonic() - t < 10
        assert vm.run("echo still here", timeout=60) == "still here\n"
        # kernel messages go to the console (ttyS0), never into command output (ttyS1)
        assert vm.run("echo KHB-KMSG-TEST > /dev/kmsg; echo done") == "done\n"
        vm.wait_for(r"KHB-KMSG-TEST", timeout=30)
        # QMP: a guest memory dump is an ELF core carrying the guest's VMCOREINFO (-device vmcoreinfo)
        assert vm.qmp("query-status")["status"] == "running"
        dump = tmp_path / "guest.elf"
        vm.qmp("stop")
        vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        vm.qmp("cont")
    with open(dump, "rb") as f:
        notes = [n for seg in ELFFile(f).iter_segments() if seg["p_type"] == "PT_NOTE" for n in seg.iter_notes()]
    vmcoreinfo = [n for n in notes if n["n_name"] == "VMCOREINFO"]
    assert vmcoreinfo, [n["n_name"] for n in notes]
    desc = vmcoreinfo[0]["n_desc"]
    text = desc.decode() if isinstance(desc, bytes) else desc
    assert f"OSRELEASE={test_kernel.info['release']}" in text
