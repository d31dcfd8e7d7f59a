"""What every khibernate command line shares: the error-reporting group and the number/address/size types."""

from __future__ import annotations

import importlib
import re
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


class LazyGroup(ErrorReportingGroup):
    """An ErrorReportingGroup whose subcommands are imported when they are used: ``lazy_commands`` maps each
    command name to ``"module:attribute"`` of its click command (whose own name must be that command name)."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        module, _, attr = self.lazy_commands[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command) or command.name != cmd_name:
            raise RuntimeError(f"{self.lazy_commands[cmd_name]} is not the click command {cmd_name!r}")
        self.add_command(command)
        return command


SUFFIXES = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_NUMBER = re.compile(r"(?P<num>0[xX][0-9a-fA-F]+|[0-9]+)(?P<suffix>[KkMmGgTt]?)(?:[iI]?[bB])?")


def parse_number(text: str) -> int:
    """A non-negative integer from 0x-hex or decimal with an optional K/M/G/T suffix (kexec-tools' memparse).

    ``0x3c000000``, ``1006632960``, ``960M``, ``256K``, ``2G`` and ``2GiB`` are accepted; a decimal with a leading
    zero (``010M``) is refused because C tools read it as octal: ValueError with a message saying what to write.
    """
    s = text.strip().replace("_", "")
    m = _NUMBER.fullmatch(s)
    if not m:
        raise ValueError(f"{text!r} is not a number: write 0x-hex or decimal, optionally with K, M, G or T "
                         "(e.g. 0x3c000000, 960M)")
    num = m.group("num")
    if len(num) > 1 and num[0] == "0" and num[1] not in "xX":
        raise ValueError(f"{text!r} has a leading zero (octal in C tools such as kexec): write {num.lstrip('0') or '0'}"
                         f"{m.group('suffix')} for decimal or 0x{num.lstrip('0') or '0'}{m.group('suffix')} for hex")
    return int(num, 0) << SUFFIXES[m.group("suffix").upper()]


class Number(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """A click type for addresses, sizes and counts: everything :func:`parse_number` accepts; bad input is a usage
    error naming the option, never a traceback."""

    def __init__(self, name: str = "NUMBER") -> None:
        self.name = name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                self.fail(f"{value} is negative", param, ctx)
            return value
        try:
            return parse_number(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class NumberRange(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """``START[:SIZE]`` as two numbers (SIZE None when left out), e.g. ``0x1e3c000:4096`` or ``0x1e3c000``."""

    name = "ADDR[:SIZE]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int | None]:
        if isinstance(value, tuple):
            return value
        start, sep, size = str(value).partition(":")
        try:
            return parse_number(start), (parse_number(size) if sep else None)
        except ValueError as e:
            self.fail(str(e), param, ctx)


ADDRESS = Number("ADDRESS")
SIZE = Number("SIZE")
NUMBER = Number("NUMBER")


def echo_hexdump(address: int, data: bytes) -> None:
    """Print ``data`` as 16-byte rows (address, hex bytes, printable ASCII), as ``image read`` and ``view read`` do."""
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        click.echo(f"{address + off:016x}  {row.hex(' '):<47}  {text}")
