"""Bundle the running Python interpreter, a trimmed zipped standard library and khibernate with its dependencies.

Guest layout, mirroring the host's base installation (PREFIX = ``sys.base_prefix``, e.g. /usr for Debian's python3):
  <host realpath of the interpreter>         the binary (its ``$ORIGIN`` RUNPATH still works); /usr/bin/python3 -> it
  PREFIX/lib/python3XY.zip                   the stdlib as legacy-layout .pyc (unchecked hash: mtimes do not matter)
  PREFIX/lib/python3.X/os.py                 the landmark by which the interpreter finds PREFIX by itself
  PREFIX/lib/python3.X/lib-dynload/*.so      the C extension modules that are .so files in this build
  <first site-packages dir for PREFIX>       khibernate and its dependencies, .py plus __pycache__ .pyc
so ``python3`` works without any environment variable (``env -i``, subprocesses); /etc/khibernate/python.env sets
PYTHONHOME=PREFIX anyway.  Everything is read from ``sys`` / ``sysconfig`` / ``site``; no path is hard-coded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement

from khibernate.cache import cache_root
from khibernate.initramfs.errors import PythonBundleError as PythonBundleError

GUEST_PREFIX = sys.base_prefix
GUEST_LIB = f"{GUEST_PREFIX}/{sys.platlibdir}"
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
VERSION_NODOT = f"{sys.version_info.major}{sys.version_info.minor}"

# Top-level stdlib entries never needed in a capture environment.
STDLIB_DROP = frozenset({
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "distutils", "pydoc_data", "site-packages",
    "dist-packages", "lib-dynload", "__pycache__", "venv", "turtle.py", "idle.py", "pydoc.py", "__phello__",
    "msilib", "curses", "dbm", "sqlite3", "xmlrpc", "wsgiref", "mailbox.py", "smtplib.py", "imaplib.py",
    "nntplib.py", "ftplib.py", "poplib.py", "telnetlib.py",
})
# C extension modules left out: tests, GUI/terminal, and those pulling big libraries (_ssl/_hashlib need libcrypto;
# hashlib falls back to the built-in _sha*/_md5/_blake2 modules).
DYNLOAD_DROP = re.compile(r"^(_test\w*|_ctypes_test|_xxtestfuzz|_xxsubinterpreters|xxlimited\w*|_tkinter|_curses\w*|"
                          r"readline|nis|spwd|ossaudiodev|_ssl|_hashlib|_sqlite3|_dbm|_gdbm|_crypt|audioop|_uuid)\.")
# Files of dependencies never imported in the guest (zstandard's cffi backend duplicates its C backend).
# Also test suites, type stubs and C headers, which nothing imports at run time.
SITE_DROP = re.compile(r"^zstandard/(_cffi\.|backend_cffi)|(^|/)tests?/|\.(pyi|pxd|h|c|cpp)$|/include/")
# Build-time files of khibernate's own package: the native kernel's C sources, cffi's generated C and objects,
# and its cffi builder (the compiled _pages extension is what the guest imports).
OWN_DROP = re.compile(r"\.(c|h|o)$|^khibernate/native/build\.py$")
# khibernate's C extension modules (cffi API mode, built by `pip install -e .` or khibernate/native/build.py): the
# capture job cannot run without them, so a bundle without them is refused.
NATIVE_EXTENSIONS = ("khibernate/native/_pages",)
# Dependencies only the first kernel's commands import (``view mount``'s FUSE binding): the capture and restore jobs
# never do, so a system without them (Debian has no mfusepy package) still gets its capture environment; bundled
# when installed.
FIRST_KERNEL_ONLY = frozenset({"mfusepy"})
# Requirement markers we treat as never true in the guest.


@dataclasses.dataclass(frozen=True)
class PyFile:
    """A file for the guest: where it goes, its bytes, whether it is executable, and (for ELF) the host file."""

    guest: str
    data: bytes
    perm: int = 0o644
    elf_source: Path | None = None


@functools.cache
def guest_site() -> str:
    """The first site-packages dir the base interpreter adds by itself (Debian: /usr/local/lib/python3.X/...)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    r = subprocess.run([base, "-I", "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                       text=True)
    if r.returncode or not r.stdout.strip().startswith("/"):
        raise PythonBundleError(f"cannot ask {base} for its site-packages directory: {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


def interpreter() -> Path:
    """The real interpreter binary (venv and pyenv shims resolved)."""
    exe = Path(os.path.realpath(sys.executable))
    if not exe.is_file():
        raise PythonBundleError(f"cannot find the Python binary behind sys.executable={sys.executable!r}")
    return exe


def stdlib_dir() -> Path:
    """The host standard library directory of the base installation (outside any venv)."""
    return Path(sysconfig.get_path("stdlib", vars={"installed_base": sys.base_prefix, "base": sys.base_prefix}))


def dynload_dir() -> Path:
    """The host lib-dynload directory (where C extension modules of the stdlib live as .so files)."""
    return Path(sysconfig.get_path("platstdlib", vars={"platbase": sys.base_exec_prefix,
                                                       "installed_platbase": sys.base_exec_prefix})) / "lib-dynload"


# Compiled in a fresh interpreter with PYTHONHASHSEED=0: marshal output depends on string hash order (frozenset
# constants) and on reference counts (FLAG_REF), so compiling in this process would not be reproducible.
_COMPILER = """
import importlib.util, json, struct, sys
from importlib._bootstrap_external import _code_to_hash_pyc
out = open(sys.argv[1], "wb")
for src, guest in json.load(sys.stdin):
    data = open(src, "rb").read()
    try:
        code = compile(data, guest, "exec", dont_inherit=True, optimize=0)
        pyc = bytes(_code_to_hash_pyc(code, importlib.util.source_hash(data), checked=False))
    except (SyntaxError, ValueError):
        pyc = b""
    out.write(struct.pack("<I", len(pyc)) + pyc)
out.close()
"""


PYC_CACHE = cache_root() / "pyc"


def compile_many(items: list[tuple[Path, str]]) -> list[bytes | None]:
    """Compile (source file, guest path) pairs to unchecked-hash .pyc bytes, reproducibly; None for bad sources.

    A whole batch is cached under ~/.cache/khibernate/pyc by the hash of its sources, guest paths and interpreter
    (compiling one batch in a fresh process is deterministic, so a cached batch equals a fresh one)."""
    h = hashlib.sha256(f"{sys.version}\0{os.path.realpath(sys.executable)}\0".encode())
    for src, guest in items:
        h.update(guest.encode() + b"\0" + hashlib.sha256(Path(src).read_bytes()).digest())
    cached = PYC_CACHE / f"{h.hexdigest()[:32]}.pycs"
    if cached.is_file():
        return _split_pycs(cached.read_bytes(), len(items))
    with tempfile.TemporaryDirectory(prefix="khibernate-pyc-") as d:
        out = Path(d) / "pycs"
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        r = subprocess.run([sys.executable, "-I", "-c", _COMPILER, str(out)], input=json.dumps(
            [(str(s), g) for s, g in items]).encode(), env=env, capture_output=True)
        if r.returncode:
            raise PythonBundleError(f"compiling the Python bundle failed: {r.stderr.decode(errors='replace')[-2000:]}")
        blob = out.read_bytes()
    result = _split_pycs(blob, len(items))
    try:
        PYC_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        tmp.replace(cached)
    except OSError:
        pass  # a read-only cache only costs time
    return result


def _split_pycs(blob: bytes, count: int) -> list[bytes | None]:
    result: list[bytes | None] = []
    pos = 0
    for _ in range(count):
        (n,) = struct.unpack_from("<I", blob, pos)
        result.append(blob[pos + 4:pos + 4 + n] or None)
        pos += 4 + n
    return result


def stdlib_zip() -> bytes:
    """The trimmed standard library as a deterministic stored zip of legacy-layout .pyc files."""
    root = stdlib_dir()
    if not (root / "os.py").is_file():
        raise PythonBundleError(f"no os.py in {root}: the standard library of {sys.executable} is not where sysconfig"
                                " says; bundle from an interpreter with an intact installation")
    zip_guest = f"{GUEST_LIB}/python{VERSION_NODOT}.zip"
    sources = sorted(_walk_stdlib(root))
    rels = [p.relative_to(root).as_posix() for p in sources]
    pycs = compile_many([(p, f"{zip_guest}/{rel}") for p, rel in zip(sources, rels, strict=True)])
    # a few stdlib files are deliberately invalid (test data): they compile to None and are left out
    members = [(rel[:-3] + ".pyc", pyc) for rel, pyc in zip(rels, pycs, strict=True) if pyc is not None]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _walk_stdlib(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        top = d == root
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__" and not (top and n in STDLIB_DROP)
                             and not n.startswith("config-"))
        for n in filenames:
            if n.endswith(".py") and not (top and n in STDLIB_DROP):
                yield d / n


def dynload_modules() -> list[Path]:
    """The stdlib's .so extension modules worth bundling."""
    d = dynload_dir()
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == ".so" and not DYNLOAD_DROP.match(p.name))


def needed_here(requirement: str) -> str | None:
    """The distribution name of a PEP 508 ``requirement`` if this interpreter needs it (its environment marker
    holds here, no extra asked for: the capture kernel runs this same interpreter), else None."""
    req = Requirement(requirement)
    return req.name if req.marker is None or req.marker.evaluate({"extra": ""}) else None


def _requirement_names(dist: importlib.metadata.Distribution) -> list[str]:
    return [name for req in dist.requires or [] if (name := needed_here(req))]


def _dist_files(dist: importlib.metadata.Distribution) -> Iterator[tuple[str, Path]]:
    """(path relative to the site dir, file) of an installed distribution: from its file list (RECORD), or, for a
    Debian package (dh_python drops RECORD), from its top-level modules; PythonBundleError when neither finds any."""
    found = list(_recorded_files(dist)) or list(_top_level_files(dist))
    if not found:
        raise PythonBundleError(f"cannot tell which files make up {dist.metadata['Name']} (no RECORD, and no "
                                "top_level.txt module imports): reinstall it with pip or the distribution's package")
    yield from found


def _top_level_files(dist: importlib.metadata.Distribution) -> Iterator[tuple[str, Path]]:
    """The files of the modules a distribution's top_level.txt names (or of the module named like it)."""
    names = (dist.read_text("top_level.txt") or dist.metadata["Name"].replace("-", "_")).split()
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            yield from ((rel, src) for rel, src in _package_files(name) if not SITE_DROP.search(rel))
        elif spec.origin and os.path.isfile(spec.origin):
            yield os.path.basename(spec.origin), Path(spec.origin)


def _recorded_files(dist: importlib.metadata.Distribution) -> Iterator[tuple[str, Path]]:
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.startswith("..") or rel.startswith("/") or "__pycache__" in rel or rel.endswith(".pyc"):
            continue
        if rel.split("/")[0].endswith(".data") or SITE_DROP.search(rel):
            continue
        src = Path(str(dist.locate_file(f)))
        if src.is_file():
            yield rel, src


def _package_files(pkg: str) -> Iterator[tuple[str, Path]]:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise PythonBundleError(f"cannot import {pkg!r} in {sys.executable}; pip install it first")
    root = Path(list(spec.submodule_search_locations)[0])
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__" and not n.endswith(".egg-info"))
        for n in sorted(filenames):
            if n.endswith((".pyc", ".pyo")) or n.startswith("."):
                continue
            p = Path(dirpath) / n
            yield f"{pkg}/{p.relative_to(root).as_posix()}", p


def top_requirements(top_package: str) -> list[str]:
    """Distribution names top_package needs: its installed metadata plus, in a source checkout, pyproject.toml."""
    names: list[str] = []
    try:
        names += _requirement_names(importlib.metadata.distribution(top_package))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(top_package)
    if spec is not None and spec.submodule_search_locations:
        package_dir = Path(list(spec.submodule_search_locations)[0])
        # the checkout's root: beside the package, or above src/ (the repo's layout)
        pyproject = next((d / "pyproject.toml" for d in package_dir.parents[:2] if (d / "pyproject.toml").is_file()),
                         package_dir.parent / "pyproject.toml")
        if pyproject.is_file():
            project = tomllib.loads(pyproject.read_text()).get("project", {})
            if project.get("name") == top_package:
                names += [name for req in project.get("dependencies", []) if (name := needed_here(req))]
    if not names:
        raise PythonBundleError(f"cannot tell what {top_package} depends on: neither installed (pip install -e .)"
                                " nor run from a source checkout with pyproject.toml")
    return names


def site_files(top_package: str = "khibernate") -> list[tuple[str, Path]]:
    """(relative path under guest_site(), host file) for top_package (from where it imports) and its dependencies;
    for khibernate, its build-time files left out and its native extensions required (PythonBundleError if unbuilt)."""
    files: dict[str, Path] = dict(_package_files(top_package))
    if top_package == "khibernate":
        files = {rel: src for rel, src in files.items() if not OWN_DROP.search(rel)}
        check_native(files)
    todo = top_requirements(top_package)
    done: set[str] = set()
    while todo:
        name = todo.pop(0)
        key = name.lower().replace("_", "-")
        if key in done:
            continue
        done.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as e:
            if key in FIRST_KERNEL_ONLY:
                continue
            raise PythonBundleError(f"{top_package} needs {name!r}, which is not installed for {sys.executable};"
                                    f" run: {sys.executable} -m pip install {name}") from e
        for rel, src in _dist_files(dist):
            files.setdefault(rel, src)
        todo += _requirement_names(dist)
    return sorted(files.items())


def check_native(files: dict[str, Path]) -> None:
    """PythonBundleError unless each of NATIVE_EXTENSIONS is among ``files`` (relative paths under the site dir) as
    an extension module this interpreter loads (a suffix of importlib.machinery.EXTENSION_SUFFIXES)."""
    for stem in NATIVE_EXTENSIONS:
        if not any(stem + suffix in files for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            raise PythonBundleError(
                f"{stem.replace('/', '.')} is not built for {sys.executable} (no {stem}*.so next to the sources): "
                "the capture job needs it; run `pip install -e .` in the checkout (or, in a worktree, "
                "`python khibernate/native/build.py` from its root)")


def bundle(top_package: str = "khibernate") -> tuple[list[PyFile], dict[str, str]]:
    """Every file of the Python bundle (ELF files carry elf_source so the caller can add their libraries), and the
    host -> guest directory map of the copied site trees (so $ORIGIN-relative libraries resolve inside the copy)."""
    out: list[PyFile] = []
    dir_map: dict[str, str] = {}
    exe = interpreter()
    out.append(PyFile(str(exe), exe.read_bytes(), 0o755, exe))
    out.append(PyFile(f"{GUEST_LIB}/python{VERSION_NODOT}.zip", stdlib_zip()))
    out.append(PyFile(f"{GUEST_LIB}/python{VERSION}/os.py", (stdlib_dir() / "os.py").read_bytes()))
    for so in dynload_modules():
        out.append(PyFile(f"{GUEST_LIB}/python{VERSION}/lib-dynload/{so.name}", so.read_bytes(), 0o755, so))
    site = site_files(top_package)
    pycs: dict[str, bytes | None] = {}
    # two batches, so that editing top_package does not recompile its (cached) dependencies
    for own in (True, False):
        py = [(rel, src) for rel, src in site if rel.endswith(".py") and rel.startswith(top_package + "/") == own]
        pycs.update(zip([rel for rel, _ in py], compile_many([(src, f"{guest_site()}/{rel}") for rel, src in py]),
                        strict=True))
    for rel, src in site:
        guest = f"{guest_site()}/{rel}"
        if src.as_posix().endswith("/" + rel):
            dir_map[os.path.realpath(src.as_posix()[:-len(rel) - 1])] = guest_site()
        data = src.read_bytes()
        is_so = src.name.endswith(".so") or ".so." in src.name
        out.append(PyFile(guest, data, 0o755 if is_so else 0o644, src if is_so else None))
        pyc = pycs.get(rel)
        if pyc is not None:
            parent, _, stem = rel[:-3].rpartition("/")
            cache = f"{parent}/__pycache__" if parent else "__pycache__"
            out.append(PyFile(f"{guest_site()}/{cache}/{stem}.{sys.implementation.cache_tag}.pyc", pyc))
    return out, dir_map


def environment() -> dict[str, str]:
    """Environment variables the guest needs to run the bundled interpreter."""
    return {"PYTHONHOME": GUEST_PREFIX, "PYTHONPATH": guest_site(), "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1"}


def python_links() -> dict[str, str]:
    """Symlinks so 'python3' and 'python3.X' run the bundled interpreter: {link path: target}."""
    exe = str(interpreter())
    links = {f"/usr/bin/python{VERSION}": exe, "/usr/bin/python3": exe}
    return {k: v for k, v in links.items() if k != exe}
