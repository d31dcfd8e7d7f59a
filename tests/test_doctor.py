"""doctor: diagnose() over copied /proc, /sys and /boot trees."""

import gzip
import json
import os
from pathlib import Path

from click.testing import CliRunner

from khibernate.cli import cli
from khibernate.doctor import diagnose, render
from khibernate.system import SystemRoot, parse_iomem, parse_lockdown

IOMEM = """00000000-00000fff : Reserved
00001000-0009fbff : System RAM
00100000-3ffdcfff : System RAM
  2f000000-3effffff : Crash kernel
  3a000000-3ac01b3f : Kernel code
"""

GOOD_CONFIG = "CONFIG_KEXEC=y\nCONFIG_KEXEC_FILE=y\nCONFIG_CRASH_DUMP=y\nCONFIG_KEXEC_JUMP=y\n"


def make_tree(tmp: Path, *, config: str | None = GOOD_CONFIG, iomem: str = IOMEM, lockdown: str | None = None,
              disabled: int = 0) -> SystemRoot:
    (tmp / "proc/sys/kernel").mkdir(parents=True)
    (tmp / "sys/kernel/security").mkdir(parents=True)
    (tmp / "proc/sys/kernel/osrelease").write_text("6.12.117\n")
    (tmp / "proc/sys/kernel/kexec_load_disabled").write_text(f"{disabled}\n")
    (tmp / "proc/iomem").write_text(iomem)
    if config is not None:
        (tmp / "proc/config.gz").write_bytes(gzip.compress(config.encode()))
    if lockdown is not None:
        (tmp / "sys/kernel/security/lockdown").write_text(lockdown)
    (tmp / "sys/kernel/kexec_loaded").write_text("0\n")
    (tmp / "sys/kernel/kexec_crash_loaded").write_text("1\n")
    (tmp / "sys/kernel/kexec_crash_size").write_text("268435456\n")
    return SystemRoot(tmp)


def test_all_good(tmp_path):
    d = diagnose(make_tree(tmp_path), euid=0)
    assert d.possible("jump") and d.possible("kexec") and d.possible("kdump")
    text = " ".join(f.message for f in d.findings)
    assert "0x2f000000-0x3effffff (256 MiB)" in text
    assert "crash image loaded: yes" in text


def test_not_root_blocks_everything(tmp_path):
    d = diagnose(make_tree(tmp_path), euid=1000)
    assert [d.possible(f) for f in ("kexec", "kdump", "jump")] == [False, False, False]


def test_lockdown_blocks_only_jump(tmp_path):
    d = diagnose(make_tree(tmp_path, lockdown="none [integrity] confidentiality\n"), euid=0)
    assert d.possible("jump") is False and d.possible("kexec") is True
    assert any("kexec_load(2) is blocked" in f.message for f in d.findings)


def test_missing_kexec_jump(tmp_path):
    d = diagnose(make_tree(tmp_path, config="CONFIG_KEXEC=y\nCONFIG_CRASH_DUMP=y\n"), euid=0)
    assert d.possible("jump") is False and d.possible("kdump") is True


def test_no_config_is_unknown(tmp_path):
    d = diagnose(make_tree(tmp_path, config=None), euid=0)
    assert d.possible("jump") is None


def test_no_crash_region(tmp_path):
    d = diagnose(make_tree(tmp_path, iomem="00100000-3ffdcfff : System RAM\n"), euid=0)
    assert d.possible("kdump") is False and d.possible("jump") is False and d.possible("kexec") is True


def test_disabled(tmp_path):
    d = diagnose(make_tree(tmp_path, disabled=1), euid=0)
    assert d.possible("kexec") is False


def test_hidden_iomem_is_unknown(tmp_path):
    hidden = "00000000-00000000 : System RAM\n  00000000-00000000 : Crash kernel\n"
    d = diagnose(make_tree(tmp_path, iomem=hidden), euid=0)
    assert d.possible("kdump") is None


def test_parsers():
    regions = parse_iomem(IOMEM)
    assert regions[3].name == "Crash kernel" and regions[3].depth == 1 and regions[3].size == 256 << 20
    assert parse_lockdown("[none] integrity confidentiality") == "none"


