"""What the CLI and the capture environment call: gather facts, plan, check, then load or execute.

The order is always read → plan → check → syscall: nothing is loaded and no memory is touched once a check failed.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import time
from pathlib import Path
from typing import Any

from khibernate.jump import elfcorehdr, loader, syscalls, xen
from khibernate.jump.bzimage import parse_bzimage
from khibernate.jump.errors import JumpBackEntryError, KexecSyscallError
from khibernate.jump.kexec_abi import KEXEC_FILE_ON_CRASH, KEXEC_FILE_UNLOAD
from khibernate.jump.loader import Plan, SystemFacts
from khibernate.ranges import Range
from khibernate.system import SystemRoot

RUN_DIR = Path(os.environ.get("KHIBERNATE_RUN_DIR", "/run/khibernate"))
JUMP_BACK_STATE = "jump-back.json"


@dataclasses.dataclass(frozen=True)
class LoadedState:
    """/sys/kernel/kexec_loaded, kexec_crash_loaded and kexec_crash_size."""

    loaded: bool
    crash_loaded: bool
    crash_size: int | None

    def describe(self) -> str:
        """Human summary."""
        size = f"{self.crash_size / 2**20:.0f} MiB" if self.crash_size is not None else "unknown"
        return (f"kexec image loaded:         {'yes' if self.loaded else 'no'}\n"
                f"crash (kdump) image loaded: {'yes' if self.crash_loaded else 'no'}\n"
                f"crash region size:          {size}")


def state() -> LoadedState:
    """What the running kernel has loaded."""
    root = SystemRoot()
    return LoadedState(root.read_int("/sys/kernel/kexec_loaded") == 1,
                       root.read_int("/sys/kernel/kexec_crash_loaded") == 1,
                       root.read_int("/sys/kernel/kexec_crash_size"))


def _total_ram() -> int | None:
    try:
        return loader.total_ram_bytes(Path("/proc/meminfo").read_text())
    except OSError:
        return None


def load_plan(plan: Plan) -> None:
    """Check the plan against kexec_load's rules, then hand it to kexec_load."""
    loader.check_segments(plan.segments, _total_ram())
    labels = tuple(f"{s.what} at {s.mem:#x}+{s.memsz:#x}" for s in plan.segments)
    syscalls.kexec_load(plan.entry, [(s.data, s.mem, s.memsz) for s in plan.segments], plan.flags, labels)


def plan_jump(kernel: str, initrd: str | None, append: str, mem_min: int | None = None,
              mem_max: int | None = None, system: SystemRoot | None = None) -> Plan:
    """The jump image for this machine (reads /proc/iomem, sysfs; needs root for real addresses; ``system``: the
    running one, read once by the caller's operation)."""
    kdata = loader.read_file(kernel, "kernel")
    parse_bzimage(kdata, Path(kernel).name)  # a bad kernel file is reported before the system is read
    idata = loader.read_file(initrd, "initrd") if initrd else None
    facts = SystemFacts.read(system=system)
    swapped = loader.swapped_ranges(facts, mem_min, mem_max)
    notes = [elfcorehdr.read_note_data(n) if any(n.range.overlaps(r) for r in swapped) else n for n in facts.notes]
    facts = dataclasses.replace(facts, notes=notes)
    return loader.plan_jump(kdata, idata, append, facts, mem_min, mem_max, Path(kernel).name)


def swapped_ranges(mem_min: int | None = None, mem_max: int | None = None,
                   system: SystemRoot | None = None) -> list[Range]:
    """This kernel's memory that a jump into [mem_min, mem_max] (default: the crash region) swaps out: a page there
    (a mailbox) is not where the jumped-to kernel can reach it."""
    return loader.swapped_ranges(SystemFacts.read(with_notes=False, system=system), mem_min, mem_max)


