"""The initramfs content (repo folder initramfs/) ships inside the wheel, so a non-editable install can build."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_carries_initramfs_content(tmp_path):
    # build from a copy, so no build/ or egg-info appears in (or is reused from) the working tree
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("src", "initramfs"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("khibernate-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    base = "khibernate/initramfs/content/"
    for rel in ("init", "usr/libexec/khibernate/vm-agent", "etc/khibernate/roles/kdump-to-disk"):
        assert base + rel in infos, sorted(n for n in infos if n.startswith(base))
        assert (infos[base + rel].external_attr >> 16) & 0o111, f"{rel} lost its executable bit"
    in_repo = {p.relative_to(REPO / "initramfs").as_posix() for p in (REPO / "initramfs").rglob("*") if p.is_file()}
    assert {base + p for p in in_repo} <= set(infos)
