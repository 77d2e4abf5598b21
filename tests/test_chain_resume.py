"""scripts/steps.sh, the chain scripts/pipeline.sh runs: a re-run goes on where the last
one stopped, and a failed step says why in one line. Real bash, real files."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHAIN = r"""
set -euo pipefail
source "{root}/scripts/steps.sh"
RUNS=$1
declare -A EXPECTED=([make]=1 [double]=1 [check]=1 [report]=1)
chain_start "$RUNS" make double check report
step make bash -c 'echo 21 > "$0/value"; echo made' "$RUNS"
step double bash -c 'echo $(( $(cat "$0/value") * ${{1}} )) > "$0/doubled"; echo twice >> "$0/ran"' "$RUNS" "${{FACTOR:-2}}"
step check bash -c 'echo checking; [ -z "${{FAIL:-}}" ] || {{ echo "ValueError: row 7 is broken" >&2; exit 3; }}'
step report bash -c 'echo "report $(cat "$0/doubled")" >> "$0/reports"' "$RUNS"
"""


def _chain(tmp: Path, runs: Path, **env) -> subprocess.CompletedProcess:
    script = tmp / "chain.sh"
    script.write_text(CHAIN.format(root=ROOT))
    return subprocess.run(["bash", str(script), str(runs)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


def test_a_failed_step_says_why_and_a_rerun_goes_on_from_it(tmp_path):
    runs = tmp_path / "runs"
    failed = _chain(tmp_path, runs, FAIL="1")
    assert failed.returncode == 3
    last = failed.stdout.strip().splitlines()[-1]
    assert last.startswith("==> check failed (exit 3)") and "ValueError: row 7 is broken" in last
    assert (runs / "logs" / "check.log").read_text().count("checking") == 1
    assert not (runs / "reports").exists()
    assert (runs / "doubled").read_text().strip() == "42"

    again = _chain(tmp_path, runs)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "make: done in an earlier run" in again.stdout and "double: done in an earlier run" in again.stdout
    assert (runs / "ran").read_text().splitlines() == ["twice"]  # 'double' was skipped
    assert (runs / "reports").read_text().splitlines() == ["report 42"]

    # nothing left to do: every step skipped, nothing written again
    third = _chain(tmp_path, runs)
    assert third.returncode == 0 and third.stdout.count("skipped") == 4
    assert (runs / "reports").read_text().splitlines() == ["report 42"]


def test_a_changed_setting_runs_its_step_and_every_later_one_again(tmp_path):
    runs = tmp_path / "runs"
    assert _chain(tmp_path, runs).returncode == 0
    changed = _chain(tmp_path, runs, FACTOR="3")
    assert changed.returncode == 0
    assert "make: done in an earlier run" in changed.stdout
    assert "double: done in an earlier run" not in changed.stdout
    assert (runs / "doubled").read_text().strip() == "63"
    assert (runs / "reports").read_text().splitlines() == ["report 42", "report 63"]
    timings = (runs / "timings.txt").read_text()
    assert "make skipped (done earlier)" in timings and timings.count("run started") == 2


def test_a_step_runs_again_when_what_step_settings_reports_changes(tmp_path):
    """`step_settings` (pipeline.sh: the resolved config files) is part of a step's record."""
    chain, settings = tmp_path / "chain.sh", tmp_path / "settings.yaml"
    chain.write_text(f"""set -euo pipefail
source "{ROOT}/scripts/steps.sh"
step_settings() {{ cat "{settings}"; }}
declare -A EXPECTED=([use]=1)
chain_start "$1" use
step use bash -c 'echo ran >> "$0/ran"' "$1"
""")
    runs = tmp_path / "runs"
    run = lambda: subprocess.run(["bash", str(chain), str(runs)], capture_output=True, text=True,  # noqa: E731
                                 env={"PATH": "/usr/bin:/bin"}, timeout=60)
    settings.write_text("steps: 1\n")
    assert run().returncode == 0 and run().returncode == 0
    assert (runs / "ran").read_text().splitlines() == ["ran"]  # the second run skipped it
    settings.write_text("steps: 2\n")
    assert run().returncode == 0
    assert (runs / "ran").read_text().splitlines() == ["ran", "ran"]


def test_a_finished_step_that_runs_again_is_restarted_and_a_failed_one_is_not(tmp_path):
    """`step_restart` (pipeline.sh: a training stage's folder moved aside) runs before a step
    that finished and must run again; a step that failed resumes instead."""
    chain = tmp_path / "chain.sh"
    chain.write_text(f"""set -euo pipefail
source "{ROOT}/scripts/steps.sh"
step_restart() {{ echo "$1" >> "{tmp_path}/restarted"; }}
declare -A EXPECTED=([make]=1 [use]=1)
chain_start "$1" make use
step make bash -c 'echo "$1" > "$0/value"' "$1" "${{VALUE:-1}}"
step use bash -c '[ -z "${{FAIL:-}}" ] || exit 1; cat "$0/value" >> "$0/used"' "$1"
""")
    runs = tmp_path / "runs"

    def run(**env):
        return subprocess.run(["bash", str(chain), str(runs)], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **env}, timeout=60)

    assert run(FAIL="1").returncode == 1
    assert run().returncode == 0
    assert not (tmp_path / "restarted").exists()  # 'use' had failed: it resumed, not restarted
    assert run(VALUE="2").returncode == 0
    assert (tmp_path / "restarted").read_text().splitlines() == ["make", "use"]
    assert (runs / "used").read_text().splitlines() == ["1", "2"]
