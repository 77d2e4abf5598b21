"""Recomputing spans of a sequence against cached keys and values (the sampler's caches).

`Transformer.forward(..., return_cache=True)` returns every layer's keys and values
(`KVCache`); `forward_span` then recomputes only a span of positions against them: the
span's queries attend to the cached keys and values of every other position and to the
span's own fresh ones, which replace the cached ones in place. In a bidirectional model
the cached entries go stale as the rest of the sequence changes; the sampler decides how
often to refresh them (Fast-dLLM's prefix and dual caches). `forward_spans` does the
same for several sequences in one padded pass (the serving scheduler's step batching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from omni_model.transformer import Transformer


@dataclass
class KVCache:
    """Keys and values of every layer for a whole sequence, with what a span needs."""

    keys: list[torch.Tensor]  #: per layer `[B, kv_heads, L, head_dim]`, after RoPE
    values: list[torch.Tensor]
    mask: torch.Tensor | None  #: `[B, 1, L, L]` bool, the full sequence's attention mask
    cos: torch.Tensor  #: `[B, 1, L, head_dim]` RoPE tables of the full sequence
    sin: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, rows: slice) -> "KVCache":
        """The cache of some rows of the batch (views: a span pass writes through)."""
        mask = self.mask if self.mask is None or self.mask.shape[0] == 1 else self.mask[rows]
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], mask,
                       self.cos[rows], self.sin[rows])


def forward_span(model: Transformer, input_ids: torch.Tensor, cache: KVCache, start: int, end: int,
                 columns: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of positions `start:end` of `input_ids` (`[B, L]`, the cached sequence's
    length), computing only those positions (one more before them with
    `shift_logits`) against `cache`, whose entries for them are replaced; of the ids
    `columns` only when given (see `Transformer.head`)."""
    first = model.logit_source(start)
    span = (first, end)
    index = model.image_index(input_ids)
    x = model.embed(input_ids[:, first:end], None if index is None else index[:, first:end])
    cos, sin = cache.cos[:, :, first:end], cache.sin[:, :, first:end]
    mask = cache.mask[:, :, first:end]
    for layer, keys, values in zip(model.model.layers, cache.keys, cache.values):
        x = layer(x, cos, sin, mask, [keys, values], span)
    return model.head(x, start, end, offset=first, columns=columns)


def forward_spans(model: Transformer, spans: Sequence[tuple[torch.Tensor, KVCache, int, int]]) -> list[torch.Tensor]:
    """`forward_span` of several cached sequences in one pass: `(input_ids, cache,
    start, end)` each, of any lengths and span widths (each may hold several rows).
    Spans are right-padded to the widest and caches to the longest; a padded query
    attends only to a scratch column that no real query sees. Returns each one's
    logits; each cache's entries for its span are replaced, as `forward_span` does."""
    cfg = model.config
    firsts = [model.logit_source(start) for _, _, start, _ in spans]
    widths = [end - first for (_, _, _, end), first in zip(spans, firsts)]
    counts = [ids.shape[0] for ids, _, _, _ in spans]
    batch, width = sum(counts), max(widths)
    length = max(cache.length for _, cache, _, _ in spans) + 1  # the last column: scratch
    first_cache = spans[0][1]
    device, dtype = first_cache.keys[0].device, first_cache.keys[0].dtype
    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    code_index = torch.full((batch, width), -1, dtype=torch.long, device=device)
    embeds_images = bool(cfg.image_position_embeddings)
    cos = first_cache.cos.new_zeros(batch, 1, width, cfg.head_dim)
    sin = torch.zeros_like(cos)
    mask = torch.zeros(batch, 1, width, length, dtype=torch.bool, device=device)
    where = torch.full((batch, width), length - 1, dtype=torch.long, device=device)
    shape = (batch, first_cache.keys[0].shape[1], length, cfg.head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.model.layers]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.model.layers]
    row = 0
    for (input_ids, cache, _, end), first, w, n in zip(spans, firsts, widths, counts):
        rows, cached = slice(row, row + n), cache.length
        ids[rows, :w] = input_ids[:, first:end]
        if embeds_images:
            code_index[rows, :w] = model.image_index(input_ids)[:, first:end]
        cos[rows, :, :w], sin[rows, :, :w] = cache.cos[:, :, first:end], cache.sin[:, :, first:end]
        mask[rows, :, :w, :cached] = cache.mask[:, :, first:end]
        mask[rows, :, w:, -1] = True
        where[rows, :w] = torch.arange(first, end, device=device)
        for layer in range(len(keys)):
            keys[layer][rows, :, :cached] = cache.keys[layer]
            values[layer][rows, :, :cached] = cache.values[layer]
        row += n
    x = model.embed(ids, code_index)
    for layer, k, v in zip(model.model.layers, keys, values):
        x = layer(x, cos, sin, mask, [k, v], where)
    out, row = [], 0
    for (_, cache, start, end), first, w, n in zip(spans, firsts, widths, counts):
        rows = slice(row, row + n)
        row += n
        for layer in range(len(keys)):
            cache.keys[layer][:, :, first:end] = keys[layer][rows, :, first:end]
            cache.values[layer][:, :, first:end] = values[layer][rows, :, first:end]
        out.append(model.head(x[rows, :w], start, end, offset=first))  # no logits for padding
    return out
