#!/usr/bin/env bash
# The whole test suite, VM tests included, after setting everything up (fresh Debian 12, as root):
#
#   scripts/test.sh                  everything, one part after the other: scripts/setup.sh --xen once, then
#                                    the plain run (ruff, mypy, pytest with two workers: the fast tier and the VM
#                                    tests on the project's test kernels), the Debian 12 machine (tests/vm/test_distro.py:
#                                    its .deb and disk image built first, then cached; one guest through apt install,
#                                    setup, systemctl hibernate, the initramfs-tools resume, apt remove) and the Xen host
#                                    (tests/vm/test_xen_host.py, several Xen boots). Every part's status counts: the exit
#                                    status is the first failing part's. .ci/run is this.
#   scripts/test.sh --plain [ARGS]   one part, with its own setup; ARGS go to pytest
#   scripts/test.sh --distro [ARGS]
#   scripts/test.sh --xen [ARGS]
#   scripts/test.sh -k doctor        any other arguments: the plain part, ARGS to pytest
#
# KHIBERNATE_RUN_VM_TESTS=1 (set here): a VM test that cannot run here fails instead of skipping (CI never skips one).
# KHIBERNATE_SKIP_SETUP=1: do not run scripts/setup.sh (it ran already); the venv must exist.
# The Debian 12 machine's hang timeouts (not its assertions) are stretched twofold in the full run
# (KHIBERNATE_VMTEST_TIMEOUT_SCALE, default 2 there): it is the longest single guest and the most sensitive to load.
set -euo pipefail
export KHIBERNATE_RUN_VM_TESTS=1
cd "$(dirname "$0")/.."
start=$(date +%s)
XEN_TESTS=tests/vm/test_xen_host.py
DISTRO_TESTS=tests/vm/test_distro.py

run_setup() {
  if [ "${KHIBERNATE_SKIP_SETUP:-0}" = "1" ]; then
    if [ ! -x .venv/bin/python ]; then
      echo "[test] KHIBERNATE_SKIP_SETUP=1 but there is no .venv: run scripts/setup.sh $* first" >&2
      exit 2
    fi
    echo "[test] scripts/setup.sh $* skipped (KHIBERNATE_SKIP_SETUP=1)"
    return
  fi
  scripts/setup.sh "$@"
}

timed() {  # timed LABEL COMMAND [ARGS]: run it, say its wall time, return its status
  local label=$1 t0 rc
  shift
  t0=$(date +%s)
  "$@"
  rc=$?
  echo "[test] $label wall time: $(( $(date +%s) - t0 )) s"
  return $rc
}

plain_tests() {  # ruff, mypy, pytest without the distro and Xen modules; returns the first failing status
  echo "[test] ruff"
  .venv/bin/ruff check . || return $?
  echo "[test] mypy"
  .venv/bin/mypy || return $?
  echo "[test] pytest"
  # two pytest workers (pytest-xdist), one test file each at a time: module-scoped guests stay shared within a file,
  # and two TCG guests keep both cores busy; KHIBERNATE_TEST_WORKERS=0 runs in one process
  KHIBERNATE_FUZZ_PROFILE=ci .venv/bin/python -m pytest -n "${KHIBERNATE_TEST_WORKERS:-2}" --dist loadfile \
    --durations=25 --ignore="$XEN_TESTS" --ignore="$DISTRO_TESTS" "$@"
}

distro_tests() {
  echo "[test] the khibernate .deb and the Debian 12 test machine's disk (built once, cached)"
  .venv/bin/python -m vmtest.package || return $?
  .venv/bin/python -m vmtest.rootfs || return $?
  echo "[test] pytest (Debian 12 machine)"
  .venv/bin/python -m pytest "$DISTRO_TESTS" --durations=0 "$@"
}

xen_tests() {
  echo "[test] pytest (Xen host)"
  .venv/bin/python -m pytest "$XEN_TESTS" "$@"
}

plain() { timed "plain run" plain_tests "$@"; }
distro() { timed "distro tests" distro_tests "$@"; }
xen() { timed "Xen host tests" xen_tests "$@"; }

part=all
case "${1:-}" in
  --plain|--distro|--xen) part=${1#--}; shift ;;
  "") ;;
  *) part=plain ;;
esac
set +e
case "$part" in
  plain) (set -e; run_setup); rc=$?; [ "$rc" = 0 ] && { plain "$@"; rc=$?; } ;;
  distro) (set -e; run_setup); rc=$?; [ "$rc" = 0 ] && { distro "$@"; rc=$?; } ;;
  xen) (set -e; run_setup --xen); rc=$?; [ "$rc" = 0 ] && { xen "$@"; rc=$?; } ;;
  all)
    (set -e; run_setup --xen); rc=$?
    if [ "$rc" = 0 ]; then
      plain; plain_rc=$?
      KHIBERNATE_VMTEST_TIMEOUT_SCALE="${KHIBERNATE_VMTEST_TIMEOUT_SCALE:-2}" distro; distro_rc=$?
      xen; xen_rc=$?
      echo "[test] plain rc=$plain_rc, Debian 12 machine rc=$distro_rc, Xen host rc=$xen_rc"
      for rc in "$plain_rc" "$distro_rc" "$xen_rc"; do [ "$rc" = 0 ] || break; done
    fi ;;
esac
echo "[test] total wall time: $(( $(date +%s) - start )) s"
exit "$rc"
