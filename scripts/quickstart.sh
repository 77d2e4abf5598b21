#!/usr/bin/env bash
# The main command: set everything up, then run the whole embedded default end to end
# (world -> tokenizers -> shards -> SDVI -> stages 1-3 -> evaluation report in runs/report).
# It first measures this machine and prints how long the run will take here.
#
#   bash scripts/quickstart.sh                  # the full run (configs/tiny/, into runs/)
#   bash scripts/quickstart.sh full --minutes 30  # the same, stages shortened to fit 30 min (or QUICK=1)
#   bash scripts/quickstart.sh ci               # the same chain, small and short (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/pipeline.sh "$@"
