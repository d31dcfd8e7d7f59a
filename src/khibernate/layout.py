"""Named binary layouts: a struct declared once as (name, code) fields, packed and unpacked by field name, with the
bounds check in one place (pyelftools' ``structs.py`` is the model).

    EHDR = Layout("Elf64_Ehdr", "<", [("e_ident", "16s"), ("e_type", "H"), ...])
    EHDR.pack(e_type=4, ...)            # missing fields are 0 / b""
    f = EHDR.unpack(data, 0, error=TruncatedError, what="ELF header");  f["e_phoff"]
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from khibernate.errors import LayoutError as LayoutError


class Record(dict[str, Any]):
    """Fields by name; an integer index gives the raw value at that position, as ``struct.Struct.unpack`` would
    (for callers written against the struct it replaced)."""

    def __init__(self, fields: dict[str, Any], raw: tuple[Any, ...]):
        super().__init__(fields)
        self.raw = raw

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self.raw[key]
        return super().__getitem__(key)


def _repeat(code: str) -> int:
    """Values a field code unpacks to: 1 for "16s" or "Q", 7 for "7Q"."""
    digits = code[:-1]
    return int(digits) if digits and code[-1] not in "sx" else 1


class Layout:
    """A fixed-size record: fields by name, ``pack``/``unpack`` by name, sizes and offsets known."""

    def __init__(self, name: str, byte_order: str, fields: Sequence[tuple[str, str]]):
        self.name = name
        self.fields = tuple(fields)
        self.format = byte_order + "".join(code for _, code in self.fields)
        self.struct = struct.Struct(self.format)
        self.size = self.struct.size
        self.names = tuple(n for n, code in self.fields if not code.endswith("x"))
        self.offsets: dict[str, int] = {}
        off = 0
        for n, code in self.fields:
            self.offsets[n] = off
            off += struct.calcsize(byte_order + code)
        # values per named field: a repeated number ("7Q") is one field holding a tuple
        self._counts = tuple(_repeat(code) for n, code in self.fields if not code.endswith("x"))
        self._defaults = tuple(b"" if code.endswith("s") else (0,) * _repeat(code) if _repeat(code) > 1 else 0
                               for n, code in self.fields if not code.endswith("x"))

    def pack(self, *args: Any, **values: Any) -> bytes:
        """Bytes of the record from positional values in field order and/or by name (absent fields are 0)."""
        if args and values:
            raise TypeError(f"{self.name}.pack: give values by position or by name, not both")
        if args:
            return self.struct.pack(*args)
        unknown = set(values) - set(self.names)
        if unknown:
            raise TypeError(f"{self.name} has no field {sorted(unknown)[0]!r}")
        flat: list[Any] = []
        for n, d, c in zip(self.names, self._defaults, self._counts, strict=True):
            v = values.get(n, d)
            if c > 1:
                flat.extend(v)
            else:
                flat.append(v)
        try:
            return self.struct.pack(*flat)
        except struct.error as e:
            raise LayoutError(self._misfit(values) or f"{self.name}: {e}") from None

    def _misfit(self, values: dict[str, Any]) -> str | None:
        """Which named value does not fit its field (for the message of a failed pack), or None."""
        order = self.format[0]
        for n, code in self.fields:
            if n not in values or code.endswith("x"):
                continue
            v = values[n]
            try:
                struct.pack(order + code, *(v if _repeat(code) > 1 else (v,)))
            except struct.error as e:
                return f"{self.name}.{n} = {v!r} does not fit its field ({code}: {e})"
        return None

    def pack_into(self, buf: bytearray, offset: int, **values: Any) -> None:
        """Write the record into ``buf`` at ``offset``."""
        buf[offset:offset + self.size] = self.pack(**values)

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0, *,
               error: type[Exception] = LayoutError, what: str = "") -> Record:
        """The fields at ``offset`` by name; ``error`` (with ``what`` in its message) if ``data`` is too short."""
        if offset < 0 or len(data) - offset < self.size:
            raise error(f"{what or self.name} cut short: {self.size} bytes needed at offset {offset}, "
                        f"{max(0, len(data) - offset)} there; the file is truncated or corrupt")
        raw = self.struct.unpack_from(data, offset)
        out: dict[str, Any] = {}
        i = 0
        for n, c in zip(self.names, self._counts, strict=True):
            out[n] = raw[i] if c == 1 else tuple(raw[i:i + c])
            i += c
        return Record(out, raw)

    def unpack_from(self, data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Any, ...]:
        """The raw value tuple (struct.Struct compatible); callers that check bounds themselves."""
        return self.struct.unpack_from(data, offset)

    def field(self, name: str) -> struct.Struct:
        """The struct of one named field (its code in this layout's byte order)."""
        code = dict(self.fields)[name]
        return struct.Struct(self.format[0] + code)

    def get(self, data: bytes | bytearray | memoryview, name: str, offset: int = 0) -> Any:
        """One field of the record at ``offset`` (the caller checked the bounds)."""
        f = self.field(name)
        v = f.unpack_from(data, offset + self.offsets[name])
        return v[0] if len(v) == 1 else v

    def set(self, buf: bytearray, name: str, value: Any, offset: int = 0) -> None:
        """Write one field of the record at ``offset`` into ``buf`` (the rest of the record untouched)."""
        self.field(name).pack_into(buf, offset + self.offsets[name], value)
