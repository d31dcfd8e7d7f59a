"""The click group class every khibernate entry point uses, so errors look the same everywhere."""

from __future__ import annotations

import sys
from typing import Any

import click

from khibernate.errors import KhibernateError

OS_HINTS = {13: " (run as root?)", 28: " (free some space or choose another DEST)"}


class ErrorReportingGroup(click.Group):
    """Any KhibernateError or OSError becomes one 'error: ...' line on stderr and a non-zero exit, no traceback.

    An OSError is reported as ``os_error_class`` (its exit code) with the file name and a hint.
    """

    os_error_class: type[KhibernateError] = KhibernateError

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            what = f"{e.filename}: " if e.filename else ""
            err: KhibernateError = self.os_error_class(f"{what}{e.strerror or e}{OS_HINTS.get(e.errno or 0, '')}")
        except KhibernateError as e:
            err = e
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)


_SUFFIX = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_number(text: str) -> int:
    """``0x``-hex or decimal (leading zeros stay decimal), with an optional K/M/G/T (binary) suffix; ValueError else."""
    import re

    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)\s*([KkMmGgTt]?)(?:i?[Bb])?", text.strip())
    if not m:
        raise ValueError(text)
    digits = m.group(1)
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)
    return value << _SUFFIX[m.group(2).upper()]


class Number(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click stubs
    """A non-negative address or size: 0x-hex, decimal, or with a K/M/G/T suffix (1M = 0x100000)."""

    def __init__(self, name: str, example: str):
        self.name = name
        self.example = example

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_number(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a {self.name.lower()} (e.g. {self.example})", param, ctx)


ADDRESS = Number("ADDRESS", "0x3c000000, 960M")
SIZE = Number("SIZE", "4096, 0x1000, 1M")
