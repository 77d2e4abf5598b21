"""Resizing a model's vocabulary: a pretrained backbone gains the image and speech codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from omni_model.transformer import Transformer


def resize_vocab(model: Transformer, new_size: int, seed: int = 0) -> Transformer:
    """Grow (or shrink) `model`'s embedding and output rows to `new_size`, in place.

    Existing rows are kept. New rows are drawn from a Gaussian with the mean and
    covariance-free per-dimension spread of the existing rows (the "mean resizing"
    of Hewitt 2021): a new token starts as a plausible average token, so the
    pretrained model's outputs barely move until it is trained on the new codes.
    """
    old = model.config.vocab_size
    if new_size == old:
        return model
    gen = torch.Generator().manual_seed(seed)

    def grow(weight: torch.Tensor) -> torch.Tensor:
        out = weight.new_empty(new_size, weight.shape[1])
        keep = min(old, new_size)
        out[:keep] = weight[:keep]
        if new_size > old:
            w = weight.float()
            mean, std = w.mean(0), w.std(0) if old > 1 else torch.zeros_like(w[0])
            noise = torch.randn(new_size - old, w.shape[1], generator=gen)
            out[old:] = (mean + 0.1 * std * noise.to(w.device)).to(weight.dtype)
        return out

    with torch.no_grad():
        embed = nn.Embedding(new_size, model.config.hidden_size,
                             device=model.model.embed_tokens.weight.device,
                             dtype=model.model.embed_tokens.weight.dtype)
        embed.weight.copy_(grow(model.model.embed_tokens.weight))
        model.model.embed_tokens = embed
        head = nn.Linear(model.config.hidden_size, new_size, bias=False,
                         device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
        if model.config.tie_word_embeddings:
            head.weight = embed.weight
        else:
            head.weight.copy_(grow(model.lm_head.weight))
        model.lm_head = head
    model.config = model.config.replace(vocab_size=new_size)
    return model
