#!/usr/bin/env bash
# The whole embedded default, end to end, on a local Ray:
#   world -> SDVI -> tokenizers -> token shards -> stages 1-3 -> evaluation report.
#
#   bash scripts/pipeline.sh [full|ci] [--minutes N]
#
# `full` (the default) is the README's quickstart: configs/tiny/, into runs/. `ci` is the
# same chain with a smaller world, fewer steps and a smaller model, for CI's time budget:
# configs/ci/ (each file a configs/tiny/ one with what differs), into runs-ci/. Every step
# is one of the jobs in jobs/ with its profile's YAML and nothing else: the commands are
# the README's "Running each job". TOKENIZERS=train trains the tokenizers instead of
# taking the shipped ones (tokenizers_train.yaml).
#
# First it measures this machine (jobs/estimate_run.py: a few training steps of the
# profile's model) and prints what each step will take here. `--minutes N` (or QUICK=1,
# 30 minutes) sets the stages' steps from that measurement so that the chain fits N
# minutes, and says which it chose; they are the only settings passed besides the YAML.
#
# Run it again and it goes on where it stopped: the steps that finished with the same
# command and config are skipped, a training stage resumes from its last complete
# checkpoint (scripts/steps.sh); a stage that runs again because something before it
# changed starts over (its old folder is kept beside, renamed). Delete the run folder to
# start over.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PROFILE=full
MINUTES=""
[ "${QUICK:-0}" = 1 ] && MINUTES=30
case "${1:-}" in full|ci) PROFILE=$1; shift ;; esac
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="${2:?--minutes N}"; shift 2 ;;
    *) echo "unknown argument '$1': bash scripts/pipeline.sh [full|ci] [--minutes N]" >&2; exit 2 ;;
  esac
done
TOKENIZERS_MODE="${TOKENIZERS:-shipped}"  # shipped (the default) or train
PY=.venv/bin/python

case "$PROFILE" in
  full) CONF=configs/tiny; RUNS=runs ;;
  ci) CONF=configs/ci; RUNS=runs-ci ;;
  *) echo "unknown profile $PROFILE (full or ci)" >&2; exit 2 ;;
esac
case "$TOKENIZERS_MODE" in
  shipped) TOKENIZERS_CONFIG=$CONF/tokenizers.yaml ;;
  train) TOKENIZERS_CONFIG=$CONF/tokenizers_train.yaml ;;
  *) echo "TOKENIZERS=$TOKENIZERS_MODE: shipped or train" >&2; exit 2 ;;
esac

mkdir -p "$RUNS"
$PY jobs/estimate_run.py --profile "$(basename "$CONF")" ${MINUTES:+--minutes "$MINUTES"} --out "$RUNS/estimate.json"
ORDER=(world sdvi sdvi_eval tokenizers tokenize tokenize_sdvi stage1 stage2 stage3 evaluate)
declare -A EXPECTED STEPS
# this machine's estimate of each step (only the proportions matter: the estimate of what
# is left is rescaled by this machine's pace so far) and the budget's stage steps, if any
while read -r key name value; do
  if [ "$key" = seconds ]; then EXPECTED[$name]=$value; else STEPS[$name]=$value; fi
done < <($PY -c 'import json, sys
e = json.load(open(sys.argv[1]))
for name, s in e["seconds"].items():
    print("seconds", name, s)
for name, s in (e["steps"] or {}).items():
    print("steps", name, s)' "$RUNS/estimate.json")
if [ "$TOKENIZERS_MODE" = train ]; then
  # full: ~2,850 s where stage 1 runs ~7,000 tokens/s; ci: ~158 s where it runs ~30,000
  if [ "$PROFILE" = ci ]; then EXPECTED[tokenizers]=158; else EXPECTED[tokenizers]=2850; fi
fi
budget() {  # a stage's train.max_steps when a budget chose it
  [ -n "${STEPS[$1]:-}" ] && echo "train.max_steps=${STEPS[$1]}"
  return 0
}
# shellcheck source=scripts/steps.sh
source scripts/steps.sh
chain_start "$RUNS" "${ORDER[@]}"
step_settings() {  # what a step depends on besides its command: its config, bases resolved
  local next=0 arg
  for arg in "$@"; do
    if [ "$next" = 1 ]; then
      $PY -c 'import json, sys; from omni_model.config import read_config_file
print(json.dumps(read_config_file(sys.argv[1]), sort_keys=True))' "$arg"
      next=0
    fi
    if [ "$arg" = --config ]; then next=1; fi
  done
}
step_restart() {  # a stage that runs again with other inputs or settings starts over
  case "$1" in
    stage*) [ ! -d "$RUNS/$1" ] || mv "$RUNS/$1" "$RUNS/$1.replaced-$(date -u +%Y%m%dT%H%M%S)" ;;
  esac
}
step_note() {  # a training stage's median pace, to tell a slow machine from a slow change
  [ -f "$RUNS/$1/metrics.jsonl" ] || return 0
  $PY -c 'import json, statistics, sys
rows = [json.loads(line).get("tokens_per_s") for line in open(sys.argv[1])]
rates = [r for r in rows[1:] or rows if r]  # the first includes the warm-up
print(f"{statistics.median(rates):.0f} tokens/s" if rates else "tokens/s unknown")' "$RUNS/$1/metrics.jsonl"
}

step world $PY jobs/build_world.py --config $CONF/world.yaml
step sdvi $PY jobs/build_sdvi.py --config $CONF/sdvi.yaml
step sdvi_eval $PY jobs/build_sdvi.py --config $CONF/sdvi_eval.yaml
step tokenizers $PY jobs/train_tokenizers.py --config "$TOKENIZERS_CONFIG"
step tokenize $PY jobs/tokenize_manifest.py --config $CONF/tokenize.yaml
step tokenize_sdvi $PY jobs/tokenize_manifest.py --config $CONF/tokenize_sdvi.yaml
step stage1 $PY jobs/stage1.py --config $CONF/stage1.yaml $(budget stage1)
step stage2 $PY jobs/stage2.py --config $CONF/stage2.yaml $(budget stage2)
step stage3 $PY jobs/stage3.py --config $CONF/stage3.yaml $(budget stage3)
step evaluate $PY jobs/evaluate.py --config $CONF/evaluate.yaml
echo "total $SECONDS s (this run)" | tee -a "$RUNS/timings.txt"
echo "report: $RUNS/report/report.md"
