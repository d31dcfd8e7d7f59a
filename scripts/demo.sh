#!/usr/bin/env bash
# The main job: set everything up, boot the test kernel in QEMU, hibernate it with `khibernate hibernate`, power
# off, boot a new QEMU and `khibernate resume` it: the same kernel runs on. `scripts/demo.sh kexec kdump jump`
# shows the building blocks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m vmtest.demo "$@"
