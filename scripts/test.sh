#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included) in .venv/.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
[ -x .venv/bin/python ] || { echo "no .venv: run 'bash scripts/setup.sh' first" >&2; exit 2; }
# The suite's shared tiny any-to-any model (tests/any2any.py) is trained here, once and
# outside pytest's per-test timeout (minutes on a slow machine), into a cache keyed by the
# code that shapes it; the tests load it from there. OMNI_TEST_CACHE="" trains it in pytest.
export OMNI_TEST_CACHE="${OMNI_TEST_CACHE-$PWD/.cache/tests}"
if [ -n "$OMNI_TEST_CACHE" ]; then
    .venv/bin/python -m tests.any2any "$OMNI_TEST_CACHE"
fi
# pytest exits 5 when it collects nothing; set -e turns that into a failure, not a pass.
exec .venv/bin/python -m pytest "$@"
