"""The training objective, once: the masked-diffusion loss of a packed batch and the
warmup-then-cosine learning-rate schedule. The Ray Train loop, the demo's fitting loop
and the benchmarks call the same `diffusion_loss_of_batch`, so a "plain loop" baseline
times exactly the step the trainer runs; every trainer of the project (the stages and
the tokenizer trainers) shapes its learning rate with `warmup_cosine`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from omni_model.batching import Batch
from omni_model.masking import MaskedBatch, diffusion_loss, mask_for_training
from omni_model.vocab import Vocab


@dataclass(frozen=True)
class Objective:
    """How a batch is noised and scored (DESIGN's training objective)."""

    pad_ratio: float = 0.6  #: tail pads are masked with probability pad_ratio * t
    eps_t: float = 1e-3  #: t ~ U(eps_t, 1) (or its cosine-scheduled form)
    schedule: str = "uniform"  #: noise levels: uniform or cosine (MaskGIT)
    weighting: str = "elbo"  #: elbo (1/t) or none


@dataclass
class StepResult:
    loss: torch.Tensor  #: the scalar to back-propagate: the mean over masked positions
    per_position: torch.Tensor  #: `[B, L]` weighted loss (0 where not masked)
    logits: torch.Tensor  #: `[N, V]`: the N masked positions' only, row by row
    noisy: MaskedBatch


def diffusion_loss_of_batch(model: nn.Module, batch: Batch, vocab: Vocab, objective: Objective,
                            generator: torch.Generator | None = None,
                            autocast: contextlib.AbstractContextManager | None = None) -> StepResult:
    """Mask a (packed) batch's responses at a fresh t per sample, predict, and score the
    masked positions (one t per packed document when `batch.doc_ids` is set)."""
    noisy = mask_for_training(batch.input_ids, batch.response_mask, vocab.mask_id, vocab.pad_id,
                              objective.pad_ratio, objective.eps_t, batch.doc_ids, generator=generator,
                              schedule=objective.schedule)
    # image positions from the clean sequence: masking may hide an image's start marker
    image_index = getattr(model, "module", model).image_index(batch.input_ids)
    with autocast if autocast is not None else contextlib.nullcontext():
        # logits of the masked positions only: at a real vocabulary the output layer over
        # every position would be the largest tensor of the step (3,072 x 176k a row)
        logits = model(noisy.noisy_ids, attention_mask=batch.attention_mask, doc_ids=batch.doc_ids,
                       image_index=image_index, logits_at=noisy.target_mask)
    per_position = diffusion_loss(logits, batch.input_ids, noisy.target_mask, noisy.t, objective.weighting,
                                  reduction="none")
    if noisy.target_mask.any():
        loss = per_position.sum() / noisy.target_mask.sum()
    else:  # nothing masked: a zero that keeps the graph (and DDP's gradient hooks) intact
        loss = logits.sum() * 0.0
    return StepResult(loss, per_position, logits, noisy)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warmup to 1 over `warmup_steps`, then a
    cosine down to `min_ratio` at `total_steps` (for `torch.optim.lr_scheduler.LambdaLR`)."""
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


__all__ = ["Objective", "StepResult", "diffusion_loss_of_batch", "warmup_cosine"]
