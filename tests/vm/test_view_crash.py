"""``crash`` on a ``view mount`` vmcore, where Debian 12's crash 8.0.2 supports the kernel: a QEMU dump of Debian's
own 6.1 kernel (KASLR on) with that build's debug vmlinux from its -dbg package. ``sys``, ``log`` and ``ps`` on
DIR/vmcore show the release, the guest's kernel-log marker and its processes, and say what they say on the QEMU ELF
itself (crash 8.0.2 cannot read the 6.12/7.3 test kernels: tests/vm/test_view_mount_real.py uses drgn and gdb there).

Never skipped: without root, qemu, crash or setup's Debian kernel and its debug vmlinux these tests fail and say what
is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from khibernate.image.sources import open_source
from tests.vm.view_mounting import mounted
from tests.vm.vmcores import DebianDump, debian_dump

pytestmark = pytest.mark.vm

# `ps` of crash 8.0.2 lists only the idle and active tasks on this kernel: Debian's 6.1.y carries the kernel's
# "pid: Replace struct pid 1-element array with flex-array", and 8.0.2 reads struct pid without numbers[0] (fixed in
# crash 8.0.4, commit 88580068 "Fix failure of gathering task table on Linux 6.5-rc1 and later"). The task list
# (`list task_struct.tasks`) does not need the pid table: it shows every process.
COMMANDS = "sys\nlog\nps\nlist task_struct.tasks -s task_struct.pid,comm -h init_task\nexit\n"
CRASH_TIMEOUT = 900


@pytest.fixture(scope="module")
def dump() -> DebianDump:
    return debian_dump()


def crash(vmlinux: Path, vmcore: Path, tmp: Path) -> dict[str, str]:
    """The output of ``crash -s vmlinux vmcore`` running COMMANDS from a file (non-interactive), per command."""
    binary = shutil.which("crash")
    assert binary, "crash is not installed: apt-get install crash (scripts/setup.sh does)"
    cmds = tmp / "crash-commands"
    cmds.write_text(COMMANDS)
    r = subprocess.run([binary, "-s", "-i", str(cmds), str(vmlinux), str(vmcore)], capture_output=True, text=True,
                       timeout=CRASH_TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"crash exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = r.stdout
    log_at = re.search(r"^\[\s*0\.000000\] Linux version ", out, re.M)
    ps_at = re.search(r"^\s+PID\s+PPID\s+CPU\s+TASK\s+ST", out, re.M)
    list_at = re.search(r"^[0-9a-f]{16}\n  pid = 0,", out, re.M)
    assert log_at and ps_at and list_at and log_at.start() < ps_at.start() < list_at.start(), out[:3000]
    return {"sys": out[:log_at.start()], "log": out[log_at.start():ps_at.start()],
            "ps": out[ps_at.start():list_at.start()], "list": out[list_at.start():]}


def test_crash_reads_the_mounted_vmcore_of_debian_6_1(dump: DebianDump, tmp_path: Path) -> None:
    release = dump.meta["release"]
    assert release.startswith("6.1.") and release.endswith("-amd64"), release
    with open_source(dump.vmcore) as src:  # QEMU's dump carries the guest's VMCOREINFO (qemu_fw_cfg): KASLR offset
        assert "KERNELOFFSET=" in (src.vmcoreinfo_text or ""), "the QEMU dump has no VMCOREINFO note"
    d = tmp_path / "mnt"
    with mounted(d, dump.vmcore):
        out = crash(dump.vmlinux, d / "vmcore", tmp_path)
    assert re.search(rf"^\s+RELEASE: {re.escape(release)}$", out["sys"], re.M), out["sys"]
    assert re.search(rf"^\s+DUMPFILE: {re.escape(str(d / 'vmcore'))}$", out["sys"], re.M), out["sys"]
    assert re.search(r"^\s+MEMORY: 1 GB$", out["sys"], re.M), out["sys"]
    assert f"Linux version {release}" in out["log"] and dump.meta["mark"] in out["log"], out["log"][-2000:]
    assert re.search(r"^>?\s+0\s+0\s+0\s+[0-9a-f]+\s+RU\s.*\[swapper/0\]$", out["ps"], re.M), out["ps"]
    tasks = {int(m.group(1)): m.group(2) for m in re.finditer(r'^  pid = (\d+),\n  comm = "([^"\\]*)', out["list"],
                                                                re.M)}
    assert tasks.get(1) == "init" and tasks.get(2) == "kthreadd", out["list"][:2000]
    assert tasks.get(dump.meta["sleep_pid"]) == "sleep" and "vm-agent" in tasks.values(), out["list"][-2000:]
    print(f"\n[crash 8.0.2, view mount of a Debian {release} QEMU dump] {len(tasks)} processes; sys:\n"
          f"{out['sys'].rstrip()}\nps:\n{out['ps'].rstrip()}")

    # the same commands on the QEMU ELF the view was made from say the same (only the dump file's name differs)
    ref = crash(dump.vmlinux, dump.vmcore, tmp_path)
    assert ref["log"] == out["log"] and ref["ps"] == out["ps"] and ref["list"] == out["list"]
    assert re.sub(r"DUMPFILE: .*", "", ref["sys"]) == re.sub(r"DUMPFILE: .*", "", out["sys"])
