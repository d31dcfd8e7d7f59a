"""The ``khibernate`` command: click groups only (parse, call, print); the logic lives in the modules.

Each part of khibernate owns its click group or command; this table names where each one lives, and a command's
module is imported only when that command runs (``khibernate --version`` or ``snapshot`` does not pay for the
imports of ``image`` or ``view``).
"""

from __future__ import annotations

import click

from khibernate import __version__
from khibernate.clickutil import LazyGroup

# command name -> "module:attribute" of its click command or group
COMMANDS = {
    "doctor": "khibernate.doctor:doctor_command",
    "image": "khibernate.image.cli:image_group",
    "kexec": "khibernate.jump.cli:kexec_group",
    "kdump": "khibernate.jump.cli:kdump_group",
    "jump": "khibernate.jump.cli:jump_group",
    "initramfs": "khibernate.initramfs.cli:initramfs_group",
    "target": "khibernate.store.cli:target_group",
    "snapshot": "khibernate.capture.cli:snapshot_command",
    "hibernate": "khibernate.capture.cli:hibernate_command",
    "watch": "khibernate.capture.cli:watch_command",
    "capture": "khibernate.capture.cli:capture_group",
    "arm": "khibernate.capture.cli:arm_command",
    "disarm": "khibernate.capture.cli:disarm_command",
    "resume": "khibernate.restore.cli:resume_command",
    "restore": "khibernate.restore.cli:restore_command",
    "view": "khibernate.view.cli:view_group",
    "setup": "khibernate.install.cli:setup_command",
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="khibernate")
def cli() -> None:
    """kexec-jump based hibernation and checkpointing for Linux.

    Start with `khibernate doctor`: it says what stops this machine from kexec, kdump and kexec jump.
    """


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
