"""The forward (noising) process of masked discrete diffusion, and its loss.

For each sample draw a noise level t in (eps, 1) and replace each *response* token by the
mask token with probability t; prompt tokens are never masked. t is uniform (LLaDA), or
`cosine`: t = cos(pi/2 * u) for u ~ U(0, 1), MaskGIT's training schedule, which puts
two thirds of the samples above t = 0.5, nearer the all-masked start of generation. The
model is trained with cross-entropy on the masked positions only, optionally weighted by
1/t (the ELBO weighting of masked diffusion: Sahoo et al. 2024, Shi et al. 2024; LLaDA
eq. 3).

Attenuated tail-pad masking (Omni-Diffusion sec. 3): every response is followed by a
random 1..N pad tokens so the model learns where a response ends, and those pads are
masked with the lower probability `pad_ratio * t` so the model spends less capacity on
the trivially predictable padding.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

Weighting = Literal["elbo", "none"]
Schedule = Literal["uniform", "cosine"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def add_tail_pad(ids: torch.Tensor, response_mask: torch.Tensor, pad_id: int, max_pads: int,
                 generator: torch.Generator | None = None,
                 num_pads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append 1..`max_pads` pad tokens (uniform) after a sample that ends with its response.

    Args:
        ids: `[length]` token ids of one sample.
        response_mask: `[length]` bool, True on response tokens.
        pad_id: the vocab's tail-pad id (`vocab.pad_id`).
        max_pads: N, the largest number of pads.
        num_pads: a fixed count instead of a random one (evaluation, tests).

    Returns:
        `(ids, response_mask)` with the pads appended; the pads count as response.
    """
    if max_pads < 1:
        raise ValueError("max_pads must be >= 1")
    if num_pads is None:
        num_pads = int(torch.randint(1, max_pads + 1, (1,), generator=generator))
    pads = torch.full((num_pads,), pad_id, dtype=ids.dtype, device=ids.device)
    ones = torch.ones(num_pads, dtype=torch.bool, device=ids.device)
    return torch.cat([ids, pads]), torch.cat([response_mask.bool(), ones])


class MaskedBatch(NamedTuple):
    noisy_ids: torch.Tensor  #: `[B, L]` ids with masked positions set to the mask id
    target_mask: torch.Tensor  #: `[B, L]` bool, True where a token was masked
    t: torch.Tensor  #: `[B, L]` the noise level of each position's sample


def mask_for_training(ids: torch.Tensor, response_mask: torch.Tensor, mask_id: int,
                      pad_id: int, pad_ratio: float = 0.6, eps: float = 1e-3,
                      doc_ids: torch.Tensor | None = None,
                      generator: torch.Generator | None = None,
                      schedule: Schedule = "uniform") -> MaskedBatch:
    """Draw the forward process for a batch.

    One t per sample (by `schedule`, in (eps, 1)): per row, or per document of a packed
    row when `doc_ids` is given. A response token is masked with probability t, a tail pad
    (a response position holding `pad_id`) with `pad_ratio * t`, a prompt token never.
    """
    if not 0.0 <= pad_ratio <= 1.0:
        raise ValueError("pad_ratio must lie in [0, 1]")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}: one of {SCHEDULES}")
    b, n = ids.shape
    device = ids.device
    n_docs = 1 if doc_ids is None else int(doc_ids.max()) + 1
    u = torch.rand(b, n_docs, generator=generator, device=device)
    if schedule == "cosine":
        u = torch.cos(0.5 * torch.pi * u)
    t_doc = eps + (1 - eps) * u
    t = t_doc.expand(b, n) if doc_ids is None else t_doc.gather(1, doc_ids.long())
    response = response_mask.bool()
    is_pad = response & (ids == pad_id)
    p_mask = torch.where(is_pad, pad_ratio * t, t) * response
    target_mask = torch.rand(b, n, generator=generator, device=device) < p_mask
    noisy = torch.where(target_mask, torch.full_like(ids, mask_id), ids)
    return MaskedBatch(noisy, target_mask, t)


def diffusion_loss(logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                   t: torch.Tensor, weighting: Weighting = "elbo",
                   reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """Cross-entropy on the masked positions, weighted by 1/t (`elbo`) or not (`none`).

    Args:
        logits: `[B, L, V]` aligned with the targets (position i scores token i), or
            `[N, V]` of the N masked positions only, row by row (`Transformer(logits_at=)`).
        target_ids: `[B, L]` the clean ids.
        target_mask: `[B, L]` bool, the positions that were masked.
        t: `[B, L]` (or `[B]`) noise level of each position.
        reduction: `mean` averages over masked tokens (normalised per token);
            `none` returns the weighted loss of every position (0 where unmasked),
            for per-task metrics.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}")
    if t.dim() == 1:
        t = t[:, None].expand_as(target_ids)
    # Only masked positions reach the (vocab-wide) softmax: with 176k ids the logits of
    # the unmasked majority would dominate the memory of the loss.
    sel = target_mask.bool()
    scored = logits if logits.dim() == 2 else logits[sel]
    if scored.shape[0] != int(sel.sum()):
        raise ValueError(f"{scored.shape[0]} rows of logits for {int(sel.sum())} masked positions")
    token_loss = F.cross_entropy(scored.float(), target_ids[sel], reduction="none")
    if weighting == "elbo":
        token_loss = token_loss / t[sel]
    if reduction == "none":
        out = torch.zeros(target_ids.shape, dtype=token_loss.dtype, device=logits.device)
        out[sel] = token_loss
        return out
    if token_loss.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
    return token_loss.mean()
