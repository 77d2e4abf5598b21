"""Streaming packing: full rows, contiguous documents, no attention across documents."""

import torch

from omni_model.batching import StreamPacker
from omni_model.transformer import attention_mask_4d, positions_from_documents


def _stream(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i, n in enumerate(lengths):
        ids = torch.randint(5, 100, (n,), generator=g)
        resp = torch.zeros(n, dtype=torch.bool)
        resp[n // 2:] = True
        yield ids, resp, i % 3


def test_packed_batches_keep_documents_apart():
    lengths = [int(x) for x in torch.randint(5, 60, (400,), generator=torch.Generator().manual_seed(1))]
    stream = _stream(lengths)
    packer = StreamPacker(max_len=128, rows=4, pad_id=0)
    consumed = real_tokens = 0
    fill = []
    for _ in range(20):
        batch, tags, n = packer.next_batch(stream)
        consumed += n
        assert batch.input_ids.shape == (4, 128) and tags.shape == (4, 128)
        allowed = attention_mask_4d(batch.attention_mask, batch.doc_ids)[:, 0]
        same_doc = batch.doc_ids[:, :, None] == batch.doc_ids[:, None, :]
        real = batch.attention_mask.bool()
        # a real token may attend only to real tokens of its own document
        assert not (allowed & ~same_doc & real[:, :, None]).any()
        assert not (allowed & ~real[:, None, :] & real[:, :, None]).any()
        positions = positions_from_documents(batch.doc_ids)
        for r in range(4):
            docs = batch.doc_ids[r][real[r]]
            # documents are contiguous and numbered in order; positions restart at 0
            assert (docs.diff() >= 0).all()
            starts = torch.nonzero(torch.diff(docs, prepend=torch.tensor([-1]))).squeeze(1)
            assert (positions[r][real[r]][starts] == 0).all()
            assert (tags[r][real[r]] >= 0).all() and (tags[r][~real[r]] == -1).all()
        fill.append(batch.attention_mask.float().mean().item())
        real_tokens += int(real.sum())
    assert sum(fill) / len(fill) > 0.9  # rows are packed, not padded
    # every consumed sample is in some batch or still waiting: nothing lost, nothing twice
    assert real_tokens + sum(len(s[0]) for s in packer.buffer) == sum(lengths[:consumed])
