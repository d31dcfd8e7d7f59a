"""`python3 -m khibernate.jump kexec|kdump|jump ...`: the jump commands alone (same as `khibernate kexec|kdump|jump`).

Useful in a capture environment that carries only khibernate.jump.
"""

from __future__ import annotations

import sys

import click

from khibernate.errors import KhibernateError
from khibernate.jump.cli import jump_group, kdump_group, kexec_group


class _Main(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KhibernateError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """khibernate's kexec, kdump and kexec-jump commands."""


for _group in (kexec_group, kdump_group, jump_group):
    main.add_command(_group)

if __name__ == "__main__":
    main(prog_name="khibernate")
