"""Which shared libraries and loader an ELF executable needs, read from its headers with pyelftools (never ``ldd``).

The search follows the dynamic loader: ``DT_RPATH`` (only when there is no ``DT_RUNPATH``) of the object and of the
objects that loaded it, then ``DT_RUNPATH`` of the object, then the default directories.  ``$ORIGIN`` expands to the
directory of the object (after resolving symlinks), ``$LIB`` to ``lib64``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from khibernate.initramfs.errors import DependencyError as DependencyError

DEFAULT_DIRS = (
    "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
    "/usr/local/lib",
)


@dataclasses.dataclass(frozen=True)
class ElfInfo:
    """What the loader reads from one ELF file."""

    path: Path
    elfclass: int
    machine: str
    interp: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]


def is_elf(path: Path) -> bool:
    """True when path is a regular file starting with the ELF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _expand(entry: str, origin: Path) -> list[str]:
    out = []
    for d in entry.split(":"):
        if not d:
            continue
        d = d.replace("${ORIGIN}", str(origin)).replace("$ORIGIN", str(origin))
        d = d.replace("${LIB}", "lib64").replace("$LIB", "lib64")
        out.append(os.path.normpath(d))
    return out


def elf_info(path: Path) -> ElfInfo:
    """Parse PT_INTERP, DT_NEEDED, DT_RPATH and DT_RUNPATH of one ELF file."""
    real = Path(os.path.realpath(path))
    try:
        with open(real, "rb") as f:
            elf = ELFFile(f)
            interp = None
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_INTERP":
                    interp = seg.get_interp_name()  # type: ignore[attr-defined]
            needed: list[str] = []
            rpath: list[str] = []
            runpath: list[str] = []
            for sec in elf.iter_sections():
                if not isinstance(sec, DynamicSection):
                    continue
                for tag in sec.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)  # type: ignore[attr-defined]
                    elif tag.entry.d_tag == "DT_RPATH":
                        rpath += _expand(tag.rpath, real.parent)  # type: ignore[attr-defined]
                    elif tag.entry.d_tag == "DT_RUNPATH":
                        runpath += _expand(tag.runpath, real.parent)  # type: ignore[attr-defined]
            return ElfInfo(path, elf.elfclass, elf["e_machine"], interp, tuple(needed), tuple(rpath), tuple(runpath))
    except (ELFError, OSError) as e:
        raise DependencyError(f"cannot read ELF file {path}: {e}") from e


def _compatible(path: Path, elfclass: int, machine: str) -> bool:
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            return elf.elfclass == elfclass and elf["e_machine"] == machine
    except (ELFError, OSError):
        return False


def find_library(name: str, info: ElfInfo, inherited_rpath: tuple[str, ...],
                 default_dirs: Iterable[str] = DEFAULT_DIRS) -> Path | None:
    """Where the loader would find DT_NEEDED name for the object described by info (None if nowhere)."""
    if "/" in name:
        return Path(name) if Path(name).is_file() else None
    dirs: list[str] = []
    if not info.runpath:
        dirs += [*info.rpath, *inherited_rpath]
    dirs += [*info.runpath, *default_dirs]
    for d in dirs:
        cand = Path(d) / name
        if cand.is_file() and _compatible(cand, info.elfclass, info.machine):
            return cand
    return None


def resolve(executables: Iterable[Path], default_dirs: Iterable[str] = DEFAULT_DIRS) -> dict[str, Path]:
    """Transitive closure of the loader and libraries the executables need: {path the loader opens: file}.

    Keys are the absolute paths at which the loader will look for each library (the directory it is found in plus
    its DT_NEEDED name), so copying each value to its key inside the initramfs reproduces what the loader expects.
    Raises DependencyError naming every library that cannot be found.
    """
    default_dirs = tuple(default_dirs)
    found: dict[str, Path] = {}
    by_name: dict[str, Path] = {}
    missing: list[str] = []
    queue: list[tuple[Path, tuple[str, ...]]] = [(Path(p), ()) for p in executables]
    seen: set[Path] = set()
    while queue:
        obj, inherited = queue.pop(0)
        real = Path(os.path.realpath(obj))
        if real in seen:
            continue
        seen.add(real)
        info = elf_info(obj)
        if info.interp and info.interp not in found:
            if not Path(info.interp).exists():
                missing.append(f"{info.interp} (program interpreter of {obj})")
            else:
                found[info.interp] = Path(os.path.realpath(info.interp))
        chain = (*info.rpath, *inherited) if not info.runpath else inherited
        for name in info.needed:
            if name in by_name:
                continue
            lib = find_library(name, info, inherited, default_dirs)
            if lib is None:
                missing.append(f"{name} (needed by {obj})")
                continue
            by_name[name] = lib
            found[str(lib)] = Path(os.path.realpath(lib))
            queue.append((lib, chain))
    if missing:
        raise DependencyError("shared libraries not found: " + "; ".join(missing)
                              + ". Install the packages that provide them, or check DT_RUNPATH/RPATH of the binary.")
    return found


# OpenSSL 3 loads its provider modules (legacy.so, ...) with dlopen from the directory compiled into libcrypto, which
# `openssl version -m` prints as this string; no DT_NEEDED names them.
OPENSSL_MODULESDIR = re.compile(rb'MODULESDIR: "(/[^"\0]+)"')


def dlopened_plugins(libraries: Iterable[Path]) -> dict[str, Path]:
    """{path the library will dlopen: file} for plugins of the given (resolved) libraries that the ELF walk cannot
    see: OpenSSL 3's provider modules, from the MODULESDIR compiled into a shared libcrypto.so.3 (Debian's
    python3-cryptography loads the legacy provider when imported and fails without it).  Empty when none."""
    out: dict[str, Path] = {}
    for lib in libraries:
        if not Path(lib).name.startswith("libcrypto.so.3"):
            continue
        m = OPENSSL_MODULESDIR.search(Path(lib).read_bytes())
        if m is None:
            continue
        moddir = Path(m.group(1).decode())
        if moddir.is_dir():
            for mod in sorted(moddir.glob("*.so")):
                out[str(mod)] = Path(os.path.realpath(mod))
    return out
