#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with an NVIDIA GPU and the project
# installed with a CUDA build of torch 2.13.0: DeepSpeed ZeRO-2 bf16 through Ray Train on
# a ~1B model for 30 steps (tokens/s, MFU), then the sampler's batch scaling and caches on
# the GPU. About 5-8 minutes; prints a JSON summary. Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f scripts/env.sh ] && source scripts/env.sh
export DS_ACCELERATOR=cuda RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
timeout 480 "$PY" benchmarks/gpu_check.py --steps "${STEPS:-30}" "$@"
