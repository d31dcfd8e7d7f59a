"""`khibernate target`: create and inspect the snapshot store (click only; logic in khibernate.store.api)."""

from __future__ import annotations

import json

import click

from khibernate.clickutil import SIZE
from khibernate.store import api


@click.group("target")
def target_group() -> None:
    """The snapshot store on a raw partition or disk (like a swap partition for in-kernel hibernation).

    \b
      khibernate target init /dev/vdb            # erases the device: 2 slots
      khibernate target list /dev/vdb
      khibernate target export /dev/vdb 0 snap.khi     # or --format kdump / elf
      khibernate target drop /dev/vdb 0

    A new image goes to a free slot; the superblock (two checksummed copies) is switched last, so an interrupted
    snapshot never damages the last good image and shows up as `writing` (incomplete).
    """


@target_group.command("init")
@click.argument("device")
@click.option("--slots", type=int, default=2, show_default=True, help="Number of equal image slots (2..16).")
@click.option("--force", is_flag=True, help="Replace an existing store (its images are lost).")
@click.option("--size", type=SIZE, metavar="S",
              help="Make DEVICE a new file of S bytes (e.g. 2G) on ext4 or xfs, like a swap file: written "
                   "completely, its extents recorded; refused where it cannot be written by device offsets.")
def init_cmd(device: str, slots: int, force: bool, size: int | None) -> None:
    """Create an empty store on DEVICE (everything on it is lost), or with --size a store file DEVICE.

    
    A store file is like a swap file with resume_offset=: the capture kernel, which mounts nothing, writes the
    disk under it, inside the file's extents only. A file that is copy-on-write, reflinked, compressed, inline,
    encrypted, sparse, or on btrfs, LVM, dm-crypt or a network filesystem is refused with the reason; so is a
    file that moved on the disk since `target init` (defragmented, copied), at every hibernate and resume.
      khibernate target init /var/lib/khibernate/store --size 2G
    """
    if size is not None:
        from khibernate.store import filetarget

        sb, m = filetarget.init_file(device, size, slots, force)
        click.echo(sb.describe())
        click.echo(f"file target: {len(m.extents)} extent(s) on the device, first byte at device offset "
                   f"{m.resume_offset} (resume_offset)")
        return
    sb = api.init(device, slots, force)
    click.echo(sb.describe())


@target_group.command("list")
@click.argument("device")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(device: str, as_json: bool) -> None:
    """The store's slots and their states (free, writing, complete, resumed, bad)."""
    sb = api.read(device)
    if as_json:
        click.echo(json.dumps({"store": sb.uuid_str, "generation": sb.generation,
                               "slots": [api.show(device, s.index) for s in sb.slots]}, indent=2))
    else:
        click.echo(sb.describe())


@target_group.command("show")
@click.argument("device")
@click.argument("slot", type=int)
@click.option("--verify", is_flag=True, help="Also read the image back and check its checksums.")
def show_cmd(device: str, slot: int, verify: bool) -> None:
    """One slot's record as JSON."""
    data = api.show(device, slot)
    if verify:
        chk = api.verify_slot(device, slot)
        data["verified"] = {"pages_stored": chk.pages_stored, "pages_zero": chk.pages_zero}
    click.echo(json.dumps(data, indent=2))


@target_group.command("export")
@click.argument("device")
@click.argument("slot", type=int)
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["khi", "kdump", "elf"]), default="khi", show_default=True,
              help="khi: the image as stored; kdump: makedumpfile's compressed format with zstd pages (drgn, "
                   "libkdumpfile; Debian 12's makedumpfile has no zstd: export the khi and use `image export "
                   "--compress zlib`); elf: an ELF vmcore (gdb, drgn).")
def export_cmd(device: str, slot: int, dest: str, fmt: str) -> None:
    """Copy SLOT's image out of the store into DEST (checked first)."""
    n = api.export(device, slot, dest, fmt)
    click.echo(f"{dest}: {fmt} {n / 1e6:.1f} MB from slot {slot}")


@target_group.command("drop")
@click.argument("device")
@click.argument("slot", type=int)
def drop_cmd(device: str, slot: int) -> None:
    """Mark SLOT free (its image is no longer listed; the bytes are overwritten by a later snapshot)."""
    rec = api.drop(device, slot)
    click.echo(f"slot {slot} ({rec.state.name.lower()}, #{rec.seq}) is free now")
