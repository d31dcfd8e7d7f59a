"""What `khibernate setup` changes, as a plan: pure over what was read (files, the doctor's diagnosis).

Every file setup writes carries ``config.MARKER`` and is the only thing it removes again, so `setup --remove` (and
the package's prerm, which calls it) leaves the system as it was before setup.  A plan with no changes means the
system is already set up that way (setup is idempotent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from khibernate.doctor import Diagnosis
from khibernate.install.config import CONF_PATH, MARKER, ResumeConfig

HIBERNATE_DROPIN = "/etc/systemd/system/systemd-hibernate.service.d/khibernate.conf"
LOGIND_DROPIN = "/etc/systemd/system/systemd-logind.service.d/khibernate.conf"
HOOK = "/usr/share/initramfs-tools/hooks/khibernate"
PREMOUNT = "/usr/share/initramfs-tools/scripts/local-premount/khibernate"
OWNED = (CONF_PATH, HIBERNATE_DROPIN, LOGIND_DROPIN)

# systemd 252's sleep.conf can only choose what is written to /sys/power/{state,disk}; replacing the action is an
# override of the unit that hibernate.target pulls in.  systemctl hibernate -> logind -> hibernate.target ->
# systemd-hibernate.service, so logind's checks (PrepareForSleep, inhibitors, HandleHibernateKey) all still apply.
HIBERNATE_DROPIN_TEXT = f"""{MARKER}: `systemctl hibernate` hibernates through khibernate.
# The command returns after the resume, so the unit (and hibernate.target) ends when the system is back.
[Service]
EnvironmentFile={CONF_PATH}
ExecStart=
ExecStart=/usr/bin/khibernate hibernate --target ${{KHIBERNATE_TARGET}}
TimeoutStartSec=infinity
"""
# logind answers CanHibernate=no (and refuses Hibernate()) without enough swap for an in-kernel image; khibernate
# needs none.  This is systemd's documented switch for that check (it has no sleep.conf setting in 252).
LOGIND_DROPIN_TEXT = f"""{MARKER}: hibernation needs no swap with khibernate (its target holds the image).
[Service]
Environment=SYSTEMD_BYPASS_HIBERNATION_MEMORY_CHECK=1
"""


@dataclasses.dataclass(frozen=True)
class FileChange:
    """Write ``content`` to ``path`` (None: remove it)."""

    path: str
    content: str | None
    why: str


@dataclasses.dataclass(frozen=True)
class SetupPlan:
    """The changes, whether the initramfs must be rebuilt and systemd reloaded, and what is still missing."""

    changes: tuple[FileChange, ...]
    update_initramfs: bool
    reload_systemd: bool
    missing: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes) or self.update_initramfs


def _diff(wanted: Mapping[str, str | None], existing: Mapping[str, str | None]) -> tuple[FileChange, ...]:
    out = []
    for path, content in wanted.items():
        if existing.get(path) != content:
            why = "remove" if content is None else ("create" if existing.get(path) is None else "update")
            out.append(FileChange(path, content, why))
    return tuple(out)


def missing_for_hibernation(d: Diagnosis, packaged: Mapping[str, bool]) -> tuple[str, ...]:
    """Plain-words list of what stops `systemctl hibernate` from working here (empty: nothing)."""
    out = [f.message for f in d.findings if "jump" in f.blocks or "jump" in f.unknown]
    for path, present in packaged.items():
        if not present:
            out.append(f"{path} is missing: the resume hook comes with the khibernate package (apt install "
                       "./khibernate_*.deb); without it the next boot cannot resume")
    return tuple(out)


def plan_setup(target: str, existing: Mapping[str, str | None], initrd_has_config: bool, d: Diagnosis,
               packaged: Mapping[str, bool]) -> SetupPlan:
    """Plan `setup --target`: the config, the two drop-ins, and an initramfs rebuild when the recorded target
    changed or the current initramfs lacks it."""
    wanted = {CONF_PATH: ResumeConfig(target).render(), HIBERNATE_DROPIN: HIBERNATE_DROPIN_TEXT,
              LOGIND_DROPIN: LOGIND_DROPIN_TEXT}
    changes = _diff(wanted, existing)
    conf_changed = any(c.path == CONF_PATH for c in changes)
    return SetupPlan(changes, conf_changed or not initrd_has_config,
                     any(c.path != CONF_PATH for c in changes), missing_for_hibernation(d, packaged))


def plan_remove(existing: Mapping[str, str | None], initrd_has_config: bool) -> SetupPlan:
    """Plan `setup --remove`: only files that carry setup's marker go; the initramfs is rebuilt without the target."""
    ours = {p: None for p, text in existing.items() if text is not None and MARKER in text}
    changes = _diff(ours, existing)
    return SetupPlan(changes, initrd_has_config or any(c.path == CONF_PATH for c in changes),
                     any(c.path != CONF_PATH for c in changes))


def foreign_files(existing: Mapping[str, str | None]) -> list[str]:
    """Files at setup's paths that setup did not write (it never overwrites or removes them)."""
    return [p for p, text in existing.items() if text is not None and MARKER not in text]
