"""`khibernate snapshot` and `khibernate capture`: parse, call khibernate.capture, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("snapshot")
@click.option("--target", required=True, metavar="DEV", help="The store (`khibernate target init DEV` first).")
@click.option("-d", "--dump-level", "level", type=int, default=17, show_default=True,
              help="makedumpfile dump level; 17 (zero + free dropped) is the most a restorable image may drop.")
@click.option("--kernel", metavar="FILE", help="Capture kernel bzImage (default: /boot/vmlinuz-$(uname -r)).")
@click.option("--capture-initrd", metavar="FILE", help="Capture initramfs (default: `capture build`, cached).")
@click.option("--keep", type=int, metavar="N", help="Keep only the N newest complete images (older slots freed).")
@click.option("--deadline", type=float, default=600, show_default=True, metavar="S",
              help="Seconds after the capture kernel's boot when its watchdog gives up and jumps back.")
@click.option("--append", default="", metavar="S",
              help="Extra capture-kernel command line words; `khibernate.fault=raise` or `=hang` makes the capture "
                   "job fail or hang on purpose (tests that it still jumps back and keeps the last good image).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def snapshot_command(target: str, level: int, kernel: str | None, capture_initrd: str | None, keep: int | None,
                     deadline: float, append: str, as_json: bool) -> None:
    """Save this running kernel's memory into a store slot and continue (a kexec jump there and back).

    \b
    The system pauses while a capture kernel, loaded fresh into the crashkernel= region, saves /proc/vmcore into
    a free slot of DEV and jumps back. Then the slot is read back and checked, and only then marked complete:
    a failed or interrupted snapshot never damages the last good image.
      khibernate target init /dev/vdb
      khibernate snapshot --target /dev/vdb
      khibernate target export /dev/vdb 0 snap.khi
    """
    from khibernate.capture import snapshot as snap

    opts = snap.Options(target=target, level=level, kernel=kernel, capture_initrd=capture_initrd, keep=keep,
                        deadline=deadline, append=append)
    report = snap.run(opts, say=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(report, indent=2) if as_json else snap.describe(report))


@click.command("hibernate")
@click.option("--target", required=True, metavar="DEV", help="The store (`khibernate target init DEV` first).")
@click.option("-d", "--dump-level", "level", type=click.IntRange(0, 17), default=17, show_default=True,
              help="0, 1, 16 or 17: zero pages (1) and free pages (16) may be dropped; nothing else may be.")
@click.option("--kernel", metavar="FILE", help="Capture kernel bzImage (default: /boot/vmlinuz-$(uname -r)).")
@click.option("--capture-initrd", metavar="FILE", help="Capture initramfs (default: `capture build`, cached).")
@click.option("--deadline", type=float, default=600, show_default=True, metavar="S",
              help="Seconds after the capture kernel's boot when its watchdog gives up and jumps back.")
@click.option("--append", default="", metavar="S", help="Extra capture-kernel command line words.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report (printed after the resume).")
def hibernate_command(target: str, level: int, kernel: str | None, capture_initrd: str | None, deadline: float,
                      append: str, as_json: bool) -> None:
    """Save this running kernel into a store slot and power the machine off; `khibernate resume` at the next
    boot brings it back exactly where it stopped (same processes, same boot_id).

    \b
    Filesystems are synced first (as swsusp does); the capture kernel writes the image, reads it back, marks it
    the one to resume, and powers off. If anything fails before that it jumps back and this system runs on
    (exit status 1, the slot marked bad, earlier images untouched). This command returns after the resume,
    reporting it. Until then, do not mount the hibernated system's filesystems read-write from another boot:
    resuming after the disks changed corrupts them.
      khibernate target init /dev/vdb
      khibernate hibernate --target /dev/vdb        # ... power on ... khibernate resume --target /dev/vdb
    """
    from khibernate.capture import snapshot as snap

    opts = snap.Options(target=target, level=level, kernel=kernel, capture_initrd=capture_initrd, deadline=deadline,
                        append=append, kind="hibernate")
    report = snap.run(opts, say=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(report, indent=2) if as_json else
               f"resumed from slot {report['slot']} of {target} after {report['away_seconds']:.1f} s away; "
               f"restore wrote {report['restore'].get('bytes_written', 0) / 1e6:.0f} MB at "
               f"{report['restore'].get('throughput_mb_s', 0)} MB/s")


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