def test_cli_exit_status_and_json(tmp_path):
    make_tree(tmp_path)
    r = CliRunner().invoke(cli, ["doctor", "--json", "--root", str(tmp_path)])
    expect_ok = os.geteuid() == 0
    assert r.exit_code == (0 if expect_ok else 1)
    assert json.loads(r.output)["possible"]["kdump"] is expect_ok


def test_doctor_on_this_machine_is_truthful():
    """On the development machine doctor must say no to jump unless it really is possible."""
    d = diagnose(SystemRoot(), os.geteuid())
    config, _ = SystemRoot().kernel_config()
    if config is not None and config.get("CONFIG_KEXEC_JUMP") != "y":
        assert d.possible("jump") is False


def _sysctls(root: SystemRoot, **values: int) -> SystemRoot:
    for name, val in values.items():
        (root.path / "proc/sys/kernel" / name).write_text(f"{val}\n")
    return root


def test_watch_needs_jump_and_names_what_panics(tmp_path):
    root = _sysctls(make_tree(tmp_path), panic_on_warn=1, panic_on_oops=0, hung_task_timeout_secs=120,
                    soft_watchdog=1)
    d = diagnose(root, euid=0)
    assert d.possible("watch") is True
    text = " ".join(f.message for f in d.findings)
    assert "kernel.panic_on_warn=1: WARNINGs panic this kernel" in text and "sysctl -w kernel.panic_on_warn=0" in text
    assert "hung task" not in text and "soft lockup reports" not in text
    from khibernate.doctor import render

    assert "[note] kernel.panic_on_warn=1" in render(d) and "watch : possible" in render(d)


def test_watch_not_possible_when_everything_panics_or_jump_is_not(tmp_path):
    root = _sysctls(make_tree(tmp_path / "a"), panic_on_warn=1, panic_on_oops=1, softlockup_panic=1,
                    hung_task_panic=1)
    assert diagnose(root, euid=0).possible("watch") is False
    d = diagnose(make_tree(tmp_path / "b", config="CONFIG_KEXEC=y\nCONFIG_CRASH_DUMP=y\n"), euid=0)
    assert d.possible("watch") is False
    from khibernate.doctor import render

    assert "watch : NOT possible (see: CONFIG_KEXEC_JUMP" in render(d)
    text = " ".join(f.message for f in d.findings)  # no detectors in the copied tree: said, not blocking
    assert "kernel.hung_task_timeout_secs=120" in text and "kernel.soft_watchdog=1" in text


def _region_tree(tmp: Path, cmdline: str, kaslr: bool, iomem: str = IOMEM, mem_total_kib: int = 1048024) -> SystemRoot:
    root = make_tree(tmp, config=GOOD_CONFIG + ("CONFIG_RANDOMIZE_BASE=y\n" if kaslr else ""), iomem=iomem)
    (root.path / "proc/cmdline").write_text(cmdline + "\n")
    (root.path / "proc/meminfo").write_text(f"MemTotal:       {mem_total_kib} kB\nMemFree:  1000 kB\n")
    return root


def test_hibernate_says_whether_the_crash_region_is_reproducible(tmp_path):
    """KASLR + crashkernel=SIZE: not reproducible (a note), yet resumable while the region is at most half of RAM;
    an address, or KASLR off, makes it reproducible; a region too large to swap blocks hibernate."""
    from khibernate.doctor import region_finding, render

    d = diagnose(_region_tree(tmp_path / "a", "console=ttyS0 crashkernel=256M", kaslr=True), euid=0)
    f = next(f for f in d.findings if f.name == "crash region at resume")
    assert not f.ok and not f.blocks and d.possible("hibernate") is True
    assert "KASLR is on and crashkernel=256M has no address" in f.message and "swapping the resume boot's 256 MiB" \
        in f.message
    assert "[note] KASLR is on" in render(d) and "hibernate: possible" in render(d)
    pinned = region_finding(_region_tree(tmp_path / "b", "crashkernel=256M@0x2f000000", kaslr=True))
    assert pinned is not None and pinned.ok and "pins the crash region" in pinned.message
    assert "the reservation fails" in pinned.message  # KASLR can land the kernel on a fixed address
    off = region_finding(_region_tree(tmp_path / "c", "crashkernel=256M nokaslr", kaslr=True))
    assert off is not None and off.ok and off.message.startswith("KASLR is off")
    big = IOMEM.replace("2f000000-3effffff : Crash kernel", "1f000000-3effffff : Crash kernel")  # 512 MiB
    d = diagnose(_region_tree(tmp_path / "d", "crashkernel=512M", kaslr=True, iomem=big, mem_total_kib=524288),
                 euid=0)
    assert d.possible("hibernate") is False and d.possible("jump") is True
    assert "hibernate: NOT possible (see: crash region at resume)" in render(d)
    assert region_finding(_region_tree(tmp_path / "e", "console=ttyS0", kaslr=True)) is None  # no crashkernel=