def plan_kexec(kernel: str, initrd: str | None, cmdline: str) -> Plan:
    """A plain kexec_load image for this machine."""
    kdata = loader.read_file(kernel, "kernel")
    parse_bzimage(kdata, Path(kernel).name)
    idata = loader.read_file(initrd, "initrd") if initrd else None
    return loader.plan_kexec(kdata, idata, cmdline, SystemFacts.read(with_notes=False), Path(kernel).name)


def file_load(kernel: str, initrd: str | None, cmdline: str, crash: bool = False) -> None:
    """kexec_file_load of kernel (+ initrd) with cmdline; crash=True loads the kdump image."""
    loader.read_file(kernel, "kernel")
    flags = KEXEC_FILE_ON_CRASH if crash else 0
    syscalls.kexec_file_load(kernel, initrd, cmdline, flags)


def unload(crash: bool = False) -> None:
    """Unload the kexec (or kdump) image, whichever syscall loaded it."""
    try:
        syscalls.kexec_file_load(None, None, "", KEXEC_FILE_UNLOAD
                                 | (KEXEC_FILE_ON_CRASH if crash else 0))
    except KexecSyscallError as e:
        if e.errno not in (38, 22, 2):  # ENOSYS, EINVAL, ENOENT: fall back to kexec_load's unload
            raise
        syscalls.kexec_unload(crash)
    _state_path().unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class JumpResult:
    """How long this kernel was away: CLOCK_BOOTTIME includes the time spent in the peer, CLOCK_MONOTONIC not."""

    boottime_s: float
    monotonic_s: float

    def describe(self) -> str:
        """One line for the user."""
        return (f"back in this kernel: away {self.boottime_s:.2f} s (CLOCK_BOOTTIME), "
                f"{self.monotonic_s:.2f} s of it on CLOCK_MONOTONIC")


def kmsg(text: str) -> None:
    """Best effort: one line in the kernel log (dmesg shows when khibernate left and re-entered this kernel)."""
    try:
        with open("/dev/kmsg", "w") as f:
            f.write(f"khibernate: {text}\n")
    except OSError:
        pass


def execute() -> JumpResult:
    """reboot(LINUX_REBOOT_CMD_KEXEC); for a jump image this returns when the peer jumps back."""
    if not state().loaded:
        raise KexecSyscallError("no kexec image is loaded: run `khibernate kexec load`, `jump load` or `jump back` "
                                "first")
    os.sync()
    kmsg(f"reboot(LINUX_REBOOT_CMD_KEXEC) from pid {os.getpid()} (ppid {os.getppid()})")
    b0, m0 = time.clock_gettime(time.CLOCK_BOOTTIME), time.clock_gettime(time.CLOCK_MONOTONIC)
    syscalls.reboot_kexec()
    b1, m1 = time.clock_gettime(time.CLOCK_BOOTTIME), time.clock_gettime(time.CLOCK_MONOTONIC)
    kmsg(f"back in this kernel (pid {os.getpid()}), away {b1 - b0:.2f} s CLOCK_BOOTTIME, {m1 - m0:.2f} s "
         "CLOCK_MONOTONIC")
    return JumpResult(b1 - b0, m1 - m0)


def read_phys_page(addr: int, path: str = "/dev/mem") -> bytes:
    """The 4 KiB page at physical addr through mmap of /dev/mem (read() stops at this kernel's high_memory)."""
    page = addr & ~0xFFF
    try:
        fd = os.open(path, os.O_RDONLY | os.O_SYNC)
    except OSError as e:
        raise JumpBackEntryError(f"cannot open {path}: {e.strerror} (needs root and CONFIG_DEVMEM)") from e
    try:
        with mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=page) as m:
            return bytes(m[:])
    except OSError as e:
        raise JumpBackEntryError(
            f"cannot map the peer's control page {page:#x} through {path}: {e.strerror}. This kernel must not own "
            "that page (boot it with the e820 `jump load` gives) and needs iomem=relaxed when CONFIG_IO_STRICT_DEVMEM "
            "is set (`jump load` adds it)") from e
    finally:
        os.close(fd)


def _boot_id() -> str:
    """This boot's id (system.py reads it)."""
    return SystemRoot().boot_id()


