"""`khibernate kexec`, `khibernate kdump` and `khibernate jump`: parse, call khibernate.jump.api, print."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from khibernate.clickutil import ADDRESS
from khibernate.errors import UsageError
from khibernate.jump import api
from khibernate.system import SystemRoot

F = TypeVar("F", bound=Callable[..., Any])

DROP_ON_REUSE = ("BOOT_IMAGE=", "initrd=", "kexec_jump_back_entry=", "elfcorehdr=", "crashkernel=")




def _cmdline(append: str | None, command_line: str | None, reuse: bool, system: SystemRoot | None = None) -> str:
    """The new kernel's command line from --append/--command-line (one of them) and --reuse-cmdline (``system``'s
    command line, the running one's by default)."""
    if append is not None and command_line is not None:
        raise UsageError("give --append or --command-line, not both (they are the same thing, as in kexec-tools)")
    words = []
    if reuse:
        current = (system or SystemRoot()).cmdline().split()
        words = [w for w in current if not w.startswith(DROP_ON_REUSE)]
    extra = append if append is not None else command_line
    if extra:
        words.append(extra)
    return " ".join(words)


def _common_load_options(f: F) -> F:
    """KERNEL, --initrd, --append/--command-line and --reuse-cmdline, the same for every load command."""
    f = click.option("--reuse-cmdline", is_flag=True, help="Start from this kernel's /proc/cmdline "
                     "(without BOOT_IMAGE=, initrd=, crashkernel=, elfcorehdr=, kexec_jump_back_entry=).")(f)
    f = click.option("--command-line", "command_line", metavar="S", help="Same as --append (kexec-tools' name).")(f)
    f = click.option("--append", metavar="S", help="Kernel command line of the new kernel (added after "
                     "--reuse-cmdline's words).")(f)
    f = click.option("--initrd", "--ramdisk", "initrd", metavar="FILE", type=click.Path(dir_okay=False),
                     help="Initial ramdisk for the new kernel.")(f)
    f = click.argument("kernel", type=click.Path(dir_okay=False))(f)
    return f


@click.group("kexec")
def kexec_group() -> None:
    """Load and boot another kernel (kexec-tools' `kexec -l / -e / -u`).

    \b
      khibernate kexec load /boot/vmlinuz --initrd /boot/initrd.img --reuse-cmdline   # kexec -l ... --reuse-cmdline
      khibernate kexec exec                                                          # kexec -e
      khibernate kexec unload                                                        # kexec -u
    """


@kexec_group.command("load")
@_common_load_options
@click.option("--syscall", type=click.Choice(["file", "load"]), default="file", show_default=True,
              help="kexec_file_load (the kernel parses the bzImage; works under lockdown with a signed kernel) or "
                   "kexec_load (khibernate builds the segments: boot_params, purgatory).")
@click.option("--dry-run", is_flag=True, help="With --syscall load (or on a Xen dom0): print the segments, load "
              "nothing.")
@click.option("--vmm", metavar="XEN_IMAGE", type=click.Path(dir_okay=False),
              help="Xen dom0 only: boot this hypervisor (xen-*.gz, multiboot) with KERNEL and --initrd as its dom0; "
                   "--append \"XEN_ARGS -- DOM0_ARGS\" gives Xen's and dom0's command lines.")
def kexec_load_cmd(kernel: str, initrd: str | None, append: str | None, command_line: str | None,
                   reuse_cmdline: bool, syscall: str, dry_run: bool, vmm: str | None) -> None:
    """Load KERNEL to be booted by `khibernate kexec exec` (like `kexec -l`).

    On a Xen dom0 the image is loaded into the hypervisor (kexec-tools does the same through libxenctrl): KERNEL
    then boots natively on the whole machine (Xen→Linux), or with --vmm a new Xen boots with KERNEL as dom0
    (Xen→Xen, like `kexec -l xen.gz --module "vmlinuz ARGS" --module initrd --command-line XEN_ARGS`).
    """
    cmdline = _cmdline(append, command_line, reuse_cmdline)
    if api.on_xen_pv():
        xplan = api.plan_xen_kexec(kernel, initrd, cmdline, vmm)
        if dry_run:
            click.echo(xplan.describe())
            return
        api.load_xen(xplan)
        click.echo(f"loaded {vmm + ' with dom0 ' + kernel if vmm else kernel} into Xen ({len(xplan.segments)} "
                   "segments); boot it with `khibernate kexec exec`")
        return
    if vmm is not None:
        raise UsageError("--vmm loads a hypervisor through Xen's kexec, from a Xen dom0; this is not one (from "
                         "bare Linux use kexec-tools' multiboot loader: kexec -l xen.gz --module ...)")
    if syscall == "file":
        if dry_run:
            raise UsageError("--dry-run shows khibernate's own segments: use it with --syscall load")
        api.file_load(kernel, initrd, cmdline)
        click.echo(f"loaded {kernel} with kexec_file_load; boot it with `khibernate kexec exec`")
        return
    plan = api.plan_kexec(kernel, initrd, cmdline)
    if dry_run:
        click.echo(plan.describe())
        return
    api.load_plan(plan)
    click.echo(f"loaded {kernel} with kexec_load ({len(plan.segments)} segments); boot it with "
               "`khibernate kexec exec`")


