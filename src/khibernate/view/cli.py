"""``khibernate view``: the previous kernel's memory, printed or mounted (click only; logic in the modules)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from khibernate.clickutil import ADDRESS, SIZE, ErrorReportingGroup, echo_hexdump
from khibernate.image.errors import FileAccessError, UsageErrorImage
from khibernate.image.sources import MemorySource
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.seal.cli import KeyOptions, one_key, with_key_options
from khibernate.view.previous import open_previous

if TYPE_CHECKING:
    from khibernate.seal.keysource import KeySource

SOURCE_HELP = """SOURCE is any file `khibernate image` reads (a khibernate image, /proc/vmcore or an ELF vmcore, a QEMU
dump, a makedumpfile kdump or flattened file). Without SOURCE: the previous kernel of the side we run on.
In a kdump or kexec-jump target (elfcorehdr= on /proc/cmdline): the first kernel, through /proc/vmcore or,
without it, /dev/mem plus the elfcorehdr, read by mmap (read() of x86 /dev/mem stops at this kernel's own end
of RAM; mmap reaches all of the first kernel's; STRICT_DEVMEM refuses only this kernel's own RAM).
In the first kernel after a jump back: the frozen jump target - the crash region through /proc/kcore plus the
pages the loaded jump image swapped back (its kimage page list); before the first jump that is the image as
loaded. Both sides need root (/proc/vmcore, /dev/mem, /proc/kallsyms addresses, /proc/kcore). Kernel lockdown
forbids /dev/mem (integrity mode) and /proc/kcore (confidentiality mode); /proc/vmcore stays readable."""


class _ViewGroup(ErrorReportingGroup):
    os_error_class = FileAccessError


def _open(source: str | None, key: KeySource | None = None) -> MemorySource:
    return open_previous(source, key)


def _vmci(src: MemorySource, path: str | None) -> Vmcoreinfo | None:
    from khibernate.image import vmcoreinfo as vmci_mod

    return vmci_mod.from_file(path) if path else None


vmcoreinfo_option = click.option("--vmcoreinfo", "vmcoreinfo_file", metavar="FILE",
                                 help="VMCOREINFO text for a source without the note (makedumpfile -g format).")


@click.group("view", cls=_ViewGroup, help=f"""One /proc/vmcore-style view of the previously booted kernel.

\b
{SOURCE_HELP}""")
def view_group() -> None:
    pass


@view_group.command("info")
@click.argument("source", required=False)
@with_key_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_cmd(source: str | None, keys: KeyOptions,
             as_json: bool) -> None:
    """Format, RAM ranges, kernel release and notes of the previous kernel (or SOURCE; sealed: with its key)."""
    from khibernate.view.files import describe

    with _open(source, one_key(keys)) as src:
        d = describe(src)
    if as_json:
        click.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    for k, v in d.items():
        if k != "ranges":
            click.echo(f"{k}: {v}")
    click.echo("ranges: " + " ".join(f"{a}-{b}" for a, b in d["ranges"]))


@view_group.command("read")
@click.argument("source", required=False)
@click.option("--paddr", required=True, type=ADDRESS, help="Physical address (0x-hex, decimal, or 1M-style).")
@click.option("--size", default="0x1000", show_default=True, type=SIZE,
              help="Bytes to read (e.g. 64, 0x1000, 4K; at most 1G).")
@click.option("--raw", is_flag=True, help="Write the bytes to stdout instead of a hex dump.")
@click.option("--zero-fill", is_flag=True, help="Read holes and excluded pages as zeros (as oldmem does) "
              "instead of failing.")
@with_key_options
def read_cmd(source: str | None, paddr: int, size: int, raw: bool, zero_fill: bool, keys: KeyOptions) -> None:
    """Read physical memory of the previous kernel (or SOURCE; sealed: with its key)."""
    if size > 1 << 30:
        raise UsageErrorImage(f"--size {size} is more than 1G; read in pieces or use 'view mount' and dd")
    a, n = paddr, size
    with _open(source, one_key(keys)) as src:
        if zero_fill:
            data = src.read_filled(a, n)
        else:
            data = src.read(a, n)
    if raw:
        sys.stdout.buffer.write(data)
        return
    echo_hexdump(a, data)


@view_group.command("dmesg")
@click.argument("source", required=False)
@vmcoreinfo_option
@with_key_options
def dmesg_cmd(source: str | None, vmcoreinfo_file: str | None, keys: KeyOptions) -> None:
    """The previous kernel's log (like makedumpfile --dump-dmesg; a sealed SOURCE with its key)."""
    from khibernate.image.dmesg import kernel_log
    from khibernate.image.vmcoreinfo import from_source

    with _open(source, one_key(keys)) as src:
        vmci = _vmci(src, vmcoreinfo_file) or from_source(src)
        click.echo(kernel_log(src, vmci), nl=False)


@view_group.command("mount")
@click.argument("directory", metavar="DIR")
@click.argument("source", required=False)
@vmcoreinfo_option
@click.option("--allow-other", is_flag=True, help="Let other users into the mount (root, or user_allow_other in "
              "/etc/fuse.conf); they still read only what --mode grants them.")
@click.option("--mode", "mode_text", default="0400", show_default=True, metavar="OCTAL",
              help="Permissions of the served files (read bits only), checked by the kernel: 0400 is the owner "
                   "alone, like /proc/kcore; 0440 adds the owner's group, 0444 every user who may enter.")
@with_key_options
def mount_cmd(directory: str, source: str | None, vmcoreinfo_file: str | None, allow_other: bool,
              mode_text: str, keys: KeyOptions) -> None:
    """Mount the view read-only at DIR with FUSE, in the foreground, until Ctrl-C, SIGTERM or `umount DIR`.

    \b
    DIR/vmcore      ELF64 core built on the fly (gdb, crash, drgn open it); holes and filtered pages read as 0
    DIR/oldmem      raw physical memory, dd-able at physical offsets like /dev/oldmem; size = end of the last
                    RAM range; holes and filtered pages read as zeros (a filtered image's dropped pages too)
    DIR/vmcoreinfo  the VMCOREINFO text (when known)
    DIR/dmesg       the kernel log (when VMCOREINFO is known)
    DIR/info.json   what `khibernate view info --json` prints, plus the vmcore's PT_LOADs

    \b
    The files hold the saved kernel's whole memory in clear: keys, passwords, every process's data. Like
    /proc/kcore they are readable by the mounting user (root) alone, mode 0400 checked by the kernel, even
    with --allow-other; give --mode to share them on purpose.
    A sealed image needs its key (--key-file, --passphrase-file or --passphrase): the mount serves it in clear.
    Mounting needs root or fusermount3 (Debian: fuse3).
    """
    from khibernate.view.files import build_files
    from khibernate.view.mount import check_mode, check_mountpoint, serve

    try:
        mode = check_mode(int(mode_text, 8))
    except ValueError:
        raise click.BadParameter(f"{mode_text!r} is not an octal mode such as 0400", param_hint="--mode") from None
    check_mountpoint(directory)
    with _open(source, one_key(keys)) as src:
        files = build_files(src, _vmci(src, vmcoreinfo_file))
        serve(directory, files, allow_other=allow_other, mode=mode,
              on_mount=lambda: click.echo(f"khibernate view: mounted at {directory} (files {mode:04o}"
                                          f"{', other users may enter' if allow_other else ''}); Ctrl-C or umount "
                                          "to end", err=True))
    click.echo(f"khibernate view: unmounted {directory}", err=True)
