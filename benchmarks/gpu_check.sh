#!/usr/bin/env bash
# The staged GPU check (benchmarks/gpu_check.py; its docstring says what each stage measures)
# on a machine with an NVIDIA GPU: the project installed with a CUDA torch in .venv, or plain
# python3 + torch after `source .gpu/rest/install.sh` (the offline bundle, scripts/gpu_bundle.sh).
# Arguments go to the check, e.g. `--stages a,c --shards .gpu/shards`. Stages have time caps
# (about 6 minutes in all, plus Ray's start); the JSON report is rewritten after every stage.
# Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f scripts/env.sh ] && source scripts/env.sh
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" benchmarks/gpu_check.py "$@"
