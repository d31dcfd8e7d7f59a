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


def fingerprint(root: Path) -> list[tuple[str, str, int, str]]:
    """Every node under ``root``: path, kind, mode, content (a file) or link target (a symlink)."""
    out = []
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out.append((str(p.relative_to(root)), "link", st.st_mode, str(p.readlink())))
        elif p.is_dir():
            out.append((str(p.relative_to(root)), "dir", st.st_mode, ""))
        else:
            out.append((str(p.relative_to(root)), "file", st.st_mode, p.read_text()))
    return out


def fake_root(root: Path, hibernate_dir: bool, logind_dir: bool) -> Path:
    """A Debian-like /etc with systemd's unit directory, the drop-in directories present or not (a present one
    empty, or holding the admin's own drop-in)."""
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    (root / "etc/systemd/system/multi-user.target.wants/cron.service").symlink_to("/lib/systemd/system/cron.service")
    (root / "etc/hostname").write_text("debian\n")
    if hibernate_dir:  # left behind, empty, by an earlier `systemctl edit systemd-hibernate.service`
        (root / "etc/systemd/system/systemd-hibernate.service.d").mkdir()
    if logind_dir:
        (root / "etc/systemd/system/systemd-logind.service.d").mkdir()
        (root / "etc/systemd/system/systemd-logind.service.d/admin.conf").write_text("[Login]\nKillUserProcesses=no\n")
    return root


@pytest.mark.parametrize(("hibernate_dir", "logind_dir"), [(False, False), (True, False), (True, True)])
def test_setup_then_remove_leaves_the_system_as_found(tmp_path, hibernate_dir, logind_dir):
    """setup then setup --remove, acted out (cli.apply) on a fake root: every file, directory, mode and symlink as
    before — a drop-in directory that was there before (even empty) stays, one setup made goes."""
    from khibernate.install import cli

    root = fake_root(tmp_path / "root", hibernate_dir, logind_dir)
    before = fingerprint(root)
    d = ready(tmp_path / "proc-tree")
    said: list[str] = []
    p = setup_plan.plan_setup(TARGET, cli.read_existing(root), False, d, PACKAGED, cli.present_dirs(root))
    cli.apply(p, said.append, initramfs=False, root=root)
    assert all((root / path.lstrip("/")).is_file() for path in setup_plan.OWNED)
    again = setup_plan.plan_setup(TARGET, cli.read_existing(root), True, d, PACKAGED, cli.present_dirs(root))
    assert not again.changed  # idempotent, also about the directories it recorded
    cli.apply(setup_plan.plan_remove(cli.read_existing(root), True), said.append, initramfs=False, root=root)
    assert fingerprint(root) == before, said


def test_remove_keeps_a_directory_setup_made_when_it_holds_other_files_now(tmp_path):
    from khibernate.install import cli

    root = fake_root(tmp_path / "root", False, False)
    p = setup_plan.plan_setup(TARGET, cli.read_existing(root), False, ready(tmp_path / "proc-tree"), PACKAGED,
                              cli.present_dirs(root))
    cli.apply(p, print, initramfs=False, root=root)
    mine = root / "etc/systemd/system/systemd-logind.service.d/admin.conf"
    mine.write_text("[Service]\n")  # the admin's drop-in, added after setup
    said: list[str] = []
    cli.apply(setup_plan.plan_remove(cli.read_existing(root), True), said.append, initramfs=False, root=root)
    assert mine.read_text() == "[Service]\n"
    assert not (root / "etc/systemd/system/systemd-hibernate.service.d").exists()
    assert any("keep /etc/systemd/system/systemd-logind.service.d" in s for s in said)


def test_the_config_records_the_directories_setup_created():
    conf = ResumeConfig(TARGET, setup_plan.DROPIN_DIRS)
    assert parse(conf.render()) == conf
    assert setup_plan.recorded_dirs({CONF_PATH: conf.render()}) == setup_plan.DROPIN_DIRS
    assert setup_plan.recorded_dirs({CONF_PATH: "KHIBERNATE_CREATED_DIRS=/etc\n"}) == ()  # not setup's file


def test_setup_builds_the_capture_environment_and_says_why_when_it_cannot(tmp_path, monkeypatch):
    """setup prepares what the first hibernation boots (so `systemctl hibernate` only jumps); a build that fails is
    a reason hibernation cannot work yet, in plain words."""
    from khibernate.capture import snapshot
    from khibernate.initramfs.build import InitramfsError
    from khibernate.install import cli as setup_cli

    img = tmp_path / "capture.cpio.zst"
    img.write_bytes(b"\0" * (3 << 20))
    calls = []

    def built(kernel, target, given):
        calls.append((kernel, target, given))
        return str(img), len(calls) > 1

    monkeypatch.setattr(snapshot, "default_kernel", lambda: "/boot/vmlinuz-test")
    monkeypatch.setattr(snapshot, "capture_initrd_for", built)
    said: list[str] = []
    assert setup_cli.build_capture_environment("/var/lib/khibernate/store", said.append) is None
    assert calls == [("/boot/vmlinuz-test", "/var/lib/khibernate/store", None)]
    assert f"capture environment {img}: 3.0 MiB (built in" in said[-1]
    assert setup_cli.build_capture_environment("/var/lib/khibernate/store", said.append) is None
    assert said[-1].endswith("(cached)")

    def fails(kernel, target, given):
        raise InitramfsError("a store file needs dmsetup in the capture environment: apt-get install dmsetup")

    monkeypatch.setattr(snapshot, "capture_initrd_for", fails)
    why = setup_cli.build_capture_environment("/var/lib/khibernate/store", said.append)
    assert why == ("the capture environment could not be built: a store file needs dmsetup in the capture "
                   "environment: apt-get install dmsetup")
