"""The Debian 12 test machine booted in QEMU: a private copy of the cached disk (vmtest/rootfs.py), started from
what its own /boot holds, with systemd as PID 1 and the harness's agent on ttyS1 (a systemd unit in the image).

Like a boot loader, each boot reads the kernel and initrd from the disk's ext4 (debugfs, no journal replay: what
GRUB sees), so an initramfs that `update-initramfs -u` rebuilt inside the guest is the one the next boot runs.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from pathlib import Path

from vmtest import diskfile
from vmtest.rootfs import PARTITION_OFFSET, RootfsImage
from vmtest.vm import LOG_ROOT, TIMEOUT_SCALE, VM, VMError

# crashkernel= as a distribution's kdump setup puts it on the command line (kdump-tools: a fixed size)
CRASHKERNEL = "crashkernel=256M"


@dataclasses.dataclass(frozen=True)
class BootFiles:
    """A kernel and initrd read from the machine's /boot (``bzimage`` is what vmtest.vm.VM boots)."""

    bzimage: Path
    initrd: Path
    release: str

    @property
    def modular(self) -> bool:
        """False for vmtest.vm.VM: the machine boots the initrd of its own /boot (update-initramfs put the disk's
        modules in it), so VM builds no guest initramfs and ships no module tree."""
        return False


