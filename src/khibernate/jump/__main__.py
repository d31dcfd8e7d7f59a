"""`python3 -m khibernate.jump kexec|kdump|jump ...`: the jump commands alone (same as `khibernate kexec|kdump|jump`).

Useful in a capture environment that carries only khibernate.jump.
"""

from __future__ import annotations

import click

from khibernate.clickutil import ErrorReportingGroup
from khibernate.jump.cli import jump_group, kdump_group, kexec_group


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """khibernate's kexec, kdump and kexec-jump commands."""


for _group in (kexec_group, kdump_group, jump_group):
    main.add_command(_group)

if __name__ == "__main__":
    main(prog_name="khibernate")
