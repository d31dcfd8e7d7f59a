"""`khibernate setup`: read (files, initramfs, doctor) -> plan (plan.py) -> check -> act (write, reload, rebuild)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import click

from khibernate.errors import KhibernateError
from khibernate.install import plan as setup_plan
from khibernate.install.errors import SetupError

EXIT_NOT_READY = 3


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def under(root: Path, path: str) -> Path:
    """``path`` (absolute, as the plan names it) inside the system whose ``/`` is ``root``."""
    return root / path.lstrip("/")


def read_existing(root: Path = Path("/")) -> dict[str, str | None]:
    """What is at setup's paths now (None: nothing)."""
    return {path: _read(under(root, path)) for path in setup_plan.OWNED}


def present_dirs(root: Path = Path("/")) -> frozenset[str]:
    """Which of the drop-in directories exist now."""
    return frozenset(d for d in setup_plan.DROPIN_DIRS if under(root, d).is_dir())


def initrd_path() -> Path:
    """The initramfs of the running kernel, as Debian names it."""
    return Path(f"/boot/initrd.img-{os.uname().release}")


def initrd_has_config(initrd: Path) -> bool:
    """True when the initramfs carries the resume configuration (conf/conf.d/khibernate, the hook's output)."""
    if not initrd.is_file():
        return False
    r = subprocess.run(["lsinitramfs", str(initrd)], capture_output=True, text=True)
    return r.returncode == 0 and any(line.endswith("conf/conf.d/khibernate") for line in r.stdout.splitlines())


def stable_name(device: str) -> str:
    """A /dev/disk/by-* name of ``device`` that survives reboots (partuuid, then id), else the path as given."""
    real = os.path.realpath(device)
    for kind in ("by-partuuid", "by-id", "by-path"):
        d = Path("/dev/disk") / kind
        if d.is_dir():
            for link in sorted(d.iterdir()):
                if os.path.realpath(link) == real:
                    return str(link)
    return device


def check_file_target(target: str, root: str = "/") -> str:
    """A store file's absolute path, after proving its extent map (FIEMAP and the raw device agree with the map
    `target init FILE --size S` recorded); SetupError saying how to recreate it otherwise."""
    from khibernate.store import filetarget

    if os.stat(target).st_dev != os.stat(root).st_dev:
        raise SetupError(f"{target} is not on the root filesystem: the resume at boot mounts only the root (read-only) "
                         "to find the store; put the store file there, or use a partition")
    try:
        filetarget.check_unmoved(target)
    except (KhibernateError, OSError) as e:
        raise SetupError(f"{target} is no usable store file ({e}): create it with `khibernate target init {target} "
                         "--size S` (a file on ext4 or xfs, written fully, never copied or moved afterwards)") from None
    return os.path.abspath(target)


def check_target(target: str, root: str = "/") -> str:
    """The target's stable name (a store file: its absolute path); SetupError when it is neither a block device
    holding a khibernate store nor a store file whose extent map is still true."""
    from khibernate.store import api as store

    p = Path(target)
    if not p.exists():
        raise SetupError(f"{target} does not exist: give the store's device or file (`khibernate target init "
                         "DEV` or `khibernate target init FILE --size S` first)")
    if p.is_file():
        return check_file_target(target, root)
    if not p.is_block_device():
        raise SetupError(f"{target} is neither a block device nor a regular file: give the partition, disk or file "
                         "holding the store")
    try:
        store.read(target)
    except KhibernateError as e:
        raise SetupError(f"{target} holds no khibernate store ({e}): run `khibernate target init {target}` "
                         "first (it refuses a device in use)") from None
    return stable_name(target)


