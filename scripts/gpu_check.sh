#!/usr/bin/env bash
# The device check in one command, from a clean checkout on a GPU machine (issue #17):
#
#   scripts/gpu_check.sh OUT [--install]
#
# --install first makes .venv and installs segbook as the README's test command does (pip install -e ".[test]").
# Every figure is written as JSON into OUT, with OUT/summary.txt; the exit status is non-zero if any step failed.
# The steps and what they measure: scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu_check.sh OUT [--install]}"
if [[ "${2:-}" == "--install" ]]; then
    python3 -m venv .venv
    . .venv/bin/activate
    pip install -q -e ".[test]"
elif [[ -f .venv/bin/activate ]]; then
    . .venv/bin/activate
fi
exec python scripts/gpu_check.py "$out"
