"""This machine's training pace, measured in a few steps, and what a chain of the embedded
default will take at it: the quickstart's first minute.

Machines differ by more than 6x on the same chain (stage 1 of the default at ~9,600
tokens/s on a CPU with bf16, ~1,400 on an AVX2-only one in float32), so a fixed time in
a README is wrong on most of them. `measure_tokens_per_s` trains a stage's own model a
few steps in this process (no Ray): its objective, precision, optimizer and packed rows
of its shapes, with one worker's threads. `estimate` turns that into seconds per step of
the chain, and `fit_steps` chooses stage lengths that fit a time budget.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from omni_model.batching import Batch, pack_rows
from omni_model.objective import diffusion_loss_of_batch
from omni_model.precision import autocast
from omni_model.vocab import Vocab
from pipelines.train.config import StageConfig
from pipelines.train.initial_model import build_model
from pipelines.train.loop import objective_of

#: Seconds each step other than the stages took in a measured run of each profile, on a
#: machine where `measure_tokens_per_s` gave `REFERENCE_TOKENS_PER_S` (a 2-core Xeon with
#: AMX; the evaluation of `tiny` scaled from another run of it). Data steps (TTS,
#: tokenizers) scale with the machine less than training does: on an AVX2-only machine
#: that trained 6.7x slower they took ~2.2x as long, about the square root of the ratio,
#: which is the rule `estimate` uses; the evaluation samples the model and scales like
#: training.
REFERENCE_SECONDS = {
    "tiny": {"world": 46, "sdvi": 63, "sdvi_eval": 28, "tokenizers": 1, "tokenize": 83, "tokenize_sdvi": 59,
             "evaluate": 194},
    "ci": {"world": 23, "sdvi": 28, "sdvi_eval": 20, "tokenizers": 2, "tokenize": 31, "tokenize_sdvi": 31,
           "evaluate": 7},
}
REFERENCE_TOKENS_PER_S = {"tiny": 10_720, "ci": 51_632}
#: the stages' own tokens/s (2 DDP workers, the data stream, metrics) over what the
#: measurement gives on the same machine: 7,152 against 10,720 for `tiny`, 29,097 against
#: 51,632 for `ci`'s small model
TRAINING_EFFICIENCY = {"tiny": 0.67, "ci": 0.56}
#: what a stage costs besides its steps (Ray and its workers starting, the data set,
#: checkpoints, the export): the ci profile's 40-step stages took ~30 s, ~25 s of it this
STAGE_OVERHEAD_S = 25
#: the shortest share of its configured steps a budget may give a stage
MIN_SHARE = 0.1


def tokens_per_step(cfg: StageConfig) -> int:
    """Positions a stage trains on in one optimizer step, over all its workers."""
    return cfg.data.rows_per_step * cfg.data.max_seq_len * cfg.optim.grad_accum * cfg.scaling.num_workers


def _random_batch(cfg: StageConfig, vocab: Vocab, gen: torch.Generator) -> Batch:
    """Rows of the stage's shape, each packed with two documents of random tokens whose
    second halves are responses (the objective masks responses only)."""
    half = cfg.data.max_seq_len // 2
    rows = []
    for _ in range(cfg.data.rows_per_step):
        docs = []
        for _ in range(2):
            ids = torch.randint(0, vocab.size, (half,), generator=gen)
            docs.append((ids, torch.arange(half) >= half // 2))
        rows.append(docs)
    return pack_rows(rows, cfg.data.max_seq_len, vocab.pad_id)


def measure_tokens_per_s(cfg: StageConfig, vocab: Vocab, steps: int = 4, warmup: int = 1) -> float:
    """Tokens a second that the stage trains at on this machine: one worker's pace
    (`warmup` steps, then `steps` timed ones of the stage's fresh model, objective,
    precision and AdamW, with `scaling.threads_per_worker` threads) times the workers
    the machine's cores can run side by side."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    try:
        model = build_model(cfg, vocab, None, None).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        objective = objective_of(cfg)
        gen = torch.Generator().manual_seed(cfg.data.seed)
        batch = _random_batch(cfg, vocab, gen)
        start = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            out = diffusion_loss_of_batch(model, batch, vocab, objective,
                                          autocast=autocast("cpu", cfg.scaling.precision))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        per_worker = steps * cfg.data.rows_per_step * cfg.data.max_seq_len / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    workers = min(cfg.scaling.num_workers, max(1, (os.cpu_count() or 1) // cfg.scaling.threads_per_worker))
    return per_worker * workers


@dataclass(frozen=True)
class Estimate:
    tokens_per_s: float  #: the measured pace of the stages' model
    seconds: dict[str, float]  #: each step of the chain, in order

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def estimate(profile: str, stages: dict[str, StageConfig], tokens_per_s: float) -> Estimate:
    """Seconds of each step of `profile`'s chain (`REFERENCE_SECONDS` order, the stages
    before the evaluation) at `tokens_per_s` (`measure_tokens_per_s`'s figure), the stages
    at their configured steps and `TRAINING_EFFICIENCY` of that pace."""
    ratio = REFERENCE_TOKENS_PER_S[profile] / tokens_per_s
    seconds: dict[str, float] = {}
    for name, ref in REFERENCE_SECONDS[profile].items():
        if name == "evaluate":
            for stage, cfg in stages.items():
                seconds[stage] = stage_seconds(cfg, cfg.train.max_steps, tokens_per_s * TRAINING_EFFICIENCY[profile])
            seconds[name] = ref * ratio
        else:
            seconds[name] = ref * math.sqrt(ratio)
    return Estimate(tokens_per_s, seconds)


def stage_seconds(cfg: StageConfig, steps: int, tokens_per_s: float) -> float:
    return STAGE_OVERHEAD_S + steps * tokens_per_step(cfg) / tokens_per_s


def fit_steps(est: Estimate, stages: dict[str, StageConfig], minutes: float) -> dict[str, int]:
    """Steps for each stage so that the chain takes about `minutes` at the measured pace:
    the configured steps scaled by one share (at most 1). Raises `ValueError`, naming the
    shortest budget that works, when even `MIN_SHARE` of the steps would not fit."""
    fixed = sum(s for name, s in est.seconds.items() if name not in stages) + STAGE_OVERHEAD_S * len(stages)
    training = sum(est.seconds[name] - STAGE_OVERHEAD_S for name in stages)
    share = min(1.0, (minutes * 60 - fixed) / training)
    if share < MIN_SHARE:
        least = (fixed + MIN_SHARE * training) / 60
        raise ValueError(f"{minutes:g} minutes is too short on this machine: the steps other than training "
                         f"take about {fixed / 60:.1f} min; at least {math.ceil(least * 10) / 10:g} min")
    return {name: max(1, round(cfg.train.max_steps * share)) for name, cfg in stages.items()}
