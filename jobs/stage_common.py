"""The command line shared by jobs/stage{1,2,3}.py (one place, so the three stay one)."""

from __future__ import annotations

import json
import logging

from pipelines.config import parse_job_args, save_config
from pipelines.ray_setup import start_ray, stop_ray
from pipelines.train import StageConfig, run_stage


def stage_main(stage: int, doc: str, argv: list[str]) -> int:
    cfg = parse_job_args(StageConfig, doc.splitlines()[0], f"configs/tiny/stage{stage}.yaml", argv)
    if cfg.stage != stage:
        raise SystemExit(f"{cfg} is a stage {cfg.stage} config, not stage {stage}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_config(cfg, f"{cfg.run.dir}/config.yaml")
    owned = start_ray(cfg.ray)
    try:
        result = run_stage(cfg)
    finally:
        stop_ray(owned)
    metrics = result.get("metrics") or {}
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("loss/")}, indent=2))
    print(f"stage {stage} done: final model in {result['final']} (vocab {result['vocab_size']}); "
          f"metrics in {cfg.run.dir}/metrics.jsonl, TensorBoard in {cfg.run.dir}/tensorboard")
    return 0
