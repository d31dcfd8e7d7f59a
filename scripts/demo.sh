#!/usr/bin/env bash
# The main job: set everything up, boot the test kernel in QEMU and show kexec, kdump and kexec jump.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m vmtest.demo "$@"
