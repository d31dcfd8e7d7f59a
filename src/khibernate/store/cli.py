"""`khibernate target`: create and inspect the snapshot store (click only; logic in khibernate.store.handle)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import click

from khibernate.clickutil import SIZE
from khibernate.errors import UsageError
from khibernate.seal.cli import KeyOptions, key_sources, one_key, with_key_options
from khibernate.store.handle import Store
from khibernate.store.superblock import STORE_SEALED


def _sealing(flags: int, short: bool = False) -> str:
    """What the store's flags say about sealing (khibernate.seal.policy)."""
    from khibernate.seal import policy

    return policy.name(flags) if short else policy.describe(flags)


@contextlib.contextmanager
def _no_capture(doing: str) -> Iterator[None]:
    """The capture lock for a store change that must not meet a capture (CaptureBusyError naming the holder)."""
    from khibernate.jump import api as jump
    from khibernate.lock import capture_or_refuse

    with capture_or_refuse(jump.RUN_DIR, doing):
        yield


@click.group("target")
def target_group() -> None:
    """The snapshot store on a raw partition or disk (like a swap partition for in-kernel hibernation).

    \b
      khibernate target init /dev/vdb            # erases the device: 2 slots
      khibernate target list /dev/vdb
      khibernate target export /dev/vdb 0 snap.khi     # or --format kdump / elf
      khibernate target drop /dev/vdb 0

    A new image goes to a free slot; the superblock (two checksummed copies) is switched last, so an interrupted
    snapshot never damages the last good image and shows up as `writing` (incomplete).  One process writes the
    store at a time (a lock on the device; others wait up to 30 s, then say who holds it).
    """


@target_group.command("init")
@click.argument("device")
@click.option("--slots", type=int, default=2, show_default=True, help="Number of equal image slots (2..16).")
@click.option("--force", is_flag=True, help="Erase what DEVICE holds: an existing store (its images are lost), a "
              "filesystem, swap, LVM/RAID/LUKS member or partition table.  A device in use is refused even so.")
@click.option("--size", type=SIZE, metavar="S",
              help="Make DEVICE a new file of S bytes (e.g. 2G) on ext4 or xfs, like a swap file: written "
                   "completely, its extents recorded; refused where it cannot be written by device offsets.")
@click.option("--unsealed", is_flag=True, help="Say that this store accepts unsealed (unauthenticated) images: "
              "whoever can write DEVICE chooses what a resume runs. Today's default (see below).")
@click.option("--tpm-pcrs", metavar="LIST", help="With --tpm: the SHA-256 PCRs the TPM slot is sealed to "
              "[default: 0,7 - firmware, Secure Boot]; add 4 (boot loader and kernel image), 8,9 (GRUB's command "
              "line and files) or 11,12 (a unified kernel image) to bind tighter: each change of them then locks "
              "the TPM slot (the passphrase or key file still opens the store).")