def test_hibernate_refuses_an_unresumable_setup_before_any_write(tmp_path, monkeypatch):
    import pytest

    import khibernate.system
    from khibernate.capture import snapshot as snap
    from khibernate.errors import KhibernateError

    big = IOMEM.replace("2f000000-3effffff : Crash kernel", "1f000000-3effffff : Crash kernel")
    root = _region_tree(tmp_path, "crashkernel=512M", kaslr=True, iomem=big, mem_total_kib=524288)
    monkeypatch.setattr(khibernate.system, "SystemRoot", lambda *a: root)  # what preflight's doctor reads
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    target = tmp_path / "store"
    with pytest.raises(snap.SnapshotError, match="a resume could not restore this hibernation: KASLR is on.*"
                                                 "--allow-unresumable"):
        snap.preflight(snap.Options(target=str(target), kind="hibernate"))
    with pytest.raises(KhibernateError) as e:  # told otherwise: on to the next check (here: no store)
        snap.preflight(snap.Options(target=str(target), kind="hibernate", allow_unresumable=True))
    assert "resume could not restore" not in str(e.value)
    assert not target.exists()


def _xen_tree(tmp_path, capabilities: str | None = "control_d\n", privcmd: bool = True):
    root = make_tree(tmp_path, iomem="00100000-3ffdcfff : System RAM\n", config=None)
    (tmp_path / "sys/hypervisor").mkdir(parents=True)
    (tmp_path / "sys/hypervisor/type").write_text("xen\n")
    (tmp_path / "sys/hypervisor/guest_type").write_text("PV\n")
    if capabilities is not None:
        (tmp_path / "proc/xen").mkdir(parents=True)
        (tmp_path / "proc/xen/capabilities").write_text(capabilities)
    if privcmd:
        (tmp_path / "dev/xen").mkdir(parents=True)
        (tmp_path / "dev/xen/privcmd").write_text("")
    return root


def test_xen_dom0_kexec_and_kdump_through_the_hypervisor_no_jump(tmp_path):
    """On a Xen dom0, kexec and kdump go through Xen (dom0's own config and crash region do not matter); jump and
    watch cannot work, and the verdict says why (no preserve-context in Xen's kexec)."""
    d = diagnose(_xen_tree(tmp_path), euid=0, xen_crash_size=256 << 20)
    assert d.possible("kexec") is True and d.possible("kdump") is True
    assert d.possible("jump") is False and d.possible("watch") is False
    text = render(d)
    assert "preserve-context" in text and "Xen's crash region: 256 MiB" in text
    assert d.to_json()["possible"] == {"kexec": True, "kdump": True, "jump": False, "watch": False,
                                       "hibernate": False}


def test_xen_without_crash_region_or_privcmd(tmp_path):
    d = diagnose(_xen_tree(tmp_path, privcmd=False), euid=0, xen_crash_size=0)
    assert d.possible("kdump") is False and d.possible("kexec") is False
    assert "crashkernel=256M to Xen's command line" in render(d) and "modprobe xen-privcmd" in render(d)


def test_xen_domu_cannot_load(tmp_path):
    d = diagnose(_xen_tree(tmp_path, capabilities=""), euid=0, xen_crash_size=None)
    assert d.possible("kexec") is False and "not dom0" in render(d)


