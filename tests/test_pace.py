"""The quickstart's first minute (pipelines/train/pace.py, jobs/estimate_run.py): a real
measurement of a stage's model on this machine, the chain's estimate from it, and stage
steps chosen for a budget."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from omni_model.config import load_config
from omni_model.vocab import Vocab
from pipelines.train import StageConfig
from pipelines.train.pace import (MIN_SHARE, REFERENCE_SECONDS, STAGE_OVERHEAD_S, TRAINING_EFFICIENCY, estimate,
                                  fit_steps, measure_tokens_per_s, tokens_per_step)
from tests.conftest import ROOT

STAGES = ("stage1", "stage2", "stage3")


def _stages(profile: str) -> dict[str, StageConfig]:
    return {name: load_config(StageConfig, ROOT / f"configs/{profile}/{name}.yaml") for name in STAGES}


def test_the_measured_pace_is_real_and_the_estimate_follows_it():
    stages = _stages("ci")
    rate = measure_tokens_per_s(stages["stage1"], Vocab.fresh(300, 64, 32), steps=2)
    assert 100 < rate < 10_000_000
    est = estimate("ci", stages, rate)
    assert list(est.seconds) == [*list(REFERENCE_SECONDS["ci"])[:-1], *STAGES, "evaluate"]
    cfg = stages["stage1"]
    pace = rate * TRAINING_EFFICIENCY["ci"]
    assert est.seconds["stage1"] == pytest.approx(STAGE_OVERHEAD_S + cfg.train.max_steps * tokens_per_step(cfg) / pace)
    slower = estimate("ci", stages, rate / 4)  # a machine 4x slower: training 4x, data steps 2x
    assert slower.seconds["world"] == pytest.approx(2 * est.seconds["world"])
    assert slower.seconds["stage2"] - STAGE_OVERHEAD_S == pytest.approx(4 * (est.seconds["stage2"] - STAGE_OVERHEAD_S))


def test_a_budget_shortens_every_stage_by_one_share_and_refuses_what_cannot_fit():
    stages = _stages("tiny")
    est = estimate("tiny", stages, 2_000.0)  # a slow machine: hours
    assert est.total_s > 3600
    steps = fit_steps(est, stages, 60)
    shares = [steps[name] / cfg.train.max_steps for name, cfg in stages.items()]
    assert max(shares) - min(shares) < 0.01 and MIN_SHARE <= shares[0] < 1
    fitted = estimate("tiny", {n: replace(c, train=replace(c.train, max_steps=steps[n])) for n, c in stages.items()},
                      2_000.0)
    assert fitted.total_s == pytest.approx(3600, rel=0.01)
    assert fit_steps(est, stages, 10_000) == {n: c.train.max_steps for n, c in stages.items()}  # never longer
    with pytest.raises(ValueError, match="too short on this machine.*at least"):
        fit_steps(est, stages, 5)


def test_the_job_writes_what_the_chain_reads(tmp_path):
    out = tmp_path / "estimate.json"
    result = subprocess.run([sys.executable, "jobs/estimate_run.py", "--profile", "ci", "--minutes", "60",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "fits a 60-minute budget at its configured steps" in result.stdout
    written = json.loads(out.read_text())
    assert written["steps"] is None and written["tokens_per_s"] > 0  # nothing for the chain to pass
    assert set(written["seconds"]) == {*REFERENCE_SECONDS["ci"], *STAGES}
    # a budget the configured steps overrun: each stage shortened, the chosen steps written
    tight = subprocess.run([sys.executable, "jobs/estimate_run.py", "--profile", "tiny", "--minutes", "20",
                            "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert tight.returncode == 0, tight.stderr
    chosen = json.loads(out.read_text())["steps"]
    if chosen is not None:  # a machine fast enough for the whole default in 20 minutes keeps it
        assert "for a 20-minute budget: stages of" in tight.stdout
        assert chosen["stage1"] < 900 and chosen["stage3"] < 1200
    refused = subprocess.run([sys.executable, "jobs/estimate_run.py", "--profile", "ci", "--minutes", "0.5"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "too short" in refused.stderr
