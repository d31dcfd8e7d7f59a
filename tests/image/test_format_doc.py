"""docs/image-format.md says what khibernate/image/layouts/khi.py declares: struct formats, field offsets and sizes,
version."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from khibernate.image.layouts import khi

DOC = (Path(__file__).resolve().parents[2] / "docs" / "image-format.md").read_text()


def fields(fmt: str) -> list[tuple[int, int]]:
    """(offset, size) of each field of a struct format; a repeat count makes one field ("65s", "7Q", "2x")."""
    out, off = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt.lstrip("<>=!@")):
        size = struct.calcsize("<" + (count or "1") + code)
        out.append((off, size))
        off += size
    return out


def section_rows(title: str) -> list[tuple[int, int]]:
    """(offset, size) rows of the first table after the heading that starts with ``title``."""
    text = DOC[DOC.index("## " + title):]
    text = text[:text.index("\n## ", 4)] if "\n## " in text[4:] else text
    return [(int(a), int(b)) for a, b in re.findall(r"^\| (\d+) \| (\d+) \|", text, re.M)]


def test_struct_formats_match() -> None:
    for name in ("HEADER", "RANGE", "INDEX", "TRAILER"):
        m = re.search(rf'`{name} = "([^"]+)"`', DOC)
        assert m, f"docs/image-format.md does not give {name}"
        assert m.group(1) == getattr(khi, name).format, name


def test_field_tables_match() -> None:
    assert section_rows("Header") == fields(khi.HEADER.format)
    assert section_rows("Block index") == fields(khi.INDEX.format)
    assert section_rows("Trailer") == fields(khi.TRAILER.format)


def test_version_and_constants() -> None:
    assert f"version {khi.VERSION}" in DOC.splitlines()[0]
    assert '`BLOCK_BIND`' in DOC and '"<QQII"' in DOC and khi.BLOCK_BIND.format == "<QQII"
    assert all(f"- **{v}**" in DOC for v in khi.READ_VERSIONS)
    assert f'`SEAL = "{khi.SEAL.format}"`' in DOC and f'`BLOCK_AD = "{khi.BLOCK_AD.format}"`' in DOC
    magic = " ".join(f"{b:02X}" for b in khi.MAGIC)
    assert magic in DOC


def section_names(title: str) -> list[str]:
    """The first `name` of each table row after the heading ``title`` ('—' rows are padding)."""
    text = DOC[DOC.index("## " + title):]
    text = text[:text.index("\n## ", 4)]
    out = []
    for row in re.findall(r"^\| \d+ \| \d+ \|(.*)$", text, re.M):
        m = re.search(r"`([a-z_0-9]+)`", row)
        out.append(m.group(1) if m else "—")
    return out


def test_field_names_match() -> None:
    for title, lay in (("Header", khi.HEADER), ("Block index", khi.INDEX)):
        want = ["—" if code.endswith("x") else name for name, code in lay.fields]
        assert section_names(title) == want, title
