"""The command line shared by jobs/stage{1,2,3}.py (one place, so the three stay one)."""

from __future__ import annotations

import json
import logging
import sys

from jobs.ray_job import run_ray_job
from pipelines.train import StageConfig, run_stage
from pipelines.train.guards import failure_reason


def stage_main(stage: int, doc: str, argv: list[str]) -> int:
    def run(cfg: StageConfig) -> dict:
        if cfg.stage != stage:
            raise SystemExit(f"this is a stage {cfg.stage} config, not stage {stage}")
        return run_stage(cfg)

    try:
        cfg, result = run_ray_job(StageConfig, doc, f"configs/tiny/stage{stage}.yaml", argv,
                                  lambda c: None, run)  # run_stage saves it, under the run.dir lock
    except Exception as err:  # noqa: BLE001 - the whole story is logged; the last line says why
        logging.getLogger(__name__).exception("stage %d failed", stage)
        # the last line a chain's log shows: Ray's own errors are pages of worker tracebacks
        print(f"stage {stage} failed: {failure_reason(err)}", file=sys.stderr, flush=True)
        return 1
    metrics = result.get("metrics") or {}
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("loss/")}, indent=2))
    print(f"stage {stage} done: final model in {result['final']} (vocab {result['vocab_size']}); "
          f"metrics in {cfg.run.dir}/metrics.jsonl, TensorBoard in {cfg.run.dir}/tensorboard")
    return 0
