"""Build (once) and cache a crash utility whose Xen hypervisor mode reads Xen 4.16 and later.

Debian 12's crash 8.0.2 cannot open a Xen 4.17 hypervisor dump: its Xen mode finds each CPU's stack through the
``tss_page`` per-CPU variable, whose layout Xen 4.16 changed, and stops at "cannot read cpu_info" (crash 8.0.3
reads ``stack_base[]`` instead and follows Xen's new scheduler structures). No crash >= 8.0.3 is packaged for
Debian 12 (bookworm-backports has none), so this module builds Debian trixie's crash from its upstream source
tarball (``apt-get source --tar-only crash``, which checks it against the signed Sources index; it carries the
gdb 10.2 tarball crash links in) with plain ``make``: the ``crash`` binary alone.

``python3 -m vmtest.xen --debug-build`` (``scripts/setup.sh --xen``) calls :func:`ensure_build`;
``python3 -m vmtest.crash_build`` alone prints the cache directory ``$KHIBERNATE_CACHE/crash/<version>-<recipe>/``
holding ``crash`` and ``build-info.json``. A lock keeps builds apart; the tree appears by an atomic rename.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from vmtest.kernel import CACHE, KernelBuildError, PrivateApt, sh

PACKAGE = "crash"
SUITES = ("trixie",)
BUILD_CACHE = CACHE / "crash"
# Bump when the build recipe changes in a way that changes the artefacts.
RECIPE_VERSION = "1"


def log(msg: str) -> None:
    print(f"[vmtest.crash_build] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class CrashBuild:
    """One cached crash build: ``crash`` and ``build-info.json``."""

    dir: Path

    @property
    def binary(self) -> Path:
        return self.dir / "crash"

    @property
    def info(self) -> dict[str, object]:
        return dict(json.loads((self.dir / "build-info.json").read_text()))

    def complete(self) -> bool:
        return self.binary.is_file() and (self.dir / "build-info.json").is_file()


def recipe_hash() -> str:
    return hashlib.sha256(RECIPE_VERSION.encode()).hexdigest()[:12]


def build_dir(version: str) -> Path:
    return BUILD_CACHE / f"{version}-{recipe_hash()}"


def cached() -> CrashBuild | None:
    """The newest complete build of this recipe, or None (tests look it up; only setup builds)."""
    found = sorted(d for d in BUILD_CACHE.glob(f"*-{recipe_hash()}") if CrashBuild(d).complete())
    return CrashBuild(found[-1]) if found else None


def ensure_build(jobs: int | None = None) -> CrashBuild:
    """The cached crash of trixie's source, built first if needed (many minutes: gdb); one build at a time."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "crash-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(jobs or os.cpu_count() or 2)


def _ensure_locked(jobs: int) -> CrashBuild:
    apt = PrivateApt(SUITES, CACHE / "apt" / "trixie-src", kinds=("deb-src",))
    try:
        apt.update()
        out = apt.run("apt-cache", "showsrc", PACKAGE)
        versions = re.findall(r"^Version: (\S+)$", out, re.M)
        if not versions:
            raise KernelBuildError(f"no {PACKAGE} source package in {apt.root / 'sources.list'}")
        version = versions[0]
    except KernelBuildError as e:
        have = cached()
        if have is not None:
            log(f"apt not reachable ({str(e).splitlines()[0]}); using cached {have.dir}")
            return have
        raise
    b = CrashBuild(build_dir(version))
    if b.complete():
        log(f"cached: {b.dir}")
        return b
    build(apt, version, jobs)
    return b


def build(apt: PrivateApt, version: str, jobs: int) -> None:
    """Fetch the upstream tarball of ``version``, ``make`` crash in a work tree, move it into the cache."""
    out = build_dir(version)
    work = CACHE / "build" / f"crash-{out.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    apt.run("apt-get", "-q", "source", "--download-only", "--tar-only", f"{PACKAGE}={version}", cwd=work)
    tarballs = sorted(work.glob(f"{PACKAGE}_*.orig.tar.*"))
    if len(tarballs) != 1:
        raise KernelBuildError(f"apt-get source --tar-only {PACKAGE}={version} left {tarballs} in {work}")
    logpath = work / "build.log"
    with open(logpath, "w") as logf:
        sh(["tar", "xf", str(tarballs[0])], work, logf)
        src = next(p for p in work.iterdir() if p.is_dir())
        log(f"building crash {version} (with its gdb 10.2) with -j{jobs} (many minutes; log {logpath})")
        t1 = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS")}
        sh(["make", f"-j{jobs}"], src, logf, env)
        seconds = time.monotonic() - t1
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(src / "crash", tmp / "crash")
    shutil.copy2(logpath, tmp / "build.log")
    info = {"version": version, "recipe": recipe_hash(), "jobs": jobs, "fetch_seconds": round(t1 - t0, 1),
            "build_seconds": round(seconds, 1), "crash_bytes": (tmp / "crash").stat().st_size}
    (tmp / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    log(f"built crash {version} in {seconds:.0f} s -> {out}")


def main() -> int:
    try:
        b = ensure_build()
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(b.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
