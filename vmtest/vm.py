"""Boot the test kernel in QEMU and drive it: run guest commands, wait on the console, talk QMP.

Two serial ports: ttyS0 is the kernel console (``vm.serial_log``, searched by ``wait_for``); ttyS1 carries the
command protocol of the guest agent (``initramfs/usr/libexec/khibernate/vm-agent``, started by /init when the
command line has ``khibernate.agent=1``), so kernel messages never mix into command output.  Every wait is bounded;
QEMU is always killed on exit; logs stay in ``$KHIBERNATE_VMTEST_LOGS/<name>`` (default /tmp/khibernate-vmtest).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from vmtest.diskfile import blank
from vmtest.initrd import guest_initrd
from vmtest.kernel import TestKernel

LOG_ROOT = Path(os.environ.get("KHIBERNATE_VMTEST_LOGS", "/tmp/khibernate-vmtest"))
# rootfstype=ramfs: the initramfs root is otherwise a tmpfs capped at half the RAM, too small for the Python
# payload in a 256 MiB capture or jumped-to kernel ("Initramfs unpacking failed: write error").
BASE_APPEND = "console=ttyS0 khibernate.agent=1 panic=-1 rootfstype=ramfs"
READY = re.compile(rb"@@KHB-READY (\S+) (\S+)@@")
CHUNK = 512
# Multiplies every timeout (slow or busy hosts: several TCG guests on 2 cores run 2-3x slower).
TIMEOUT_SCALE = float(os.environ.get("KHIBERNATE_VMTEST_TIMEOUT_SCALE", "1"))


class VMError(RuntimeError):
    """The VM harness failed: QEMU could not start or died, or a wait timed out.  The message names the logs."""


class GuestError(VMError):
    """A guest command exited non-zero."""

    def __init__(self, status: int, output: str, command: str = ""):
        self.status = status
        self.output = output
        self.command = command
        super().__init__(f"guest command {command!r} exited with status {status}:\n{output[-3000:]}")


def check_host(accel: str = "tcg") -> None:
    """Raise VMError saying what to install or change if this host cannot run the VM tests."""
    problems = []
    if os.geteuid() != 0:
        problems.append("VM tests must run as root (kexec, kdump and /dev/mem tests need a root guest setup)")
    if shutil.which("qemu-system-x86_64") is None:
        problems.append("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        problems.append("accel=kvm but /dev/kvm is not usable; use KHIBERNATE_VMTEST_ACCEL=tcg")
    if problems:
        raise VMError("; ".join(problems))


class _Stream:
    """Bytes from one guest channel: a reader thread appends them to a buffer and a log file."""

    def __init__(self, name: str, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.buf = bytearray()
        self.pos = 0
        self.eof = False
        self.cond = threading.Condition()
        self._log = open(log_path, "wb")
        self._thread: threading.Thread | None = None

    def start(self, read) -> None:
        def pump() -> None:
            try:
                while True:
                    try:
                        data = read()
                    except OSError:
                        data = b""
                    if not data:
                        break
                    self._log.write(data)
                    self._log.flush()
                    with self.cond:
                        self.buf += data
                        self.cond.notify_all()
            finally:
                with self.cond:
                    self.eof = True
                    self.cond.notify_all()

        self._thread = threading.Thread(target=pump, name=f"vmtest-{self.name}", daemon=True)
        self._thread.start()

    def search(self, pattern: re.Pattern[bytes], timeout: float, alive, describe: str,
               fail: re.Pattern[bytes] | None = None) -> re.Match[bytes]:
        """Wait until pattern matches after pos; advance pos past the match.  fail matching first -> VMError."""
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = pattern.search(self.buf, self.pos)
                f = fail.search(self.buf, self.pos) if fail is not None else None
                if f is not None and (m is None or f.start() < m.start()):
                    self.pos = f.end()
                    raise _Failed(f)
                if m is not None:
                    self.pos = m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VMError(f"timed out after {timeout:.0f} s waiting for {describe} on {self.name}"
                                  f" ({self.log_path}); on a slow or busy host set KHIBERNATE_VMTEST_TIMEOUT_SCALE=2")
                if self.eof or not alive():
                    raise VMError(f"QEMU exited while waiting for {describe} on {self.name} ({self.log_path})")
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._log.close()

    def tail(self, n: int = 3000) -> str:
        with self.cond:
            return bytes(self.buf[-n:]).decode(errors="replace")


class _Failed(Exception):
    def __init__(self, match: re.Match[bytes]):
        self.match = match


class VM:
    """A QEMU guest running the test kernel with khibernate's initramfs; use as a context manager."""

    _ids = itertools.count(1)

    def __init__(self, kernel: TestKernel, append: str = "", memory_mb: int = 1024, smp: int = 1,
                 extra_files: Iterable[tuple[Path | str, str]] = (), disk_mb: int = 0, timeout: float = 120,
                 name: str = "vm", accel: str | None = None, qemu_args: Iterable[str] = (),
                 initrd: Path | None = None, cpu: str | None = None, disks: Iterable[Path] = (),
                 wait_ready: bool = True, base_append: str = BASE_APPEND):
        self.kernel = kernel
        self.append = f"{base_append} {append}".strip()  # base_append: another boot (a disk root, not ramfs)
        self.memory_mb = memory_mb
        self.smp = smp
        self.extra_files = [(Path(s), d) for s, d in extra_files]
        self.disk_mb = disk_mb
        self.timeout = timeout
        self.name = name
        self.accel = accel or os.environ.get("KHIBERNATE_VMTEST_ACCEL", "tcg")
        # Nehalem (x86-64-v2) was chosen for numpy >= 2 wheels, which die with SIGILL on TCG's default qemu64;
        # the guest bundle has no numpy now and runs on qemu64 too (KHIBERNATE_VMTEST_CPU=qemu64).  Nehalem stays
        # so figures compare; like qemu64 it has no 1 GiB pages (pdpe1gb), which the kexec-jump findings need.
        self.cpu = cpu or os.environ.get("KHIBERNATE_VMTEST_CPU") or ("host" if self.accel == "kvm" else "Nehalem")
        self.qemu_args = list(qemu_args)
        self.disks = [Path(d) for d in disks]  # existing raw disk files, attached after disk_mb's fresh one
        self.wait_ready = wait_ready  # False: a boot that is not expected to reach its own agent (a resume)
        self.log_dir = LOG_ROOT / name
        self._initrd = initrd
        self._proc: subprocess.Popen | None = None
        self._sockdir: str | None = None
        self._agent_sock: socket.socket | None = None
        self._qmp_sock: socket.socket | None = None
        self._qmp_file = None
        self._pending: dict[str, str] = {}
        self.console: _Stream | None = None
        self.agent: _Stream | None = None
        self.boot_seconds: float | None = None
        self.boot_id: str | None = None
        self.release: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def serial_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def agent_log(self) -> Path:
        return self.log_dir / "agent.log"

    @property
    def disk(self) -> Path:
        return self.log_dir / "disk.img"

    def __enter__(self) -> VM:
        try:
            self.start()
        except BaseException:
            self.close()
            self._report_logs()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is not None:
            self._report_logs()

    def _report_logs(self) -> None:
        print(f"[vmtest] {self.name}: logs in {self.log_dir} (console.log, agent.log, qemu.log)", file=sys.stderr)
        if self.console is not None:
            print(f"[vmtest] last console output:\n{self.console.tail(2000)}", file=sys.stderr)

    def _log(self, msg: str) -> None:
        print(f"[vmtest] {self.name}: {msg}", file=sys.stderr, flush=True)

    def start(self) -> None:
        """Build the initrd, start QEMU, and wait (self.timeout) until the guest agent is ready."""
        check_host(self.accel)
        if self.log_dir.exists():
            shutil.rmtree(self.log_dir)
        self.log_dir.mkdir(parents=True)
        modules = (self.kernel.modules_root, self.kernel.release) if self.kernel.modular else None
        initrd = self._initrd or guest_initrd(self.log_dir / "initrd.img", self.kernel.bzimage, self.extra_files,
                                              log=self._log, modules=modules)
        self._sockdir = tempfile.mkdtemp(prefix="khb-vm-")
        agent_path = os.path.join(self._sockdir, "agent")
        qmp_path = os.path.join(self._sockdir, "qmp")
        cmd = ["qemu-system-x86_64", "-accel", self.accel, "-cpu", self.cpu, "-m", str(self.memory_mb),
               "-smp", str(self.smp),
               "-nodefaults", "-display", "none", "-no-reboot", *self.boot_args(initrd),
               "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
               "-chardev", f"socket,id=agent,path={agent_path},server=on,wait=on", "-serial", "chardev:agent",
               "-qmp", f"unix:{qmp_path},server=on,wait=off", "-device", "vmcoreinfo"]
        if self.disk_mb:
            blank(self.disk, self.disk_mb)
            cmd += ["-drive", f"file={self.disk},if=virtio,format=raw,cache=unsafe"]
        for d in self.disks:
            cmd += ["-drive", f"file={d},if=virtio,format=raw,cache=unsafe"]
        cmd += self.qemu_args
        (self.log_dir / "qemu-cmdline.txt").write_text(" ".join(cmd) + "\n")
        self.console = _Stream("console (ttyS0)", self.serial_log)
        self.agent = _Stream("agent (ttyS1)", self.agent_log)
        qemu_log = open(self.log_dir / "qemu.log", "wb")
        t0 = time.monotonic()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=qemu_log)
        qemu_log.close()
        stdout = self._proc.stdout
        assert stdout is not None
        self.console.start(lambda: os.read(stdout.fileno(), 65536))
        self._agent_sock = self._connect(agent_path)
        sock = self._agent_sock
        self.agent.start(lambda: sock.recv(65536))
        self._qmp_sock = self._connect(qmp_path)
        self._qmp_file = self._qmp_sock.makefile("rwb")
        self._qmp_read(10)
        self.qmp("qmp_capabilities")
        self._log(f"QEMU pid {self._proc.pid}, {self.memory_mb} MiB, {self.accel} {self.cpu}, append {self.append!r}")
        if not self.wait_ready:
            return
        self._wait_ready(self.timeout)
        self.boot_seconds = time.monotonic() - t0
        self._log(f"guest ready in {self.boot_seconds:.1f} s (kernel {self.release})")

    def boot_args(self, initrd: Path) -> list[str]:
        """QEMU's direct-boot options: the kernel, its initrd and command line (vmtest/xen.py boots Xen instead)."""
        return ["-kernel", str(self.kernel.bzimage), "-initrd", str(initrd), "-append", self.append]

    def console_write(self, data: bytes) -> None:
        """Type bytes on the kernel console (ttyS0's input), e.g. Xen's Ctrl-A switch and debug keys."""
        if self._proc is None or self._proc.stdin is None or not self._alive():
            raise VMError(f"QEMU is not running; see {self.serial_log}")
        self._proc.stdin.write(data)
        self._proc.stdin.flush()

    def _connect(self, path: str, timeout: float = 30) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except OSError:
                s.close()
                if not self._alive():
                    raise VMError(f"QEMU exited at start; see {self.log_dir / 'qemu.log'}:\n"
                                  + (self.log_dir / "qemu.log").read_text(errors="replace")[-2000:]) from None
                if time.monotonic() > deadline:
                    raise VMError(f"QEMU did not create {path} within {timeout} s; see {self.log_dir}") from None
                time.sleep(0.05)

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Kill QEMU (if still running) and release everything; logs stay."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for s in (self._qmp_file, self._qmp_sock, self._agent_sock):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        for stream in (self.console, self.agent):
            if stream is not None:
                stream.close()
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited (e.g. after a guest reboot with -no-reboot), else None."""
        return None if self._proc is None else self._proc.poll()

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait until QEMU exits by itself (guest poweroff/reboot) and return its status."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VMError(f"QEMU still running after {timeout} s; see {self.serial_log}") from None

    # ------------------------------------------------------------------ console

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Wait for regex pattern (MULTILINE: ^/$ match at line ends) on the kernel console after the current
        position; the position moves past the match, which is returned (as text)."""
        assert self.console is not None
        m = self.console.search(re.compile(pattern.encode(), re.MULTILINE), timeout, self._alive, repr(pattern))
        # the same match on text: decode the console up to the match end as latin-1 (byte offsets == char offsets)
        with self.console.cond:
            text = bytes(self.console.buf[:m.end()]).decode("latin-1")
        sm = re.compile(pattern, re.MULTILINE).search(text, m.start())
        assert sm is not None
        return sm

    def console_text(self) -> str:
        """Everything the kernel console printed so far."""
        assert self.console is not None
        with self.console.cond:
            return bytes(self.console.buf).decode(errors="replace").replace("\r\n", "\n")

    def mark(self) -> int:
        """Move the console position to the end (so wait_for only sees what comes next); return the offset."""
        assert self.console is not None
        with self.console.cond:
            self.console.pos = len(self.console.buf)
            return self.console.pos

    def console_since(self, offset: int) -> str:
        """Console text from a mark() offset to now."""
        assert self.console is not None
        with self.console.cond:
            return bytes(self.console.buf[offset:]).decode(errors="replace").replace("\r\n", "\n")

    # ------------------------------------------------------------------ guest commands

    def _agent_write(self, text: str) -> None:
        if self._agent_sock is None or not self._alive():
            raise VMError(f"QEMU is not running; see {self.serial_log}")
        self._agent_sock.sendall(text.encode())

    def send(self, command: str) -> str:
        """Start a guest command without waiting (e.g. 'kexec -e'); returns its id for result()."""
        cid = f"c{next(self._ids)}"
        b64 = base64.b64encode(command.encode()).decode()
        lines = [f"KHBPUT {cid} {b64[i:i + CHUNK]}\n" for i in range(0, len(b64), CHUNK)] or [f"KHBPUT {cid} \n"]
        self._agent_write("".join(lines) + f"KHBRUN {cid}\n")
        self._pending[cid] = command
        return cid

    def result(self, cid: str, timeout: float = 60) -> tuple[int, str]:
        """(exit status, output) of a command started with send()."""
        assert self.agent is not None
        command = self._pending.get(cid, "?")
        begin = self.agent.search(re.compile(rb"@@KHB-BEGIN " + cid.encode() + rb"@@\r?\n"), timeout,
                                  self._alive, f"start of {command!r}")
        end = self.agent.search(re.compile(rb"\r?\n@@KHB-END " + cid.encode() + rb" (-?\d+)@@"), timeout,
                                self._alive, f"end of {command!r} (timeout {timeout} s)")
        self._pending.pop(cid, None)
        with self.agent.cond:
            raw = bytes(self.agent.buf[begin.end():end.start()])
        return int(end.group(1)), raw.decode(errors="replace").replace("\r\n", "\n")

    def result_elsewhere(self, cid: str, timeout: float = 60) -> tuple[int, str]:
        """(exit status, output since this QEMU started) of a command another VM object sent: a hibernated kernel
        resumed in this QEMU finishes the command it was running when it hibernated."""
        assert self.agent is not None
        end = self.agent.search(re.compile(rb"\r?\n@@KHB-END " + cid.encode() + rb" (-?\d+)@@"), timeout,
                                self._alive, f"end of command {cid} started before the hibernation")
        with self.agent.cond:
            raw = bytes(self.agent.buf[:end.start()])
        return int(end.group(1)), raw.decode(errors="replace").replace("\r\n", "\n")

    def poll_result(self, cid: str) -> tuple[int, str] | None:
        """(exit status, output) of a command started with send() if it has ended, else None (never waits)."""
        assert self.agent is not None
        with self.agent.cond:
            text = bytes(self.agent.buf).decode(errors="replace")
        m = re.search(rf"@@KHB-BEGIN {cid}@@\r?\n(.*?)\r?\n@@KHB-END {cid} (-?\d+)@@", text, re.S)
        if m is None:
            return None
        return int(m.group(2)), m.group(1).replace("\r\n", "\n")

    def agent_text(self) -> str:
        """Everything the agent channel (ttyS1) carried so far, in this QEMU."""
        assert self.agent is not None
        with self.agent.cond:
            return bytes(self.agent.buf).decode(errors="replace").replace("\r\n", "\n")

    def run_status(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command in the guest; return (exit status, stdout+stderr)."""
        return self.result(self.send(command), timeout)

    def run(self, command: str, timeout: float = 60) -> str:
        """Run a shell command in the guest; return its stdout+stderr; GuestError if it exits non-zero."""
        status, out = self.run_status(command, timeout)
        if status != 0:
            raise GuestError(status, out, command)
        return out

    def _wait_ready(self, timeout: float) -> re.Match[bytes]:
        assert self.agent is not None
        fail = None
        if self._pending:
            fail = re.compile(rb"@@KHB-END (" + b"|".join(c.encode() for c in self._pending) + rb") (-?\d+)@@")
        try:
            m = self.agent.search(READY, timeout, self._alive, "the guest agent to start (a kernel booting)", fail)
        except _Failed as f:
            cid = f.match.group(1).decode()
            status = int(f.match.group(2))
            raise GuestError(status, self.agent.tail(2000), self._pending.pop(cid, cid)) from None
        self.release = m.group(1).decode()
        self.boot_id = m.group(2).decode()
        self._pending.clear()
        return m

    def wait_for_shell(self, timeout: float = 120, new_boot: bool = True) -> None:
        """Wait until a guest shell answers again: after kexec/crash (new_boot) the next kernel's agent must start;
        with new_boot=False (a jump back into a kernel whose agent was waiting) a ping answer is enough.
        A command started with send() that exits instead (e.g. a failed 'kexec -e') raises GuestError."""
        deadline = time.monotonic() + timeout
        if new_boot:
            self._wait_ready(timeout)
        assert self.agent is not None
        while True:
            cid = f"p{next(self._ids)}"
            self._agent_write(f"KHBPING {cid}\n")
            try:
                self.agent.search(re.compile(rb"@@KHB-PONG " + cid.encode() + rb"@@"),
                                  min(10.0, max(1.0, deadline - time.monotonic())), self._alive, "a ping answer")
                return
            except VMError:
                if time.monotonic() >= deadline or not self._alive():
                    raise

    # ------------------------------------------------------------------ QMP

    def _qmp_read(self, timeout: float) -> dict:
        assert self._qmp_sock is not None and self._qmp_file is not None
        self._qmp_sock.settimeout(timeout)
        try:
            line = self._qmp_file.readline()
        except TimeoutError:
            raise VMError(f"no QMP answer within {timeout} s") from None
        if not line:
            raise VMError(f"QMP connection closed (QEMU exited?); see {self.log_dir / 'qemu.log'}")
        return json.loads(line)

    def qmp(self, command: str, qmp_timeout: float = 600, **arguments) -> object:
        """Execute a QMP command and return its 'return' value; VMError on a QMP error."""
        assert self._qmp_file is not None
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp_file.write(json.dumps(msg).encode() + b"\n")
        self._qmp_file.flush()
        deadline = time.monotonic() + qmp_timeout
        while True:
            reply = self._qmp_read(max(0.1, deadline - time.monotonic()))
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise VMError(f"QMP {command} failed: {reply['error']}")
