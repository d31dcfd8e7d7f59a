"""Fuzzing the sealed format (tests/image/test_fuzz.py's contract and profiles): any mutation of a sealed .khi -
with its CRCs left as they fall or made to agree again (tests/seal/forge.py) - is refused with an ImageError
carrying a message, with bounded memory, whatever it hits (header, key slots, blocks, tables, seal, trailer)."""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from khibernate.image.errors import ImageError
from khibernate.image.sources.khi import KhiSource
from khibernate.seal.keysource import KeyFile, Passphrase
from khibernate.seal.sealing import Sealing
from tests.image.fuzzing import Mutation, exercise
from tests.image.test_fuzz import MEMORY_BOUND, PROFILE, mutations
from tests.seal import forge

Keys = tuple[KeyFile, Passphrase, Sealing]


def _outcome(data: bytes, key: KeyFile) -> str:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.khi"
        p.write_bytes(data)
        try:
            with KhiSource(p, key=key) as src:
                exercise(src)
            return "ok"
        except ImageError as e:
            assert str(e), f"{type(e).__name__} without a message"
            return "error"


def test_fuzz_sealed_reader(sealed: Path, keys: Keys) -> None:
    orig = sealed.read_bytes()
    assert _outcome(orig, keys[0]) == "ok"

    @settings(settings.get_profile(PROFILE))
    @given(mutations(len(orig)), st.booleans())
    def run(muts: list[Mutation], fix_crcs: bool) -> None:
        data = orig
        for m in muts:
            data = m.apply(data)
        if fix_crcs:
            try:
                data = forge.rechecksum(data)
            except Exception:  # noqa: BLE001 - the forger cannot parse what it broke: test the plain mutation
                pass
        tracemalloc.start()
        try:
            outcome = _outcome(data, keys[0])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"{peak} bytes allocated for {muts}"
        if data != orig:
            assert outcome == "error", f"a sealed .khi changed by {muts} (CRCs fixed: {fix_crcs}) was accepted"

    run()