def apply(p: setup_plan.SetupPlan, say: Callable[[str], None], initramfs: bool = True, root: Path = Path("/")) -> None:
    """Act on the plan in the system whose ``/`` is ``root``: files (atomically), the directories setup created
    (removed when empty), systemd reload + logind restart (when systemd runs there), update-initramfs -u (only
    when ``root`` is the running system's ``/``)."""
    for c in p.changes:
        path = under(root, c.path)
        if c.content is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(c.content)
            tmp.chmod(0o644)
            tmp.replace(path)
        say(f"  {c.why} {c.path}")
    for d in p.remove_dirs:
        path = under(root, d)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            say(f"  remove {d} (setup created it)")
        elif path.is_dir():
            say(f"  keep {d}: setup created it, but it holds other files now")
    if p.reload_systemd and under(root, "/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "try-restart", "systemd-logind.service"], check=True)
        say("  systemd reloaded (logind restarted for its hibernation check)")
    if p.update_initramfs and initramfs and root == Path("/"):
        say("  update-initramfs -u (the resume hook reads the target from the initramfs)")
        r = subprocess.run(["update-initramfs", "-u"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"update-initramfs -u failed (status {r.returncode}):\n{r.stderr[-1500:]}")


def build_capture_environment(target: str, say: Callable[[str], None]) -> str | None:
    """Build (or find cached) the capture initramfs the hibernation of ``target`` will boot, for this kernel: the
    first `systemctl hibernate` then only jumps.  None when it is there; else why it could not be built."""
    from khibernate.capture.snapshot import capture_initrd_for, default_kernel

    t0 = time.monotonic()
    say("  the capture environment (busybox, Python and khibernate, the target's driver modules; built once, "
        "cached until one of them changes) ...")
    try:
        path, reused = capture_initrd_for(default_kernel(), target, None)
    except KhibernateError as e:
        return f"the capture environment could not be built: {e}"
    size = Path(path).stat().st_size / 2**20
    say(f"  capture environment {path}: {size:.1f} MiB "
        + ("(cached)" if reused else f"(built in {time.monotonic() - t0:.0f} s)"))
    return None


@click.command("setup")
@click.option("--target", metavar="DEV|FILE",
              help="The store to hibernate to: a device (`khibernate target init DEV` first) or a store file on the "
                   "root filesystem (`khibernate target init FILE --size S` first).")
@click.option("--remove", is_flag=True, help="Undo setup: remove what it wrote and rebuild the initramfs.")
@click.option("--no-initramfs", is_flag=True, help="Do not run update-initramfs (the package's scripts do it).")
@click.option("--no-capture-build", is_flag=True,
              help="Do not build the capture environment now (the first hibernation then builds it, minutes).")
@click.option("--dry-run", is_flag=True, help="Say what would change, change nothing.")
def setup_command(target: str | None, remove: bool, no_initramfs: bool, no_capture_build: bool,
                  dry_run: bool) -> None:
    """Make `systemctl hibernate` hibernate through khibernate and the next boot resume (Debian, initramfs-tools).

    \b
    Writes /etc/khibernate.conf (the target), a drop-in for systemd-hibernate.service (runs `khibernate
    hibernate`) and one for systemd-logind (hibernation needs no swap), then runs `update-initramfs -u` so the
    initramfs resume hook knows the target, and builds the capture environment the hibernation boots (`capture
    build`, cached). Checks what `khibernate doctor` checks and says what is still missing (crashkernel=, a kernel
    with CONFIG_KEXEC_JUMP). Running it again changes nothing; --remove undoes it.
      khibernate target init /dev/sdb2
      khibernate setup --target /dev/sdb2
      systemctl hibernate
    or with a store file on the root filesystem (like a swap file with resume_offset=):
      khibernate target init /var/lib/khibernate/store --size 4G
      khibernate setup --target /var/lib/khibernate/store

    Exit status: 0 set up and ready; 3 set up, but hibernation cannot work yet (the reasons are printed);
    1 nothing changed because of an error.
    """
    from khibernate.doctor import diagnose
    from khibernate.system import SystemRoot

    if os.geteuid() != 0 and not dry_run:
        raise click.ClickException("setup changes /etc and the initramfs: run it as root")
    if remove == (target is not None):
        raise click.UsageError("give either --target DEV|FILE or --remove")
    existing = read_existing()
    foreign = setup_plan.foreign_files(existing)
    has_config = initrd_has_config(initrd_path())
    if remove:
        p = setup_plan.plan_remove(existing, has_config)
    else:
        assert target is not None
        if foreign:
            raise click.ClickException(f"{', '.join(foreign)} exist(s) but setup did not write them: move them "
                                       "away, then run setup again")
        name = check_target(target)
        packaged = {path: Path(path).is_file() for path in (setup_plan.HOOK, setup_plan.PREMOUNT)}
        p = setup_plan.plan_setup(name, existing, has_config, diagnose(SystemRoot(), os.geteuid()), packaged,
                                  present_dirs())
    if not p.changed:
        click.echo("khibernate setup: nothing to change" + ("" if remove else f" (target {target} already set up)"))
    else:
        click.echo(f"khibernate setup: {'would change' if dry_run else 'changing'}:")
        if not dry_run:
            apply(p, click.echo, initramfs=not no_initramfs)
        else:
            for c in p.changes:
                click.echo(f"  {c.why} {c.path}")
            for d in p.remove_dirs:
                click.echo(f"  remove {d} if empty (setup created it)")
    if dry_run and not remove and not no_capture_build:
        click.echo("  build the capture environment for the target, unless it is cached (`capture build`)")
    if remove:
        return
    missing = list(p.missing)
    if not missing and not dry_run and not no_capture_build:
        problem = build_capture_environment(name, click.echo)
        missing += [problem] if problem else []
    if missing:
        click.echo("hibernation cannot work yet:", err=True)
        for m in missing:
            click.echo(f"  - {m}", err=True)
        raise SystemExit(EXIT_NOT_READY)
    click.echo("ready: `systemctl hibernate` saves this system to the target and powers off; the next boot resumes")
