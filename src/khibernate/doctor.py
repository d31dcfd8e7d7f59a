"""`khibernate doctor`: what stops this machine from kexec, kdump, kexec jump and live capture, in plain words.

``diagnose()`` is pure over a ``SystemRoot`` and an effective uid; the command only prints its findings.
Exit status 0 means a kexec jump is possible here; 1 means it is not (or cannot be confirmed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

import click

from khibernate.system import SystemRoot, addresses_hidden, crash_regions

if TYPE_CHECKING:  # cryptography is imported only for a sealed store
    from khibernate.seal.keyring import Keyring

FEATURES = ("kexec", "kdump", "jump", "watch", "hibernate")
# live capture (`khibernate watch`) and hibernation are kexec jumps: whatever blocks jump blocks them
DEPENDS = {"watch": "jump", "hibernate": "jump"}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One check: ``blocks`` names the features it rules out; ``unknown`` ones it cannot confirm."""

    name: str
    ok: bool
    message: str
    blocks: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    findings: list[Finding]
    release: str

    def possible(self, feature: str) -> bool | None:
        """True / False, or None when a needed fact could not be read."""
        base = DEPENDS.get(feature)
        if base is not None and self.possible(base) is not True:
            return self.possible(base)
        if any(feature in f.blocks for f in self.findings):
            return False
        if any(feature in f.unknown for f in self.findings):
            return None
        return True

    def to_json(self) -> dict[str, object]:
        return {
            "release": self.release,
            "possible": {f: self.possible(f) for f in FEATURES},
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }


def _config_findings(root: SystemRoot) -> list[Finding]:
    config, where = root.kernel_config()
    if config is None:
        return [Finding("kernel config", False,
                        "kernel config not found (no /proc/config.gz, no /boot/config-*): cannot tell whether "
                        "CONFIG_KEXEC, CONFIG_CRASH_DUMP and CONFIG_KEXEC_JUMP are built in",
                        unknown=FEATURES)]
    out = []
    wants = [
        ("CONFIG_KEXEC", ("kexec", "jump"), "kexec_load(2) (needed by kexec jump)"),
        ("CONFIG_CRASH_DUMP", ("kdump",), "crash dumps (kdump)"),
        ("CONFIG_KEXEC_JUMP", ("jump",), "kexec jump (KEXEC_PRESERVE_CONTEXT); depends on KEXEC and HIBERNATION"),
    ]
    for opt, feats, what in wants:
        val = config.get(opt)
        if val == "y":
            out.append(Finding(opt, True, f"{opt}=y in {where}: {what}"))
        else:
            out.append(Finding(opt, False, f"{opt} is not set in {where}: this kernel has no {what}; "
                                           "boot a kernel built with it", blocks=feats))
    if config.get("CONFIG_KEXEC_FILE") == "y":
        out.append(Finding("CONFIG_KEXEC_FILE", True, f"CONFIG_KEXEC_FILE=y in {where}: kexec_file_load(2) works"))
    return out


# sysctl -> (what it turns into a panic, the watch kinds it takes away)
PANIC_SYSCTLS = {"panic_on_oops": ("Oopses and BUGs", ("oops", "bug")), "panic_on_warn": ("WARNINGs", ("warn",)),
                 "softlockup_panic": ("soft lockups", ("softlockup",)),
                 "hung_task_panic": ("hung tasks", ("hung-task",))}


