"""The systemd units the package ships, read the way systemd reads them: every word of an Environment= line is one
assignment (systemd splits the line on whitespace, honouring quotes), and the watch unit's command line parses."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from khibernate.capture.cli import watch_command

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def environment(unit: Path) -> dict[str, str]:
    """The Environment= assignments of ``unit``; AssertionError on a word that is no assignment (systemd ignores it
    with a warning, and the variable keeps only the first word: the bug run 11 of test_distro found)."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line[len("Environment="):]):
                key, eq, value = word.partition("=")
                assert eq and key.isidentifier(), f"{unit.name}: {word!r} in {line!r} is no assignment"
                env[key] = value
    return env


def test_every_environment_word_is_an_assignment():
    for unit in sorted(UNITS.glob("*.service")):
        environment(unit)


def test_the_watch_units_command_line_parses():
    env = environment(UNITS / "khibernate-watch.service")
    args = ["--target", "/dev/vdb", "--on", env["KHIBERNATE_WATCH_ON"], "--dir", "/var/crash/khibernate",
            *env["KHIBERNATE_WATCH_ARGS"].split()]
    ctx = watch_command.make_context("watch", args)
    assert ctx.params["min_interval"] == 600 and ctx.params["max_captures"] == 10, ctx.params
    assert isinstance(ctx.command, click.Command)
