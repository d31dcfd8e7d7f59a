"""The shared number/address/size type: what it accepts, and clean errors for what it does not."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from khibernate.clickutil import ADDRESS, NumberRange, parse_number


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("0x3c000000", 0x3C000000), ("0X10", 16), ("256K", 256 << 10), ("1M", 1 << 20),
    ("960m", 960 << 20), ("2G", 2 << 30), ("2GiB", 2 << 30), ("1T", 1 << 40), ("0x10M", 16 << 20), (" 8K ", 8192),
])
def test_parse_number_accepts(text: str, value: int) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5M", "0x", "12Q", "M", "0xZZ", "1 M"])
def test_parse_number_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a number"):
        parse_number(text)


def test_leading_zero_is_refused_with_both_spellings() -> None:
    with pytest.raises(ValueError, match=r"leading zero.*write 10M for decimal or 0x10M for hex"):
        parse_number("010M")


def _cmd() -> click.Command:
    @click.command()
    @click.option("--mem-min", type=ADDRESS)
    @click.option("--at", type=NumberRange())
    def cmd(mem_min: int | None, at: tuple[int, int | None] | None) -> None:
        click.echo(f"{mem_min} {at}")
    return cmd


def test_click_option_error_is_a_usage_error_not_a_traceback() -> None:
    r = CliRunner().invoke(_cmd(), ["--mem-min", "010M"])
    assert r.exit_code == 2
    assert "Invalid value for '--mem-min'" in r.output and "leading zero" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_click_option_values() -> None:
    r = CliRunner().invoke(_cmd(), ["--mem-min", "960M", "--at", "0x1000:4K"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{960 << 20} (4096, 4096)"
    r = CliRunner().invoke(_cmd(), ["--at", "0x1000"])
    assert r.output.strip() == "None (4096, None)"