def _watch_findings(root: SystemRoot) -> list[Finding]:
    """Live capture: which events reach user space (the panic sysctls) and which detectors report at all."""
    out = []
    lost: set[str] = set()
    for name, (what, kinds) in PANIC_SYSCTLS.items():
        val = root.read_int(f"/proc/sys/kernel/{name}")
        if val:
            lost.update(kinds)
            out.append(Finding(name, False, f"kernel.{name}={val}: {what} panic this kernel, so `watch` cannot "
                                            f"capture them live (kdump can, if loaded); `sysctl -w kernel.{name}=0` "
                                            "to capture them and run on"))
    if len(lost) == 5:
        out.append(Finding("live capture", False, "every event `watch` knows panics here: nothing to capture live",
                           blocks=("watch",)))
    elif not lost:
        out.append(Finding("live capture", True, "no panic_on_oops/panic_on_warn/softlockup_panic/hung_task_panic: "
                                                 "Oopses, WARNINGs, BUGs, hung tasks and soft lockups reach `watch`"))
    timeout = root.read_int("/proc/sys/kernel/hung_task_timeout_secs")
    if not timeout:
        out.append(Finding("hung task detector", False, "no hung task reports (CONFIG_DETECT_HUNG_TASK is off or "
                                                        "kernel.hung_task_timeout_secs=0): `watch --on hung-task` "
                                                        "will see none; set kernel.hung_task_timeout_secs=120"))
    if root.read_int("/proc/sys/kernel/soft_watchdog") != 1:
        out.append(Finding("soft lockup detector", False, "no soft lockup reports (CONFIG_SOFTLOCKUP_DETECTOR is off "
                                                          "or kernel.soft_watchdog=0): `watch --on softlockup` will "
                                                          "see none; set kernel.soft_watchdog=1"))
    return out


def region_finding(root: SystemRoot) -> Finding | None:
    """Will a resume boot reserve the crash region a hibernation saves from, and can a resume do without?
    None without a crashkernel= region (the crash region finding says so)."""
    from khibernate.jump.memmap import crash_region
    from khibernate.restore.region import kaslr_on, parse_crashkernel, region_outlook

    arg = parse_crashkernel(root.cmdline())
    regions = root.iomem()
    if arg is None or addresses_hidden(regions) or not crash_regions(regions):
        return None
    region = crash_region(regions)
    total = next((int(w.split()[1]) << 10 for w in (root.read("/proc/meminfo") or "").splitlines()
                  if w.startswith("MemTotal:")), 0)
    out = region_outlook(arg, kaslr_on(root.cmdline(), root.kernel_config()[0]), region.size if region else 0,
                         total)
    return Finding("crash region at resume", out.reproducible is True, out.message,  # not reproducible: a note
                   blocks=() if out.resumable else ("hibernate",))


XEN_NO_PRESERVE_CONTEXT = (
    "Xen's kexec has only a default and a crash image, no preserve-context image: nothing can jump back to a Xen "
    "host, so kexec jump, snapshot, hibernate and watch (all a jump and back) cannot work here")


def _xen_findings(root: SystemRoot, guest_type: str, xen_crash_size: int | None) -> list[Finding]:
    """A Xen PV domain: the hypervisor, not this kernel, loads and runs kexec images (kexec-tools and khibernate
    hand them to Xen through /dev/xen/privcmd); its kexec has no preserve-context."""
    out = [Finding("xen", True, f"a Xen {guest_type} domain: `khibernate kexec` and `kdump` load into the Xen "
                                "hypervisor (kexec of the whole host: Xen→Linux, Xen→Xen with --vmm; kdump of dom0 "
                                "and Xen crashes)"),
           Finding("xen: no preserve-context", False, XEN_NO_PRESERVE_CONTEXT, blocks=("jump",))]
    control = root.xen_control_domain()
    if control is False:
        out.append(Finding("xen control domain", False, "this is not dom0 (/proc/xen/capabilities has no "
                                                        "control_d): only dom0 may load kexec images into Xen",
                           blocks=("kexec", "kdump")))
    elif control is None:
        out.append(Finding("xen control domain", False, "/proc/xen is not mounted (mount -t xenfs xenfs /proc/xen): "
                                                        "cannot tell whether this is dom0"))
    if not (root.path / "dev/xen/privcmd").exists():
        out.append(Finding("xen privcmd", False, "no /dev/xen/privcmd: load xen-privcmd (modprobe xen-privcmd) to "
                                                 "reach the hypervisor", blocks=("kexec", "kdump")))
    if xen_crash_size:
        out.append(Finding("crash region", True, f"Xen's crash region: {xen_crash_size >> 20} MiB"))
    elif xen_crash_size == 0:
        out.append(Finding("crash region", False, "Xen reserved no crash region: add crashkernel=256M to Xen's "
                                                  "command line (not dom0's)", blocks=("kdump",)))
    else:
        out.append(Finding("crash region", False, "cannot ask Xen for its crash region", unknown=("kdump",)))
    return out


