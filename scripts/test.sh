#!/usr/bin/env bash
# The whole test suite, VM tests included, after setting everything up (fresh Debian 12, as root).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k doctor`.
# `scripts/test.sh --xen [ARGS]` runs the Xen host VM tests (tests/vm/test_xen_host.py, several Xen boots under
# TCG) on their own; `scripts/test.sh --distro [ARGS]` the Debian 12 machine's tests (tests/vm/test_distro.py: one
# guest through apt install, setup, systemctl hibernate, the resume in initramfs-tools, apt remove; its disk image
# and the .deb are built first, then cached). The plain run leaves both out. .ci/run runs all three.
# KHIBERNATE_RUN_VM_TESTS=1: a VM test that cannot run here fails instead of skipping (CI never skips one).
# KHIBERNATE_SKIP_SETUP=1: do not run scripts/setup.sh (for a CI that ran it once already, e.g. before starting two
# test.sh runs side by side, which would otherwise race on the venv and the kernel builds); the venv must exist.
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
if [ "${1:-}" = "--distro" ]; then
  shift
  run_setup
  echo "[test] the khibernate .deb and the Debian 12 test machine's disk (built once, cached)"
  .venv/bin/python -m vmtest.package
  .venv/bin/python -m vmtest.rootfs
  echo "[test] pytest (Debian 12 machine)"
  set +e
  .venv/bin/python -m pytest "$DISTRO_TESTS" --durations=0 "$@"
  rc=$?
  set -e
  echo "[test] distro tests wall time: $(( $(date +%s) - start )) s"
  exit $rc
fi
if [ "${1:-}" = "--xen" ]; then
  shift
  run_setup --xen
  echo "[test] pytest (Xen host)"
  set +e
  .venv/bin/python -m pytest "$XEN_TESTS" "$@"
  rc=$?
  set -e
  echo "[test] Xen host tests wall time: $(( $(date +%s) - start )) s"
  exit $rc
fi
run_setup
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] mypy"
.venv/bin/mypy
echo "[test] pytest"
export KHIBERNATE_FUZZ_PROFILE=ci  # the longer hypothesis profile of tests/image/test_fuzz.py
set +e
# two pytest workers (pytest-xdist), one test file each at a time: module-scoped guests stay shared within a file,
# and two TCG guests keep both cores busy; KHIBERNATE_TEST_WORKERS=0 runs in one process
.venv/bin/python -m pytest -n "${KHIBERNATE_TEST_WORKERS:-2}" --dist loadfile --durations=25 --ignore="$XEN_TESTS" --ignore="$DISTRO_TESTS" "$@"
rc=$?
set -e
echo "[test] total wall time: $(( $(date +%s) - start )) s"
exit $rc
