#!/usr/bin/env bash
# The whole test suite, VM tests included, after setting everything up (fresh Debian 12, as root).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k doctor`.
# `scripts/test.sh --xen [ARGS]` runs the Xen host VM tests (tests/vm/test_xen_host.py, several Xen boots under
# TCG) on their own; the plain run leaves them out. .ci/run runs both.
# KHIBERNATE_RUN_VM_TESTS=1: a VM test that cannot run here fails instead of skipping (CI never skips one).
set -euo pipefail
export KHIBERNATE_RUN_VM_TESTS=1
cd "$(dirname "$0")/.."
start=$(date +%s)
XEN_TESTS=tests/vm/test_xen_host.py
scripts/setup.sh
if [ "${1:-}" = "--xen" ]; then
  shift
  echo "[test] pytest (Xen host)"
  set +e
  .venv/bin/python -m pytest "$XEN_TESTS" "$@"
  rc=$?
  set -e
  echo "[test] Xen host tests wall time: $(( $(date +%s) - start )) s"
  exit $rc
fi
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] mypy"
.venv/bin/mypy
echo "[test] pytest"
export KHIBERNATE_FUZZ_PROFILE=ci  # the longer hypothesis profile of tests/image/test_fuzz.py
set +e
# two pytest workers (pytest-xdist), one test file each at a time: module-scoped guests stay shared within a file,
# and two TCG guests keep both cores busy; KHIBERNATE_TEST_WORKERS=0 runs in one process
.venv/bin/python -m pytest -n "${KHIBERNATE_TEST_WORKERS:-2}" --dist loadfile --durations=25 --ignore="$XEN_TESTS" "$@"
rc=$?
set -e
echo "[test] total wall time: $(( $(date +%s) - start )) s"
exit $rc
