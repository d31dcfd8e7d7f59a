"""The command-line options that name a key (click only): ``--key-file``, ``--passphrase-file``, ``--passphrase``
(asked on the terminal), shared by every command that seals or opens a sealed image."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from khibernate.errors import UsageError

if TYPE_CHECKING:  # cryptography is imported only when a key is given
    from khibernate.seal.keysource import KeySource

F = TypeVar("F", bound=Callable[..., Any])

KEY_OPTIONS = [
    click.option("--key-file", metavar="FILE", help="Key file (32+ random bytes, mode 0600: `head -c 32 "
                 "/dev/urandom > FILE`) that seals or opens a sealed image."),
    click.option("--passphrase-file", metavar="FILE", help="A file whose first line is the passphrase that seals or "
                 "opens a sealed image (scrypt, memory-hard)."),
    click.option("--passphrase", "ask_passphrase", is_flag=True, help="Ask for the passphrase on the terminal."),
]


def with_key_options(f: F) -> F:
    """Decorate a command with the key options (it receives key_file, passphrase_file, ask_passphrase)."""
    for opt in reversed(KEY_OPTIONS):
        f = opt(f)
    return f


def key_sources(key_file: str | None, passphrase_file: str | None, ask_passphrase: bool,
                confirm: bool = False) -> list[KeySource]:
    """The key sources the options name (none, one, or a key file and a passphrase); ``confirm`` asks a typed
    passphrase twice (when sealing)."""
    if passphrase_file and ask_passphrase:
        raise UsageError("give --passphrase-file or --passphrase, not both")
    if not (key_file or passphrase_file or ask_passphrase):
        return []
    from khibernate.seal.keysource import KeyFile, Passphrase

    out: list[KeySource] = []
    if key_file:
        out.append(KeyFile(key_file))
    if passphrase_file:
        out.append(Passphrase.from_file(passphrase_file))
    if ask_passphrase:
        typed = click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
        out.append(Passphrase(typed.encode(), "typed passphrase"))
    return out


def capture_key(key_file: str | None, passphrase_file: str | None,
                ask_passphrase: bool) -> Callable[[], KeySource] | None:
    """The key of a capture into a sealed store, as a factory run in the child process that derives the image key
    (so the secret is never read into the capturing process); a typed passphrase is refused (it would be)."""
    if ask_passphrase:
        raise UsageError("a capture takes the key from --key-file or --passphrase-file (read in a process that ends "
                         "before the jump), not typed")
    if key_file and passphrase_file:
        raise UsageError("give one key for a capture: --key-file or --passphrase-file")
    if not (key_file or passphrase_file):
        return None

    def make() -> KeySource:
        key = one_key(key_file, passphrase_file, False)
        assert key is not None
        return key

    return make


def one_key(key_file: str | None, passphrase_file: str | None, ask_passphrase: bool) -> KeySource | None:
    """The one key source that opens an image (None without key options)."""
    sources = key_sources(key_file, passphrase_file, ask_passphrase)
    if len(sources) > 1:
        raise UsageError("give one key to open a sealed image: --key-file, --passphrase-file or --passphrase")
    return sources[0] if sources else None
