#!/usr/bin/env bash
# The main command: set everything up, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/python jobs/demo.py --config configs/tiny/demo.yaml "$@"