def _state_path() -> Path:
    return RUN_DIR / JUMP_BACK_STATE


def entry_from_cmdline() -> int:
    """kexec_jump_back_entry from /proc/cmdline; raise JumpBackEntryError when this kernel was not jumped to."""
    entry = loader.parse_jump_back_entry(SystemRoot().cmdline())
    if entry is None:
        raise JumpBackEntryError("no kexec_jump_back_entry=0x... in /proc/cmdline: this kernel was not started by a "
                                 "kexec jump (`khibernate jump load` + `jump exec` in the first kernel); give --entry")
    return entry


def _load_state() -> dict[str, Any]:
    try:
        data = json.loads(_state_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(data: dict[str, Any]) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    _state_path().write_text(json.dumps(data))


def prepare_jump_back(entry: int | None = None) -> tuple[int, bool]:
    """(entry, reused): load the jump-back image unless the one loaded in this boot for this entry is still loaded.

    relocate_kernel swaps the peer's control page with the image's copy on every exit and re-entry, so once the peer
    has resumed this kernel, a fresh copy from /dev/mem is stale and would crash the peer: the image is loaded once
    per boot and reused; a reload after a round trip is refused.
    """
    entry = entry if entry is not None else entry_from_cmdline()
    saved = _load_state()
    this_boot = saved.get("boot_id") == _boot_id()
    loaded = state().loaded
    if this_boot and saved.get("entry") == entry and loaded:
        kmsg(f"jump-back image for entry {entry:#x} reused")
        return entry, True
    if this_boot and saved.get("returned"):
        raise JumpBackEntryError(
            "the jump-back image of this boot was unloaded after the peer had resumed this kernel: the peer's live "
            "control page was in it, a new copy from /dev/mem would be stale and crash the peer — it cannot be "
            "resumed from here any more")
    if loaded:
        raise JumpBackEntryError("another kexec image is loaded in this kernel; `khibernate kexec unload` it first "
                                 "(or `khibernate jump exec` if it is the jump-back image)")
    plan = loader.plan_jump_back(entry, read_phys_page(entry))
    load_plan(plan)
    _save_state({"boot_id": _boot_id(), "entry": entry, "returned": False})
    kmsg(f"jump-back image for entry {entry:#x} loaded")
    return entry, False


def jump_back(entry: int | None = None) -> tuple[int, bool, JumpResult]:
    """Load (or reuse) the jump-back image and jump; returns when the peer resumes this kernel."""
    entry, reused = prepare_jump_back(entry)
    result = execute()
    _save_state({**_load_state(), "returned": True})
    return entry, reused, result


def jump_status() -> str:
    """Whether this kernel was jumped to (its jump-back entry), what is loaded, and the jump-back image state."""
    lines = [state().describe()]
    entry = loader.parse_jump_back_entry(SystemRoot().cmdline())
    if entry is None:
        lines.append("this kernel was not started by a kexec jump (no kexec_jump_back_entry= in /proc/cmdline)")
    else:
        lines.append(f"jumped to from a peer: kexec_jump_back_entry={entry:#x}; /proc/vmcore is the peer's memory")
    saved = _load_state()
    if saved.get("boot_id") == _boot_id():
        how = "the peer has resumed this kernel since" if saved.get("returned") else "not used yet"
        lines.append(f"jump-back image loaded in this boot for {saved['entry']:#x} ({how})")
    return "\n".join(lines)


# ---------------------------------------------------------------- a Xen dom0: images go to the hypervisor

XEN_NO_JUMP = ("this is a Xen PV domain: kexec images are loaded into the Xen hypervisor, whose kexec knows only "
               "a default and a crash image, with no preserve-context: nothing can jump back to a Xen host, so "
               "kexec jump, snapshot, hibernate and watch cannot work here (kexec and kdump do)")


def on_xen_pv() -> bool:
    """True in a Xen PV domain (dom0): kexec and kdump must go through the hypervisor."""
    return SystemRoot().xen_guest_type() == "PV"


def refuse_on_xen(what: str) -> None:
    """Raise NotOnXen for a preserve-context operation (jump, snapshot, hibernate, watch) on a Xen PV domain."""
    if on_xen_pv():
        from khibernate.jump.errors import NotOnXen

        raise NotOnXen(f"{what}: {XEN_NO_JUMP}")


def plan_xen_kexec(kernel: str, initrd: str | None, cmdline: str, vmm: str | None = None) -> xen.XenPlan:
    """The default image for Xen: Linux KERNEL (Xen→Linux) or, with vmm, that hypervisor with KERNEL as its dom0."""
    kdata = loader.read_file(kernel, "kernel")
    idata = loader.read_file(initrd, "initrd") if initrd else None
    if vmm is not None:
        import gzip

        vdata = loader.read_file(vmm, "hypervisor image")
        if vdata[:2] == b"\x1f\x8b":
            vdata = gzip.decompress(vdata)
        return xen.plan_multiboot(vdata, kdata, idata, cmdline, xen.XenFacts.read(), Path(vmm).name,
                                  Path(kernel).name, Path(initrd).name if initrd else "initrd")
    parse_bzimage(kdata, Path(kernel).name)
    return xen.plan_kexec(kdata, idata, cmdline, xen.XenFacts.read(), Path(kernel).name)


def plan_xen_crash(kernel: str, initrd: str | None, cmdline: str) -> xen.XenPlan:
    """The crash image for Xen: a capture kernel for the whole host in Xen's crash region."""
    kdata = loader.read_file(kernel, "kernel")
    parse_bzimage(kdata, Path(kernel).name)
    idata = loader.read_file(initrd, "initrd") if initrd else None
    return xen.plan_crash(kdata, idata, cmdline, xen.XenFacts.read(), Path(kernel).name)


def load_xen(plan: xen.XenPlan) -> None:
    """Hand a XenPlan to the hypervisor (KEXEC_CMD_kexec_load), replacing an image of the same type."""
    from khibernate.jump import xen_hypercalls

    segments = plan.xen_segments()
    xen_hypercalls.kexec_load(plan.image_type, plan.arch, plan.entry, segments)


def xen_state() -> LoadedState:
    """What Xen holds: default and crash images (KEXEC_CMD_kexec_status) and the crash region's size."""
    from khibernate.jump import xen_hypercalls as xh
    from khibernate.jump.xen_abi import KEXEC_RANGE_MA_CRASH, KEXEC_TYPE_CRASH, KEXEC_TYPE_DEFAULT

    crash = xh.kexec_get_range(KEXEC_RANGE_MA_CRASH)
    return LoadedState(xh.kexec_status(KEXEC_TYPE_DEFAULT), xh.kexec_status(KEXEC_TYPE_CRASH),
                       crash[1] if crash else 0)


def unload_xen(crash: bool = False) -> None:
    """Unload Xen's default (or crash) image."""
    from khibernate.jump import xen_hypercalls as xh
    from khibernate.jump.xen_abi import KEXEC_TYPE_CRASH, KEXEC_TYPE_DEFAULT

    xh.kexec_unload(KEXEC_TYPE_CRASH if crash else KEXEC_TYPE_DEFAULT)


def execute_xen() -> None:
    """KEXEC_CMD_kexec of the default image: Xen stops the host and starts the image (does not return)."""
    from khibernate.jump import xen_hypercalls as xh
    from khibernate.jump.xen_abi import KEXEC_TYPE_DEFAULT

    if not xh.kexec_status(KEXEC_TYPE_DEFAULT):
        raise KexecSyscallError("Xen holds no kexec image: run `khibernate kexec load` first")
    kmsg(f"Xen kexec (KEXEC_CMD_kexec) from pid {os.getpid()}")
    xh.kexec_exec(KEXEC_TYPE_DEFAULT)
    raise KexecSyscallError("Xen returned from KEXEC_CMD_kexec without starting the image")
