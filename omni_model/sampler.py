"""The iterative unmasking sampler of masked discrete diffusion.

Knows token ids only (the vocab for ranges and specials), never text or media.

Start from an all-mask response of the requested layout; at each of K steps predict
every masked position, commit the most confident predictions and keep the rest masked
("low-confidence remasking", LLaDA sec. 2.4 and Algorithm 5). The number committed per
step follows a linear schedule: the masked count falls linearly from all to none over
the K steps (LLaDA's `get_num_transfer_tokens`). Each response region's logits are
restricted to its modality's ids, so an image region can only ever hold image codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from omni_model.vocab import Vocab

#: Specials a region of each modality may emit besides its own ids: a text or speech
#: response can end early (close the turn, then tail pads; speech closes its audio).
_REGION_EXTRA_SPECIALS = {
    "text": ("im_end", "pad"),
    "image": (),
    "speech": ("eoa", "im_end", "pad"),
}


@dataclass(frozen=True)
class Region:
    """One span of the response: `length` positions of `modality`."""

    modality: str
    length: int

    def __post_init__(self) -> None:
        if self.modality not in _REGION_EXTRA_SPECIALS:
            raise ValueError(f"unknown modality {self.modality!r}")
        if self.length < 1:
            raise ValueError("a region needs at least one position")


@dataclass(frozen=True)
class Layout:
    """The response skeleton: fixed structural tokens and masked positions.

    Built by `make_layout`. An image region is `boi [length masks] eoi`, a speech
    region `boa [length masks]`, a text region `[length masks]`; a layout that ends
    with an image closes the turn with a fixed `im_end`.
    """

    regions: tuple[Region, ...]
    template: torch.Tensor  #: `[R]` initial response ids (mask id where to fill)
    region_index: torch.Tensor  #: `[R]` region of each position, -1 for fixed tokens
    allowed: torch.Tensor  #: `[n_regions, V]` bool, ids each region may hold
    mask_id: int

    @property
    def length(self) -> int:
        return self.template.numel()

    @property
    def num_masked(self) -> int:
        return int((self.template == self.mask_id).sum())


def make_layout(vocab: Vocab, regions: Sequence[Region]) -> Layout:
    """Build the response skeleton for `regions` under `vocab`."""
    if not regions:
        raise ValueError("a layout needs at least one region")
    ids: list[int] = []
    index: list[int] = []
    for i, region in enumerate(regions):
        if region.modality == "image":
            ids.append(vocab.boi_id), index.append(-1)
        elif region.modality == "speech":
            ids.append(vocab.boa_id), index.append(-1)
        ids += [vocab.mask_id] * region.length
        index += [i] * region.length
        if region.modality == "image":
            ids.append(vocab.eoi_id), index.append(-1)
    if regions[-1].modality == "image":
        ids.append(vocab.im_end_id), index.append(-1)
    allowed = torch.stack([vocab.allowed_mask(r.modality, _REGION_EXTRA_SPECIALS[r.modality])
                           for r in regions])
    return Layout(tuple(regions), torch.tensor(ids, dtype=torch.long),
                  torch.tensor(index, dtype=torch.long), allowed, vocab.mask_id)


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 32  #: K, denoising steps (capped at the number of masked positions)
    temperature: float = 0.0  #: 0 = greedy (argmax) predictions
    top_k: int | None = None  #: keep the k most likely ids before sampling
    top_p: float | None = None  #: nucleus: keep the smallest set with mass >= top_p
    seed: int = 0  #: seeds every random draw; same seed, same output


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each step: `num_masked` split evenly, remainder first."""
    steps = max(1, min(steps, num_masked))
    base, extra = divmod(num_masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (the most likely id always stays)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this id
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _left_pad(prompts: torch.Tensor | Sequence[torch.Tensor], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts if prompts.dim() == 2 else prompts[None]
        return prompts.to(device), torch.ones_like(prompts, dtype=torch.long, device=device)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        p = torch.as_tensor(p, dtype=torch.long)
        ids[row, width - len(p):] = p
        attn[row, width - len(p):] = 1
    return ids.to(device), attn.to(device)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: torch.Tensor | Sequence[torch.Tensor],
             layout: Layout, config: SamplerConfig = SamplerConfig(),
             pad_id: int | None = None) -> torch.Tensor:
    """Fill the layout's masked positions for each prompt.

    Args:
        model: maps `(input_ids, attention_mask=...)` to logits `[B, L, V]` aligned
            with positions (the Transformer applies the Dream shift itself).
        prompt_ids: `[B, P]`, or a list of 1-D prompts of different lengths (left-padded
            with `pad_id` and masked out of attention).
        layout: the response skeleton from `make_layout`.
        config: steps, temperature, top-k/p, seed.

    Returns:
        `[B, R]` response ids: the template with every mask filled.
    """
    device = next(model.parameters()).device
    if not isinstance(prompt_ids, torch.Tensor) and pad_id is None:
        raise ValueError("prompts of different lengths need pad_id for left padding")
    prompt, attn = _left_pad(prompt_ids, pad_id if pad_id is not None else 0, device)
    batch, plen = prompt.shape
    template = layout.template.to(device)
    x = torch.cat([prompt, template.expand(batch, -1)], dim=1)
    attn = torch.cat([attn, torch.ones(batch, layout.length, dtype=attn.dtype, device=device)], 1)
    allowed = layout.allowed.to(device)[layout.region_index.clamp(min=0).to(device)]  # [R, V]
    gen = torch.Generator(device=device).manual_seed(config.seed)
    was_training = model.training
    model.eval()
    try:
        for n_commit in transfer_schedule(layout.num_masked, config.steps):
            logits = model(x, attention_mask=attn)[:, plen:].float()
            logits = logits.masked_fill(~allowed, float("-inf"))
            x0, confidence = _predict(logits, config, gen)
            masked = x[:, plen:] == layout.mask_id
            confidence = confidence.masked_fill(~masked, float("-inf"))
            chosen = torch.topk(confidence, n_commit, dim=-1).indices
            commit = torch.zeros_like(masked).scatter(1, chosen, True) & masked
            x[:, plen:] = torch.where(commit, x0, x[:, plen:])
    finally:
        model.train(was_training)
    return x[:, plen:]


def _predict(logits: torch.Tensor, config: SamplerConfig,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted ids and their confidence.

    Confidence is the probability of the predicted id under the model's own
    (modality-restricted) distribution, before temperature and top-k/p: those shape
    which id is drawn, not how sure the model is of it (as in LLaDA's sampler).
    """
    probs = logits.softmax(-1)
    if config.temperature > 0:
        filtered = filter_logits(logits / config.temperature, config.top_k, config.top_p)
        # Gumbel-max draws one id per position from softmax(filtered), reproducibly.
        u = torch.rand(filtered.shape, generator=gen, device=filtered.device).clamp_(1e-20, 1.0)
        x0 = (filtered - torch.log(-torch.log(u))).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1)
