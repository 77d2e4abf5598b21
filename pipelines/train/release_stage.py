"""Fine-tune a release folder on a started Ray: manifests to examples (Ray Data), then a
`TorchTrainer` under the stages' guards (resources checked, run folder locked, a stalled
fit failed with what is pending), and `final/`: the last checkpoint's release folder,
which `ReleaseModel.from_folder` (and the official code) loads."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from omni_model.config import save_config
from omni_model.release.model import is_release_folder
from pipelines.train.checkpoint import TRAIN_STATE, latest_checkpoint
from pipelines.train.guards import STOPPED_FILE, fit_to_cluster, run_dir_lock
from pipelines.train.parallelism import OPTIMIZER_FILE
from pipelines.train.release_config import ReleaseFinetuneConfig
from pipelines.train.release_data import prepare_examples, training_dataset
from pipelines.train.release_loop import FINAL_DIR, release_loop_per_worker
from pipelines.train.stage import fit_and_export

logger = logging.getLogger(__name__)


def run_release_finetune(cfg: ReleaseFinetuneConfig, *, fail_at_step: int | None = None) -> dict[str, Any]:
    """Fine-tune `cfg.model.path` on `cfg.data.manifests`; returns the final metrics, the
    final folder and the example counts. Test hook: `fail_at_step` (rank 1 exits once
    at that step, as a crashed worker; the run resumes from its last checkpoint)."""
    run_dir = Path(cfg.run.dir).resolve()
    with run_dir_lock(run_dir):
        save_config(cfg, run_dir / "config.yaml")
        return _run(cfg, run_dir, fail_at_step)


def _run(cfg: ReleaseFinetuneConfig, run_dir: Path, fail_at_step: int | None) -> dict[str, Any]:
    if not cfg.model.path or not is_release_folder(cfg.model.path):
        raise ValueError(f"model.path {cfg.model.path!r} is not a release folder (Dream's slow tokenizer files "
                         "beside the weights; docs/release.md)")
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    d = cfg.data
    absolute = {k: str(Path(v).resolve()) for k, v in
                (("image_tokenizer", d.image_tokenizer), ("speech_tokenizer", d.speech_tokenizer), ("root", d.root))
                if v}
    cfg = replace(cfg, data=replace(d, **absolute),
                  model=replace(cfg.model, path=str(Path(cfg.model.path).resolve()),
                                sensevoice_folder=cfg.model.sensevoice_folder
                                and str(Path(cfg.model.sensevoice_folder).resolve())),
                  run=replace(cfg.run, dir=str(run_dir)))
    if cfg.scaling.check_resources:
        cfg = fit_to_cluster(cfg)  # type: ignore[arg-type] - it reads the sections both configs share
    summary = prepare_examples(cfg, run_dir)
    if summary["examples"] == 0:
        raise ValueError(f"no usable example in {summary['rows']} manifest rows: see "
                         f"{run_dir}/examples/quarantine.parquet")
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        done = json.loads((resume / TRAIN_STATE).read_text())["step"]
        logger.info("resuming from %s (step %d)", resume, done)
        if done >= cfg.train.max_steps:
            export_release(resume, run_dir / FINAL_DIR)
            return {"metrics": None, "final": str(run_dir / FINAL_DIR), "examples": summary,
                    "resumed_finished_run": True}
    metrics = fit_and_export(cfg, run_dir, release_loop_per_worker, {"cfg": asdict(cfg), "fail_at_step": fail_at_step},
                             training_dataset(cfg, run_dir, summary), export_release)  # type: ignore[arg-type]
    return {"metrics": metrics, "final": str(run_dir / FINAL_DIR), "examples": summary}


def _training_file(path: Path) -> bool:
    name = path.name
    return (name in (TRAIN_STATE, OPTIMIZER_FILE, "deepspeed") or (name.startswith("rank_")
            and name.endswith((".pt", ".files.json"))))


def export_release(checkpoint: Path, final: Path) -> None:
    """`final/`: the checkpoint's release folder (written by `ReleaseModel.save_pretrained`
    on rank 0) without the optimizer and the ranks' state; whole or absent, refused when
    a weight is not finite."""
    from safetensors import safe_open

    from pipelines.train.guards import check_finite_weights

    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as weights:
            check_finite_weights((name, weights.get_tensor(name)) for name in weights.keys())
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if _training_file(item):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
