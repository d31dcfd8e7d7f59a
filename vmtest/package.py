"""The khibernate Debian package, built from this repository by dpkg-buildpackage (debian/, pybuild) and cached by
the content of what goes into it; ``python -m vmtest.package`` prints the .deb's path.

The source is the repository's files as git lists them (tracked plus untracked-but-not-ignored: the working tree a
fresh clone with these edits would have), copied to a scratch directory, so the build never touches the checkout.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmtest.kernel import CACHE

REPO = Path(__file__).resolve().parent.parent
DEB_CACHE = CACHE / "deb"
# what the package is made of (tests/, vmtest/, benchmarks/ are not in it)
PACKAGED = ("src/", "initramfs/", "debian/", "contrib/", "pyproject.toml", "setup.py", "README.md")
# Debian's own python3 builds the package (a python3 earlier on PATH, e.g. pyenv's, would install elsewhere)
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_DEPS = ("debhelper", "dh-python", "python3-all-dev", "python3-setuptools", "python3-cffi")


class PackageError(RuntimeError):
    """The .deb could not be built; the message carries the build log's tail."""


def source_files() -> list[str]:
    """Repository-relative paths of the package's source (git's view of the working tree)."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return sorted(p for p in out if p.startswith(PACKAGED) and os.path.lexists(REPO / p))


def source_key(files: list[str]) -> str:
    h = hashlib.sha256(b"khibernate-deb-v1\0")
    for rel in files:
        p = REPO / rel
        data = os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        h.update(rel.encode() + b"\0" + data + b"\0")
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def build(log=print) -> Path:
    """The cached .deb for the current sources (built first, under a lock, if absent)."""
    files = source_files()
    key = source_key(files)
    out_dir = DEB_CACHE / key
    found = sorted(out_dir.glob("khibernate_*_amd64.deb"))
    if found:
        return found[-1]
    missing = [p for p in BUILD_DEPS
               if subprocess.run(["dpkg-query", "-W", "-f", "${Status}", p], capture_output=True,
                                 text=True).stdout != "install ok installed"]
    if missing:
        raise PackageError(f"building the .deb needs {' '.join(missing)}: apt-get install them (scripts/setup.sh does)")
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    with open(DEB_CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(out_dir.glob("khibernate_*_amd64.deb"))
        if found:
            return found[-1]
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="khibernate-deb-") as tmp:
            src = Path(tmp) / "khibernate"
            for rel in files:
                dst = src / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dst, follow_symlinks=False)
            blog = Path(tmp) / "build.log"
            with open(blog, "wb") as f:
                env = dict(os.environ, DEB_BUILD_OPTIONS="nocheck", PATH=DEBIAN_PATH)
                r = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, stdout=f,
                                   stderr=subprocess.STDOUT, env=env)
            if r.returncode != 0:
                raise PackageError(f"dpkg-buildpackage failed:\n{blog.read_text(errors='replace')[-3000:]}")
            debs = sorted(Path(tmp).glob("khibernate_*_amd64.deb"))
            if not debs:
                raise PackageError(f"dpkg-buildpackage made no khibernate_*_amd64.deb in {tmp}")
            partial = DEB_CACHE / f"{key}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            shutil.copy2(debs[-1], partial / debs[-1].name)
            shutil.copy2(blog, partial / "build.log")
            partial.rename(out_dir)
        log(f"[vmtest.package] built {debs[-1].name} in {time.monotonic() - t0:.0f} s")
        return out_dir / debs[-1].name


if __name__ == "__main__":
    print(build(log=lambda m: print(m, file=sys.stderr)))
