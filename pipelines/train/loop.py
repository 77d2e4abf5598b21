"""The loop every Ray Train worker runs: stream its dataset shard, add tail pads, pack
samples into rows with a document mask, draw the masking, optimise, report metrics and
checkpoints."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch

from omni_model.batching import StreamPacker
from omni_model.config import from_dict
from omni_model.masking import add_tail_pad
from omni_model.objective import Objective, StepResult, diffusion_loss_of_batch
from omni_model.precision import autocast
from omni_model.vocab import Vocab
from pipelines.data.manifest import TASKS
from pipelines.train.checkpoint import TrainState, restored_checkpoint, save_checkpoint
from pipelines.train.config import StageConfig
from pipelines.train.guards import STOPPED_FILE, NonFiniteTraining
from pipelines.train.metrics import MetricsWindow, MetricsWriter
from pipelines.train.parallelism import ParallelModel, compile_blocks
from pipelines.train.prefetch import BatchFeed, prefetch_depth
from pipelines.train.initial_model import build_model

logger = logging.getLogger(__name__)


def objective_of(cfg: StageConfig) -> Objective:
    return Objective(cfg.data.pad_ratio, cfg.optim.eps_t, cfg.optim.t_schedule, cfg.optim.weighting)


def _sample_stream(shard, skip: int, buffer: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The worker's samples in one pass (see DataConfig.epochs), skipping `skip` first."""
    task_index = {t: i for i, t in enumerate(TASKS)}
    seen = 0
    for batch in shard.iter_batches(batch_size=64, batch_format="numpy", local_shuffle_buffer_size=buffer,
                                    local_shuffle_seed=seed):
        for ids, mask, task in zip(batch["input_ids"], batch["response_mask"], batch["task"]):
            seen += 1
            if seen <= skip:
                continue
            yield (torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.bool),
                   task_index.get(str(task), len(TASKS)))
    raise RuntimeError(f"this worker's data ran out after {seen} samples: raise data.epochs")


def _padded(stream, pad_id: int, max_pads: int, gen: torch.Generator):
    for ids, mask, tag in stream:
        ids, mask = add_tail_pad(ids, mask, pad_id, max_pads, gen)
        yield ids, mask, tag


class FailOnce:
    """Test hook (`run_stage(..., fail_at_step=N)`, never in a stage's config): rank 1
    exits once at that step, as a crashed worker."""

    def __init__(self, step: int | None, run_dir: str, rank: int) -> None:
        self.step = step if rank == 1 else None
        self.marker = Path(run_dir) / ".failed_once"

    def __call__(self, step: int) -> None:
        if step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text("rank 1 exited on purpose (fail_at_step)")
            os._exit(1)


class _PoisonLoss:
    """Test hook (`run_stage(..., nonfinite_at={S: N})`, never in a stage's config):
    rank 1's loss is NaN the first N times step S is tried (a skipped step is tried
    again), as a bad batch or an overflow would make it."""

    def __init__(self, at: dict[int, int] | None, rank: int) -> None:
        self.left = dict(at or {}) if rank == 1 else {}

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.left.get(step, 0) > 0:
            self.left[step] -= 1
            return loss * float("nan")
        return loss


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    cfg = from_dict(StageConfig, config["stage"])
    rank, world, device = worker_context(cfg.scaling.threads_per_worker)
    if cfg.model.attention == "flex" and device.type != "cuda":
        raise ValueError("model.attention=flex needs a GPU worker (FlexAttention has no backward pass "
                         "on the CPU); use model.attention=sdpa")
    vocab = Vocab.from_dict(config["vocab"])

    with restored_checkpoint(ray.train.get_checkpoint(), cfg.run.dir) as (resume_dir, recorded):
        torch.manual_seed(cfg.data.seed * 1000 + rank)
        state = TrainState.begin(rank, world, device, recorded, cfg.data.seed)
        model = build_model(cfg, vocab, config.get("init_path"), resume_dir)
        model.set_gradient_checkpointing(cfg.model.gradient_checkpointing).set_attention(cfg.model.attention)
        if cfg.model.compile == "blocks":
            compile_blocks(model)
        opt = ParallelModel(cfg, model, device, world, resume_dir)
        state.restore_rng(resume_dir)
    stop_when_nonfinite(lambda: _train(cfg, config, state, model, opt, vocab), rank, cfg.run.dir)


