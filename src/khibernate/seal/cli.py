"""The command-line options that name a key (click only): ``--key-file``, ``--passphrase-file``, ``--passphrase``
(asked on the terminal) and ``--tpm``, shared by every command that seals or opens a sealed image; a command
decorated with :func:`with_key_options` receives them as one :class:`KeyOptions` (``keys``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

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
    click.option("--tpm", is_flag=True, help="The TPM 2.0 (/dev/tpmrm0, or the TCTI in $KHIBERNATE_TPM_TCTI): "
                 "releases the key only to the boot chain `target init --tpm` sealed it to (its PCRs)."),
]


@dataclasses.dataclass(frozen=True)
class KeyOptions:
    """The key options a command was given."""

    key_file: str | None = None
    passphrase_file: str | None = None
    ask_passphrase: bool = False
    tpm: bool = False

    def count(self) -> int:
        """How many keys the options name."""
        return sum(map(bool, (self.key_file, self.passphrase_file, self.ask_passphrase, self.tpm)))


def with_key_options(f: F) -> F:
    """Decorate a command with the key options; it receives them as ``keys`` (a :class:`KeyOptions`)."""

    @functools.wraps(f)
    def command(*args: Any, key_file: str | None, passphrase_file: str | None, ask_passphrase: bool, tpm: bool,
                **kwargs: Any) -> Any:
        return f(*args, keys=KeyOptions(key_file, passphrase_file, ask_passphrase, tpm), **kwargs)

    for opt in reversed(KEY_OPTIONS):
        command = opt(command)
    return cast(F, command)


def key_sources(keys: KeyOptions, confirm: bool = False, tpm_pcrs: Sequence[int] | None = None) -> list[KeySource]:
    """The key sources the options name (none, one, or several: each gets a key slot); ``confirm`` asks a typed
    passphrase twice (when sealing); ``tpm_pcrs`` the PCRs a new TPM slot is sealed to (default 0,7)."""
    if keys.passphrase_file and keys.ask_passphrase:
        raise UsageError("give --passphrase-file or --passphrase, not both")
    if not keys.count():
        return []
    from khibernate.seal.keysource import KeyFile, Passphrase

    out: list[KeySource] = []
    if keys.key_file:
        out.append(KeyFile(keys.key_file))
    if keys.passphrase_file:
        out.append(Passphrase.from_file(keys.passphrase_file))
    if keys.ask_passphrase:
        typed = click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
        out.append(Passphrase(typed.encode(), "typed passphrase"))
    if keys.tpm:
        from khibernate.seal.tpm import DEFAULT_PCRS, TpmKey

        out.append(TpmKey(tpm_pcrs or DEFAULT_PCRS))
    return out


def capture_key(keys: KeyOptions) -> Callable[[], KeySource] | None:
    """The key of a capture into a sealed store, as a factory run in the child process that derives the image key
    (so the secret is never read into the capturing process); a typed passphrase is refused (it would be)."""
    if keys.ask_passphrase:
        raise UsageError("a capture takes the key from --key-file, --passphrase-file or --tpm (read in a process "
                         "that ends before the jump), not typed")
    if keys.count() > 1:
        raise UsageError("give one key for a capture: --key-file, --passphrase-file or --tpm")
    if not keys.count():
        return None

    def make() -> KeySource:
        key = one_key(keys)
        assert key is not None
        return key

    return make


def resume_key(target: str, keys: KeyOptions) -> Callable[[], KeySource] | None:
    """The key of a resume of ``target``, as a factory run in the child process that derives the image key: a key
    file, a passphrase file, the TPM, or (``--passphrase``) the passphrase asked on the console there
    (seal/askpass.py).  None without key options: a sealed store's TPM slot is then tried, and its passphrase asked
    on the console (khibernate.restore.resume)."""
    if keys.count() > 1:
        raise UsageError("give one key to resume: --key-file, --passphrase-file, --passphrase or --tpm")
    if keys.ask_passphrase:
        from khibernate.seal.askpass import console_passphrase

        return console_passphrase(target)
    return capture_key(keys)


def one_key(keys: KeyOptions) -> KeySource | None:
    """The one key source that opens an image (None without key options)."""
    if keys.count() > 1:
        raise UsageError("give one key to open a sealed image: --key-file, --passphrase-file, --passphrase or --tpm")
    sources = key_sources(keys)
    return sources[0] if sources else None
