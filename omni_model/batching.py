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

    def _map(self, fn) -> "Batch":
        return Batch(*(None if v is None else fn(v) for v in
                       (self.input_ids, self.response_mask, self.attention_mask, self.doc_ids)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """The batch in page-locked host memory (a GPU copies it without blocking the host)."""
        return self._map(torch.Tensor.pin_memory)


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
    return pack_rows(rows, max_len, pad_id)


class StreamPacker:
    """Packs a stream of samples into fixed-size batches of `rows` rows of `max_len`.

    First-fit over the batch's rows; samples that do not fit wait in a small buffer for
    the next batch, so rows fill up well without reordering the stream much. Each
    sample carries a tag (its task index) that comes back per position in `tags`
    (-1 on unused positions).
    """

    def __init__(self, max_len: int, rows: int, pad_id: int, lookahead: int = 16) -> None:
        self.max_len, self.rows, self.pad_id, self.lookahead = max_len, rows, pad_id, lookahead
        self.buffer: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def next_batch(self, stream) -> tuple[Batch, torch.Tensor, int]:
        """The next batch, its per-position tags, and how many samples it consumed
        from `stream` (an iterator of `(ids, response_mask, tag)`)."""
        rows: list[list[tuple[torch.Tensor, torch.Tensor, int]]] = [[] for _ in range(self.rows)]
        used = [0] * self.rows
        waiting, consumed = [], 0
        candidates = iter(self.buffer)
        self.buffer = []
        while True:
            sample = next(candidates, None)
            if sample is None:
                if len(waiting) >= self.lookahead or min(used) >= self.max_len * 0.95:
                    break
                sample = next(stream)
                consumed += 1
            n = len(sample[0])
            if n > self.max_len:
                raise ValueError(f"sample of {n} tokens exceeds max_len={self.max_len}")
            r = next((r for r in range(self.rows) if used[r] + n <= self.max_len), None)
            if r is None:
                waiting.append(sample)
            else:
                rows[r].append(sample)
                used[r] += n
        self.buffer = waiting
        batch = pack_rows([[(i, m) for i, m, _ in row] for row in rows], self.max_len, self.pad_id)
        tags = torch.full((self.rows, self.max_len), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            pos = 0
            for ids, _, tag in row:
                tags[r, pos:pos + len(ids)] = tag
                pos += len(ids)
        return batch, tags, consumed


def pack_rows(rows: Sequence[Sequence[Sample]], max_len: int, pad_id: int) -> Batch:
    """Lay out already-assigned rows of samples (see `pack`)."""
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
