"""Pure parts of the debug-info hypervisor build: the config check and the source version order."""

from __future__ import annotations

import shutil

import pytest

from vmtest import xen_build

DEBIAN = """#
# Automatically generated file; DO NOT EDIT.
CONFIG_X86_64=y
# CONFIG_SHADOW_PAGING is not set
CONFIG_SCHED_DEFAULT="credit2"
# CONFIG_EXPERT is not set
# CONFIG_DEBUG is not set
"""
FRAGMENT = """CONFIG_EXPERT=y
CONFIG_DEBUG_INFO=y
# CONFIG_GDBSX is not set
"""


def test_wanted_config_is_debians_with_the_fragment_on_top():
    w = xen_build.wanted_config(DEBIAN, FRAGMENT)
    assert w["CONFIG_EXPERT"] == "y" and w["CONFIG_DEBUG_INFO"] == "y" and w["CONFIG_GDBSX"] == "n"
    assert w["CONFIG_SHADOW_PAGING"] == "n" and w["CONFIG_SCHED_DEFAULT"] == '"credit2"'


def test_config_check():
    wanted = xen_build.wanted_config(DEBIAN, FRAGMENT)
    good = DEBIAN.replace("# CONFIG_EXPERT is not set", "CONFIG_EXPERT=y") + (
        "CONFIG_DEBUG_INFO=y\n# CONFIG_GDBSX is not set\n# CONFIG_UBSAN is not set\n")
    assert xen_build.config_mismatches(good, wanted) == []
    # an option Debian has that changed, a fragment option that did not stick, a new option that is on
    bad = good.replace("# CONFIG_SHADOW_PAGING is not set", "CONFIG_SHADOW_PAGING=y")
    bad = bad.replace("CONFIG_DEBUG_INFO=y", "# CONFIG_DEBUG_INFO is not set") + "CONFIG_FRAME_POINTER=y\n"
    found = xen_build.config_mismatches(bad, wanted)
    assert len(found) == 3, found
    assert any("SHADOW_PAGING" in f for f in found) and any("DEBUG_INFO" in f for f in found)
    assert any(f.startswith("CONFIG_FRAME_POINTER=y") for f in found)


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="Debian version order needs dpkg")
def test_preference_wanted_first_then_newest_4_17():
    got = xen_build.preference("4.17.7+13-g2445b30a44-0+deb12u1",
                               ["4.17.5+72-g01140da4e8-1", "4.17.7+13-g2445b30a44-0+deb12u1", "4.20.1-1",
                                "4.17.5+23-ga4e5191dc0-1", "4.17.5+72-g01140da4e8-1"])
    assert got == ["4.17.7+13-g2445b30a44-0+deb12u1", "4.17.5+72-g01140da4e8-1", "4.17.5+23-ga4e5191dc0-1"]


def test_recipe_hash_follows_the_fragment(tmp_path, monkeypatch):
    before = xen_build.recipe_hash()
    frag = tmp_path / "xen-debug.config"
    frag.write_text(xen_build.FRAGMENT.read_text() + "CONFIG_FRAME_POINTER=y\n")
    monkeypatch.setattr(xen_build, "FRAGMENT", frag)
    assert xen_build.recipe_hash() != before
