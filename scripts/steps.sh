# A chain of steps that a re-run resumes (sourced by scripts/pipeline.sh).
#
#   source scripts/steps.sh; chain_start RUNS_DIR ORDER...; step NAME COMMAND...
#
# A step that exits 0 leaves RUNS_DIR/steps/NAME.done holding its command line. Run the
# same chain on the same folder again and each step whose marker holds the same command
# is skipped, up to the first that has none (it failed or never ran) or whose command
# changed; from there every step runs again, since each reads what the ones before it
# wrote. A training stage that runs again resumes from its last complete checkpoint in
# its run.dir. A step that fails ends the chain with one line saying which and why (the
# last line it printed), and its whole output stays in RUNS_DIR/logs/NAME.log.
#
# A function `step_settings COMMAND...`, when the caller defines one, prints what else a
# step's result depends on (its config files, resolved): the marker holds that too, so an
# edited config runs the step again.
#
# A function `step_restart NAME`, when the caller defines one, runs before a step that
# finished earlier runs again (its inputs or settings changed): a training stage must
# start over then, not resume from a checkpoint of other data.
#
# A function `step_note NAME`, when the caller defines one, adds to the step's line in
# RUNS_DIR/timings.txt. EXPECTED[NAME] (seconds, from a measured run; only the proportions matter) drives the
# estimate of what is left, scaled by this machine's pace over the steps it ran.

declare -gA EXPECTED
CHAIN_ORDER=()
CHAIN_RERUN=0
CHAIN_DONE_EXPECTED=0
CHAIN_SECONDS=0

chain_start() {  # chain_start RUNS_DIR NAME...: the folder and the steps in order
  CHAIN_RUNS=$1; shift
  CHAIN_ORDER=("$@")
  mkdir -p "$CHAIN_RUNS/steps" "$CHAIN_RUNS/logs"
  echo "run started $(date -u '+%Y-%m-%d %H:%M:%S') UTC" >> "$CHAIN_RUNS/timings.txt"
}

_chain_left() {  # seconds expected from step NAME to the end
  local name=$1 index=0 left=0 s
  for s in "${CHAIN_ORDER[@]}"; do
    [ "$s" = "$name" ] && index=1
    [ "$index" -gt 0 ] && left=$((left + ${EXPECTED[$s]:-0}))
  done
  echo "$left"
}

_chain_index() {
  local i=0 s
  for s in "${CHAIN_ORDER[@]}"; do
    i=$((i + 1))
    [ "$s" = "$1" ] && { echo "$i"; return; }
  done
  echo "?"
}

step() {  # step NAME COMMAND...: skips it when done before, else runs it and records it
  local name=$1; shift
  local marker="$CHAIN_RUNS/steps/$name.done" log="$CHAIN_RUNS/logs/$name.log"
  local index; index=$(_chain_index "$name")
  local command; command=$(printf '%q ' "$@")
  if declare -F step_settings >/dev/null; then command+=$'\n'$(step_settings "$@"); fi
  if [ "$CHAIN_RERUN" = 0 ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$command" ]; then
    echo "==> [$index/${#CHAIN_ORDER[@]}] $name: done in an earlier run of $CHAIN_RUNS, skipped"
    echo "$name skipped (done earlier)" >> "$CHAIN_RUNS/timings.txt"
    return 0
  fi
  CHAIN_RERUN=1  # this step runs, so every later one reads new inputs
  # done before, so it runs again on changed inputs or settings: the caller's
  # `step_restart NAME`, when defined, clears what must not be resumed from
  if [ -f "$marker" ] && declare -F step_restart >/dev/null; then step_restart "$name"; fi
  rm -f "$marker"
  local left; left=$(_chain_left "$name")
  if [ "$CHAIN_DONE_EXPECTED" -gt 0 ]; then
    left=$((left * CHAIN_SECONDS / CHAIN_DONE_EXPECTED))
    echo "==> [$index/${#CHAIN_ORDER[@]}] $name: ${CHAIN_SECONDS} s so far, about $(( (left + 59) / 60 )) min left at this pace"
  else
    echo "==> [$index/${#CHAIN_ORDER[@]}] $name: about $(( (left + 59) / 60 )) min left at the pace of the measured run"
  fi
  local start=$SECONDS rc=0
  set +e
  PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "$log"  # unbuffered: progress shows as it happens
  rc=${PIPESTATUS[0]}
  set -e
  local took=$((SECONDS - start))
  if [ "$rc" -ne 0 ]; then
    local why
    why=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-300)
    echo "==> $name failed (exit $rc) after $took s: ${why:-no output}" | tee -a "$CHAIN_RUNS/timings.txt"
    echo "    its log: $log; run the same command again to go on from this step" >&2
    exit "$rc"
  fi
  printf '%s' "$command" > "$marker"
  CHAIN_SECONDS=$((CHAIN_SECONDS + took))
  CHAIN_DONE_EXPECTED=$((CHAIN_DONE_EXPECTED + ${EXPECTED[$name]:-0}))
  local line="$name $took s" note=""
  # the caller may add to a step's line (a training stage's pace, say)
  declare -F step_note >/dev/null && note=$(step_note "$name")
  echo "$line${note:+, $note}" | tee -a "$CHAIN_RUNS/timings.txt"
}
