"""Build (once) and cache a Xen hypervisor WITH debug info, from Debian's own xen source and Debian's own config.

Debian's ``xen-hypervisor-4.17-amd64-dbg`` ships ``xen-syms`` with an ELF symbol table and no DWARF, so crash's gdb
refuses it ("no debugging data available") and makedumpfile ``--xen-syms`` fails the same way. This module builds
the hypervisor alone (``make -C xen``: no tools, no docs, no stubdoms, no EFI image) from ``apt-get source xen``
of the same version as the Debian hypervisor package vmtest/xen.py caches, with that package's
``boot/xen-4.17-amd64.config`` plus vmtest/xen-debug.config (``DEBUG_INFO=y``; every other option as Debian's).

``python3 -m vmtest.xen`` (scripts/setup.sh's Xen step) calls :func:`ensure_build` after caching Debian's
packages, with their version; ``python3 -m vmtest.xen_build [VERSION]`` alone prints the cache directory
``$KHIBERNATE_CACHE/xen/debug/<source version>-<recipe hash>/`` holding ``xen`` (the multiboot ELF QEMU's
``-kernel`` and ``kexec --vmm`` load), ``xen-syms`` (with DWARF), ``config`` and ``build-info.json``. Concurrent
callers wait on a lock; the tree appears by an atomic rename, so a half-built one is never found.

If the archive does not serve the wanted version's source (a mirror without debian-security's source packages),
the newest xen 4.17 source it does serve is built instead, said loudly and recorded in build-info.json
(``source_version`` against ``binary_version``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vmtest.kernel import CACHE, HERE, KernelBuildError, PrivateApt, config_options, missing_options, sh

XEN_SOURCE_PACKAGE = "xen"
HYPERVISOR_PACKAGE = "xen-hypervisor-4.17-amd64"
CONFIG_MEMBER = "./boot/xen-4.17-amd64.config"
SUITES = ("bookworm", "bookworm-security", "bookworm-updates")
FRAGMENT = HERE.parent / "xen-debug.config"
BUILD_CACHE = CACHE / "xen" / "debug"
# Bump when the build recipe changes in a way that changes the artefacts.
RECIPE_VERSION = "1"


def log(msg: str) -> None:
    print(f"[vmtest.xen_build] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class XenBuild:
    """One cached hypervisor build: ``xen``, ``xen-syms`` (DWARF), ``config``, ``build-info.json``."""

    dir: Path

    @property
    def image(self) -> Path:
        """The multiboot ELF32 QEMU boots with -kernel (Debian ships it gzipped as boot/xen-4.17-amd64.gz)."""
        return self.dir / "xen"

    @property
    def syms(self) -> Path:
        """The hypervisor's ELF64 with symbols and DWARF: what crash and makedumpfile --xen-syms read."""
        return self.dir / "xen-syms"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def info(self) -> dict[str, object]:
        """build-info.json: versions, seconds, sizes."""
        return dict(json.loads((self.dir / "build-info.json").read_text()))

    @property
    def version(self) -> str:
        """The Debian source version built, e.g. 4.17.5+72-g01140da4e8-1."""
        return str(self.info["source_version"])

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.image, self.syms, self.config, self.dir / "build-info.json"))


def recipe_hash() -> str:
    """What else than the version decides the artefacts: the recipe version and the config fragment."""
    return hashlib.sha256(RECIPE_VERSION.encode() + b"\0" + FRAGMENT.read_bytes()).hexdigest()[:12]


def build_dir(version: str) -> Path:
    return BUILD_CACHE / f"{version}-{recipe_hash()}"


def cached() -> XenBuild | None:
    """The newest complete build of this recipe, or None (tests look it up; only setup builds)."""
    found = sorted(d for d in BUILD_CACHE.glob(f"*-{recipe_hash()}") if XenBuild(d).complete())
    return XenBuild(found[-1]) if found else None


def wanted_config(debian_config: str, fragment: str) -> dict[str, str]:
    """Every option of Debian's config with the fragment's values on top."""
    return {**config_options(debian_config), **config_options(fragment)}


def config_mismatches(final_config: str, wanted: dict[str, str]) -> list[str]:
    """What differs between the config olddefconfig wrote and Debian's + the fragment: an option that did not
    stick, or one that appeared (made visible by EXPERT) with a value other than 'n'."""
    bad = missing_options(final_config, wanted)
    bad += [f"{opt}={val}: not in Debian's config nor in {FRAGMENT.name}"
            for opt, val in config_options(final_config).items() if opt not in wanted and val != "n"]
    return bad


def _compare_versions(a: str, b: str) -> int:
    if a == b:
        return 0
    r = subprocess.run(["dpkg", "--compare-versions", a, "lt", b])
    return -1 if r.returncode == 0 else 1


def preference(wanted: str, available: list[str]) -> list[str]:
    """The wanted version first, then the other available 4.17 versions, newest first."""
    others = sorted({v for v in available if v != wanted and v.startswith("4.17.")},
                    key=functools.cmp_to_key(_compare_versions), reverse=True)
    return [wanted, *others]


