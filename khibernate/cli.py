"""The ``khibernate`` command: click groups only (parse, call, print); the logic lives in the modules.

Each part of khibernate registers its own click group or command here; only commands that work are listed.
"""

from __future__ import annotations

import click

from khibernate import __version__
from khibernate.clickutil import ErrorReportingGroup


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="khibernate")
def cli() -> None:
    """kexec-jump based hibernation and checkpointing for Linux.

    Start with `khibernate doctor`: it says what stops this machine from kexec, kdump and kexec jump.
    """


def _register() -> None:
    from khibernate.doctor import doctor_command

    cli.add_command(doctor_command)
    from khibernate.image.cli import image_group

    cli.add_command(image_group)
    from khibernate.jump.cli import jump_group, kdump_group, kexec_group

    for group in (kexec_group, kdump_group, jump_group):
        cli.add_command(group)
    from khibernate.initramfs.cli import initramfs_group

    cli.add_command(initramfs_group)
    from khibernate.store.cli import target_group

    cli.add_command(target_group)
    from khibernate.capture.cli import capture_group, hibernate_command, snapshot_command, watch_command

    cli.add_command(snapshot_command)
    cli.add_command(hibernate_command)
    cli.add_command(watch_command)
    from khibernate.restore.cli import restore_command, resume_command

    cli.add_command(resume_command)
    cli.add_command(restore_command)
    cli.add_command(capture_group)
    from khibernate.view.cli import view_group

    cli.add_command(view_group)
    from khibernate.install.cli import setup_command

    cli.add_command(setup_command)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
