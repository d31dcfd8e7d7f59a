"""`khibernate resume` (early boot, the hibernated kernel's fresh boot) and `khibernate restore` (capture kernel)."""

from __future__ import annotations

import sys

import click

from khibernate.capture.cli import capture_kernel_options
from khibernate.seal.cli import KeyOptions, one_key, resume_key, with_key_options

AGAIN_WARNING = ("--again resumes an image that a boot tried or resumed before: the same kernel state runs a second "
                 "time — the same random-number generator state, the same TCP connections and sequence numbers, the "
                 "same half-done writes replayed against disks that have moved on. Use it for checkpoints you mean "
                 "to re-run, on machines whose disks are copies made at hibernate time; a filesystem mounted since "
                 "hibernate is still refused unless --ignore-changed-filesystems is given too.")


@click.command("resume", epilog=AGAIN_WARNING)
@click.option("--target", required=True, metavar="DEV", help="The store `khibernate hibernate --target` wrote.")
@click.option("--again", is_flag=True, help="Resume the newest image although a boot tried or resumed it before "
              "(see the warning below).")
@click.option("--attempt", metavar="TOKEN", help="Continue the resume attempt TOKEN (32 hex digits) once: for a boot "
              "that re-entered this kernel to go on with the same attempt, whose slot is tried already (the "
              "initramfs passes khibernate.resume_attempt=TOKEN). A token works once.")
@click.option("--ignore-changed-filesystems", is_flag=True, help="With --again only: resume although a filesystem "
              "that was mounted read-write at hibernate time was mounted since (its contents may have changed: the "
              "resumed kernel writes its stale view over them). For disks restored from copies made at hibernate "
              "time.")
@capture_kernel_options
@click.option("--append", default="", metavar="S", help="Extra capture-kernel command line words.")
@click.option("--check", is_flag=True, help="Only say whether there is an image this boot would resume (nothing is "
              "marked or written).")
@click.option("--discard", is_flag=True, help="Mark the newest hibernation image tried without resuming it, like "
              "swsusp's `noresume` (the initramfs scripts run this for `noresume` on the kernel command line): this "
              "boot goes on, and no later boot resumes the image (it stays for analysis and export).")
@with_key_options
def resume_command(target: str, again: bool, attempt: str | None, ignore_changed_filesystems: bool,
                   kernel: str | None, capture_initrd: str | None, deadline: float, append: str, check: bool,
                   discard: bool, keys: KeyOptions) -> None:
    """Resume the kernel that `khibernate hibernate` saved in DEV, like swsusp's resume=: run it at early boot,
    BEFORE any filesystem is mounted read-write (the initramfs-tools script in initramfs/ does).

    \b
    An image is tried once (swsusp's rule): the first boot that finds the newest hibernation image marks its
    slot `tried` before any check, so whatever happens next — a refusal, a failure, a power cut — no later boot
    resumes it (only --again does, on purpose). Refused outside an initramfs. Then it is checked against this
    boot — kernel build, memory, and every ext2/3/4 filesystem that was mounted read-write at
    hibernate time must be unmounted since (same mount count, last mount time, journal state; xfs, btrfs and
    others cannot be checked: a warning says so) — and on success this boot ends: a capture kernel writes the
    image back into memory and the saved kernel runs on. The capture kernel runs in the crash region the image
    was saved from, also when this boot reserved another one (KASLR moves it): the jump then swaps this boot's
    pages out of the saved region.
    A sealed store's image needs its key: --key-file FILE, --passphrase-file FILE, --tpm, or the passphrase typed —
    given none, a sealed store's TPM slot is tried first (the TPM releases the key only to the boot chain, PCRs,
    `target init --tpm` sealed it to), then the passphrase is asked on the console (the controlling terminal, else
    /dev/console; no echo; 300 s), as cryptsetup asks in an initramfs. The secret is read in a child process that
    derives the key of this one image and ends; that key reaches the restoring capture kernel through memory (the
    mailbox page, wiped at once), never the command line or the disk. A wrong key or passphrase, or a TPM that does
    not release the key, is refused before anything is loaded (the image stays tried; `resume --again` with the
    right one). Given a key, an unsealed image is refused.
    --check of a sealed store needs a key option (it asks only with --passphrase; without one: exit 2).
    Exit status: 0 nothing to resume (DEV holds no hibernation image); 1 the image was not resumed — refused (it
    is for another kernel build or memory size, a filesystem changed, it is damaged, or this is no
    initramfs) or tried or resumed before, or discarded; nothing was written to memory, boot on normally;
    2 wrong usage.
    With --check: 0 an image would be resumed, 1 it would be refused, 3 there is none.
    """
    from khibernate.errors import KhibernateError
    from khibernate.progress import Reporter
    from khibernate.restore import resume as rs

    if attempt and again:
        raise click.UsageError("--attempt continues one attempt; it does not go with --again")
    if ignore_changed_filesystems and not again:
        raise click.UsageError("--ignore-changed-filesystems goes only with --again: an image never resumed is "
                               "never resumed over changed disks")
    if discard and (again or attempt or check):
        raise click.UsageError("--discard marks the image tried and resumes nothing: it goes with no other mode")
    opts = rs.Options(target=target, kernel=kernel, capture_initrd=capture_initrd, again=again, deadline=deadline,
                      append=append, attempt=attempt, ignore_changed_filesystems=ignore_changed_filesystems,
                      key=resume_key(target, keys))
    if again and not check:
        click.echo(f"resume: --again: {AGAIN_WARNING}", err=True)
    try:
        if discard:
            att = rs.discard(opts)
            click.echo(f"resume: slot {att.slot.index} of {target} marked tried without resuming it (noresume); "
                       "booting normally", err=True)
            sys.exit(1)
        if check:
            _, rec, img = rs.preflight(opts, say=Reporter.for_terminal().say)
            where = rs.where_to_restore(img)
            click.echo(f"resume: slot {rec.index} of {target} would be resumed ({img.osrelease}, "
                       f"{rec.length / 1e6:.1f} MB)" + (f"; {where.describe()}" if where else ""))
            return
        rs.run(opts, say=Reporter.for_terminal().say)
    except rs.NothingToResume as e:
        click.echo(f"resume: {e}; booting normally", err=True)
        sys.exit(3 if check else 0)
    except KhibernateError as e:
        click.echo(f"resume: {e}; {'it would not be resumed' if check else 'booting normally'}", err=True)
        attempt_token = getattr(e, "attempt", None)
        if attempt_token:
            click.echo(f"resume: attempt {attempt_token}", err=True)
        sys.exit(e.exit_code if e.exit_code == 2 else 1)


