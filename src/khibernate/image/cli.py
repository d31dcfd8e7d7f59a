"""``khibernate image``: save, inspect, verify, export and read memory images (click only; logic lives in modules)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from khibernate.clickutil import ADDRESS, SIZE, ErrorReportingGroup, echo_hexdump, parse_number
from khibernate.image import vmcoreinfo as vmci_mod
from khibernate.image.errors import FileAccessError, ImageError, UsageErrorImage
from khibernate.image.levels import RESTORABLE_LEVEL, PageClass
from khibernate.image.sources import MemorySource, open_source
from khibernate.image.vmcoreinfo import Vmcoreinfo
from khibernate.progress import Reporter
from khibernate.seal.cli import KeyOptions, key_sources, one_key, with_key_options

if TYPE_CHECKING:
    from khibernate.seal.keysource import KeySource


def _int(text: str) -> int:
    """Integer from decimal, 0x-hex or K/M/G text; UsageErrorImage otherwise."""
    try:
        return parse_number(text)
    except ValueError:
        raise UsageErrorImage(f"{text!r} is not a number (use decimal, 0x-hex, or a K/M/G suffix)") from None


def _open(source: str, ranges: str | None, elfcorehdr: str | None, key: KeySource | None = None) -> MemorySource:
    """The source: raw memory when --elfcorehdr/--ranges are given, else sniffed by magic (``key``: for a sealed
    khibernate image)."""
    if elfcorehdr:
        from khibernate.image.inputfile import open_input

        fd = open_input(elfcorehdr)
        try:
            blob = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        return open_source(source, elfcorehdr=blob)
    if ranges:
        from khibernate.image.sources.raw import parse_ranges

        return open_source(source, ranges=parse_ranges(ranges))
    return open_source(source, key=key)


def _sealed_khi(path: str) -> bool:
    """Whether ``path`` starts like a sealed khibernate image (magic, version 3): `save` opens it with its key."""
    from khibernate.image.inputfile import open_input
    from khibernate.image.layouts.khi import MAGIC, SEALED_VERSION

    fd = open_input(path)
    try:
        head = os.pread(fd, 12, 0)
    finally:
        os.close(fd)
    return head[:8] == MAGIC and int.from_bytes(head[8:12], "little") == SEALED_VERSION


def _vmcoreinfo(src: MemorySource, path: str | None, at: str | None, required: bool) -> Vmcoreinfo | None:
    """VMCOREINFO from --vmcoreinfo, --vmcoreinfo-at or the source's note (None if optional and absent)."""
    if path:
        return vmci_mod.from_file(path)
    if at:
        a, _, n = at.partition(":")
        return vmci_mod.from_memory(src, _int(a), _int(n or "0x1000"))
    return vmci_mod.from_source(src) if required else vmci_mod.find_in_source(src)


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    """Print ``data`` as JSON or ``text`` as is."""
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


source_options = [
    click.option("--vmcoreinfo", "vmcoreinfo_file", metavar="FILE", help="VMCOREINFO text (makedumpfile -g format) "
                 "when the source has no VMCOREINFO note (kexec-jump /proc/vmcore)."),
    click.option("--vmcoreinfo-at", metavar="PADDR[:SIZE]", help="Read the VMCOREINFO note from the source's memory "
                 "at this physical address (the first number in the old kernel's /sys/kernel/vmcoreinfo)."),
    click.option("--ranges", metavar="START-END,...", help="Raw memory file (/dev/mem): hex physical RAM ranges."),
    click.option("--elfcorehdr", metavar="FILE", help="Raw memory file (/dev/mem): take ranges and notes from "
                 "this elfcorehdr."),
]


def with_source_options(f: Any) -> Any:
    """Decorate a command with the options that describe a source."""
    for opt in reversed(source_options):
        f = opt(f)
    return f


def with_raw_options(f: Any) -> Any:
    """Decorate a command with the options that describe a raw-memory source (no VMCOREINFO needed)."""
    for opt in reversed(source_options[2:]):
        f = opt(f)
    return f


