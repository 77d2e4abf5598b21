"""Turning encoded samples into model batches: padded (`collate`) or packed (`pack`).

Packing puts several samples into one row up to `max_len`, with a document id per
position; the transformer's document mask keeps packed samples from attending to each
other and restarts RoPE positions per sample, so no compute is spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  #: `[B, L]`
    response_mask: torch.Tensor  #: `[B, L]` bool
    attention_mask: torch.Tensor  #: `[B, L]` 1 real, 0 padding
    doc_ids: torch.Tensor | None = None  #: `[B, L]` sample index within each row

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(None if v is None else v.to(device) for v in
                       (self.input_ids, self.response_mask, self.attention_mask, self.doc_ids)))


Sample = tuple[torch.Tensor, torch.Tensor]  # (ids [L], response_mask [L])


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Right-pad samples to the longest; padding is neither attended to nor trained."""
    width = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    resp = torch.zeros((len(samples), width), dtype=torch.bool)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (s_ids, s_resp) in enumerate(samples):
        ids[row, :len(s_ids)] = s_ids
        resp[row, :len(s_ids)] = s_resp
        attn[row, :len(s_ids)] = 1
    return Batch(ids, resp, attn)


def pack(samples: Sequence[Sample], max_len: int, pad_id: int) -> Batch:
    """First-fit packing of samples (in order) into rows of exactly `max_len`.

    Every sample must fit in one row (longer ones raise: truncating a response would
    teach the model to stop mid-sentence). Unused tail positions get their own
    document id and attention_mask 0.
    """
    rows: list[list[Sample]] = []
    fill: list[int] = []
    for sample in samples:
        n = len(sample[0])
        if n > max_len:
            raise ValueError(f"sample of {n} tokens exceeds max_len={max_len}")
        for r, used in enumerate(fill):
            if used + n <= max_len:
                rows[r].append(sample)
                fill[r] += n
                break
        else:
            rows.append([sample])
            fill.append(n)
    ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    resp = torch.zeros((len(rows), max_len), dtype=torch.bool)
    attn = torch.zeros((len(rows), max_len), dtype=torch.long)
    docs = torch.zeros((len(rows), max_len), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for d, (s_ids, s_resp) in enumerate(row):
            n = len(s_ids)
            ids[r, pos:pos + n] = s_ids
            resp[r, pos:pos + n] = s_resp
            attn[r, pos:pos + n] = 1
            docs[r, pos:pos + n] = d
            pos += n
        docs[r, pos:] = len(row)
    return Batch(ids, resp, attn, docs)
