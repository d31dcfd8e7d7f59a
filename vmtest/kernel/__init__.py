"""Build (once) and cache the jump-capable test kernels from Debian's linux-source packages.

``python -m vmtest.kernel [LINE]`` prints the cache directory holding ``bzImage``, ``vmlinux``,
``System.map`` and ``config`` (and, for a modular flavour, ``modules/lib/modules/<release>`` with modules.dep).
LINE is a kernel line (``6.12``, ``7.3``: small tinyconfig-based kernels) or a flavour of one (``6.12-distro``:
the same source with what distributions turn on — KASLR, THP, memcg, modules …; ``distro.config``).
The cache key is the source package version plus a hash of the config fragments and of the recipe version,
so a warm run costs one private ``apt-get update``.
The host's apt configuration is never changed: a private sources list and state directory are used.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from khibernate.cache import cache_root

HERE = Path(__file__).resolve().parent
CACHE = cache_root()


@dataclasses.dataclass(frozen=True)
class KernelLine:
    """A kernel we can build: the Debian source package and the suites that carry it, the config fragments
    (files next to this module, merged in order on top of ``make tinyconfig``) and whether it has modules."""

    name: str
    package: str
    codename: str
    suites: tuple[str, ...]
    fragments: tuple[str, ...]
    modular: bool = False


BOOKWORM = ("bookworm", "bookworm-security", "bookworm-updates", "bookworm-backports")
LINES = {
    "6.12": KernelLine("6.12", "linux-source-6.12", "bookworm", BOOKWORM, ("common.config", "6.12.config")),
    "7.3": KernelLine("7.3", "linux-source-7.3", "trixie", ("trixie", "trixie-security", "trixie-backports"),
                      ("common.config", "7.3.config")),
    # a distribution-like 6.12: KASLR, THP, hugetlbfs, memcg, KSM, init_on_alloc, systemd's needs, modular drivers
    "6.12-distro": KernelLine("6.12-distro", "linux-source-6.12", "bookworm", BOOKWORM,
                              ("common.config", "6.12.config", "distro.config"), modular=True),
}
DEFAULT_LINE = "6.12"


@dataclasses.dataclass(frozen=True)
class TestKernel:
    """The cached artefacts of one test kernel build (``modular``: it also has an installed modules tree)."""

    directory: Path
    modular: bool = False

    @property
    def bzimage(self) -> Path:
        return self.directory / "bzImage"

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def system_map(self) -> Path:
        return self.directory / "System.map"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def info(self) -> dict:
        return json.loads((self.directory / "build-info.json").read_text())

    @property
    def modules_root(self) -> Path:
        """The ``/lib/modules`` of this build (``<release>/modules.dep`` inside) as modules_install wrote it."""
        return self.directory / "modules" / "lib" / "modules"

    @property
    def release(self) -> str:
        """``uname -r`` of this kernel."""
        return str(self.info["release"])

    def complete(self) -> bool:
        files = (self.bzimage, self.vmlinux, self.system_map, self.config, self.directory / "build-info.json")
        if not all(p.is_file() for p in files):
            return False
        return not self.modular or (self.modules_root / self.release / "modules.dep").is_file()


class KernelBuildError(RuntimeError):
    """The test kernel could not be fetched, configured or built."""


def log(msg: str) -> None:
    print(f"[vmtest.kernel] {msg}", file=sys.stderr, flush=True)


def fragments(line: str) -> list[Path]:
    return [HERE / name for name in LINES[line].fragments]


def config_options(text: str) -> dict[str, str]:
    """CONFIG_X -> 'y' / value / 'n' (for '# CONFIG_X is not set') of a .config or a fragment (Kconfig syntax:
    also the Xen hypervisor's)."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        raw = raw.strip()
        if m := re.fullmatch(r"# (CONFIG_\w+) is not set", raw):
            options[m.group(1)] = "n"
        elif m := re.fullmatch(r"(CONFIG_\w+)=(.*)", raw):
            options[m.group(1)] = m.group(2)
    return options


def wanted_options(line: str) -> dict[str, str]:
    """CONFIG_X -> 'y' / value / 'n' (for '# CONFIG_X is not set') from the fragments."""
    wanted: dict[str, str] = {}
    for frag in fragments(line):
        wanted.update(config_options(frag.read_text()))
    return wanted


def missing_options(config_text: str, wanted: dict[str, str]) -> list[str]:
    """The fragment options that did not stick in a final .config."""
    have: dict[str, str] = {}
    for raw in config_text.splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", raw.strip()):
            have[m.group(1)] = m.group(2)
    bad = []
    for opt, val in wanted.items():
        got = have.get(opt, "n")
        if got != val:
            bad.append(f"{opt}: wanted {val}, got {got}")
    return bad


# Bump when the build recipe changes in a way that changes the artefacts.
RECIPE_VERSION = "1"
MODULAR_RECIPE = "modules_install v1"  # added to a modular flavour's hash (the 6.12 and 7.3 keys stay as they were)


def fragment_hash(line: str) -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    if LINES[line].modular:
        h.update(MODULAR_RECIPE.encode())
    for p in fragments(line):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- private apt


def host_debian_uris() -> tuple[str, str | None, str]:
    """(debian mirror URI, security URI or None, keyring) read from the host's apt sources."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.is_file() and p.suffix in ("", ".list", ".sources"):
            texts.append(p.read_text(errors="replace"))
    uris: list[str] = []
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    for text in texts:
        for raw in text.splitlines():
            raw = raw.strip()
            if raw.startswith("URIs:"):
                uris.extend(raw.split()[1:])
            elif raw.startswith("deb ") or raw.startswith("deb\t"):
                parts = re.sub(r"\[[^\]]*\]", "", raw).split()
                if len(parts) >= 2:
                    uris.append(parts[1])
    main = next((u for u in uris if u.rstrip("/").endswith("/debian")), None)
    sec = next((u for u in uris if u.rstrip("/").endswith("/debian-security")), None)
    main = os.environ.get("KHIBERNATE_DEBIAN_MIRROR", main)
    if not main:
        raise KernelBuildError("no Debian mirror found in /etc/apt sources; set KHIBERNATE_DEBIAN_MIRROR=<uri>")
    return main, sec, keyring


class PrivateApt:
    """apt-get/apt-cache with their own sources list and state, leaving the host's apt untouched.

    ``kinds`` are the sources.list line types: ``("deb",)`` for binary packages, add ``"deb-src"`` for
    ``apt-get source``."""

    def __init__(self, suites: tuple[str, ...], root: Path, kinds: tuple[str, ...] = ("deb",)):
        self.root = root
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        main, sec, keyring = host_debian_uris()
        lines = []
        for suite in suites:
            uri = sec if suite.endswith("-security") else main
            if uri:
                lines.extend(f"{kind} [signed-by={keyring}] {uri} {suite} main" for kind in kinds)
        (root / "sources.list").write_text("\n".join(lines) + "\n")
        self.opts = [
            "-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=-",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "APT::Sandbox::User=root",
        ]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        cmd = [tool, *self.opts, *args]
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if r.returncode:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        return r.stdout

    def update(self) -> None:
        self.run("apt-get", "-q", "update")

    def candidate(self, package: str) -> str:
        out = self.run("apt-cache", "policy", package)
        m = re.search(r"Candidate:\s*(\S+)", out)
        if not m or m.group(1) == "(none)":
            raise KernelBuildError(f"{package} is not available from {self.root / 'sources.list'}")
        return m.group(1)

    def download(self, package: str, version: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        self.run("apt-get", "-q", "download", f"{package}={version}", cwd=dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if not debs:
            raise KernelBuildError(f"apt-get download {package} produced no .deb in {dest}")
        return debs[-1]


# ---------------------------------------------------------------- build


def sh(cmd: list[str] | str, cwd: Path, logf, env: dict[str, str] | None = None) -> None:
    logf.write(f"$ {cmd}\n")
    logf.flush()
    r = subprocess.run(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT, shell=isinstance(cmd, str), env=env)
    if r.returncode:
        raise KernelBuildError(f"{cmd} failed in {cwd} (exit {r.returncode}); see {logf.name}")


def find_cached(line: str) -> TestKernel | None:
    """Any complete cached build of this fragment (used when apt cannot be reached)."""
    fh = fragment_hash(line)
    for d in sorted((CACHE / "kernels").glob(f"{line}-*-{fh}")):
        tk = TestKernel(d, LINES[line].modular)
        if tk.complete():
            return tk
    return None


def ensure_kernel(line: str = DEFAULT_LINE, jobs: int | None = None) -> TestKernel:
    """Return the cached test kernel for LINE, building it first if needed (~7-10 min on 2 cores).

    Concurrent callers wait for each other (a lock file in the cache), so only one build runs.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"kernel-{line}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_kernel_locked(line, jobs)


def _ensure_kernel_locked(line: str, jobs: int | None) -> TestKernel:
    kline = LINES[line]
    apt = PrivateApt(kline.suites, CACHE / "apt" / kline.codename)
    version = os.environ.get("KHIBERNATE_KERNEL_SOURCE_VERSION")
    try:
        with open(CACHE / f"apt-{kline.codename}.lock", "w") as lock:  # flavours of a line share its apt state
            fcntl.flock(lock, fcntl.LOCK_EX)
            apt.update()
            version = version or apt.candidate(kline.package)
    except KernelBuildError as e:
        cached = find_cached(line)
        if cached:
            log(f"apt not reachable ({str(e).splitlines()[0]}); using cached {cached.directory}")
            return cached
        raise
    key = f"{line}-{version}-{fragment_hash(line)}"
    tk = TestKernel(CACHE / "kernels" / key, kline.modular)
    if tk.complete():
        log(f"cached: {tk.directory}")
        return tk
    build(kline, version, apt, tk.directory, jobs or os.cpu_count() or 2)
    return tk


def build(kline: KernelLine, version: str, apt: PrivateApt, out: Path, jobs: int) -> None:
    work = CACHE / "build" / out.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logpath = work / "build.log"
    t0 = time.monotonic()
    with open(logpath, "w") as logf:
        log(f"fetching {kline.package}={version} (log {logpath})")
        deb = apt.download(kline.package, version, CACHE / "debs")
        sh(f"dpkg-deb --fsys-tarfile '{deb}' | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' | tar -xJ",
           work, logf)
        srcs = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("linux-source")]
        if len(srcs) != 1:
            raise KernelBuildError(f"unexpected source layout in {work}: {srcs}")
        src = srcs[0]
        t_fetch = time.monotonic() - t0
        log(f"configuring ({t_fetch:.0f} s so far)")
        sh(["make", "tinyconfig"], src, logf)
        sh(["scripts/kconfig/merge_config.sh", "-m", ".config", *map(str, fragments(kline.name))], src, logf)
        sh(["make", "olddefconfig"], src, logf)
        bad = missing_options((src / ".config").read_text(), wanted_options(kline.name))
        if bad:
            raise KernelBuildError("config options did not stick after olddefconfig (unmet dependencies?):\n  "
                                   + "\n  ".join(bad))
        log(f"building with -j{jobs} (several minutes; log {logpath})")
        t1 = time.monotonic()
        sh(["make", f"-j{jobs}", "bzImage"], src, logf)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if kline.modular:
            install_modules(src, tmp / "modules", jobs, logf)
        t_build = time.monotonic() - t1
    shutil.copy2(src / "arch/x86/boot/bzImage", tmp / "bzImage")
    shutil.copy2(src / "vmlinux", tmp / "vmlinux")
    shutil.copy2(src / "System.map", tmp / "System.map")
    shutil.copy2(src / ".config", tmp / "config")
    shutil.copy2(logpath, tmp / "build.log")
    release = (src / "include/config/kernel.release").read_text().strip()
    info = {"line": kline.name, "package": kline.package, "version": version, "release": release,
            "fetch_seconds": round(t_fetch, 1), "build_seconds": round(t_build, 1), "jobs": jobs,
            "bzimage_bytes": (tmp / "bzImage").stat().st_size, "vmlinux_bytes": (tmp / "vmlinux").stat().st_size,
            "modules": sorted(p.name for p in (tmp / "modules").rglob("*.ko")) if kline.modular else []}
    (tmp / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    log(f"built {release} in {t_build:.0f} s -> {out}")


def install_modules(src: Path, dest: Path, jobs: int, logf) -> None:
    """``make modules`` and ``modules_install`` into ``dest`` (``dest/lib/modules/<release>``, depmod's
    modules.dep beside the .ko files, stripped); the ``build``/``source`` links into the deleted tree go."""
    if shutil.which("depmod") is None and not Path("/sbin/depmod").exists():
        raise KernelBuildError("depmod not found: apt-get install kmod (modules_install writes modules.dep with it)")
    sh(["make", f"-j{jobs}", "modules"], src, logf)
    sh(["make", "modules_install", f"INSTALL_MOD_PATH={dest}", "INSTALL_MOD_STRIP=1"], src, logf)
    for link in (*dest.glob("lib/modules/*/build"), *dest.glob("lib/modules/*/source")):
        link.unlink()
    if not list(dest.glob("lib/modules/*/modules.dep")):
        raise KernelBuildError(f"modules_install wrote no modules.dep under {dest}; see {logf.name}")


def main(argv: list[str]) -> int:
    line = argv[0] if argv else DEFAULT_LINE
    if line not in LINES:
        print(f"unknown kernel line {line!r}; known: {', '.join(LINES)}", file=sys.stderr)
        return 2
    try:
        tk = ensure_kernel(line)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(tk.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
