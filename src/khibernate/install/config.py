"""/etc/khibernate.conf: the resume target `khibernate setup` records, read by the initramfs-tools hook (which
copies it into the initramfs as conf/conf.d/khibernate) and by the systemd drop-in of systemd-hibernate.service.

Shell-compatible ``KEY=VALUE`` lines (both sh and systemd's EnvironmentFile= read them); pure parse and render.
"""

from __future__ import annotations

import dataclasses
import re

from khibernate.install.errors import ConfigError

CONF_PATH = "/etc/khibernate.conf"
MARKER = "# written by `khibernate setup`"
_LINE = re.compile(r"([A-Z_][A-Z0-9_]*)=(.*)")
_SAFE = re.compile(r"[A-Za-z0-9_./:=@+,-]*")


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    """What `khibernate setup` recorded: the store to hibernate to and resume from (a device path or a store file),
    and the directories setup created for its drop-ins (``setup --remove`` removes those, and only those, again)."""

    target: str
    created_dirs: tuple[str, ...] = ()

    def render(self) -> str:
        """The file's text (a value with characters that sh or systemd would interpret is refused)."""
        if not self.target or not _SAFE.fullmatch(self.target):
            raise ConfigError(f"target {self.target!r} has characters /etc/khibernate.conf cannot hold unquoted: "
                              "give the device by a /dev/disk/by-* path")
        dirs = ":".join(self.created_dirs)
        if not _SAFE.fullmatch(dirs) or any(not d.startswith("/") or ":" in d for d in self.created_dirs):
            raise ConfigError(f"created directories {self.created_dirs!r} cannot be recorded in {CONF_PATH}")
        return (f"{MARKER}; read by the initramfs resume hook and by systemctl hibernate.\n"
                "# Change it with `khibernate setup --target DEV`, remove with `khibernate setup --remove`.\n"
                f"KHIBERNATE_TARGET={self.target}\n"
                + ("# the directories setup created (setup --remove takes them away again when empty)\n"
                   f"KHIBERNATE_CREATED_DIRS={dirs}\n" if dirs else ""))


def parse(text: str) -> ResumeConfig:
    """The config in ``text``; ConfigError on a line that is not a comment or KEY=VALUE, or without a target."""
    values: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            raise ConfigError(f"{CONF_PATH} line {n} is not KEY=VALUE ({line[:60]!r}); rerun `khibernate setup`")
        values[m.group(1)] = m.group(2).strip().strip('"')
    target = values.get("KHIBERNATE_TARGET", "")
    if not target:
        raise ConfigError(f"{CONF_PATH} names no KHIBERNATE_TARGET; rerun `khibernate setup --target DEV`")
    dirs = values.get("KHIBERNATE_CREATED_DIRS", "")
    return ResumeConfig(target, tuple(d for d in dirs.split(":") if d))
