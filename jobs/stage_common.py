"""The command line shared by jobs/stage{1,2,3}.py (one place, so the three stay one)."""

from __future__ import annotations

from jobs.ray_job import run_training_job
from pipelines.train import StageConfig, run_stage


def stage_main(stage: int, doc: str, argv: list[str]) -> int:
    def run(cfg: StageConfig) -> dict:
        if cfg.stage != stage:
            raise SystemExit(f"this is a stage {cfg.stage} config, not stage {stage}")
        return run_stage(cfg)  # it saves the config, under the run.dir lock

    done = run_training_job(f"stage {stage}", StageConfig, doc, f"configs/tiny/stage{stage}.yaml", argv, run)
    if done is None:
        return 1
    cfg, result = done
    print(f"stage {stage} done: final model in {result['final']} (vocab {result['vocab_size']}); "
          f"metrics in {cfg.run.dir}/metrics.jsonl, TensorBoard in {cfg.run.dir}/tensorboard")
    return 0