def _tpm(tmp: Path, major: int, rm: bool = True, tools: bool = True) -> SystemRoot:
    root = make_tree(tmp)
    (tmp / "sys/class/tpm/tpm0").mkdir(parents=True)
    (tmp / "sys/class/tpm/tpm0/tpm_version_major").write_text(f"{major}\n")
    if rm:
        (tmp / "sys/class/tpmrm/tpmrm0").mkdir(parents=True)
    if tools:
        (tmp / "usr/bin").mkdir(parents=True)
        (tmp / "usr/bin/tpm2_unseal").write_text("")
    return root


def test_doctor_says_whether_this_machine_has_a_tpm(tmp_path):
    def tpm(root: SystemRoot):
        return next(f for f in diagnose(root, euid=0).findings if f.name == "tpm")

    f = tpm(make_tree(tmp_path / "none"))
    assert not f.ok and "no TPM" in f.message and not f.blocks
    f = tpm(_tpm(tmp_path / "two", 2))
    assert f.ok and "TPM 2.0 (tpm0, resource manager /dev/tpmrm0)" in f.message and "--tpm" in f.message
    f = tpm(_tpm(tmp_path / "old", 1, rm=False))
    assert not f.ok and "not 2.0" in f.message
    f = tpm(_tpm(tmp_path / "notools", 2, tools=False))
    assert not f.ok and "tpm2-tools" in f.message
    assert diagnose(_tpm(tmp_path / "again", 2), euid=0).possible("jump")  # a note: blocks nothing


def test_doctor_says_whether_a_targets_images_are_sealed_and_by_what(tmp_path):
    """A store sealed to a key file and (a hand-made slot) the TPM, one sealed and one unsealed image in it; an
    unsealed store; no store: each one line of `doctor --target`, no key needed."""
    import dataclasses

    from khibernate.seal import keyring
    from khibernate.seal.tpmblob import TpmSealed
    from khibernate.store import keyslots
    from khibernate.store.handle import Store
    from tests.image import basefiles
    from tests.seal.conftest import key_file
    from tests.seal.test_sealed_store import init, put_image, store_sealing

    (tmp_path / "mem").mkdir()
    mem = basefiles.build(tmp_path / "mem")["elf64"]
    key = key_file(tmp_path / "store.key")
    sealed, plain = tmp_path / "sealed.img", tmp_path / "plain.img"
    for dev in (sealed, plain):
        with open(dev, "wb") as f:
            f.truncate(64 << 20)
    assert init(str(sealed), "--key-file", key.path)[0] == 0
    put_image(str(sealed), 0, mem, store_sealing(str(sealed), key, 0))
    put_image(str(sealed), 1, mem, None)
    with Store.open(str(sealed), write=True) as st:  # a TPM slot beside the key file's (the TPM is not asked)
        ring = keyslots.read(st.fd, str(sealed))
        tpm = keyring.KeySlot(keyring.KIND_TPM, keyring.KDF_TPM2_PCR, bytes(32), bytes(48),
                              blob=TpmSealed((0, 7), (bytes(32), bytes(32)), b"pub", b"priv").pack())
        keyslots.write(st.fd, dataclasses.replace(ring, slots=(*ring.slots, tpm), version=keyring.VERSION_BLOBS))
    assert init(str(plain), "--unsealed")[0] == 0
    put_image(str(plain), 0, mem, None)
    make_tree(tmp_path / "root")
    r = CliRunner().invoke(cli, ["doctor", "--root", str(tmp_path / "root"), "--target", str(sealed), "--target",
                                 str(plain), "--target", str(tmp_path / "nothing")])
    lines = r.output.splitlines()
    assert any(f"target {sealed}: sealed store, opened by a key file or the TPM (PCRs 0,7); 2 images: 1 sealed, "
               "1 unsealed" in ln and "[note]" in ln for ln in lines), r.output
    assert any(f"target {plain}: unsealed" in ln and "1 image: 0 sealed, 1 unsealed" in ln for ln in lines), r.output
    assert any(f"target {tmp_path / 'nothing'}: cannot read the store" in ln for ln in lines), r.output
    assert "Traceback" not in r.output
