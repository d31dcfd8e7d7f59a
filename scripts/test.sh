#!/usr/bin/env bash
# The whole test suite, VM tests included, after setting everything up (fresh Debian 12, as root).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k doctor`.
# KHIBERNATE_RUN_VM_TESTS=1: a VM test that cannot run here fails instead of skipping (CI never skips one).
set -euo pipefail
export KHIBERNATE_RUN_VM_TESTS=1
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/setup.sh
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] mypy"
.venv/bin/mypy
echo "[test] pytest"
export KHIBERNATE_FUZZ_PROFILE=ci  # the longer hypothesis profile of tests/image/test_fuzz.py
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
echo "[test] total wall time: $(( $(date +%s) - start )) s"
exit $rc
