"""Fuzz campaign: mutate small real inputs of every format and run every ``khibernate image`` command on them as a
hostile user would, printing outcome counts per format and command.

    python3 benchmarks/fuzz_campaign.py [--mutations 1000] [--seed 1]

Each run is a forked child (address space limited to 2 GiB, killed after 20 s) that invokes the click command
in-process.  Outcomes: ``ok`` (exit 0), ``error`` (one ``error:`` line or a click usage error), ``TRACEBACK``
(any other exception), ``HANG`` (killed by the timeout), ``MEMORY`` (MemoryError or over the limit),
``WRONG`` (a .khi ``read`` returned bytes that differ from the original memory, or a changed .khi passed
``verify``: data a checksum should have refused), ``unchecked`` (the same for ELF/kdump/raw inputs, whose headers,
bitmaps and ELF data carry no checksum: the format cannot tell), ``UNSAFE`` (an output left behind that is not
the DEST file).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from click.testing import CliRunner  # noqa: E402

from khibernate.cli import cli  # noqa: E402
from tests.image import basefiles  # noqa: E402
from tests.image.fuzzing import INTERESTING, Mutation  # noqa: E402

FORMATS = ["khi", "kdump-zlib", "kdump-zstd", "kdump-flat", "elf64", "elf32", "raw"]
COMMANDS = ["info", "verify", "read", "dmesg", "save", "export"]
READ_AT, READ_SIZE = 0x100000, 4 * 4096
LIMIT_AS = 2 << 30
TIMEOUT = 20


def mutation(rnd: random.Random, size: int) -> list[Mutation]:
    """1-3 random mutations, offsets biased to both ends of the file."""
    out = []
    for _ in range(rnd.choice([1, 1, 2, 3])):
        off = rnd.choice([rnd.randrange(min(size, 8192)), max(0, size - rnd.randrange(1, 512)), rnd.randrange(size)])
        kind = rnd.choice(["truncate", "flip", "flip", "set", "set", "set"])
        value = rnd.choice(INTERESTING + [rnd.getrandbits(64)]) if kind == "set" else rnd.randrange(255)
        out.append(Mutation(kind, off, value, rnd.choice([1, 2, 4, 8])))
    return out


def argv(cmd: str, path: Path, hdr: Path | None, work: Path) -> list[str]:
    """The command line for one run."""
    extra = ["--elfcorehdr", str(hdr)] if hdr else []
    return {
        "info": ["info", str(path), *extra],
        "verify": ["verify", str(path), *extra],
        "read": ["read", str(path), "--paddr", hex(READ_AT), "--size", str(READ_SIZE), "--raw", *extra],
        "dmesg": ["dmesg", str(path), *extra],
        "save": ["save", str(path), str(work / "out.khi"), "-d", "1", "--no-sync", *extra],
        "export": ["export", str(path), str(work / "out.kdump"), "--format", "kdump", "--no-sync", *extra],
    }[cmd]


def child(args: list[str], is_khi: bool, changed_khi: bool, want: bytes, work: Path, wfd: int) -> None:
    """Run one command in this forked process; write the outcome to ``wfd`` and exit."""
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
    try:
        r = CliRunner().invoke(cli, ["image", *args])
        exc = r.exception
        if exc is not None and not isinstance(exc, SystemExit):
            outcome = "MEMORY" if isinstance(exc, MemoryError) else "TRACEBACK"
            detail = f"{type(exc).__name__}: {exc}"[:200]
        elif r.exit_code == 0:
            outcome, detail = "ok", ""
            if args[0] == "read" and r.stdout_bytes != want:
                outcome = "WRONG" if is_khi else "unchecked"
                detail = "read returned other bytes"
            elif changed_khi and args[0] == "verify":
                outcome, detail = "WRONG", "a changed .khi passed verify"
        else:
            err = r.stderr.strip().splitlines()
            outcome = "error" if err and (err[-1].startswith("error: ") or err[-1].startswith("Error: ")) else \
                "TRACEBACK"
            detail = err[-1][:200] if err else ""
        left = sorted(p.name for p in work.iterdir() if p.name not in ("out.khi", "out.kdump", "input", "hdr"))
        if left or any(p.is_symlink() or not p.is_file() for p in work.iterdir()):
            outcome, detail = "UNSAFE", f"left behind {left}"
    except MemoryError:
        outcome, detail = "MEMORY", "MemoryError"
    os.write(wfd, json.dumps([outcome, detail]).encode())
    os._exit(0)


def run_one(args: list[str], is_khi: bool, changed_khi: bool, want: bytes, work: Path) -> tuple[str, str]:
    """Fork, run, collect (outcome, detail)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            child(args, is_khi, changed_khi, want, work, wfd)
        finally:
            os._exit(3)
    os.close(wfd)
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rfd)
            return "HANG", " ".join(args)
        time.sleep(0.002)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    if not data:
        return "MEMORY" if os.WIFSIGNALED(status) else "TRACEBACK", f"child died, status {status}"
    outcome, detail = json.loads(data)
    return outcome, detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    counts: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bad: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        base = basefiles.build(Path(d))
        want = bytes(basefiles.memory()[READ_AT:READ_AT + READ_SIZE])
        originals = {f: (base["elfcorehdr"] if f == "raw" else base[f]).read_bytes() for f in FORMATS}
        for i in range(a.mutations):
            fmt = FORMATS[i % len(FORMATS)]
            orig = originals[fmt]
            data = orig
            muts = mutation(rnd, len(orig))
            for m in muts:
                data = m.apply(data)
            for cmd in COMMANDS:
                with tempfile.TemporaryDirectory(dir=d) as w:
                    work = Path(w)
                    (work / ("hdr" if fmt == "raw" else "input")).write_bytes(data)
                    path, hdr = (base["raw"], work / "hdr") if fmt == "raw" else (work / "input", None)
                    outcome, detail = run_one(argv(cmd, path, hdr, work), fmt == "khi",
                                              fmt == "khi" and data != orig, want, work)
                counts[(fmt, cmd)][outcome] += 1
                if outcome not in ("ok", "error", "unchecked"):
                    bad.append(f"{outcome} {fmt} {cmd} {muts}: {detail}")
    runs = sum(sum(c.values()) for c in counts.values())
    print(f"fuzz campaign: {a.mutations} mutations, {runs} runs, {time.monotonic() - t0:.0f} s, seed {a.seed}")
    kinds = ["ok", "error", "unchecked", "TRACEBACK", "HANG", "MEMORY", "WRONG", "UNSAFE"]
    print(f"{'format':<11} {'command':<7} " + " ".join(f"{k:>9}" for k in kinds))
    for (fmt, cmd), c in sorted(counts.items(), key=lambda kv: (FORMATS.index(kv[0][0]), COMMANDS.index(kv[0][1]))):
        print(f"{fmt:<11} {cmd:<7} " + " ".join(f"{c[k]:>9}" for k in kinds))
    total: collections.Counter[str] = collections.Counter()
    for c in counts.values():
        total.update(c)
    print(f"{'total':<19} " + " ".join(f"{total[k]:>9}" for k in kinds))
    for line in bad[:40]:
        print("  " + line)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
