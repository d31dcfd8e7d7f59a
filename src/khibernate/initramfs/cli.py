"""``khibernate initramfs``: build and list capture-environment initramfs images (click only; logic in build/cpio)."""

from __future__ import annotations

import stat
from pathlib import Path

import click

from khibernate.initramfs import cpio  # cheap: the builder (pyelftools, subprocesses) is imported by the command


@click.group("initramfs")
def initramfs_group() -> None:
    """Build and inspect the initramfs of the capture (jumped-to) kernel."""


@initramfs_group.command("build")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the initramfs.")
@click.option("--add", "adds", multiple=True, metavar="SRC:DST",
              help="Also put host file or directory SRC at guest path DST (repeatable).")
@click.option("--compress", "compression", type=click.Choice(cpio.COMPRESSIONS), default="zstd", show_default=True,
              help="Compression of the cpio archive (the kernel needs the matching CONFIG_RD_* option).")
@click.option("--no-python", is_flag=True, help="Leave out Python and khibernate (busybox, kexec and /init only).")
def build_command(output: Path, adds: tuple[str, ...], compression: str, no_python: bool) -> None:
    """Build a deterministic initramfs: busybox, /init, kexec, Python + khibernate, and added files."""
    from khibernate.initramfs import build as builder

    extra = [builder.parse_add(a) for a in adds]
    report = builder.build(output, extra, compression=compression, python=not no_python)
    click.echo(report.summary())


@initramfs_group.command("list")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def list_command(file: Path) -> None:
    """List the members of an initramfs (newc cpio, plain, gzip or zstd, possibly concatenated)."""
    for compression, entries in cpio.segments(file.read_bytes()):
        click.echo(f"# segment: {compression}, {len(entries)} entries")
        for e in entries:
            extra = f" -> {e.data.decode(errors='replace')}" if e.kind == "symlink" else ""
            if e.kind == "chardev":
                extra = f" (char {e.rdev[0]},{e.rdev[1]})"
            click.echo(f"{stat.filemode(e.mode)} {len(e.data) if e.kind == 'file' else 0:>10} /{e.path}{extra}")
