"""Evaluate a trained model on the held-out world scenes and write a report folder.

    python jobs/evaluate.py --config configs/tiny/evaluate.yaml [evaluate.model=runs/stage2/final]

Writes metrics.json, report.md, t2i_grid.png, loss.png, presets.json and a few WAVs to
`evaluate.out` (and presets.json into the model folder with `evaluate.presets_into_model`). Runs in this process (no Ray): generation is batched by layout.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from omni_model.config import parse_job_args, save_config
from pipelines.evaluation import EvalConfig, evaluate, format_report


@dataclass(frozen=True)
class EvaluateJob:
    evaluate: EvalConfig = field(default_factory=EvalConfig)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(EvaluateJob, __doc__.splitlines()[0], "configs/tiny/evaluate.yaml", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    save_config(cfg, f"{cfg.evaluate.out}/config.yaml")
    metrics = evaluate(cfg.evaluate)
    print(format_report(metrics))
    print(f"report in {cfg.evaluate.out}/ (report.md, metrics.json, t2i_grid.png, loss.png, *.wav)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
