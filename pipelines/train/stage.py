"""One training stage on a started Ray: resolve its start, fit it to the cluster,
stream its data into a `TorchTrainer` under the watchdog, export `final/`."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from omni_model.config import save_config
from pipelines.data.shards import check_compatible
from pipelines.train.checkpoint import (TRAIN_STATE, check_text_tokenizer, export_final, latest_checkpoint,
                                        text_tokenizer_entry)
from pipelines.train.config import StageConfig
from pipelines.train.guards import STOPPED_FILE, NonFiniteTraining, fit_to_cluster, fit_watched, run_dir_lock
from pipelines.train.initial_model import resolve_vocab
from pipelines.train.loop import train_loop_per_worker
from pipelines.train.mixture import build_dataset, shard_sets

logger = logging.getLogger(__name__)


def run_stage(cfg: StageConfig, *, fail_at_step: int | None = None,
              nonfinite_at: dict[int, int] | None = None) -> dict[str, Any]:
    """Train one stage on a started Ray; returns the final metrics and the final model path.
    The run folder is locked for the stage's time (`RunDirBusy` if another run holds it).

    Test hooks, kept out of the stage's config: `fail_at_step` (rank 1 exits once at that
    step, as a crashed worker) and `nonfinite_at={S: N}` (rank 1's loss is NaN the first
    N times step S is tried)."""
    run_dir = Path(cfg.run.dir).resolve()
    with run_dir_lock(run_dir):
        save_config(cfg, run_dir / "config.yaml")  # as given; the resolved paths go to the workers
        return _run_stage(cfg, run_dir, fail_at_step, nonfinite_at)


def _run_stage(cfg: StageConfig, run_dir: Path, fail_at_step: int | None,
               nonfinite_at: dict[int, int] | None) -> dict[str, Any]:
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # an earlier run's stop; this one starts over
    # Workers and Ray Data tasks do not run in this directory: every path they open is absolute.
    cfg = replace(cfg, data=replace(cfg.data, shards=str(Path(cfg.data.shards).resolve()),
                                    text_tokenizer=cfg.data.text_tokenizer and
                                    str(Path(cfg.data.text_tokenizer).resolve())))
    if cfg.scaling.check_resources:
        cfg = fit_to_cluster(cfg)
    identity = check_compatible(shard_sets(cfg))
    vocab, init_path = resolve_vocab(cfg, identity)
    init_path = str(Path(init_path).resolve()) if init_path else None
    text = text_tokenizer_entry(cfg.data.text_tokenizer)
    if cfg.model.init == "previous":
        check_text_tokenizer(Path(init_path), text)
    cfg_dict = asdict(cfg)
    cfg_dict["run"]["dir"] = str(run_dir)
    tokenizers = {"text": text, "image": identity.get("image"), "speech": identity.get("speech")}
    dataset = build_dataset(cfg, vocab)
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        done = json.loads((resume / TRAIN_STATE).read_text())["step"]
        logger.info("resuming from %s (step %d)", resume, done)
        if done >= cfg.train.max_steps:
            export_final(resume, run_dir / "final")
            return {"metrics": None, "final": str(run_dir / "final"), "vocab_size": vocab.size,
                    "resumed_finished_run": True}
    metrics = fit_and_export(cfg, run_dir, train_loop_per_worker, {
        "stage": cfg_dict, "vocab": vocab.to_dict(), "init_path": init_path, "tokenizers": tokenizers,
        "fail_at_step": fail_at_step, "nonfinite_at": nonfinite_at}, dataset, export_final)
    return {"metrics": metrics, "final": str(run_dir / "final"), "vocab_size": vocab.size}


def fit_and_export(cfg, run_dir: Path, loop: Callable[[dict], None], loop_config: dict, dataset,
                   export: Callable[[Path, Path], None]) -> dict | None:
    """Fit `loop` on the workers `cfg.scaling` asks for (a GPU each with `use_gpu`) under
    the watchdog (`fit_watched`), then export the last checkpoint to `run_dir/final`
    with `export(checkpoint, final)`; returns the last metrics. A run its workers
    stopped as non-finite raises `NonFiniteTraining` with their reason. No
    resume_from_checkpoint: Train V2 restores a run started again with the same name and
    storage_path from that run's newest checkpoint by itself."""
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.scaling.use_gpu
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name="train", storage_path=str(run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures)),
        datasets={"train": dataset},
    )
    result = fit_watched(trainer, cfg, run_dir)
    if (run_dir / STOPPED_FILE).exists():
        raise NonFiniteTraining((run_dir / STOPPED_FILE).read_text().strip())
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as src:
        export(Path(src), run_dir / "final")
    return result.metrics
