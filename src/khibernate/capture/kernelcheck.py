"""Can this capture kernel jump back?  Known before any slot is reserved or anything frozen, or refused.

A capture kernel without CONFIG_KEXEC_JUMP boots, saves, and then cannot return: the first kernel stays frozen
until a reset.  Proof that it can, in this order:

1. a record of an earlier round trip with that very image (its SHA-256) — written after every snapshot that came
   back, in ``$KHIBERNATE_STATE_DIR/jumped-back`` (default /var/lib/khibernate);
2. its embedded config (CONFIG_IKCONFIG, read out of the bzImage's payload) says CONFIG_KEXEC_JUMP=y;
3. it is the running kernel's own build (the same GNU build id as /sys/kernel/notes) and the running kernel's
   config (/proc/config.gz or /boot/config-RELEASE) says CONFIG_KEXEC_JUMP=y.

An embedded config without KEXEC_JUMP is a proof of the opposite; no proof at all is refused too, saying how to get
one.  The decompression costs up to a few seconds (xz), once per image and process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

from khibernate.capture.errors import CaptureKernelError as CaptureKernelError
from khibernate.system import SystemRoot, parse_kernel_config

JUMPED_BACK = "jumped-back"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a capture kernel can jump back (None: cannot be told) and why."""

    can_jump_back: bool | None
    why: str


def state_dir() -> Path:
    return Path(os.environ.get("KHIBERNATE_STATE_DIR", "/var/lib/khibernate"))


def judge(embedded: dict[str, str] | None, build_id: str, running_build_id: str,
          running_config: dict[str, str] | None, recorded: bool) -> Verdict:
    """The verdict from the facts (pure): a recorded round trip, the embedded config, the running kernel's build."""
    if recorded:
        return Verdict(True, "this very image (SHA-256) jumped back in an earlier snapshot here")
    if embedded is not None:
        if embedded.get("CONFIG_KEXEC_JUMP") == "y":
            return Verdict(True, "its embedded config (IKCONFIG) has CONFIG_KEXEC_JUMP=y")
        return Verdict(False, "its embedded config (IKCONFIG) has no CONFIG_KEXEC_JUMP: it cannot jump back, and "
                              "the first kernel would stay frozen until a reset")
    if build_id and build_id == running_build_id:
        if running_config is not None and running_config.get("CONFIG_KEXEC_JUMP") == "y":
            return Verdict(True, f"it is the running kernel's own build (build id {build_id[:12]}…), whose config "
                                 "has CONFIG_KEXEC_JUMP=y")
        if running_config is not None:
            return Verdict(False, "it is the running kernel's own build, whose config has no CONFIG_KEXEC_JUMP")
    return Verdict(None, "nothing proves that it can jump back: it has no embedded config (CONFIG_IKCONFIG), is "
                         "not the running kernel's build (or that build's config is not found), and never jumped "
                         "back here before; give a kernel built with CONFIG_KEXEC_JUMP and CONFIG_IKCONFIG, or "
                         "this kernel's own image")


def _recorded(digest: str, where: Path) -> bool:
    try:
        return any(line.split()[:1] == [digest] for line in (where / JUMPED_BACK).read_text().splitlines())
    except OSError:
        return False


_facts: dict[str, tuple[dict[str, str] | None, str] | Verdict] = {}  # per image: (embedded config, build id)


def _image_facts(digest: str, data: bytes) -> tuple[dict[str, str] | None, str] | Verdict:
    """The embedded config and build id of a bzImage (decompressed once per process), or the verdict when its kernel
    cannot be read."""
    from khibernate.jump import payload

    if digest not in _facts:
        try:
            vmlinux = payload.decompress(payload.payload(data))
        except payload.PayloadError as e:
            _facts[digest] = Verdict(None, f"its kernel cannot be read ({e}), so nothing proves that it can jump back")
        else:
            config = payload.ikconfig(vmlinux)
            _facts[digest] = (parse_kernel_config(config) if config is not None else None, payload.build_id(vmlinux))
    return _facts[digest]


def assess(kernel: str, system: SystemRoot | None = None, where: Path | None = None) -> Verdict:
    """The verdict on the bzImage at ``kernel`` on the system at ``system`` (``/``)."""
    from khibernate.elfcore import gnu_build_id

    system = system or SystemRoot()
    data = Path(kernel).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if _recorded(digest, where or state_dir()):
        return judge(None, "", "", None, True)
    facts = _image_facts(digest, data)
    if isinstance(facts, Verdict):
        return facts
    running = system.read_bytes("/sys/kernel/notes")
    return judge(facts[0], facts[1], gnu_build_id(running) if running else "", system.kernel_config()[0], False)


def check(kernel: str, system: SystemRoot | None = None) -> None:
    """CaptureKernelError unless ``kernel`` is known to jump back (``system``: the running one, ``/`` if None)."""
    v = assess(kernel, system)
    if v.can_jump_back is not True:
        raise CaptureKernelError(f"capture kernel {kernel}: {v.why}; nothing was reserved or frozen "
                                 f"(`khibernate doctor --kernel {kernel}`)")


def remember(kernel: str, where: Path | None = None) -> None:
    """Record that ``kernel`` jumped back (after a snapshot came back); OSError if the state dir is not writable."""
    where = where or state_dir()
    digest = hashlib.sha256(Path(kernel).read_bytes()).hexdigest()
    if _recorded(digest, where):
        return
    where.mkdir(parents=True, exist_ok=True)
    with open(where / JUMPED_BACK, "a") as f:
        f.write(f"{digest} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {kernel}\n")