DUMP_LEVEL = click.IntRange(0, 31)
XEN_FILTER = click.option("--xen", "xen_filter", type=click.Choice(["dom0", "hypervisor"]), default=None,
                          help="A Xen host's vmcore: keep the hypervisor's and dom0's frames, dropping guests' and "
                               "free ones (dom0, like makedumpfile -X), or the hypervisor's only (hypervisor); read "
                               "from Xen's frame table.")


class _ImageGroup(ErrorReportingGroup):
    """Reports errors also when run alone (``python3 -m khibernate.image`` skips the other command groups)."""

    os_error_class = FileAccessError


@click.group("image", cls=_ImageGroup)
def image_group() -> None:
    """Read any vmcore, filter pages like makedumpfile, save a verifiable zstd image, export what peers open.

    SOURCE may be /proc/vmcore, an ELF vmcore (ELF64/ELF32), a QEMU dump-guest-memory file, a makedumpfile
    kdump-compressed or flattened file, a khibernate image, or raw memory (/dev/mem) with --ranges/--elfcorehdr.
    """


@image_group.command("save")
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("-d", "--dump-level", "level", type=DUMP_LEVEL, default=None,
              help="makedumpfile dump level 0-31, a bitmask: 1 zero, 2 cache without private, 4 all cache, 8 user, "
                   f"16 free. Default: {RESTORABLE_LEVEL} (restorable).")
@click.option("--restorable", is_flag=True,
              help="Keep everything a resumed kernel needs: only zero and free pages may be dropped (-d 17 at "
                   "most). The default when no -d is given; use it for any image that will be restored.")
