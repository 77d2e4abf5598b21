"""Fine-tune a released Omni-Diffusion folder on JSONL manifests with Ray Train (speech
encoder frozen; the result saved in the release format). Also run by jobs/stage3.py
when its config's model.path is a release folder.

    python jobs/finetune_release.py --config configs/release/stage3_tiny.yaml [train.max_steps=20 run.dir=DIR]
"""

from __future__ import annotations

import sys

from jobs.ray_job import run_training_job
from omni_model.config import apply_overrides, read_config_file
from omni_model.release.model import is_release_folder
from pipelines.train.release_config import ReleaseFinetuneConfig
from pipelines.train.release_stage import run_release_finetune


def is_release_run(argv: list[str]) -> bool:
    """Whether a stage command line (`--config FILE` and overrides) fine-tunes a release:
    its model.path is a release folder, or its data names manifests."""
    args = list(argv)
    path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), path)
    data = read_config_file(path) if path else {}
    data = apply_overrides(dict(data), [a for a in args if "=" in a and not a.startswith("-")])
    model, source = data.get("model") or {}, data.get("data") or {}
    return bool(source.get("manifests")) or bool(model.get("path") and is_release_folder(model["path"]))


def main(argv: list[str], doc: str = __doc__) -> int:
    done = run_training_job("release fine-tuning", ReleaseFinetuneConfig, doc, "configs/release/stage3_tiny.yaml",
                            argv, run_release_finetune)
    if done is None:
        return 1
    cfg, result = done
    print(f"done: release folder in {result['final']} ({result['examples']['examples']} examples, "
          f"{result['examples']['quarantined']} quarantined); metrics in {cfg.run.dir}/metrics.jsonl")
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
