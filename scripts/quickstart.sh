#!/usr/bin/env bash
# The main command: set everything up, then run the whole embedded default end to end
# (world -> tokenizers -> shards -> SDVI -> stages 1-3 -> evaluation report in runs/report).
#
#   bash scripts/quickstart.sh        # the full run (about 25-35 minutes on 2 CPU cores)
#   bash scripts/quickstart.sh ci     # the same chain, small and short (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/pipeline.sh "${1:-full}" "${2:-runs}"
