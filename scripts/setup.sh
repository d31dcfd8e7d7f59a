#!/usr/bin/env bash
# Everything khibernate's demo and tests need, on a fresh Debian 12 machine, as root:
# Debian packages, a virtualenv with khibernate and its test tools, and the cached test kernel.
# `scripts/setup.sh --xen` also builds what only the Xen host tests need (a Xen hypervisor with debug info).
# Safe to run again: each step is skipped or cheap when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "error: run as root (apt-get installs packages; the VM tests use /dev/kvm-less QEMU and kexec as root)" >&2
  exit 1
fi

PKGS="qemu-system-x86 kexec-tools busybox-static makedumpfile crash build-essential flex bison bc libelf-dev
      libssl-dev python3 python3-venv python3-dev python3-libkdumpfile zstd xz-utils
      fuse3 gdb kmod fdisk lz4 libncurses-dev texinfo swtpm swtpm-tools tpm2-tools
      mmdebstrap dpkg-dev debhelper dh-python python3-all-dev python3-setuptools python3-cffi"
missing=""
for p in $PKGS; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[setup] installing Debian packages:" $missing
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
echo "[setup] installing khibernate into .venv"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

# the -dbg package is ~860 MB (about 25 s from a Debian mirror); only its 630 MB vmlinux is kept
echo "[setup] a Debian distribution kernel for the tests and its debug vmlinux (for crash), in ~/.cache/khibernate/debs"
.venv/bin/python -m vmtest.debian

# ~3.5 MB: Debian's Xen 4.17 hypervisor and its xen-syms, and dom0's xen-privcmd/xenfs (+ virtio) modules of the
# Debian kernel above, for the Xen host VM tests (tests/vm/test_xen_host.py). With --xen (scripts/test.sh --xen)
# also, once, the same hypervisor built from Debian's xen source with debug info, whose xen-syms crash can read
# (vmtest/xen_build.py: `make -C xen` only, ~5 MB of source; gcc, make, python3, flex, bison and dpkg-source from the
# packages above; 3.5 min of CPU, 2-11 min on 2 shared cores), and crash 8.0.6 with its gdb (vmtest/crash_build.py:
# Debian 12's crash cannot read Xen 4.17's dumps; g++, libncurses-dev and texinfo, which gdb's bfd build runs)
echo "[setup] Xen hypervisors for the Xen host tests, in ~/.cache/khibernate/xen"
if [ "${1:-}" = "--xen" ]; then
  .venv/bin/python -m vmtest.xen --debug-build
else
  .venv/bin/python -m vmtest.xen
fi

echo "[setup] test kernels (built once from Debian's linux-source-6.12 and -7.3, then cached in ~/.cache/khibernate)"
.venv/bin/python -m vmtest.kernel 6.12
.venv/bin/python -m vmtest.kernel 7.3
# the distribution-like flavour of 6.12: KASLR, THP, hugetlbfs, memcg, KSM, systemd's needs, modular drivers
.venv/bin/python -m vmtest.kernel 6.12-distro
# the khibernate .deb and the Debian 12 test machine's disk: `scripts/test.sh --distro` builds them (once, cached)
