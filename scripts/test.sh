#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included) in .venv/.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
[ -x .venv/bin/python ] || { echo "no .venv: run 'bash scripts/setup.sh' first" >&2; exit 2; }
# pytest exits 5 when it collects nothing; set -e turns that into a failure, not a pass.
exec .venv/bin/python -m pytest "$@"
