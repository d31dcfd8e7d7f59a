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
