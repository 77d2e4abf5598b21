"""The loop every Ray Train worker of a release fine-tuning runs: the stages' loop
(`pipelines/train/loop.py`) with the release's model, speech input and checkpoint
format. Shared with it: `TrainState` (step, samples seen, random streams), the
`StreamPacker` (documents packed with block-diagonal attention, as the official
training packs them), the tail pads and the objective, `ParallelModel` (DDP or DeepSpeed
ZeRO, AdamW, warmup-cosine, a non-finite step skipped on every rank), the metrics and
the rule that a checkpoint counts only when every rank's files are there.

A checkpoint is a release folder (`ReleaseModel.save_pretrained`, rank 0) plus the
optimizer (DDP's `optimizer.pt`, or DeepSpeed's `deepspeed/`), each rank's random
state and `train_state.json`; a restarted worker group loads the source release for
its tokenizer and files, then the checkpoint's weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from omni_model.batching import StreamPacker
from omni_model.config import from_dict
from omni_model.masking import add_tail_pad
from omni_model.objective import Objective
from omni_model.precision import autocast
from omni_model.release.finetune import (ReleaseDiffusion, SpeechBatch, freeze_speech_encoder, load_release_weights,
                                         release_loss)
from omni_model.release.model import ReleaseModel
from pipelines.data.manifest import TASKS
from pipelines.train.checkpoint import TrainState, restored_checkpoint, write_checkpoint
from pipelines.train.loop import FailOnce, run_steps, stop_when_nonfinite, worker_context
from pipelines.train.parallelism import ParallelModel
from pipelines.train.prefetch import BatchFeed, prefetch_depth
from pipelines.train.release_config import ReleaseFinetuneConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"


def build_release(cfg: ReleaseFinetuneConfig, device: torch.device | str = "cpu",
                  resume_dir: Path | None = None) -> ReleaseModel:
    """The release to train: the source folder (tokenizer, SenseVoiceSmall, files its
    saves copy), its weights or a checkpoint's, the speech encoder frozen as configured."""
    model = ReleaseModel.from_folder(cfg.model.path, dtype=getattr(torch, cfg.model.dtype),
                                     sensevoice_folder=cfg.model.sensevoice_folder, dither=cfg.data.dither)
    if resume_dir is not None:
        load_release_weights(model, resume_dir)
    if cfg.model.freeze_speech_encoder:
        freeze_speech_encoder(model)
    return model.to(device).train()


def release_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    cfg = from_dict(ReleaseFinetuneConfig, config["cfg"])
    rank, world, device = worker_context(cfg.scaling.threads_per_worker)
    with restored_checkpoint(ray.train.get_checkpoint(), cfg.run.dir) as (resume_dir, recorded):
        torch.manual_seed(cfg.data.seed * 1000 + rank)
        state = TrainState.begin(rank, world, device, recorded, cfg.data.seed)
        net = ReleaseDiffusion(build_release(cfg, "cpu", resume_dir))
        net.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
        opt = ParallelModel(cfg, net, device, world, resume_dir)  # type: ignore[arg-type] - the fields it reads
        state.restore_rng(resume_dir)
    stop_when_nonfinite(lambda: _train(cfg, config, state, net, opt), rank, cfg.run.dir)


class _Examples:
    """The worker's examples as `(ids, response_mask, key)` for the packer; the speech
    features and task of each wait under its key until its batch is assembled."""

    def __init__(self, shard, skip: int, buffer: int, seed: int, dim: int) -> None:
        self.shard, self.skip, self.buffer, self.seed, self.dim = shard, skip, buffer, seed, dim
        self.pending: dict[int, tuple[int, list[int], list[torch.Tensor]]] = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task_index = {t: i for i, t in enumerate(TASKS)}
        seen = 0
        for batch in self.shard.iter_batches(batch_size=16, batch_format="pyarrow",
                                             local_shuffle_buffer_size=self.buffer, local_shuffle_seed=self.seed):
            for row in batch.to_pylist():
                seen += 1
                if seen <= self.skip:
                    continue
                flat = torch.tensor(row["audio_features"], dtype=torch.float32).view(-1, self.dim)
                feats = list(flat.split(row["audio_frames"])) if row["audio_frames"] else []
                self.pending[seen] = (task_index.get(row["task"], len(TASKS)), row["audio_starts"], feats)
                yield (torch.tensor(row["input_ids"], dtype=torch.long),
                       torch.tensor(row["response_mask"], dtype=torch.bool), seen)
        raise RuntimeError(f"this worker's data ran out after {seen} samples: raise data.epochs")

    def assemble(self, tags: torch.Tensor) -> tuple[SpeechBatch, torch.Tensor]:
        """The speech inputs of a packed batch (by where each example landed) and the
        per-position task tags for the metrics."""
        features, spans = [], []
        tasks = torch.full_like(tags, -1)
        for row in range(tags.shape[0]):
            keys, counts = torch.unique_consecutive(tags[row], return_counts=True)
            offset = 0
            for key, count in zip(keys.tolist(), counts.tolist()):
                if key >= 0:
                    task, starts, feats = self.pending.pop(key)
                    tasks[row, offset:offset + count] = task
                    for start, f in zip(starts, feats):
                        features.append(f)
                        spans.append((row, offset + start, f.shape[0] + 4))
                offset += count
        return SpeechBatch.of(features, spans), tasks


def _padded(stream, pad_id: int, max_pads: int, gen: torch.Generator):
    for ids, mask, key in stream:
        ids, mask = add_tail_pad(ids, mask, pad_id, max_pads, gen)
        yield ids, mask, key


def _train(cfg: ReleaseFinetuneConfig, config: dict[str, Any], state: TrainState, net: ReleaseDiffusion,
           opt: ParallelModel) -> None:
    import ray.train

    rank, device = state.rank, state.device
    release = net.release
    vocab = release.vocab
    examples = _Examples(ray.train.get_dataset_shard("train"), state.samples_seen, cfg.data.shuffle_buffer,
                         cfg.data.seed * 1000 + rank, release.speech.frontend.config.output_size)
    stream = _padded(iter(examples), vocab.pad_id, cfg.data.max_pads, state.generator)
    packer = StreamPacker(cfg.data.max_seq_len, cfg.data.rows_per_step, vocab.pad_id)
    objective = Objective(cfg.data.pad_ratio, cfg.optim.eps_t, cfg.optim.t_schedule, cfg.optim.weighting)
    precision = "none" if opt.engine is not None else cfg.scaling.precision

    def make():
        batch, tags, consumed = packer.next_batch(stream)
        speech, tasks = examples.assemble(tags)
        return (batch, tasks, speech), consumed

    feed = BatchFeed(make, state.generator, device, prefetch_depth(cfg.data.prefetch, device))

    def next_micro_batch():
        (batch, tasks, speech), consumed, state.pad_rng = feed.next()
        return batch, tasks, speech, consumed

    def loss_of(step: int, batch, speech: SpeechBatch):
        return release_loss(opt.net, batch, speech, vocab, objective, autocast=autocast(device, precision),
                            masking=cfg.masking)

    try:
        run_steps(cfg, state, opt, next_micro_batch, loss_of,
                  lambda folder: write_checkpoint(folder, state, opt, "release"),
                  FailOnce(config.get("fail_at_step"), cfg.run.dir, rank))
    finally:
        feed.close()