def diagnose(root: SystemRoot, euid: int, xen_crash_size: int | None = None) -> Diagnosis:
    """Check every precondition of kexec, kdump and kexec jump on the system at ROOT (``xen_crash_size``: the
    size of the crash region the Xen hypervisor reports, read by the caller on a Xen dom0)."""
    f: list[Finding] = []
    if euid == 0:
        f.append(Finding("root", True, "running as root"))
    else:
        f.append(Finding("root", False, "not root: loading a kernel needs CAP_SYS_BOOT; run as root",
                         blocks=FEATURES))
    guest_type = root.xen_guest_type()
    if guest_type == "PV":
        f.extend(_xen_findings(root, guest_type, xen_crash_size))
        return Diagnosis(f, root.release())

    disabled = root.read_int("/proc/sys/kernel/kexec_load_disabled")
    if disabled:
        f.append(Finding("kexec_load_disabled", False,
                         "kernel.kexec_load_disabled=1: kexec loading is off until the next boot (it cannot be "
                         "switched back on); reboot without setting it", blocks=FEATURES))
    elif disabled == 0:
        f.append(Finding("kexec_load_disabled", True, "kernel.kexec_load_disabled=0"))
    for limit in ("kexec_load_limit_reboot", "kexec_load_limit_panic"):
        val = root.read_int(f"/proc/sys/kernel/{limit}")
        if val == 0:
            feats = ("kdump",) if limit.endswith("panic") else ("kexec", "jump")
            f.append(Finding(limit, False, f"kernel.{limit}=0: no more loads allowed until reboot", blocks=feats))

    mode = root.lockdown()
    if mode is None:
        f.append(Finding("lockdown", True, "no /sys/kernel/security/lockdown: kernel lockdown is not active"))
    elif mode == "none":
        f.append(Finding("lockdown", True, "kernel lockdown: none"))
    else:
        f.append(Finding("lockdown", False,
                         f"kernel lockdown is '{mode}' (e.g. Secure Boot): kexec_load(2) is blocked, and kexec jump "
                         "needs kexec_load; kexec/kdump still work through kexec_file_load with a signed kernel. "
                         "Disable Secure Boot or boot with lockdown=none to jump", blocks=("jump",)))

    f.extend(_config_findings(root))

    regions = root.iomem()
    if addresses_hidden(regions):
        f.append(Finding("crash region", False, "/proc/iomem shows no addresses (not root): cannot see the "
                                                "crashkernel= region", unknown=("kdump", "jump")))
    else:
        crash = crash_regions(regions)
        if crash:
            desc = ", ".join(f"{r.start:#x}-{r.last:#x} ({r.size >> 20} MiB)" for r in crash)
            f.append(Finding("crash region", True, f"crashkernel= region reserved: {desc}"))
        else:
            f.append(Finding("crash region", False,
                             "no 'Crash kernel' region in /proc/iomem: boot with crashkernel=256M (kdump loads the "
                             "capture kernel there; a jump target needs a region the first kernel does not use)",
                             blocks=("kdump", "jump")))

    loaded = root.read_int("/sys/kernel/kexec_loaded")
    crash_loaded = root.read_int("/sys/kernel/kexec_crash_loaded")
    crash_size = root.read_int("/sys/kernel/kexec_crash_size")
    state = []
    if loaded is not None:
        state.append(f"kexec image loaded: {'yes' if loaded else 'no'}")
    if crash_loaded is not None:
        state.append(f"crash image loaded: {'yes' if crash_loaded else 'no'}")
    if crash_size is not None:
        state.append(f"kexec_crash_size: {crash_size} bytes")
    if loaded:
        from khibernate.capture.arm import read_state

        armed = read_state(root)
        if armed is not None:
            state.append(armed.describe())
    if state:
        f.append(Finding("loaded", True, "; ".join(state)))
    region = region_finding(root)
    if region is not None:
        f.append(region)
    f.extend(_watch_findings(root))
    f.append(tpm_finding(root))
    return Diagnosis(f, root.release())