def source_versions(apt: PrivateApt) -> list[str]:
    """Versions of the xen source package the private sources list knows."""
    out = apt.run("apt-cache", "showsrc", XEN_SOURCE_PACKAGE)
    return re.findall(r"^Version: (\S+)$", out, re.M)


def ensure_build(binary_version: str | None = None, jobs: int | None = None) -> XenBuild:
    """The cached debug-info hypervisor of ``binary_version``'s source (the Debian hypervisor package the tests
    use, default apt's candidate), built first if needed (minutes); one build at a time (a lock)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "xen-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(binary_version, jobs or os.cpu_count() or 2)


def _ensure_locked(binary_version: str | None, jobs: int) -> XenBuild:
    apt = PrivateApt(SUITES, CACHE / "apt" / "bookworm-xen-src", kinds=("deb", "deb-src"))
    try:
        apt.update()
        wanted = binary_version or apt.candidate(HYPERVISOR_PACKAGE)
        versions = preference(wanted, source_versions(apt))
    except KernelBuildError as e:
        have = cached()
        if have is not None:
            log(f"apt not reachable ({str(e).splitlines()[0]}); using cached {have.dir}")
            return have
        raise
    for version in versions:
        if XenBuild(build_dir(version)).complete():
            log(f"cached: {build_dir(version)}")
            return XenBuild(build_dir(version))
        work = CACHE / "build" / build_dir(version).name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            apt.run("apt-get", "-q", "source", f"{XEN_SOURCE_PACKAGE}={version}", cwd=work)
        except KernelBuildError as e:
            log(f"the archive does not serve xen={version}'s source ({_why(e)}); trying the next version")
            shutil.rmtree(work, ignore_errors=True)
            continue
        if version != wanted:
            log(f"WARNING: building xen {version}, not {wanted} (the Debian hypervisor package's version): "
                f"{wanted}'s source is not on this mirror")
        build(apt, version, wanted, work, jobs)
        return XenBuild(build_dir(version))
    raise KernelBuildError(f"no xen 4.17 source package could be downloaded (tried {', '.join(versions)})")


def _why(e: KernelBuildError) -> str:
    m = re.search(r"(\d{3}\s+[A-Za-z ]+?)\s*\[", str(e))
    return m.group(1) if m else str(e).splitlines()[-1][-200:]


def build(apt: PrivateApt, version: str, binary_version: str, work: Path, jobs: int) -> None:
    """Configure (Debian's config + the fragment, checked) and build the hypervisor in ``work`` (its source
    already unpacked there), then move the artefacts into the cache in one rename."""
    srcs = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("xen-")]
    if len(srcs) != 1:
        raise KernelBuildError(f"unexpected source layout in {work}: {srcs}")
    src = srcs[0] / "xen"
    deb = apt.download(HYPERVISOR_PACKAGE, version, work / "deb")
    debian_config = subprocess.run(f"dpkg-deb --fsys-tarfile '{deb}' | tar -xO '{CONFIG_MEMBER}'", shell=True,
                                   capture_output=True, text=True, check=True).stdout
    make = ["make", "-C", str(src), "XEN_TARGET_ARCH=x86_64",
            f"EXTRA_CFLAGS_XEN_CORE=-ffile-prefix-map={src.parent}=. -fdebug-prefix-map={src.parent}=."]
    env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "CPPFLAGS", "LDFLAGS")}
    env.update(WGET="/bin/false", GIT="/bin/false")  # as Debian's rules: the build never downloads
    logpath = work / "build.log"
    with open(logpath, "w") as logf:
        (src / ".config").write_text(debian_config + FRAGMENT.read_text())
        sh([*make, "olddefconfig"], src, logf, env)
        final = (src / ".config").read_text()
        bad = config_mismatches(final, wanted_config(debian_config, FRAGMENT.read_text()))
        if bad:
            raise KernelBuildError("the hypervisor config is not Debian's + the fragment:\n  " + "\n  ".join(bad))
        log(f"building xen {version}'s hypervisor with -j{jobs} (minutes; log {logpath})")
        t0 = time.monotonic()
        # XEN_BUILD_PE=n: no xen.efi (QEMU boots the multiboot ELF); the EFI code inside xen stays as Debian's
        sh([*make, f"-j{jobs}", "XEN_BUILD_PE=n", "build"], src, logf, env)
        seconds = time.monotonic() - t0
    out = build_dir(version)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, dest in (("xen", "xen"), ("xen-syms", "xen-syms"), (".config", "config")):
        shutil.copy2(src / name, tmp / dest)
    shutil.copy2(logpath, tmp / "build.log")
    info = {"source_version": version, "binary_version": binary_version, "recipe": recipe_hash(), "jobs": jobs,
            "build_seconds": round(seconds, 1), "xen_bytes": (tmp / "xen").stat().st_size,
            "xen_syms_bytes": (tmp / "xen-syms").stat().st_size}
    (tmp / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    log(f"built xen {version} in {seconds:.0f} s -> {out}")


def main(argv: list[str]) -> int:
    try:
        b = ensure_build(argv[0] if argv else None)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(b.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