class Machine:
    """One machine: its disk (a sparse copy of the cached image, kept across boots) and how to boot it."""

    def __init__(self, image: RootfsImage, name: str):
        self.image = image
        self.name = name
        self.dir = LOG_ROOT / f"{name}-machine"
        self.disk = self.dir / "disk.img"
        self.extra_disks: list[Path] = []  # more raw disks, attached after the root disk (/dev/vdb, ...)
        self.boots = 0

    def create(self) -> float:
        """Copy the cached disk (sparse) into this machine's folder; returns the seconds it took."""
        t0 = time.monotonic()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        diskfile.copy_sparse(self.image.disk, self.disk)
        return time.monotonic() - t0

    @property
    def root_fs(self) -> str:
        """The root partition as e2fsprogs opens it inside the disk image."""
        return f"{self.disk}?offset={PARTITION_OFFSET}"

    def read_file(self, path: str) -> bytes:
        """A file of the guest's root filesystem as on disk now (QEMU stopped or not writing it)."""
        out = self.dir / "debugfs.out"
        out.unlink(missing_ok=True)
        r = subprocess.run(["debugfs", "-R", f"dump {path} {out}", self.root_fs], capture_output=True, text=True)
        if r.returncode != 0 or not out.is_file() or "File not found" in r.stderr:
            raise FileNotFoundError(f"{path} in {self.disk}: {r.stderr.strip()[-300:]}")
        data = out.read_bytes()
        out.unlink()
        return data

    def put_file(self, src: Path, path: str) -> None:
        """Write a host file into the guest's root filesystem (debugfs -w; only while the machine is off and its
        filesystem clean, e.g. before the first boot: what a user downloaded)."""
        r = subprocess.run(["debugfs", "-w", "-R", f"write {src} {path}", self.root_fs], capture_output=True, text=True)
        if r.returncode != 0 or "rror" in r.stderr:
            raise OSError(f"debugfs write {src} {path}: {r.stderr.strip()[-300:]}")

    def boot_files(self, release: str | None = None) -> BootFiles:
        """/boot/vmlinuz-REL and /boot/initrd.img-REL from the disk (the image's kernel by default)."""
        rel = release or self.image.release
        bz = self.dir / f"vmlinuz-{rel}"
        ird = self.dir / f"initrd.img-{rel}"
        bz.write_bytes(self.read_file(f"/boot/vmlinuz-{rel}"))
        ird.write_bytes(self.read_file(f"/boot/initrd.img-{rel}"))
        return BootFiles(bz, ird, rel)

    def append(self, extra: str = "") -> str:
        """The kernel command line a distribution's boot loader would pass, plus ``extra``."""
        return f"root=UUID={self.image.root_uuid} ro console=ttyS0 {CRASHKERNEL} panic=-1 {extra}".strip()

    def vm(self, extra_append: str = "", memory_mb: int = 1536, smp: int = 1, timeout: float = 300,
           wait_ready: bool = True, release: str | None = None) -> VM:
        """A VM booting this machine's disk (enter it to start); each boot gets its own log folder."""
        self.boots += 1
        files = self.boot_files(release)
        return VM(kernel=files, initrd=files.initrd, base_append=self.append(extra_append), memory_mb=memory_mb,
                  smp=smp, disks=[self.disk, *self.extra_disks], timeout=timeout, name=f"{self.name}-boot{self.boots}",
                  wait_ready=wait_ready)

    def fsck(self) -> tuple[int, str]:
        """e2fsck -fn of the root filesystem on the host (QEMU must have exited): (status, output)."""
        r = subprocess.run(["e2fsck", "-fn", self.root_fs], capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr


def wait_system_running(vm: VM, timeout: float = 300) -> str:
    """Wait until systemd finished booting (`systemctl is-system-running --wait`); returns its state."""
    status, out = vm.run_status("systemctl is-system-running --wait", timeout=timeout)
    state = out.strip().splitlines()[-1] if out.strip() else ""
    if state not in ("running", "degraded"):
        raise AssertionError(f"systemd did not finish booting: {out!r} (status {status})")
    return state


# What the guest's console shows when a hibernation or resume went wrong (the capture kernel's job, the kernel itself,
# the premount script's refusal): a wait stops at the first one instead of running into its timeout.
CONSOLE_FAILURES = re.compile(r"Kernel panic - not syncing|khibernate-capture: FAILED|khibernate-capture: cannot|"
                              r"resume: .*booting normally|Oops: |BUG: ")


def unit_start_stamp(vm: VM, unit: str) -> str:
    """The monotonic start time (µs) of ``unit``'s last run ("0": it never ran), for unit_run_watcher."""
    return vm.run(f"systemctl show -p ExecMainStartTimestampMonotonic --value {unit}").strip() or "0"


def unit_run_watcher(unit: str, previous_start: str, limit_s: int = 7200) -> str:
    """A guest shell command that waits until a run of ``unit`` (a oneshot, e.g. systemd-hibernate.service) that
    started after ``previous_start`` (unit_start_stamp before the run was asked for) has ended: exit 0 when it ended
    well; exit 1 with the unit's journal when it failed.  Send it with VM.send() and poll it: it is frozen with the
    system while the unit hibernates, and ends after the resume."""
    show = f"systemctl show -p ActiveState,Result,ExecMainStartTimestampMonotonic {unit}"  # KEY=value lines
    return (f"i=0; while [ $i -lt {limit_s} ]; do eval \"$({show})\"; "
            f"if [ \"$ExecMainStartTimestampMonotonic\" != {previous_start} ] && "
            f"! systemctl list-jobs --no-legend | grep -q {unit}; then "
            f"case $ActiveState in failed) echo \"{unit} failed ($Result)\"; "
            f"journalctl -b 0 -u {unit} --no-pager -o short-monotonic | tail -n 60; exit 1;; "
            f"inactive) exit 0;; esac; fi; sleep 1; i=$((i+1)); done; echo 'still waiting for {unit}'; exit 2")


def _console_failure(vm: VM, since: int) -> str | None:
    text = vm.console_text()[since:]
    m = CONSOLE_FAILURES.search(text)
    return None if m is None else text[max(0, m.start() - 2500):m.end() + 1500]


def wait_power_off(vm: VM, watcher: str, timeout: float, since: int = 0) -> float:
    """Wait until the guest powers off by itself (QEMU exits with status 0) and return the seconds waited; fail
    as soon as the ``watcher`` command (sent before, see unit_run_watcher) ends, the console (from offset
    ``since``) shows a failure, or QEMU exits otherwise.  The message carries what the guest said."""
    t0 = time.monotonic()
    deadline = t0 + timeout * TIMEOUT_SCALE
    while True:
        rc = vm.returncode
        if rc is not None:
            if rc != 0:
                raise VMError(f"QEMU exited with status {rc} instead of a power-off; console:\n"
                              f"{vm.console_text()[-4000:]}")
            return time.monotonic() - t0
        done = vm.poll_result(watcher)
        if done is not None:
            raise VMError(f"the guest did not power off: the watched unit ended (status {done[0]}):\n{done[1][-4000:]}"
                          f"\nconsole:\n{vm.console_text()[-3000:]}")
        bad = _console_failure(vm, since)
        if bad is not None:
            raise VMError(f"the guest's console shows a failure while powering off:\n{bad}")
        if time.monotonic() > deadline:
            raise VMError(f"the guest did not power off within {timeout * TIMEOUT_SCALE:.0f} s; console:\n"
                          f"{vm.console_text()[-4000:]}")
        time.sleep(1)


AGENT_REARM_UNIT = """[Unit]
Description=vmtest: the harness's agent restarted after a resume (test harness)
After=systemd-hibernate.service
[Service]
Type=oneshot
ExecStart=/bin/systemctl kill --kill-who=all -s KILL vmtest-agent.service
[Install]
WantedBy=hibernate.target
"""
"""The test machine's unit (vmtest-agent-rearm.service) that restarts the agent once the system runs again after a
hibernation: in the new QEMU the resumed kernel does not bring ttyS1 back for the process that held it open across
the hibernation (seen with systemd as PID 1: the system ran on, its counter ticked in the journal, nothing came out
of ttyS1 and no ping was answered), while a fresh open of the port sets the UART up again.  The restarted agent
announces the boot_id of the system that hibernated; wait_resumed takes that as the resumed system answering."""


def _check_agent_boot(vm: VM, boot_id: str | None) -> None:
    """Raise if an agent announced a boot other than ``boot_id`` (any, when None): the machine booted afresh.  An
    agent restarted in the resumed system (its boot_id) sets the VM's release and boot_id as a ready agent does."""
    ready = re.search(r"@@KHB-READY (\S+) (\S+)@@", vm.agent_text())
    if ready is None:
        return
    if boot_id is None or ready.group(2) != boot_id:
        raise VMError(f"the machine booted afresh instead of resuming; console:\n{vm.console_text()[-4000:]}")
    vm.release, vm.boot_id = ready.group(1), ready.group(2)


def wait_resumed(vm: VM, timeout: float, boot_id: str | None = None) -> float:
    """After power-on of a hibernated machine: wait until the resumed system's agent answers and return the seconds
    waited: the one that was running when it hibernated, or (``boot_id`` given) an agent restarted in the resumed
    system that announces that boot_id (AGENT_REARM_UNIT).  Fail as soon as the console shows a refusal or
    failure, an agent of another boot announces itself (the boot went on normally), or QEMU exits."""
    t0 = time.monotonic()
    deadline = t0 + timeout * TIMEOUT_SCALE
    while True:
        if vm.returncode is not None:
            raise VMError(f"QEMU exited (status {vm.returncode}) during the resume; console:\n"
                          f"{vm.console_text()[-4000:]}")
        bad = _console_failure(vm, 0)
        if bad is not None:
            raise VMError(f"the resume failed; console:\n{bad}")
        _check_agent_boot(vm, boot_id)
        try:
            vm.wait_for_shell(timeout=5 / TIMEOUT_SCALE, new_boot=False)
        except VMError:
            if time.monotonic() > deadline:
                raise VMError(f"the resumed system did not answer within {timeout * TIMEOUT_SCALE:.0f} s; "
                              f"console:\n{vm.console_text()[-4000:]}") from None
            continue
        _check_agent_boot(vm, boot_id)  # the answer may come from a fresh agent: of this boot, or of a new one
        if boot_id is not None:
            vm.boot_id = boot_id  # the hibernated boot answered (its old agent, or one restarted in it)
        return time.monotonic() - t0
