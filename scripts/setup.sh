#!/usr/bin/env bash
# Sets up a fresh machine: system packages, then .venv/ at the project root with the
# project and its dev extra. Idempotent; re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# System packages the project needs: espeak-ng (TTS voices and phonemes).
SYSTEM_PACKAGES=(espeak-ng)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# constraints.txt pins torch==2.13.0 for the whole resolve: deepspeed asks only for
# torch>=2.0, which on a CPU machine would otherwise pull a multi-GB CUDA build.
# DeepSpeed ships an sdist; with DS_BUILD_OPS=0 its wheel is pure Python (no CUDA, no
# compiler) and its CPU ops are JIT-built on first use.
# (The grep drops this machine's warnings about absent local index folders; pipefail
# keeps pip's exit status.)
set -o pipefail
PIP_CONSTRAINT="$PWD/constraints.txt" .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' \
  2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.13.0", f"torch changed to {torch.__version__}"
print(f"set-up done: torch {torch.__version__} in .venv")
PY
