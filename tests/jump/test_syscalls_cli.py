import errno

from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.jump import syscalls
from khibernate.jump.errors import NotRoot
from khibernate.jump.kexec_abi import KEXEC_PRESERVE_CONTEXT
from khibernate.jump.syscalls import Context, explain


def test_explain():
    e = explain("kexec_load", errno.EPERM, 0, Context(euid=1000))
    assert isinstance(e, NotRoot) and "root" in str(e)
    e = explain("kexec_load", errno.EPERM, KEXEC_PRESERVE_CONTEXT, Context(0, lockdown="integrity"))
    assert "kexec_load is blocked by kernel lockdown" in str(e) and "kexec jump needs kexec_load" in str(e)
    e = explain("kexec_load", errno.EPERM, 0, Context(0, kexec_load_disabled=True))
    assert "kexec_load_disabled" in str(e)
    e = explain("kexec_load", errno.EINVAL, KEXEC_PRESERVE_CONTEXT, Context(0, segments=("kernel at 0x1000+0x2000",)))
    assert "CONFIG_KEXEC_JUMP" in str(e) and "kernel at 0x1000" in str(e)
    assert "retry" in str(explain("kexec_load", errno.EBUSY, 0, Context(0)))
    assert "--syscall load" in str(explain("kexec_file_load", errno.ENOEXEC, 0, Context(0)))
    assert "no kexec image is loaded" in str(explain("reboot", errno.EINVAL, 0, Context(0)))
    assert explain("kexec_load", errno.ENOMEM, 0, Context(0)).errno == errno.ENOMEM


def test_cffi_binding_builds():
    ffi, lib = syscalls._libc()
    assert ffi.sizeof("struct kexec_segment") == 32
    assert lib.syscall(ffi.cast("long", 39)) > 0  # getpid through the same variadic binding


def test_cli_errors_no_traceback(tmp_path):
    bad = tmp_path / "notakernel"
    bad.write_bytes(b"hello" * 1000)
    r = CliRunner().invoke(cli, ["kexec", "load", str(bad), "--syscall", "load", "--dry-run"])
    assert r.exit_code != 0
    assert r.output.startswith("error: notakernel: not an x86 bzImage") and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["kexec", "load", str(bad), "--append", "a", "--command-line", "b"])
    assert r.exit_code == 2 and "not both" in r.output


def test_cli_help_teaches():
    r = CliRunner().invoke(cli, ["jump", "--help"])
    assert r.exit_code == 0 and "--load-preserve-context" in r.output and "jump back" in r.output
    for group in ("kexec", "kdump"):
        assert CliRunner().invoke(cli, [group, "--help"]).exit_code == 0


def test_generated_cffi_module_matches(tmp_path):
    """The carried out-of-line module is what cffi generates from syscalls.CDEF."""
    out = tmp_path / "gen.py"
    syscalls.generate(out)
    assert out.read_text() == syscalls.GENERATED.read_text()


def test_reuse_cmdline(monkeypatch, tmp_path):
    from khibernate.jump import cli as jcli
    from khibernate.system import SystemRoot

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda crashkernel=256M quiet "
                                           "kexec_jump_back_entry=0x1\n")
    assert jcli._cmdline("console=ttyS0", None, True, SystemRoot(tmp_path)) == "root=/dev/vda quiet console=ttyS0"
    assert jcli._cmdline(None, "a b", False) == "a b"


def test_every_option_has_help():
    import click

    def options(cmd: click.Command, path: str):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from options(sub, f"{path} {name}")
        for p in cmd.params:
            if isinstance(p, click.Option):
                yield path, p

    missing = [f"{path} {'/'.join(p.opts)}" for path, p in options(cli, "khibernate") if not p.help]
    assert missing == []


def test_load_commands_take_the_same_command_line_options(monkeypatch, tmp_path):
    """kexec load, kdump load and jump load: --append or --command-line (not both), and --reuse-cmdline."""
    from khibernate.jump import api

    seen = []
    monkeypatch.setattr(api, "plan_jump", lambda kernel, initrd, cmdline, *a: seen.append(cmdline) or 1 / 0)
    monkeypatch.setattr(api, "plan_kexec", lambda kernel, initrd, cmdline: seen.append(cmdline) or 1 / 0)
    monkeypatch.setattr(api, "file_load", lambda kernel, initrd, cmdline, crash=False: seen.append(cmdline) or 1 / 0)
    k = tmp_path / "k"
    k.write_bytes(b"x")
    for cmd in (["kexec", "load", "--syscall", "load"], ["kexec", "load"], ["kdump", "load"], ["jump", "load"]):
        names = {o for p in cli.get_command(None, cmd[0]).get_command(None, "load").params for o in p.opts}
        assert {"--append", "--command-line", "--reuse-cmdline", "--initrd"} <= names, cmd
        r = CliRunner().invoke(cli, [*cmd, str(k), "--append", "a", "--command-line", "b"])
        assert r.exit_code == 2 and "not both" in r.output, (cmd, r.output)
        seen.clear()
        CliRunner().invoke(cli, [*cmd, str(k), "--command-line", "console=ttyS0"])
        assert seen == ["console=ttyS0"], cmd


def test_address_options_take_sizes_and_refuse_octal_cleanly(tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"x")
    r = CliRunner().invoke(cli, ["jump", "load", str(k), "--mem-min", "010M", "--mem-max", "0x3effffff"])
    assert r.exit_code == 2 and "Invalid value for '--mem-min'" in r.output and "leading zero" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    r = CliRunner().invoke(cli, ["jump", "back", "--load-only", "--entry", "1.5G"])
    assert r.exit_code == 2 and "not a number" in r.output
