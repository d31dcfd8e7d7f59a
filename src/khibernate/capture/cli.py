"""`khibernate snapshot` and `khibernate capture`: parse, call khibernate.capture, print."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from khibernate.clickutil import ADDRESS
from khibernate.errors import UsageError
from khibernate.seal.cli import KeyOptions, capture_key, with_key_options


def capture_kernel_options(f: Any) -> Any:
    """--kernel, --capture-initrd and --deadline: the capture kernel a jump loads (every command that jumps)."""
    f = click.option("--deadline", type=float, default=600, show_default=True, metavar="S",
                     help="Seconds after the capture kernel's boot when its watchdog gives up (and jumps back, "
                          "unless memory was already being restored).")(f)
    f = click.option("--capture-initrd", metavar="FILE",
                     help="Capture initramfs (default: `capture build`, cached).")(f)
    return click.option("--kernel", metavar="FILE",
                        help="Capture kernel bzImage (default: /boot/vmlinuz-$(uname -r)).")(f)


@click.command("snapshot")
@click.option("--target", required=True, metavar="DEV", help="The store (`khibernate target init DEV` first).")
@click.option("-d", "--dump-level", "level", type=int, default=None,
              help="makedumpfile dump level [default: 17, 31 with --for-analysis]; 17 (zero + free dropped) is the "
                   "most a restorable image may drop.")
@click.option("--for-analysis", is_flag=True,
              help="An image for crash/drgn, not for restore: -d 31 unless -d is given (kernel memory only).")
@click.option("--export-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Also write DIR/<UTC date-time>/vmcore (kdump-compressed) and dmesg.txt, as kdump-tools does.")
@capture_kernel_options
@click.option("--keep", type=int, metavar="N", help="Keep only the N newest complete images (older slots freed).")
@click.option("--append", default="", metavar="S",
              help="Extra capture-kernel command line words; `khibernate.fault=raise` or `=hang` makes the capture "
                   "job fail or hang on purpose (tests that it still jumps back and keeps the last good image).")
@click.option("--mem-min", type=ADDRESS, help="Lowest address of the capture kernel's window (default: all of the "
              "crash region); with --mem-max, inside the region it leaves the rest to a kdump kernel loaded there; "
              "outside it, the jump swaps this kernel's pages out of the window and back.")
@click.option("--mem-max", type=ADDRESS, help="Highest address of the capture kernel's window, inclusive.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@with_key_options
def snapshot_command(target: str, level: int | None, for_analysis: bool, export_dir: Path | None, kernel: str | None,
                     capture_initrd: str | None, keep: int | None, deadline: float, append: str,
                     mem_min: int | None, mem_max: int | None, as_json: bool, keys: KeyOptions) -> None:
    """Save this running kernel's memory into a store slot and continue (a kexec jump there and back).

    \b
    The system pauses while a capture kernel, loaded fresh into the crashkernel= region, saves /proc/vmcore into
    a free slot of DEV and jumps back. Then the slot is read back and checked, and only then marked complete:
    a failed or interrupted snapshot never damages the last good image. Filesystems are synced before the jump,
    and a capture kernel that cannot be shown to jump back (CONFIG_KEXEC_JUMP: `khibernate doctor --kernel K`)
    is refused before anything is done. After `khibernate arm --target DEV` the pause jumps into the capture
    kernel already waiting there (no boot in the pause); when it cannot serve or refuses, a fresh one is loaded.
      khibernate target init /dev/vdb
      khibernate snapshot --target /dev/vdb
      khibernate target export /dev/vdb 0 snap.khi

    \b
    A sealed store (`target init --key-file F`) needs its key: --key-file F or --passphrase-file F. The secret is
    read in a child process that ends before the jump, and only the key of this one image reaches the capture
    kernel, through the mailbox page it wipes before reading memory - never the command line or the disk.
    """
    from khibernate.capture import analysis
    from khibernate.capture import snapshot as snap
    from khibernate.jump import api as jump
    from khibernate.lock import capture_or_refuse
    from khibernate.progress import Reporter

    if level is None:
        level = analysis.ANALYSIS_LEVEL if for_analysis else 17
    opts = snap.Options(target=target, level=level, kernel=kernel, capture_initrd=capture_initrd, keep=keep,
                        deadline=deadline, append=append, mem_min=mem_min, mem_max=mem_max,
                        key=capture_key(keys))
    if opts.key is not None and export_dir is not None:
        raise UsageError("--export-dir of a sealed store is not done yet: export the slot afterwards with "
                         "`khibernate target export --key-file F DEV SLOT FILE --format kdump`")
    with capture_or_refuse(jump.RUN_DIR, "snapshot"):
        report = snap.snapshot(opts, say=Reporter.for_terminal(as_json=as_json).say)
    e = None
    if export_dir is not None:
        e = analysis.export_folder(target, report.slot, analysis.dated_folder(export_dir))
    click.echo(json.dumps({**report.to_json(), **({"export": e} if e else {})}, indent=2) if as_json
               else report.describe())
    if e is not None and not as_json:
        click.echo(f"  exported to {e['folder']}: vmcore {e['vmcore_bytes'] / 1e6:.1f} MB (kdump-compressed), "
                   f"dmesg.txt {e['dmesg_lines']} lines, in {e['export_seconds']} s")


@click.command("hibernate")
@click.option("--target", required=True, metavar="DEV", help="The store (`khibernate target init DEV` first).")
@click.option("-d", "--dump-level", "level", type=click.IntRange(0, 17), default=17, show_default=True,
              help="0, 1, 16 or 17: zero pages (1) and free pages (16) may be dropped; nothing else may be.")
@capture_kernel_options
@click.option("--append", default="", metavar="S", help="Extra capture-kernel command line words.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report (printed after the resume).")
@click.option("--allow-unresumable", is_flag=True,
              help="Hibernate even where `doctor` says a resume boot could not restore the image (e.g. KASLR with a "
                   "crash region over half of RAM): the image is then for analysis, or for a boot you arrange.")
@with_key_options
def hibernate_command(target: str, level: int, kernel: str | None, capture_initrd: str | None, deadline: float,
                      append: str, as_json: bool, allow_unresumable: bool, keys: KeyOptions) -> None:
    """Save this running kernel into a store slot and power the machine off; `khibernate resume` at the next
    boot brings it back exactly where it stopped (same processes, same boot_id).

    \b
    Filesystems are synced first (as swsusp does); the capture kernel writes the image, reads it back, marks it
    the one to resume, and powers off. If anything fails before that it jumps back and this system runs on
    (exit status 1, the slot marked bad, earlier images untouched). This command returns after the resume,
    reporting it. The image is tried once: a boot that finds it and does not resume it (refused, noresume) marks
    it tried. Every filesystem mounted read-write is recorded; the resume refuses an ext2/3/4 one that another boot
    mounted in between. xfs, btrfs and others cannot be checked (a warning says so): do not mount them from another
    boot before the resume — resuming after they changed corrupts them. It says first whether a resume boot reserves
    the same crash region (KASLR moves it; resume then swaps the saved region free) and refuses a setup whose resume
    would fail.
    A sealed store (`target init --passphrase-file F` or `--key-file F`) needs its key here as for a snapshot
    (--passphrase-file F or --key-file F, read in a child process that ends before the jump; only the key of this
    one image reaches the capture kernel). The resume boot asks for the passphrase on the console, or takes the
    same option.
      khibernate target init /dev/vdb
      khibernate hibernate --target /dev/vdb        # ... power on ... khibernate resume --target /dev/vdb
    """
    from khibernate.capture import snapshot as snap
    from khibernate.doctor import region_finding
    from khibernate.jump import api as jump
    from khibernate.lock import capture_or_refuse
    from khibernate.progress import Reporter
    from khibernate.system import SystemRoot

    opts = snap.Options(target=target, level=level, kernel=kernel, capture_initrd=capture_initrd, deadline=deadline,
                        append=append, kind="hibernate", allow_unresumable=allow_unresumable,
                        key=capture_key(keys))
    rep = Reporter.for_terminal(as_json=as_json)
    system = SystemRoot()
    region = region_finding(system)
    if region is not None:
        rep.say(f"hibernate: {region.message}")
    with capture_or_refuse(jump.RUN_DIR, "hibernate"):
        report = snap.hibernate(opts, say=rep.say, system=system)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.describe())


@click.group("capture")
def capture_group() -> None:
    """The capture environment: the initramfs the jumped-to kernel runs, and its job."""


@capture_group.command("build")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also copy the initramfs here (it is cached in ~/.cache/khibernate/capture either way).")
@click.option("--target", metavar="DEV",
              help="The snapshot target: when its drivers are modules (Debian's kernels), they and their "
                   "dependencies from modules.dep go in, and /init loads them before the job.")
@click.option("--kernel", metavar="BZIMAGE",
              help="The capture kernel whose modules to take (default: the running kernel's release).")
def build_cmd(output: Path | None, target: str | None, kernel: str | None) -> None:
    """Build (or reuse, by content) the capture initramfs: busybox, /init, Python + khibernate, and the target's
    driver modules for a modular capture kernel."""
    from khibernate.capture import initrd
    from khibernate.jump.bzimage import kernel_release

    release = kernel_release(Path(kernel).read_bytes()) if kernel else None
    path, reused = initrd.ensure(output, target=target, kernel_release=release)
    click.echo(f"{path}: {path.stat().st_size / 2**20:.1f} MiB ({'cached' if reused else 'built'})")


@capture_group.command("job", hidden=True)
@click.option("--timeout", is_flag=True, help="Post the watchdog's result (the job was killed).")
def job_cmd(timeout: bool) -> None:
    """Run the job on /proc/cmdline (what the capture /init calls)."""
    from khibernate.capture.job import main

    sys.exit(main(["--timeout"] if timeout else []))


@click.command("watch")
@click.option("--target", required=True, metavar="DEV", help="The store the captures go to (`target init DEV`).")
@click.option("--on", "kinds", default="oops,warn,bug,hung-task,softlockup", show_default=True, metavar="KINDS",
              help="Comma-separated event kinds that trigger a capture: oops, warn, bug, hung-task, softlockup.")
@click.option("--min-interval", type=float, default=300, show_default=True, metavar="S",
              help="Seconds from the end of one capture before the next may start; events in between are logged.")
@click.option("--max", "max_captures", type=int, metavar="N", help="Stop after N captures (default: never stop).")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/crash/khibernate"), show_default=True,
              help="Each capture's folder DIR/<UTC date-time>-<kind>/: event.json (the triggering report and the "
                   "snapshot's report), vmcore (kdump-compressed) and dmesg.txt.")
@click.option("--no-export", is_flag=True, help="Write only event.json; the image stays in the store slot.")
@click.option("-d", "--dump-level", "level", type=int, default=31, show_default=True,
              help="makedumpfile dump level of the captures (31: kernel memory only, what kdump users keep).")
@capture_kernel_options
@click.option("--keep", type=int, metavar="N", help="Keep only the N newest complete images in the store.")
@click.option("--mem-min", type=ADDRESS, help="Lowest address of the capture kernel's window (default: all of the "
              "crash region); with --mem-max, inside the region it leaves the rest to a kdump kernel loaded there; "
              "outside it, the jump swaps this kernel's pages out of the window and back.")
@click.option("--mem-max", type=ADDRESS, help="Highest address of the capture kernel's window, inclusive.")
def watch_command(target: str, kinds: str, min_interval: float, max_captures: int | None, out_dir: Path,
                  no_export: bool, level: int, kernel: str | None, capture_initrd: str | None, keep: int | None,
                  deadline: float, mem_min: int | None, mem_max: int | None) -> None:
    """Follow the kernel log; on an Oops, WARNING, BUG, hung task or soft lockup take an analysis snapshot and run on.

    \b
    The system pauses for each capture (a kexec jump to a capture kernel and back), then continues: unlike kdump,
    for events the kernel survives. Events that kernel.panic_on_oops / panic_on_warn / softlockup_panic /
    hung_task_panic turn into panics never reach user space: the watcher says so at start and leaves them to kdump.
    One capture at a time, at most one per --min-interval, and it stops after --max.
      khibernate target init /dev/vdb
      khibernate watch --target /dev/vdb --on oops,warn --min-interval 600 --max 5
    """
    from khibernate.capture import analysis, watch
    from khibernate.capture import snapshot as snap
    from khibernate.jump import api as jump
    from khibernate.system import SystemRoot

    if max_captures is not None and max_captures < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max")
    if min_interval < 0:
        raise click.BadParameter("must not be negative", param_hint="--min-interval")
    root = SystemRoot()
    plan = watch.plan_start(watch.parse_kinds(kinds), watch.panic_policy(root.read_int),
                            root.read_int("/sys/kernel/kexec_crash_loaded") == 1)
    opts = snap.Options(target=target, level=level, kernel=kernel, capture_initrd=capture_initrd, keep=keep,
                        deadline=deadline, mem_min=mem_min, mem_max=mem_max)
    snap.preflight(opts)  # a target that cannot take a capture is refused now, not at the first Oops

    def say(m: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {m}", err=True)

    def busy() -> str | None:
        from khibernate.capture import arm

        if jump.state().loaded and arm.read_state(root) is None:  # a resident capture kernel serves captures
            return "a kexec image is loaded (a jump or kexec is pending; `khibernate kexec unload` if it is stale)"
        return None

    def capture(ev: watch.Event) -> dict[str, Any]:
        return snap.snapshot(opts, say=say).to_json()  # the event record's "snapshot" (JSON)

    def export(report: dict[str, Any], folder: Path) -> dict[str, Any]:
        return analysis.export_folder(target, int(report["slot"]), folder)

    for line in plan.describe():
        say(line)
    say(f"watch: {target}, -d {level}, --min-interval {min_interval:g} s"
        + (f", --max {max_captures}" if max_captures else "") + f"; records in {out_dir}; following /dev/kmsg")
    w = watch.Watcher(plan, watch.RateLimiter(min_interval, max_captures), capture, out_dir, jump.RUN_DIR, say, busy,
                      None if no_export else export)
    try:
        n = w.run(watch.follow_kmsg(), watch.ReportCollector())
    except KeyboardInterrupt:
        n = w.limiter.captures
    say(f"watch: stopped after {n} capture(s)")


@click.command("arm")
@click.option("--target", required=True, metavar="DEV", help="The store the pauses save into (`target init DEV`).")
@capture_kernel_options
@click.option("--append", default="", metavar="S", help="Extra capture-kernel command line words.")
@click.option("--mem-min", type=ADDRESS, help="Lowest address of the capture kernel's window (default: all of the "
              "crash region; with --mem-max, leave the rest of the region to a kdump kernel).")
@click.option("--mem-max", type=ADDRESS, help="Highest address of the capture kernel's window, inclusive.")
def arm_command(target: str, kernel: str | None, capture_initrd: str | None, deadline: float, append: str,
                mem_min: int | None, mem_max: int | None) -> None:
    """Boot the capture kernel once and keep it waiting: later snapshot, hibernate and watch captures only jump.

    \b
    The system pauses once now while the capture kernel boots into the crashkernel= region, starts Python, opens
    the store on DEV and jumps back. From then on a capture of DEV with the same capture kernel jumps straight
    into it: no load, no boot, no Python start in the pause. What each pause should do goes through a mailbox page,
    and the capture kernel refuses (and the capture loads a fresh capture kernel instead) when anything changed
    under it: the store, this kernel's memory map, the mailbox. `khibernate disarm` unloads it; `khibernate
    doctor` shows it. Same checks as `snapshot` before anything is loaded (a capture kernel that cannot jump
    back is refused). --deadline here bounds the boot until ready.
      khibernate arm --target /dev/vdb
      khibernate snapshot --target /dev/vdb      # pauses through the resident capture kernel
      khibernate disarm
    """
    from khibernate.capture import arm, kernelcheck
    from khibernate.capture import snapshot as snap
    from khibernate.capture.roundtrip import CaptureKernel
    from khibernate.doctor import diagnose
    from khibernate.jump import api as jump
    from khibernate.lock import capture_or_refuse
    from khibernate.progress import Reporter
    from khibernate.system import SystemRoot

    rep = Reporter.for_terminal()
    system = SystemRoot()
    jump.refuse_on_xen("arm")
    d = diagnose(system, os.geteuid())
    if d.possible("jump") is False:
        why = "; ".join(f.message for f in d.findings if "jump" in f.blocks)
        raise arm.ArmError(f"this machine cannot kexec jump: {why} (`khibernate doctor` says more)")
    snap.check_kdump_sharing(snap.Options(target, mem_min=mem_min, mem_max=mem_max),
                             system.read_int("/sys/kernel/kexec_crash_loaded") == 1)
    kernel = kernel or snap.default_kernel()
    kernelcheck.check(kernel, system)
    initrd, _ = snap.capture_initrd_for(kernel, target, capture_initrd)
    with capture_or_refuse(jump.RUN_DIR, "arm"):
        armed = arm.arm(CaptureKernel(kernel, initrd, mem_min, mem_max, append), target, rep.say, deadline, system)
    click.echo(f"{armed.describe()}; ready after {armed.ready_seconds:.2f} s")


@click.command("disarm")
def disarm_command() -> None:
    """Unload the resident capture kernel `khibernate arm` left waiting (captures load a fresh one again)."""
    from khibernate.capture import arm
    from khibernate.jump import api as jump
    from khibernate.lock import capture_or_refuse

    with capture_or_refuse(jump.RUN_DIR, "disarm"):
        was = arm.disarm()
    click.echo("resident capture kernel unloaded" if was else "no resident capture kernel was armed")