@kexec_group.command("exec")
def kexec_exec_cmd() -> None:
    """Boot the loaded kernel now, without a firmware reboot (like `kexec -e`). Processes are not stopped first."""
    click.echo("starting the loaded kernel", err=True)
    if api.on_xen_pv():
        api.execute_xen()
    result = api.execute()
    click.echo(f"the loaded image was a jump image: {result.describe()}")


@kexec_group.command("unload")
def kexec_unload_cmd() -> None:
    """Unload the kexec image (like `kexec -u`)."""
    if api.on_xen_pv():
        api.unload_xen()
    else:
        api.unload()
    click.echo("kexec image unloaded")


@kexec_group.command("status")
def kexec_status_cmd() -> None:
    """Show what is loaded (/sys/kernel/kexec_loaded, kexec_crash_loaded; on a Xen dom0: what Xen holds)."""
    click.echo((api.xen_state() if api.on_xen_pv() else api.state()).describe())


@click.group("kdump")
def kdump_group() -> None:
    """Load a capture kernel that boots when this kernel panics (kexec-tools' `kexec -p`).

    \b
    Needs crashkernel=256M (or similar) on this kernel's command line.
      khibernate kdump load /boot/vmlinuz --initrd /boot/initrd.img --append "console=ttyS0 nr_cpus=1 reset_devices"
      echo c > /proc/sysrq-trigger          # test it: the capture kernel has /proc/vmcore
    """


@kdump_group.command("load")
@_common_load_options
@click.option("--dry-run", is_flag=True, help="On a Xen dom0: print the segments, command line and e820, load "
              "nothing.")
def kdump_load_cmd(kernel: str, initrd: str | None, append: str | None, command_line: str | None,
                   reuse_cmdline: bool, dry_run: bool) -> None:
    """Load KERNEL into the crash region with kexec_file_load (like `kexec -p`); the kernel adds elfcorehdr=.

    On a Xen dom0 the capture kernel goes into Xen's crash region (crashkernel= on Xen's command line) and boots
    when dom0 or Xen itself crashes; its /proc/vmcore is the whole host, with Xen's notes and dom0's VMCOREINFO.
    """
    cmdline = _cmdline(append, command_line, reuse_cmdline)
    if api.on_xen_pv():
        plan = api.plan_xen_crash(kernel, initrd, cmdline)
        if dry_run:
            click.echo(plan.describe())
            return
        api.load_xen(plan)
        click.echo(f"loaded capture kernel {kernel} into Xen's crash region; it boots when dom0 or Xen crashes")
        return
    if dry_run:
        raise UsageError("--dry-run applies on a Xen dom0 (elsewhere the kernel builds the kdump image itself)")
    from khibernate.capture import arm

    if arm.read_state() is not None:  # the kernel would place the kdump image over the waiting capture kernel
        raise UsageError("a resident capture kernel (`khibernate arm`) lives in the crash region: `khibernate "
                         "disarm` first, or arm it with --mem-min/--mem-max and load kdump into the rest of the "
                         "region with kexec-tools (kexec -p --mem-min=... --mem-max=...)")
    api.file_load(kernel, initrd, cmdline, crash=True)
    click.echo(f"loaded capture kernel {kernel}; it boots on panic")


@kdump_group.command("unload")
def kdump_unload_cmd() -> None:
    """Unload the capture kernel (like `kexec -p -u`)."""
    if api.on_xen_pv():
        api.unload_xen(crash=True)
    else:
        api.unload(crash=True)
    click.echo("capture kernel unloaded")