def worker_context(threads: int) -> tuple[int, int, torch.device]:
    """This Ray Train worker's rank, world size and device, its torch threads set."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def stop_when_nonfinite(train: Callable[[], None], rank: int, run_dir: str) -> None:
    """Run `train`; a `NonFiniteTraining` ends the worker quietly, rank 0 leaving the
    reason in `STOPPED_FILE` for the driver. Every rank is there at the same step (the
    flags are reduced over the ranks)."""
    try:
        train()
    except NonFiniteTraining as err:
        if rank == 0:
            (Path(run_dir) / STOPPED_FILE).write_text(str(err) + "\n")
        logger.error("rank %d stops: %s", rank, err)


def _train(cfg: StageConfig, config: dict[str, Any], state: TrainState, model, opt: ParallelModel,
           vocab: Vocab) -> None:
    import ray.train

    rank, device = state.rank, state.device
    stream = _padded(_sample_stream(ray.train.get_dataset_shard("train"), state.samples_seen,
                                    cfg.data.shuffle_buffer, cfg.data.seed * 1000 + rank),
                     vocab.pad_id, cfg.data.max_pads, state.generator)
    packer = StreamPacker(cfg.data.max_seq_len, cfg.data.rows_per_step, vocab.pad_id)
    poison = _PoisonLoss(config.get("nonfinite_at"), rank)
    precision = "none" if opt.engine is not None else cfg.scaling.precision  # DeepSpeed: its own bf16
    objective = objective_of(cfg)
    model.train()

    def make():
        batch, tags, consumed = packer.next_batch(stream)
        return (batch, tags), consumed

    feed = BatchFeed(make, state.generator, device, prefetch_depth(cfg.data.prefetch, device))

    def next_micro_batch():
        (batch, tags), consumed, state.pad_rng = feed.next()
        return batch, tags, None, consumed

    def loss_of(step: int, batch, _extra) -> StepResult:
        out = diffusion_loss_of_batch(opt.net, batch, vocab, objective, autocast=autocast(device, precision))
        return replace(out, loss=poison(step, out.loss))

    try:
        run_steps(cfg, state, opt, next_micro_batch, loss_of,
                  lambda folder: save_checkpoint(folder, state, opt, vocab, config),
                  FailOnce(config.get("fail_at_step"), cfg.run.dir, rank))
    finally:
        feed.close()


def run_steps(cfg, state: TrainState, opt: ParallelModel, next_micro_batch: Callable[[], tuple],
              loss_of: Callable[[int, Any, Any], StepResult], save: Callable[[Path], None],
              fail_once: Callable[[int], None] | None = None) -> None:
    """The optimisation steps every kind of run takes, from `state.step` to
    `cfg.train.max_steps`: `cfg.optim.grad_accum` micro-batches a step
    (`next_micro_batch()` -> packed batch on the device, per-position task tags, what the
    loss needs besides, samples consumed; `loss_of(step, batch, extra)`), a step with a
    non-finite loss or gradient skipped on every rank (`train.max_nonfinite_in_row` in a
    row stop the run), metrics every `train.log_every` steps (rank 0 writes them) and a
    checkpoint every `train.checkpoint_every` (`save(folder)` on every rank, then
    reported to Ray Train). `fail_once(step)`: a test hook before each step."""
    import ray.train

    rank, world, device = state.rank, state.world, state.device
    n_tasks = len(TASKS) + 1
    writer = MetricsWriter(Path(cfg.run.dir)) if rank == 0 else None
    window = MetricsWindow(n_tasks, device)
    in_row = 0  # skipped steps since the last applied one
    try:
        while state.step < cfg.train.max_steps:
            step = state.step
            if fail_once is not None:
                fail_once(step)
            t_start = time.perf_counter()
            pending = MetricsWindow(n_tasks, device)  # joins `window` only if the step is applied
            finite = torch.ones((), dtype=torch.bool, device=device)
            for _ in range(cfg.optim.grad_accum):
                t0 = time.perf_counter()
                batch, tags, extra, consumed = next_micro_batch()
                state.samples_seen += consumed  # a skipped step's samples are passed over too
                pending.wait += time.perf_counter() - t0
                out = loss_of(step, batch, extra)
                finite &= torch.isfinite(out.loss.detach())
                opt.backward(out.loss)
                pending.add(out.per_position.detach(), out.logits.detach(), batch.input_ids,
                            out.noisy.target_mask, tags, batch.attention_mask)
            pending.time += time.perf_counter() - t_start
            if not opt.step(finite):
                in_row += 1
                state.nonfinite_skipped += 1
                if rank == 0:
                    logger.warning("step %d: non-finite loss or gradient norm, update skipped (%d in a row, "
                                   "%d in all)", step + 1, in_row, state.nonfinite_skipped)
                if in_row >= cfg.train.max_nonfinite_in_row:
                    raise NonFiniteTraining(
                        f"{in_row} steps in a row had a non-finite loss or gradient norm (train.max_nonfinite_"
                        f"in_row={cfg.train.max_nonfinite_in_row}; {state.nonfinite_skipped} skipped in all): "
                        f"stopped before step {step + 1}, with the weights of step {step}. Lower optim.lr or "
                        "check the data; a new run resumes from the last checkpoint")
                continue
            in_row = 0
            window.merge(pending)
            done = state.step = step + 1
            if writer is not None:
                writer.progress(done)
            is_log = done % cfg.train.log_every == 0 or done == cfg.train.max_steps
            is_ckpt = done % cfg.train.checkpoint_every == 0 or done == cfg.train.max_steps
            if not (is_log or is_ckpt):
                continue
            metrics = window.reduce(world) | {"step": done, "lr": opt.lr, "epoch_samples": state.samples_seen,
                                              "skipped_nonfinite": state.nonfinite_skipped}
            window = MetricsWindow(n_tasks, device)
            if writer is not None:
                writer.write(metrics)
            if is_ckpt:
                with tempfile.TemporaryDirectory() as tmp:
                    save(Path(tmp))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
    finally:
        if writer is not None:
            writer.close()
