"""Fuzzing every reader with mutations of small real files: any truncation or corruption gives a khibernate
ImageError with a message (never another exception), allocates boundedly, finishes quickly; any changed byte of a
.khi (all of which are checksummed) is refused.

Profiles (python-zstandard's fuzzing tests are the model): ``fast`` for a plain ``pytest``, ``ci`` (many more
examples) when KHIBERNATE_FUZZ_PROFILE=ci, as scripts/test.sh sets it.
"""

from __future__ import annotations

import os
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.image import basefiles
from tests.image.fuzzing import INTERESTING, Mutation, run_contract

# no deadline: these tests assert what a reader does with bad bytes, not how fast (CI runs them beside TCG guests,
# where one example took over 2 s)
settings.register_profile("fast", max_examples=30, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("KHIBERNATE_FUZZ_PROFILE", "fast")
MEMORY_BOUND = 64 << 20  # bytes Python may allocate while reading a ~300 KiB input

FORMATS = ["khi", "kdump-zlib", "kdump-zstd", "kdump-flat", "elf64", "elf32", "raw"]


@pytest.fixture(scope="module")
def base() -> Iterator[dict[str, Path]]:
    with tempfile.TemporaryDirectory() as d:
        yield basefiles.build(Path(d))


def mutations(size: int) -> st.SearchStrategy[list[Mutation]]:
    """1-3 mutations, offsets biased to the headers at both ends of the file."""
    offset = st.one_of(st.integers(0, min(size, 8192)), st.integers(max(0, size - 512), size),
                       st.integers(0, size))
    one = st.one_of(
        st.builds(Mutation, st.just("truncate"), offset),
        st.builds(Mutation, st.just("flip"), offset, st.integers(0, 254)),
        st.builds(Mutation, st.just("set"), offset, st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1),
                  st.sampled_from([1, 2, 4, 8])),
    )
    return st.lists(one, min_size=1, max_size=3)


def _mutated(base: dict[str, Path], fmt: str, muts: list[Mutation], out: Path) -> tuple[Path, Path | None, bool]:
    """(input, elfcorehdr or None, changed?) after applying ``muts`` to the format's parsed file."""
    target = base["elfcorehdr"] if fmt == "raw" else base[fmt]
    orig = target.read_bytes()
    data = orig
    for m in muts:
        data = m.apply(data)
    out.write_bytes(data)
    if fmt == "raw":
        return base["raw"], out, data != orig
    return out, None, data != orig


def _check(base: dict[str, Path], fmt: str, muts: list[Mutation]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path, hdr, changed = _mutated(base, fmt, muts, Path(d) / "input")
        tracemalloc.start()
        try:
            outcome, _ = run_contract(path, hdr)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"{fmt}: {peak} bytes allocated for {muts}"
    if fmt == "khi" and changed:
        assert outcome == "error", f"a .khi changed by {muts} passed verify"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_reader(base: dict[str, Path], fmt: str) -> None:
    size = (base["elfcorehdr"] if fmt == "raw" else base[fmt]).stat().st_size

    @settings(settings.get_profile(PROFILE))
    @given(mutations(size))
    def run(muts: list[Mutation]) -> None:
        _check(base, fmt, muts)

    run()


def test_base_files_read_back(base: dict[str, Path]) -> None:
    """The unmutated inputs read fully (else the fuzz tests would test nothing)."""
    for fmt in FORMATS:
        outcome, seen = run_contract(base[fmt], base["elfcorehdr"] if fmt == "raw" else None)
        assert outcome == "ok", (fmt, seen)


def test_fuzz_vmcoreinfo_text() -> None:
    """Any VMCOREINFO text: parse and every typed getter give a value or an ImageError."""
    from khibernate.image.errors import ImageError
    from khibernate.image.vmcoreinfo import Vmcoreinfo

    keys = ["OSRELEASE", "PAGESIZE", "KERNELOFFSET", "CRASHTIME", "SYMBOL(prb)", "NUMBER(phys_base)",
            "OFFSET(page.flags)", "SIZE(page)", "LENGTH(mem_section)", "BUILD-ID"]
    line = st.tuples(st.sampled_from(keys) | st.text(max_size=12), st.sampled_from(["=", "", "=="]),
                     st.text(max_size=20) | st.sampled_from(["4096", "0x10", "abc", "-1", "99999999999999999999"]))

    @settings(settings.get_profile(PROFILE))
    @given(st.lists(line, max_size=12))
    def run(lines: list[tuple[str, str, str]]) -> None:
        text = "\n".join(k + s + v for k, s, v in lines)
        try:
            v = Vmcoreinfo.parse(text)
        except ImageError:
            return
        for get in (lambda: v.page_size, lambda: v.kerneloffset, lambda: v.crashtime, lambda: v.symbol("prb"),
                    lambda: v.number("phys_base"), lambda: v.offset("page.flags"), lambda: v.size("page"),
                    lambda: v.length("mem_section"), lambda: v.number_or("phys_base", 0), lambda: v.osrelease):
            try:
                get()
            except ImageError as e:
                assert str(e)

    run()


# every number the synthetic kernel's VMCOREINFO holds, and values around what breaks arithmetic on them
NUMBER_VALUES = [0, 1, 7, 11, 12, 20, 31, 32, 63, 64, 65, 200, 4095, 4096, -1, -5, 1 << 31, 1 << 32, (1 << 63) - 1,
                 1 << 63, (1 << 64) - 1, 1 << 64, 10 ** 30, -(1 << 63), -(1 << 70)]


def _with_numbers(text: str, changes: list[tuple[str, int]]) -> str:
    """VMCOREINFO ``text`` with the given keys' values replaced (hex for addresses, as the kernel prints them)."""
    lines = dict(line.split("=", 1) for line in text.splitlines())
    for key, v in changes:
        hexed = key.startswith("SYMBOL(") or key == "KERNELOFFSET"
        lines[key] = ("-" if v < 0 else "") + (f"{abs(v):x}" if hexed else str(abs(v)))
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def test_fuzz_vmcoreinfo_numbers_in_a_save(synth: object, synth_elf: Path, tmp_path: Path) -> None:
    """Issue 18: any VMCOREINFO number (SECTION_SIZE_BITS, MAX_PHYSMEM_BITS, SIZE(mem_section), struct page
    offsets, page orders, flag bits, addresses ...) changed to anything: `image save -d 31` either saves or stops
    with one ImageError - never a negative shift, a division by zero or a read outside struct page."""
    from khibernate.image.errors import ImageError
    from khibernate.image.sources import open_source
    from khibernate.image.sources.khi import save
    from khibernate.image.vmcoreinfo import Vmcoreinfo

    text = synth.vmcoreinfo  # type: ignore[attr-defined]
    keys = sorted(k for k, _, v in (line.partition("=") for line in text.splitlines())
                  if k not in ("OSRELEASE", "BUILD-ID") and v)
    value = st.sampled_from(NUMBER_VALUES) | st.integers(-(1 << 66), 1 << 66)
    out = tmp_path / "o.khi"

    with open_source(synth_elf) as src:
        @settings(settings.get_profile(PROFILE))
        @given(st.lists(st.tuples(st.sampled_from(keys), value), min_size=1, max_size=3))
        def run(changes: list[tuple[str, int]]) -> None:
            try:
                vmci = Vmcoreinfo.parse(_with_numbers(text, changes))
                with open(out, "wb") as f:
                    save(src, f, vmci=vmci, level=31)
            except ImageError as e:
                assert str(e)

        run()