def tpm_finding(root: SystemRoot) -> Finding:
    """Whether this machine has a TPM 2.0 that `target init --tpm` can seal a store's key to (a note: it blocks
    nothing; a sealed store takes a key file or a passphrase as well)."""
    sysfs = root.path / "sys/class/tpm"
    tpms = sorted(p.name for p in sysfs.iterdir()) if sysfs.is_dir() else []
    if not tpms:
        return Finding("tpm", False, "no TPM (none in /sys/class/tpm: the machine has none, or its driver, tpm_tis "
                                     "or tpm_crb, is not loaded): a sealed store takes a key file or a passphrase")
    major = root.read_int(f"/sys/class/tpm/{tpms[0]}/tpm_version_major")
    if major != 2:
        return Finding("tpm", False, f"{tpms[0]} is a TPM {major if major else '1.2'}, not 2.0: `target init --tpm` "
                                     "needs a TPM 2.0")
    rm = (root.path / f"sys/class/tpmrm/tpmrm{tpms[0].removeprefix('tpm')}").exists()
    tools = (root.path / "usr/bin/tpm2_unseal").exists()
    where = f"TPM 2.0 ({tpms[0]}{', resource manager /dev/tpmrm' + tpms[0].removeprefix('tpm') if rm else ''})"
    if not (rm and tools):
        missing = [m for m, ok in (("its resource manager /dev/tpmrm0 (kernel 4.12+)", rm),
                                   ("tpm2-tools (`apt-get install tpm2-tools`)", tools)) if not ok]
        return Finding("tpm", False, f"{where}, but {' and '.join(missing)} missing: `target init --tpm` cannot "
                                     "ask it")
    return Finding("tpm", True, f"{where}: `target init --tpm` can seal a store's key to this boot chain's PCRs")


def target_finding(dev: str) -> Finding:
    """Whether the images in the store ``dev`` are sealed, and by which key sources (its key slots' kinds; the
    TPM's with the PCRs it is sealed to).  Reads the store, opens nothing: no key needed."""
    from khibernate.errors import KhibernateError
    from khibernate.image.layouts.khi import MAGIC, SEALED_VERSION
    from khibernate.seal import policy
    from khibernate.store import keyslots
    from khibernate.store.handle import Store
    from khibernate.store.superblock import HOLDS_IMAGE, STORE_SEALED

    try:
        with Store.open(dev) as st:
            flags = st.sb.flags
            heads = [os.pread(st.fd, 12, rec.offset) for rec in st.sb.slots if rec.state in HOLDS_IMAGE]
            ring = keyslots.read(st.fd, dev) if flags & STORE_SEALED else None
    except (KhibernateError, OSError) as e:
        return Finding("target", False, f"target {dev}: cannot read the store: {e}")
    sealed = sum(h[:8] == MAGIC and int.from_bytes(h[8:12], "little") == SEALED_VERSION for h in heads)
    images = f"{len(heads)} image{'s' if len(heads) != 1 else ''}: {sealed} sealed, {len(heads) - sealed} unsealed"
    if ring is None:
        return Finding("target", False, f"target {dev}: {policy.describe(flags)}; {images} (unsealed images are in "
                                        "clear and unauthenticated: `target init --key-file/--passphrase/--tpm`)")
    return Finding("target", sealed == len(heads),
                   f"target {dev}: sealed store, opened by {_key_sources(ring)}; {images}")


def _key_sources(ring: Keyring) -> str:
    """The kinds of a keyring's slots, the TPM's with its PCRs: "a passphrase or the TPM (PCRs 0,7)"."""
    from khibernate.seal import keyring
    from khibernate.seal.errors import KeyringError
    from khibernate.seal.tpmblob import TpmSealed

    names = []
    for slot in ring.slots:
        name = keyring.KIND_NAMES.get(slot.kind, f"kind {slot.kind}")
        if slot.kind == keyring.KIND_TPM:
            try:
                name += f" (PCRs {','.join(map(str, TpmSealed.unpack(slot.blob).pcrs))})"
            except KeyringError:
                name += " (its sealed key damaged)"
        names.append(name)
    return " or ".join(dict.fromkeys(names))


