"""``khibernate image``: save, inspect, verify, export and read memory images (click only; logic lives in modules)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

import click

from khibernate.clickutil import ErrorReportingGroup
from khibernate.image import vmcoreinfo as vmci_mod
from khibernate.image.errors import FileAccessError, ImageError, MissingVmcoreinfoError, UsageErrorImage
from khibernate.image.levels import RESTORABLE_LEVEL, PageClass
from khibernate.image.progress import Progress
from khibernate.image.sources import MemorySource, open_source
from khibernate.image.vmcoreinfo import Vmcoreinfo


def _int(text: str) -> int:
    """Integer from decimal or 0x-hex text; UsageErrorImage otherwise."""
    try:
        return int(text, 0)
    except ValueError:
        raise UsageErrorImage(f"{text!r} is not a number (use decimal or 0x-hex)") from None


def _open(source: str, ranges: str | None, elfcorehdr: str | None) -> MemorySource:
    """The source: raw memory when --ranges/--elfcorehdr are given, else sniffed by magic."""
    if ranges or elfcorehdr:
        from khibernate.image.sources.raw import RawSource, parse_ranges

        if elfcorehdr:
            with open(elfcorehdr, "rb") as f:
                return RawSource.with_elfcorehdr(source, f.read())
        return RawSource(source, parse_ranges(ranges or ""))
    return open_source(source)


def _vmcoreinfo(src: MemorySource, path: str | None, at: str | None, required: bool) -> Vmcoreinfo | None:
    """VMCOREINFO from --vmcoreinfo, --vmcoreinfo-at or the source's note (None if optional and absent)."""
    if path:
        return vmci_mod.from_file(path)
    if at:
        a, _, n = at.partition(":")
        return vmci_mod.from_memory(src, _int(a), _int(n or "0x1000"))
    try:
        return vmci_mod.from_source(src)
    except MissingVmcoreinfoError:
        if required:
            raise
        return None


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
@click.option("-d", "--dump-level", "level", type=int, default=None,
              help="makedumpfile dump level, a bitmask: 1 zero, 2 cache without private, 4 all cache, 8 user, "
                   f"16 free. Default: {RESTORABLE_LEVEL} (restorable).")
@click.option("--restorable", is_flag=True,
              help="Keep everything a resumed kernel needs: only zero and free pages may be dropped (-d 17 at "
                   "most). The default when no -d is given; use it for any image that will be restored.")
@click.option("--threads", type=int, default=min(4, os.cpu_count() or 1), show_default=True,
              help="Compression threads.")