@kdump_group.command("status")
def kdump_status_cmd() -> None:
    """Show whether a capture kernel is loaded and the crash region size (on a Xen dom0: Xen's)."""
    click.echo((api.xen_state() if api.on_xen_pv() else api.state()).describe())


@click.group("jump")
def jump_group() -> None:
    """kexec jump: run another kernel and come back (kexec-tools' --load-preserve-context / --load-jump-back-helper).

    \b
    In the first kernel (booted with crashkernel=256M):
      khibernate jump load /boot/bzImage --initrd /boot/initrd.gz --append "console=ttyS0"
      khibernate jump exec          # returns when the second kernel jumps back
    In the second kernel (its /proc/cmdline has kexec_jump_back_entry=, /proc/vmcore is the first kernel):
      khibernate jump back          # back to the first kernel; returns when it jumps here again
    After the first trip both kernels are coroutines: `jump exec` / `jump back` resume the peer where it stopped.

    \b
    Replaces:
      kexec --load-preserve-context --mem-min=0x2f000000 --mem-max=0x3effffff bzImage --initrd=... \\
            --append="... memmap=exactmap memmap=639K@0 memmap=256M@0x2f000000 --"
      kexec --load-jump-back-helper --entry=$E   (broken on 6.12 and 7.3: zero-length segment)
    """


@jump_group.command("load")
@_common_load_options
@click.option("--mem-min", type=ADDRESS, help="Lowest address of the load window (default: the crash region).")
@click.option("--mem-max", type=ADDRESS, help="Highest address of the load window, inclusive.")
@click.option("--dry-run", is_flag=True, help="Print the segment table, command line and e820; load nothing.")
def jump_load_cmd(kernel: str, initrd: str | None, append: str | None, command_line: str | None,
                  reuse_cmdline: bool, mem_min: int | None, mem_max: int | None, dry_run: bool) -> None:
    """Load KERNEL as a jump image (like `kexec --load-preserve-context`).

    The second kernel gets RAM only in the load window (the crashkernel= region by default) and in low memory
    below 640 KiB, which is swapped with the first kernel's on every jump; its /proc/vmcore describes the first
    kernel's RAM, with VMCOREINFO. khibernate adds nokaslr, iomem=relaxed, elfcorehdr= and kexec_jump_back_entry=
    to the command line (before a '--' if there is one).
    """
    api.refuse_on_xen("khibernate jump load")
    plan = api.plan_jump(kernel, initrd, _cmdline(append, command_line, reuse_cmdline), mem_min, mem_max)
    if dry_run:
        click.echo(plan.describe())
        return
    api.load_plan(plan)
    click.echo(f"loaded jump image {kernel} ({len(plan.segments)} segments, "
               f"{sum(s.memsz for s in plan.segments) / 2**20:.0f} MiB); enter it with `khibernate jump exec`")


@jump_group.command("exec")
def jump_exec_cmd() -> None:
    """Jump to the loaded image (like `kexec -e`); returns when the peer jumps back."""
    api.refuse_on_xen("khibernate jump exec")
    click.echo("jumping", err=True)
    click.echo(api.execute().describe())


@jump_group.command("back")
@click.option("--entry", type=ADDRESS, help="The peer's jump-back entry (default: kexec_jump_back_entry= of "
              "/proc/cmdline).")
@click.option("--load-only", is_flag=True, help="Load the jump-back image, do not jump (then `jump exec`).")
def jump_back_cmd(entry: int | None, load_only: bool) -> None:
    """Jump back to the kernel that jumped here (like `kexec --load-jump-back-helper --entry=E; kexec -e`).

    The image is ONE 4 KiB segment holding a copy of the peer's kexec control page, loaded once per boot and
    reused for later trips: after a round trip a new copy would be stale, so do not unload it while the peer
    should stay resumable.
    """
    if load_only:
        entry, reused = api.prepare_jump_back(entry)
        click.echo(f"jump-back image for entry {entry:#x} {'already loaded' if reused else 'loaded'}")
        return
    click.echo("jumping back", err=True)
    entry, reused, result = api.jump_back(entry)
    click.echo(f"jump-back image for entry {entry:#x} {'reused' if reused else 'loaded'}; {result.describe()}")


@jump_group.command("status")
def jump_status_cmd() -> None:
    """Show what is loaded and whether this kernel is a jump target (its kexec_jump_back_entry)."""
    click.echo(api.jump_status())
