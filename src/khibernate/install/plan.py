"""What `khibernate setup` changes, as a plan: pure over what was read (files, the doctor's diagnosis).

Every file setup writes carries ``config.MARKER`` and is the only thing it removes again, and the drop-in
directories it had to create are recorded in the config (``KHIBERNATE_CREATED_DIRS``) and are the only directories
it removes, so `setup --remove` (and the package's prerm, which calls it) leaves the system as it was before setup
(a directory that was there before, even empty, stays).  A plan with no changes means the
system is already set up that way (setup is idempotent).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Collection, Mapping

from khibernate.doctor import Diagnosis
from khibernate.install.config import CONF_PATH, MARKER, ResumeConfig, parse
from khibernate.install.errors import ConfigError

HIBERNATE_DROPIN = "/etc/systemd/system/systemd-hibernate.service.d/khibernate.conf"
LOGIND_DROPIN = "/etc/systemd/system/systemd-logind.service.d/khibernate.conf"
HOOK = "/usr/share/initramfs-tools/hooks/khibernate"
PREMOUNT = "/usr/share/initramfs-tools/scripts/local-premount/khibernate"
OWNED = (CONF_PATH, HIBERNATE_DROPIN, LOGIND_DROPIN)
DROPIN_DIRS = tuple(posixpath.dirname(p) for p in (HIBERNATE_DROPIN, LOGIND_DROPIN))

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
    """The changes, whether the initramfs must be rebuilt and systemd reloaded, and what is still missing;
    ``remove_dirs``: directories setup created, to remove after the files when empty."""

    changes: tuple[FileChange, ...]
    update_initramfs: bool
    reload_systemd: bool
    missing: tuple[str, ...] = ()
    remove_dirs: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes) or self.update_initramfs or bool(self.remove_dirs)


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


def recorded_dirs(existing: Mapping[str, str | None]) -> tuple[str, ...]:
    """The drop-in directories an earlier setup created (recorded in its config; none when the config is not
    setup's own or cannot be read)."""
    text = existing.get(CONF_PATH)
    if text is None or MARKER not in text:
        return ()
    try:
        return tuple(d for d in parse(text).created_dirs if d in DROPIN_DIRS)
    except ConfigError:
        return ()


def plan_setup(target: str, existing: Mapping[str, str | None], initrd_has_config: bool, d: Diagnosis,
               packaged: Mapping[str, bool], present_dirs: Collection[str] = ()) -> SetupPlan:
    """Plan `setup --target`: the config, the two drop-ins, and an initramfs rebuild when the recorded target
    changed or the current initramfs lacks it.  ``present_dirs``: which of DROPIN_DIRS exist now (the ones that do
    not are created, and recorded in the config with those an earlier setup created)."""
    created = tuple(sorted({*recorded_dirs(existing), *(p for p in DROPIN_DIRS if p not in present_dirs)}))
    wanted = {CONF_PATH: ResumeConfig(target, created).render(), HIBERNATE_DROPIN: HIBERNATE_DROPIN_TEXT,
              LOGIND_DROPIN: LOGIND_DROPIN_TEXT}
    changes = _diff(wanted, existing)
    conf_changed = any(c.path == CONF_PATH for c in changes)
    return SetupPlan(changes, conf_changed or not initrd_has_config,
                     any(c.path != CONF_PATH for c in changes), missing_for_hibernation(d, packaged))


def plan_remove(existing: Mapping[str, str | None], initrd_has_config: bool) -> SetupPlan:
    """Plan `setup --remove`: only files that carry setup's marker go, then the directories setup recorded that it
    created; the initramfs is rebuilt without the target."""
    ours = {p: None for p, text in existing.items() if text is not None and MARKER in text}
    changes = _diff(ours, existing)
    return SetupPlan(changes, initrd_has_config or any(c.path == CONF_PATH for c in changes),
                     any(c.path != CONF_PATH for c in changes), remove_dirs=recorded_dirs(existing))


def foreign_files(existing: Mapping[str, str | None]) -> list[str]:
    """Files at setup's paths that setup did not write (it never overwrites or removes them)."""
    return [p for p, text in existing.items() if text is not None and MARKER not in text]