def render(d: Diagnosis) -> str:
    lines = [f"khibernate doctor: Linux {d.release}"]
    for fi in d.findings:
        mark = "ok  " if fi.ok else ("FAIL" if fi.blocks else ("??  " if fi.unknown else "note"))
        lines.append(f"  [{mark}] {fi.message}")
    for feat in FEATURES:
        p = d.possible(feat)
        word = {True: "possible", False: "NOT possible", None: "unknown"}[p]
        base = DEPENDS.get(feat)
        why = [fi.name for fi in d.findings if feat in fi.blocks or (p is None and feat in fi.unknown)
               or (base is not None and p is not True and (base in fi.blocks or base in fi.unknown))]
        lines.append(f"  {feat:6s}: {word}" + (f" (see: {', '.join(why)})" if why else ""))
    return "\n".join(lines)


def capture_kernel_finding(kernel: str, can_jump_back: bool | None, why: str) -> Finding:
    """What `doctor --kernel K` says about a capture kernel: a jump into one that cannot jump back strands this
    system, so anything but a proof blocks jump (and watch)."""
    if can_jump_back:
        return Finding("capture kernel", True, f"capture kernel {kernel} can jump back: {why}")
    return Finding("capture kernel", False, f"capture kernel {kernel}: {why}; snapshot, hibernate, watch and resume "
                                            "refuse it", blocks=("jump",))


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--root", type=click.Path(exists=True, file_okay=False), default="/", show_default=True,
              help="Read /proc, /sys and /boot below this directory (for inspecting a copied tree).")
@click.option("--target", "targets", multiple=True, metavar="DEV", help="Also say whether the images in the store "
              "DEV are sealed, and by which key sources (repeatable).")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), metavar="BZIMAGE",
              help="Also say whether this capture kernel can jump back (CONFIG_KEXEC_JUMP in its embedded config, "
                   "the running kernel's own build, or an earlier round trip with this very image).")
def doctor_command(as_json: bool, root: str, targets: tuple[str, ...], kernel: str | None) -> None:
    """Say what stops this machine from kexec, kdump, kexec jump and live crash capture (`watch`).

    Checks root, kernel.kexec_load_disabled, kernel lockdown (blocks kexec_load, which jump needs),
    CONFIG_KEXEC / CONFIG_CRASH_DUMP / CONFIG_KEXEC_JUMP (from /proc/config.gz or /boot/config-*),
    the crashkernel= region in /proc/iomem, what is loaded now, and for `watch` which events reach user space
    (kernel.panic_on_oops, panic_on_warn, softlockup_panic, hung_task_panic) and which detectors report.
    On a Xen dom0: that kexec and kdump go through the hypervisor, Xen's crash region, and that jump, snapshot,
    hibernate and watch cannot work (Xen's kexec has no preserve-context).
    With --kernel, also whether that capture kernel can jump back. Whether this machine has a TPM 2.0 (for
    `target init --tpm`); with --target DEV, whether the images in that store are sealed and by which key sources.
    For `hibernate`: whether a resume boot reserves the same crash region (an address in crashkernel=, or KASLR
    off) and, where it may not (KASLR), whether the saved region is small enough for a resume to swap it free.

    Exit status: 0 when a kexec jump is possible here (into that capture kernel, with --kernel), 1 otherwise.
    """
    from pathlib import Path

    system = SystemRoot(Path(root))
    xen_crash = None
    if root == "/" and system.xen_guest_type() == "PV":
        from khibernate.errors import KhibernateError
        from khibernate.jump import api

        try:
            xen_crash = api.xen_state().crash_size
        except KhibernateError:
            pass
    d = diagnose(system, os.geteuid(), xen_crash)
    if kernel is not None:
        from khibernate.capture.kernelcheck import assess

        v = assess(kernel, system)
        d = Diagnosis([*d.findings, capture_kernel_finding(kernel, v.can_jump_back, v.why)], d.release)
    if targets:
        d = Diagnosis([*d.findings, *(target_finding(t) for t in targets)], d.release)
    click.echo(json.dumps(d.to_json(), indent=1) if as_json else render(d))
    raise SystemExit(0 if d.possible("jump") else 1)
