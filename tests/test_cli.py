"""The top-level command: every subcommand is found where the table says, and none is imported before it runs."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from khibernate.cli import COMMANDS, cli


def test_every_command_in_the_table_loads_under_its_own_name() -> None:
    ctx = click.Context(cli, info_name="khibernate")
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name


def test_help_lists_every_command() -> None:
    out = CliRunner().invoke(cli, ["--help"]).output
    for name in COMMANDS:
        assert f"  {name} " in out


def test_version_imports_no_subcommand_module() -> None:
    code = ("import sys; from khibernate.cli import cli, COMMANDS\n"
            "try:\n    cli(['--version'])\nexcept SystemExit:\n    pass\n"
            "mods = {v.partition(':')[0] for v in COMMANDS.values()}\n"
            "print(sorted(m for m in mods if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_an_unknown_command_is_a_usage_error() -> None:
    r = CliRunner().invoke(cli, ["hibernat"])
    assert r.exit_code == 2 and "No such command" in r.output
