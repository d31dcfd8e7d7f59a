"""Which dependencies the capture initramfs bundles: a requirement's environment marker is evaluated for the
interpreter that is bundled (a plain `pip install .` has no typing-extensions, which cryptography needs only
before Python 3.11, and the bundle must not ask for it)."""

from __future__ import annotations

import sys

import pytest

from khibernate.initramfs.python import needed_here

OLDER = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.mark.parametrize(("requirement", "name"), [
    ("zstandard>=0.21", "zstandard"),
    ("typing-extensions>=4.13.2 ; python_full_version < '3.11'", None),
    (f"tomli ; python_version < '{OLDER}'", None),
    (f"exceptiongroup ; python_version >= '{OLDER}'", "exceptiongroup"),
    ("pytest ; extra == 'test'", None),
    ("pywin32 ; sys_platform == 'win32'", None),
    ("cffi>=1.14 ; platform_python_implementation != 'PyPy'", "cffi"),
    ("appnope ; platform_system == 'Darwin'", None),
])
def test_a_requirement_is_bundled_only_where_its_marker_holds(requirement: str, name: str | None) -> None:
    assert needed_here(requirement) == name