@click.option("--level", "zlevel", type=int, default=1, show_default=True, help="zstd level.")
@click.option("--block-pages", type=int, default=256, show_default=True, help="Pages per zstd block.")
@click.option("--no-sync", is_flag=True, help="Skip the fsync before the final rename (faster, not crash-safe).")
@with_source_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def save_cmd(source: str, dest: str, level: int | None, restorable: bool, threads: int, zlevel: int,
             block_pages: int, no_sync: bool, vmcoreinfo_file: str | None, vmcoreinfo_at: str | None,
             ranges: str | None, elfcorehdr: str | None, as_json: bool) -> None:
    """Filter SOURCE and save it as a khibernate image DEST (written as DEST.partial, renamed when complete)."""
    from khibernate.image.format import save_file

    if level is None:
        level, restorable = RESTORABLE_LEVEL, True
    with _open(source, ranges, elfcorehdr) as src:
        vmci = _vmcoreinfo(src, vmcoreinfo_file, vmcoreinfo_at, required=bool(level & ~1))
        total = sum(r.size for r in src.ranges)
        with Progress("save", total) as prog:
            stats = save_file(src, dest, vmci=vmci, level=level, restorable=restorable, threads=threads,
                              zstd_level=zlevel, block_pages=block_pages, progress=prog.update,
                              sync=not no_sync)
    counts = {c.name.lower(): stats.class_counts[c] for c in PageClass}
    data = {"dest": dest, "dump_level": level, "restorable": restorable, "pages_ram": stats.pages_ram,
            "pages_stored": stats.pages_stored, "pages_zero": stats.pages_zero,
            "pages_excluded": stats.pages_excluded, "classes": counts, "bytes": stats.bytes_written,
            "seconds": round(stats.seconds, 3),
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    _emit(as_json, data, f"{dest}: {stats.pages_stored} of {stats.pages_ram} pages stored "
          f"({stats.pages_zero} zero, {stats.pages_excluded - stats.pages_zero} dropped by -d {level}), "
          f"{stats.bytes_written / 1e6:.1f} MB in {stats.seconds:.2f}s")


def describe(src: MemorySource) -> dict[str, Any]:
    """Facts about any source for ``info``."""
    from khibernate.image.format import KhiSource

    d: dict[str, Any] = {"format": type(src).__name__.removesuffix("Source").lower(),
                         "ranges": [[hex(r.start), hex(r.end)] for r in src.ranges],
                         "ram_bytes": sum(r.size for r in src.ranges),
                         "notes": [f"{n.name}/{n.type}" for n in src.notes],
                         "cpus": sum(1 for n in src.notes if n.name == "CORE" and n.type == 1)}
    text = src.vmcoreinfo_text
    if text:
        v = Vmcoreinfo.parse(text)
        d.update(osrelease=v.osrelease, build_id=v.build_id, page_size=v.page_size,
                 kerneloffset=hex(v.kerneloffset), crashtime=v.crashtime)
    from khibernate.image.kdump import KdumpSource

    if isinstance(src, KdumpSource):
        d.update(header_version=src.header.version, dump_level=src.header.dump_level, status=src.header.status,
                 utsname=list(src.header.utsname))
    if isinstance(src, KhiSource):
        h, t = src.header, src.trailer
        import uuid

        d.update(version=h.version, dump_level=h.dump_level, restorable=bool(h.flags & 1), uuid=str(uuid.UUID(
            bytes=h.uuid)), created_ns=h.created_ns, blocks=t.index_count, pages_stored=t.pages_stored,
            pages_zero=t.pages_zero, classes={c.name.lower(): t.class_counts[c] for c in PageClass},
            zstd_level=h.compression_level)
    return d


@image_group.command("info")
@click.argument("source")
@with_source_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_cmd(source: str, vmcoreinfo_file: str | None, vmcoreinfo_at: str | None, ranges: str | None,
             elfcorehdr: str | None, as_json: bool) -> None:
    """Show what SOURCE holds: format, memory ranges, kernel release, and for images the filter counts."""
    with _open(source, ranges, elfcorehdr) as src:
        d = describe(src)
    lines = [f"{k}: {v}" for k, v in d.items() if k != "ranges"]
    lines.append("ranges: " + " ".join(f"{a}-{b}" for a, b in d["ranges"]))
    _emit(as_json, d, "\n".join(lines))


@image_group.command("verify")
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(image: str, as_json: bool) -> None:
    """Check every checksum of a khibernate image (or read every page of any other source)."""
    from khibernate.image.format import KhiSource

    with open_source(image) as src:
        if isinstance(src, KhiSource):
            total = sum(e.usize for e in src.index)
            with Progress("verify", total) as prog:
                res = src.verify(progress=prog.update)
        else:
            n = 0
            for r in src.ranges:
                for a in range(r.start, r.end, 4 << 20):
                    src.read(a, min(4 << 20, r.end - a))
                    n += 1
            res = {"chunks_read": n}
    _emit(as_json, {"ok": True, **res}, f"{image}: OK " + ", ".join(f"{k} {v}" for k, v in res.items()))


@image_group.command("read")
@click.argument("source")
@click.option("--paddr", required=True, help="Physical address.")
@click.option("--size", required=True, help="Bytes to read.")
@click.option("--raw", is_flag=True, help="Write the bytes to stdout instead of a hex dump.")
@with_source_options
def read_cmd(source: str, paddr: str, size: str, raw: bool, vmcoreinfo_file: str | None,
             vmcoreinfo_at: str | None, ranges: str | None, elfcorehdr: str | None) -> None:
    """Read physical memory from SOURCE (hex dump, or --raw bytes)."""
    a, n = _int(paddr), _int(size)
    with _open(source, ranges, elfcorehdr) as src:
        data = src.read(a, n)
    if raw:
        sys.stdout.buffer.write(data)
        return
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        click.echo(f"{a + off:016x}  {row.hex(' '):<47}  {text}")


@image_group.command("export")
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--format", "fmt", type=click.Choice(["elf", "kdump"]), required=True, help="Output format.")
@click.option("--compress", type=click.Choice(["zstd", "zlib", "none"]), default="zstd", show_default=True,
              help="kdump per-page compression (Debian's makedumpfile reads zlib and none, not zstd).")
@click.option("--flat", is_flag=True, help="makedumpfile flattened stream (for pipes; DEST may be -).")
@click.option("--elf32", is_flag=True, help="ELF32 headers (memory below 4 GiB only).")
@click.option("-d", "--dump-level", "level", type=int, default=None,
              help="Drop more pages while exporting (same bits as save); default: keep what SOURCE has.")
@with_source_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def export_cmd(source: str, dest: str, fmt: str, compress: str, flat: bool, elf32: bool, level: int | None,
               vmcoreinfo_file: str | None, vmcoreinfo_at: str | None, ranges: str | None,
               elfcorehdr: str | None, as_json: bool) -> None:
    """Write SOURCE as an ELF vmcore or a makedumpfile-compatible kdump-compressed file."""
    from khibernate.image.export import export

    if flat and fmt != "kdump":
        raise UsageErrorImage("--flat applies to --format kdump only")
    with _open(source, ranges, elfcorehdr) as src:
        vmci = _vmcoreinfo(src, vmcoreinfo_file, vmcoreinfo_at, required=bool((level or 0) & ~1))
        total = sum(r.size for r in src.ranges)
        t0 = time.monotonic()
        with Progress("export", total) as prog:
            size = export(src, dest, fmt=fmt, compress=compress, flat=flat, elf32=elf32, level=level or 0,
                          vmci=vmci, progress=prog.update)
    if dest != "-":
        data = {"dest": dest, "format": fmt, "compress": compress if fmt == "kdump" else None, "flat": flat,
                "bytes": size, "seconds": round(time.monotonic() - t0, 3)}
        _emit(as_json, data, f"{dest}: {fmt} {size / 1e6:.1f} MB in {data['seconds']:.2f}s")


@image_group.command("dmesg")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@with_source_options
def dmesg_cmd(source: str, output: str | None, vmcoreinfo_file: str | None, vmcoreinfo_at: str | None,
              ranges: str | None, elfcorehdr: str | None) -> None:
    """Print the old kernel's log buffer, like makedumpfile --dump-dmesg."""
    from khibernate.image.dmesg import kernel_log

    with _open(source, ranges, elfcorehdr) as src:
        vmci = _vmcoreinfo(src, vmcoreinfo_file, vmcoreinfo_at, required=True)
        assert vmci is not None
        text = kernel_log(src, vmci)
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


__all__ = ["ImageError", "image_group"]
