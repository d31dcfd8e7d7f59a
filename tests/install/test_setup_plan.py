"""khibernate setup: the config file and the plan (pure), over diagnoses made from copied /proc trees."""

from pathlib import Path

import pytest

from khibernate.doctor import diagnose
from khibernate.install import plan as setup_plan
from khibernate.install.config import CONF_PATH, MARKER, ResumeConfig, parse
from khibernate.install.errors import ConfigError, SetupError
from tests.test_doctor import IOMEM, make_tree

TARGET = "/dev/disk/by-partuuid/0f3a9c1e-01"
PACKAGED = {setup_plan.HOOK: True, setup_plan.PREMOUNT: True}
NOTHING = {p: None for p in setup_plan.OWNED}


def ready(tmp: Path):
    return diagnose(make_tree(tmp), 0)


def test_config_round_trip_and_marker():
    text = ResumeConfig(TARGET).render()
    assert MARKER in text
    assert parse(text) == ResumeConfig(TARGET)


@pytest.mark.parametrize("bad", ["", "/dev/sd b", "/dev/x;reboot", "$(id)", "/dev/`x`", '/dev/"q"'])
def test_config_refuses_targets_a_shell_or_systemd_would_interpret(bad):
    with pytest.raises(ConfigError):
        ResumeConfig(bad).render()


def test_config_parse_errors_name_the_line():
    with pytest.raises(ConfigError, match="line 2"):
        parse("# ok\nnot a setting\n")
    with pytest.raises(ConfigError, match="KHIBERNATE_TARGET"):
        parse("# nothing\n")


def test_setup_writes_config_and_dropins_and_rebuilds_the_initramfs(tmp_path):
    p = setup_plan.plan_setup(TARGET, NOTHING, False, ready(tmp_path), PACKAGED)
    assert {c.path for c in p.changes} == set(setup_plan.OWNED)
    assert all(c.why == "create" and c.content and MARKER in c.content for c in p.changes)
    assert p.update_initramfs and p.reload_systemd and not p.missing
    dropin = next(c.content for c in p.changes if c.path == setup_plan.HIBERNATE_DROPIN)
    assert "ExecStart=\nExecStart=/usr/bin/khibernate hibernate --target ${KHIBERNATE_TARGET}" in dropin
    assert f"EnvironmentFile={CONF_PATH}" in dropin


def test_setup_twice_changes_nothing(tmp_path):
    d = ready(tmp_path)
    first = setup_plan.plan_setup(TARGET, NOTHING, False, d, PACKAGED)
    now = {c.path: c.content for c in first.changes}
    again = setup_plan.plan_setup(TARGET, now, True, d, PACKAGED)
    assert not again.changed


def test_setup_with_another_target_rewrites_only_the_config(tmp_path):
    d = ready(tmp_path)
    now = {c.path: c.content for c in setup_plan.plan_setup(TARGET, NOTHING, False, d, PACKAGED).changes}
    p = setup_plan.plan_setup("/dev/vdc", now, True, d, PACKAGED)
    assert [(c.path, c.why) for c in p.changes] == [(CONF_PATH, "update")]
    assert p.update_initramfs and not p.reload_systemd


def test_initramfs_without_the_target_is_rebuilt_even_when_files_are_in_place(tmp_path):
    d = ready(tmp_path)
    now = {c.path: c.content for c in setup_plan.plan_setup(TARGET, NOTHING, False, d, PACKAGED).changes}
    p = setup_plan.plan_setup(TARGET, now, False, d, PACKAGED)
    assert not p.changes and p.update_initramfs


def test_missing_crashkernel_and_kexec_jump_are_said_in_plain_words(tmp_path):
    iomem = "\n".join(line for line in IOMEM.splitlines() if "Crash" not in line) + "\n"
    d = diagnose(make_tree(tmp_path, iomem=iomem, config="CONFIG_KEXEC=y\nCONFIG_CRASH_DUMP=y\n"), 0)
    p = setup_plan.plan_setup(TARGET, NOTHING, False, d, {setup_plan.HOOK: False, setup_plan.PREMOUNT: True})
    text = "\n".join(p.missing)
    assert "crashkernel=256M" in text
    assert "CONFIG_KEXEC_JUMP is not set" in text
    assert f"{setup_plan.HOOK} is missing" in text
    assert p.changes  # setup still records the target: the user fixes the rest and reboots


def test_remove_takes_only_what_setup_wrote(tmp_path):
    now = {c.path: c.content for c in setup_plan.plan_setup(TARGET, NOTHING, False, ready(tmp_path),
                                                              PACKAGED).changes}
    now[setup_plan.LOGIND_DROPIN] = "[Service]\nEnvironment=MINE=1\n"  # the admin's own file
    p = setup_plan.plan_remove(now, True)
    assert {c.path for c in p.changes} == {CONF_PATH, setup_plan.HIBERNATE_DROPIN}
    assert all(c.content is None for c in p.changes)
    assert p.update_initramfs and p.reload_systemd
    assert setup_plan.foreign_files(now) == [setup_plan.LOGIND_DROPIN]


def test_remove_on_a_clean_system_changes_nothing():
    assert not setup_plan.plan_remove(NOTHING, False).changed



def test_setup_refuses_a_file_that_is_no_store_file_and_says_how_to_make_one(tmp_path):
    from khibernate.install.cli import check_target

    f = tmp_path / "store"
    f.write_bytes(bytes(2 << 20))
    with pytest.raises(SetupError, match=r"no usable store file .*target init .* --size S"):
        check_target(str(f), root=str(tmp_path))  # tmp_path's filesystem plays the root filesystem


def test_setup_refuses_a_store_file_outside_the_root_filesystem(tmp_path):
    from khibernate.install.cli import check_target

    f = tmp_path / "store"
    f.write_bytes(bytes(1 << 20))
    with pytest.raises(SetupError, match="not on the root filesystem"):
        check_target(str(f), root="/proc")  # /proc plays a root filesystem the file is not on