@click.command("restore", epilog=AGAIN_WARNING)
@click.argument("what", metavar="SLOT|IMAGE")
@click.option("--target", metavar="DEV", help="The store holding SLOT (a slot number).")
@click.option("--again", is_flag=True, help="Restore a slot already resumed once (see the warning below).")
@click.option("--vmcore", default="/proc/vmcore", show_default=True,
              help="How this (capture) kernel sees the first kernel's memory layout.")
@click.option("--devmem", metavar="PATH", help="Memory device (default /dev/oldmem if present, else /dev/mem).")
@click.option("--dry-run", is_flag=True, help="Every check, nothing written.")
@click.option("--no-jump", is_flag=True, help="Write and verify, but do not enter the saved kernel.")
@click.option("--allow-unsealed", is_flag=True, help="Restore an unsealed (unauthenticated) IMAGE file: anyone who "
              "could write the file chooses what runs. A store slot follows its store's choice (`target init "
              "--unsealed`).")
@with_key_options
def restore_command(what: str, target: str | None, again: bool, vmcore: str, devmem: str | None, dry_run: bool,
                    no_jump: bool, allow_unsealed: bool, keys: KeyOptions) -> None:
    """krestore: write a saved image back into the first kernel's memory and enter the saved kernel. Runs in a
    capture kernel that the hibernated kernel's fresh boot jumped to (`khibernate resume` does all of this).

    \b
    A sealed image needs its key (--key-file, --passphrase-file or --passphrase); with a key, an unsealed image is
    refused. Everything is checked before the first write: every block's checksum and, sealed, its authenticity
    (a first pass; the write pass checks each block again), the tables, and
    that the image belongs here (page size, memory ranges, crash region, kernel release and BUILD-ID of the kernel
    whose memory is overwritten, restorable, not resumed before). Any difference: refused, nothing touched.
    Then the slot is marked resumed, every stored page written and every zero page zeroed through /dev/mem mmap
    (the capture kernel needs iomem=relaxed; `jump load` adds it), each block read back and compared. After the
    first write a failure powers the machine off instead of returning into half-overwritten memory.
    """
    from khibernate.capture.jobspec import Resumed
    from khibernate.errors import UsageError
    from khibernate.restore import run as rr

    key = one_key(keys)
    if what.isdigit():
        if not target:
            raise UsageError("a slot number needs --target DEV (or give an image file)")
        p = rr.prepare_slot(target, int(what), again=again, vmcore=vmcore, key=key)
    else:
        p = rr.prepare_file(what, vmcore=vmcore, key=key, allow_unsealed=allow_unsealed)
    click.echo(f"restore: {what} fits this boot ({p.image.osrelease}, entry {p.image.jump_back_entry:#x}); "
               f"checked in {p.verify_seconds:.2f} s", err=True)
    if dry_run:
        return
    try:
        stats = rr.write_back(p, devmem=devmem)
        if no_jump:
            click.echo(f"restore: written and verified, {stats.throughput_mb_s:.1f} MB/s; not entering the saved "
                       "kernel (--no-jump): this kernel must not jump back to the overwritten one")
            return
        rr.enter_saved_kernel(p, Resumed(restore=stats.as_dict(), resume_boot_id="",
                                         slot=p.slot.index if p.slot else -1, again=again))
    except Exception as e:
        rr.power_off_if_touched(e)
        raise