@with_key_options
def init_cmd(device: str, slots: int, force: bool, size: int | None, unsealed: bool, tpm_pcrs: str | None,
             keys: KeyOptions) -> None:
    """Create an empty store on DEVICE (everything on it is lost), or with --size a store file DEVICE.

    \b
    Refused when DEVICE is in use - mounted, swap, held by LVM, md or dm-crypt, a whole disk with such a
    partition, a file open for writing elsewhere (a loop device, a program) - and, unless --force, when it
    holds a store or anything `blkid -p` recognises (mkfs and wipefs refuse the same).

    \b
    A store file is like a swap file with resume_offset=: the capture kernel, which mounts nothing, writes the
    disk under it, inside the file's extents only. A file that is copy-on-write, reflinked, compressed, inline,
    encrypted, sparse, or on btrfs, LVM, dm-crypt or a network filesystem is refused with the reason; so is a
    file that moved on the disk since `target init` (defragmented, copied), at every hibernate and resume.
      khibernate target init /var/lib/khibernate/store --size 2G

    \b
    Sealing: with --key-file, --passphrase-file (--passphrase asks) and/or --tpm, a random store key is made,
    wrapped by each (key slots at 8 KiB), and the store accepts only images sealed with it: `snapshot` and
    `hibernate` into it need a key (--key-file, --passphrase-file or --tpm), `resume` takes one or, given none,
    tries the TPM slot and then asks for the passphrase on the console. --tpm seals the slot's key inside this
    machine's TPM 2.0 to the PCRs of --tpm-pcrs: only the same firmware and Secure Boot chain (and whatever else
    those PCRs measure) unseal it; give a passphrase too, to open the store when the chain changes.
    Without a key the store is unsealed and says so (as --unsealed): restore refuses an unsealed image
    from a store that does not say so. A store file cannot be sealed yet (its extent map lies where
    the key slots would).
    """
    pcrs = _pcrs(tpm_pcrs, keys.tpm)
    if unsealed and keys.count():
        raise UsageError("--unsealed and a key contradict each other: give one")
    if size is not None:
        if keys.count():
            raise UsageError("a store file cannot be sealed yet: its extent map lies at 8 KiB, where a sealed "
                             "store keeps its key slots; use a partition for a sealed store")
        from khibernate.store import filetarget

        sb, m = filetarget.init_file(device, size, slots, force)
        click.echo(sb.describe())
        click.echo(f"file target: {len(m.extents)} extent(s) on the device, first byte at device offset "
                   f"{m.resume_offset} (resume_offset)")
        click.echo(f"sealing: {_sealing(sb.flags)}")
        return
    sources = key_sources(keys, confirm=True, tpm_pcrs=pcrs)
    ring = None
    if sources:  # sealed (the TPM asked) before DEVICE is touched: a failure writes nothing
        from khibernate.seal.sealing import Sealing

        ring = Sealing.new(sources).keyring
    with contextlib.ExitStack() as stack:
        if force:  # replacing a store: no capture may be writing it meanwhile
            stack.enter_context(_no_capture("target init --force"))
        st = stack.enter_context(Store.create(device, slots, force=force))
        if ring is not None:
            from khibernate.store import keyslots

            keyslots.write(st.fd, ring)  # the store key itself is never written
            st.update(lambda sb: sb.with_flags(STORE_SEALED))
        click.echo(st.sb.describe())
        click.echo(f"sealing: {_sealing(st.sb.flags)}")


def _pcrs(text: str | None, tpm: bool) -> tuple[int, ...] | None:
    """The PCR list of --tpm-pcrs (None: the default); UsageError when it is malformed or given without --tpm."""
    if text is None:
        return None
    if not tpm:
        raise UsageError("--tpm-pcrs goes with --tpm")
    from khibernate.seal.tpmblob import parse_pcrs

    try:
        return parse_pcrs(text)
    except ValueError as e:
        raise UsageError(f"--tpm-pcrs: {e}") from None


@target_group.command("list")
@click.argument("device")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(device: str, as_json: bool) -> None:
    """The store's slots and their states (free, writing, complete, tried, resumed, bad)."""
    with Store.open(device) as st:
        if as_json:
            click.echo(json.dumps({"store": st.sb.uuid_str, "generation": st.sb.generation,
                                   "sealing": _sealing(st.sb.flags, short=True),
                                   "slots": [st.show(s.index) for s in st.sb.slots]}, indent=2))
        else:
            click.echo(st.sb.describe())
            click.echo(f"sealing: {_sealing(st.sb.flags)}")


@target_group.command("show")
@click.argument("device")
@click.argument("slot", type=int)
@click.option("--verify", is_flag=True, help="Also read the image back and check its checksums.")
def show_cmd(device: str, slot: int, verify: bool) -> None:
    """One slot's record as JSON."""
    with Store.open(device) as st:
        data = st.show(slot)
        if verify:
            chk = st.verify_slot(slot)
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
@with_key_options
def export_cmd(device: str, slot: int, dest: str, fmt: str, keys: KeyOptions) -> None:
    """Copy SLOT's image out of the store into DEST (checked first). A sealed image stays sealed as khi (no key
    needed); exported as kdump or elf it needs its key (--key-file, --passphrase-file or --passphrase)."""
    key = one_key(keys)
    with Store.open(device) as st:
        n = st.export(slot, dest, fmt, key)
    click.echo(f"{dest}: {fmt} {n / 1e6:.1f} MB from slot {slot}")


@target_group.command("drop")
@click.argument("device")
@click.argument("slot", type=int)
def drop_cmd(device: str, slot: int) -> None:
    """Mark SLOT free (its image is no longer listed; the bytes are overwritten by a later snapshot).  Refused
    while a capture runs (it may be writing that slot)."""
    with _no_capture("target drop"), Store.open(device, write=True) as st:
        rec = st.drop(slot)
    click.echo(f"slot {slot} ({rec.state.name.lower()}, #{rec.seq}) is free now")