@click.option("--threads", type=click.IntRange(1, 256), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Compression threads.")
@click.option("--zstd-level", "zlevel", type=click.IntRange(-7, 22), default=1, show_default=True,
              help="zstd compression level (negative: faster, larger).")
@click.option("--block-pages", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Pages per zstd block.")
@click.option("--no-sync", is_flag=True, help="Skip the fsync before the final rename (faster, not crash-safe).")
@with_source_options
@XEN_FILTER
@with_key_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def save_cmd(source: str, dest: str, level: int | None, restorable: bool, threads: int, zlevel: int,
             block_pages: int, no_sync: bool, vmcoreinfo_file: str | None, vmcoreinfo_at: str | None,
             ranges: str | None, elfcorehdr: str | None, xen_filter: str | None, keys: KeyOptions,
             as_json: bool) -> None:
    """Filter SOURCE and save it as a khibernate image DEST (written to a temporary file beside DEST, fsync'd and
    renamed when complete). The image is restorable only if SOURCE itself lost no more than zero and free pages.
    A Xen host's vmcore is saved at -d 1 by default (dom0's page classes need its p2m: -d 2-16 are refused).
    With --key-file and/or --passphrase-file (--passphrase asks), DEST is sealed: encrypted and authenticated
    under a new random key wrapped by each (docs/sealed.md); a sealed SOURCE opens with the same key."""
    from khibernate.image.plan import check_source_level
    from khibernate.image.sources import xen
    from khibernate.image.sources.khi import save_file

    sources = key_sources(keys, confirm=True)
    sealing = None
    if sources:
        from khibernate.seal.sealing import Sealing

        sealing = Sealing.new(sources)
    with _open(source, ranges, elfcorehdr, sources[0] if sources and _sealed_khi(source) else None) as opened:
        src = xen.XenFilteredSource(opened, xen.frame_filter(opened, xen_filter)) if xen_filter else opened
        if level is None:  # restorable by default; a Xen host's dump cannot be restored and drops zero pages only
            level, restorable = (1, False) if xen.is_xen_dump(src) else (RESTORABLE_LEVEL, True)
        xen.check_level(src, level)
        recorded = check_source_level(src, level, restorable)
        vmci = _vmcoreinfo(src, vmcoreinfo_file, vmcoreinfo_at, required=bool(level & ~1))
        total = sum(r.size for r in src.ranges)
        with Reporter.for_terminal().meter("save", total) as prog:
            stats = save_file(src, dest, vmci=vmci, level=level, restorable=restorable, threads=threads,
                              zstd_level=zlevel, block_pages=block_pages, progress=prog.update,
                              sync=not no_sync, seal=sealing)
    counts = {c.name.lower(): stats.class_counts[c] for c in PageClass}
    data = {"dest": dest, "dump_level": recorded, "restorable": restorable, "sealed": sealing is not None,
            "pages_ram": stats.pages_ram,
            "pages_stored": stats.pages_stored, "pages_zero": stats.pages_zero,
            "pages_excluded": stats.pages_excluded, "classes": counts, "bytes": stats.bytes_written,
            "seconds": round(stats.seconds, 3),
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    _emit(as_json, data, f"{dest}: {stats.pages_stored} of {stats.pages_ram} pages stored "
          f"({stats.pages_zero} zero, {stats.pages_excluded - stats.pages_zero} dropped by -d {level}), "
          f"{stats.bytes_written / 1e6:.1f} MB in {stats.seconds:.2f}s")


@image_group.command("info")
@click.argument("source")
@with_source_options
@with_key_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_cmd(source: str, vmcoreinfo_file: str | None, vmcoreinfo_at: str | None, ranges: str | None,
             elfcorehdr: str | None, keys: KeyOptions,
             as_json: bool) -> None:
    """Show what SOURCE holds: format, memory ranges, kernel release, and for images the filter counts (a sealed
    image: with its key)."""
    from khibernate.image.info import describe

    with _open(source, ranges, elfcorehdr, one_key(keys)) as src:
        d = describe(src, _vmcoreinfo(src, vmcoreinfo_file, vmcoreinfo_at, required=False))
    lines = [f"{k}: {v}" for k, v in d.items() if k != "ranges"]
    lines.append("ranges: " + " ".join(f"{a}-{b}" for a, b in d["ranges"]))
    _emit(as_json, d, "\n".join(lines))


@image_group.command("verify")
@click.argument("image")
@with_raw_options
@with_key_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(image: str, ranges: str | None, elfcorehdr: str | None, keys: KeyOptions, as_json: bool) -> None:
    """Check every checksum and table of a khibernate image (or read every stored page of any other source).
    A sealed image needs its key, and is checked for authenticity: every block's tag, and the tag over header,
    bitmaps, index and trailer."""
    with _open(image, ranges, elfcorehdr, one_key(keys)) as src:
        with Reporter.for_terminal().meter("verify", sum(r.size for r in src.ranges)) as prog:
            res = src.verify(progress=prog.update)
        sealed = bool(getattr(src, "cipher", None))
    _emit(as_json, {"ok": True, "authenticated": sealed, **res},
          f"{image}: OK{' (sealed: authentic)' if sealed else ''} " + ", ".join(f"{k} {v}" for k, v in res.items()))


@image_group.command("read")
@click.argument("source")
@click.option("--paddr", required=True, type=ADDRESS, help="Physical address (0x-hex, decimal, or 1M-style).")
@click.option("--size", required=True, type=SIZE, help="Bytes to read (e.g. 64, 0x1000, 4K; at most 1G).")
@click.option("--raw", is_flag=True, help="Write the bytes to stdout instead of a hex dump.")
@with_raw_options
@with_key_options
def read_cmd(source: str, paddr: int, size: int, raw: bool, ranges: str | None, elfcorehdr: str | None,
             keys: KeyOptions) -> None:
    """Read physical memory from SOURCE (hex dump, or --raw bytes)."""
    if size > 1 << 30:
        raise UsageErrorImage(f"--size {size} is more than 1G; read in pieces or use 'image export'")
    a = paddr
    with _open(source, ranges, elfcorehdr, one_key(keys)) as src:
        data = src.read(a, size)
    if raw:
        sys.stdout.buffer.write(data)
        return
    echo_hexdump(a, data)


@image_group.command("export")
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--format", "fmt", type=click.Choice(["elf", "kdump"]), required=True, help="Output format.")
@click.option("--compress", type=click.Choice(["zstd", "zlib", "none"]), default="zstd", show_default=True,
              help="kdump per-page compression. Debian 12's makedumpfile and crash are built without zstd and "
                   "cannot read a zstd kdump export: use zlib for them.")
@click.option("--flat", is_flag=True, help="makedumpfile flattened stream (for pipes; DEST may be -).")
@click.option("--elf32", is_flag=True, help="ELF32 headers (memory below 4 GiB only).")
@click.option("-d", "--dump-level", "level", type=DUMP_LEVEL, default=None,
              help="Drop more pages while exporting (0-31, same bits as save); default: keep what SOURCE has.")
@click.option("--threads", type=click.IntRange(1, 256), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Compression threads (kdump).")
@click.option("--no-sync", is_flag=True, help="Skip the fsync before the final rename (faster, not crash-safe).")
@with_source_options
@XEN_FILTER
@with_key_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def export_cmd(source: str, dest: str, fmt: str, compress: str, flat: bool, elf32: bool, level: int | None,
               threads: int, no_sync: bool, vmcoreinfo_file: str | None, vmcoreinfo_at: str | None, ranges: str | None,
               elfcorehdr: str | None, xen_filter: str | None, keys: KeyOptions, as_json: bool) -> None:
    """Write SOURCE as an ELF vmcore or a makedumpfile-compatible kdump-compressed file.

    A zstd kdump file needs makedumpfile/crash built with zstd (Debian 12's are not: export with --compress zlib
    for them). A sealed SOURCE needs its key; the export is in clear (mode 0600)."""
    from khibernate.image.export import export

    if flat and fmt != "kdump":
        raise UsageErrorImage("--flat applies to --format kdump only")
    from khibernate.image.sources import xen

    with _open(source, ranges, elfcorehdr, one_key(keys)) as opened:
        src = xen.XenFilteredSource(opened, xen.frame_filter(opened, xen_filter)) if xen_filter else opened
        xen.check_level(src, level or 0)
        vmci = _vmcoreinfo(src, vmcoreinfo_file, vmcoreinfo_at, required=bool((level or 0) & ~1))
        total = sum(r.size for r in src.ranges)
        t0 = time.monotonic()
        with Reporter.for_terminal().meter("export", total) as prog:
            size = export(src, dest, fmt=fmt, compress=compress, flat=flat, elf32=elf32, level=level or 0,
                          vmci=vmci, threads=threads, sync=not no_sync, progress=prog.update)
    if dest != "-":
        data = {"dest": dest, "format": fmt, "compress": compress if fmt == "kdump" else None, "flat": flat,
                "bytes": size, "seconds": round(time.monotonic() - t0, 3)}
        _emit(as_json, data, f"{dest}: {fmt} {size / 1e6:.1f} MB in {data['seconds']:.2f}s")


@image_group.command("dmesg")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@with_source_options
@with_key_options
def dmesg_cmd(source: str, output: str | None, vmcoreinfo_file: str | None, vmcoreinfo_at: str | None,
              ranges: str | None, elfcorehdr: str | None, keys: KeyOptions) -> None:
    """Print the old kernel's log buffer, like makedumpfile --dump-dmesg."""
    from khibernate.image.dmesg import kernel_log

    with _open(source, ranges, elfcorehdr, one_key(keys)) as src:
        vmci = _vmcoreinfo(src, vmcoreinfo_file, vmcoreinfo_at, required=True)
        assert vmci is not None
        text = kernel_log(src, vmci)
    if output:
        from khibernate.image.atomic import atomic_output

        with atomic_output(output) as f:
            f.write(text.encode())
    else:
        click.echo(text, nl=False)


__all__ = ["ImageError", "image_group"]
