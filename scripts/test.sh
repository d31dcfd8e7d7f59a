#!/usr/bin/env bash
# The whole test suite, VM tests included, after setting everything up (fresh Debian 12, as root):
#
#   scripts/test.sh                  everything: scripts/setup.sh --xen, ruff, mypy, the .deb and the Debian 12 test
#                                    machine's disk image (built once, then cached), then ONE pytest session with two
#                                    workers over every test: the fast tier, the VM tests on the project's test
#                                    kernels, the Debian 12 machine (tests/vm/test_distro.py: one guest through apt
#                                    install, setup, systemctl hibernate, the initramfs-tools resume, apt remove) and
#                                    the Xen host (tests/vm/test_xen_host.py). Each worker runs one test file at a time
#                                    (module-scoped guests stay shared within a file), so two guests share the two
#                                    cores; the hang timeouts (not the assertions) are stretched twofold
#                                    (KHIBERNATE_VMTEST_TIMEOUT_SCALE, default 2 here). .ci/run is this.
#   scripts/test.sh --plain [ARGS]   everything but the Debian 12 machine and the Xen host; ARGS go to pytest
#   scripts/test.sh --distro [ARGS]  the Debian 12 machine alone
#   scripts/test.sh --xen [ARGS]     the Xen host alone
#   scripts/test.sh -k doctor        any other arguments: the plain part, ARGS to pytest
#
# KHIBERNATE_RUN_VM_TESTS=1 (set here): a VM test that cannot run here fails instead of skipping (CI never skips one).
# KHIBERNATE_SKIP_SETUP=1: do not run scripts/setup.sh (it ran already); the venv must exist.
# KHIBERNATE_TEST_WORKERS: pytest workers of the plain and full runs (default 2; 0 runs in one process).
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

lint() {
  echo "[test] ruff"
  .venv/bin/ruff check . || return $?
  echo "[test] mypy"
  .venv/bin/mypy || return $?
}

machine_images() {
  echo "[test] the khibernate .deb and the Debian 12 test machine's disk (built once, cached)"
  .venv/bin/python -m vmtest.package || return $?
  .venv/bin/python -m vmtest.rootfs || return $?
}

workers() {  # pytest-xdist, one test file per worker at a time: module-scoped guests stay shared within a file
  echo -n "${KHIBERNATE_TEST_WORKERS:-2}" --dist loadfile
}

plain() {  # ruff, mypy, pytest without the distro and Xen modules
  local t0 rc
  t0=$(date +%s)
  lint || return $?
  echo "[test] pytest"
  # shellcheck disable=SC2046
  KHIBERNATE_FUZZ_PROFILE=ci .venv/bin/python -m pytest -n $(workers) --durations=25 \
    --ignore="$XEN_TESTS" --ignore="$DISTRO_TESTS" "$@"
  rc=$?
  echo "[test] plain run wall time: $(( $(date +%s) - t0 )) s"
  return $rc
}

everything() {  # ruff, mypy, the distro machine's images, one pytest session over every test
  local t0 rc
  t0=$(date +%s)
  lint || return $?
  machine_images || return $?
  echo "[test] pytest (everything: fast tier, VM tests, the Debian 12 machine, the Xen host)"
  # shellcheck disable=SC2046
  KHIBERNATE_VMTEST_TIMEOUT_SCALE="${KHIBERNATE_VMTEST_TIMEOUT_SCALE:-2}" KHIBERNATE_FUZZ_PROFILE=ci \
    .venv/bin/python -m pytest -n $(workers) --durations=40 "$@"
  rc=$?
  echo "[test] pytest wall time: $(( $(date +%s) - t0 )) s"
  return $rc
}

distro() {
  local t0 rc
  t0=$(date +%s)
  machine_images || return $?
  echo "[test] pytest (Debian 12 machine)"
  .venv/bin/python -m pytest "$DISTRO_TESTS" --durations=0 "$@"
  rc=$?
  echo "[test] distro tests wall time: $(( $(date +%s) - t0 )) s"
  return $rc
}

xen() {
  local t0 rc
  t0=$(date +%s)
  echo "[test] pytest (Xen host)"
  .venv/bin/python -m pytest "$XEN_TESTS" "$@"
  rc=$?
  echo "[test] Xen host tests wall time: $(( $(date +%s) - t0 )) s"
  return $rc
}

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
  all) (set -e; run_setup --xen); rc=$?; [ "$rc" = 0 ] && { everything "$@"; rc=$?; } ;;
esac
echo "[test] total wall time: $(( $(date +%s) - start )) s"
exit "$rc"
