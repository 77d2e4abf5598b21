"""The GPU-side efficiency paths, each checked on the CPU against the path it replaces:
fused AdamW, micro-batches made ahead on a thread (pinned memory where a GPU is), the
transformer's blocks compiled, and sampling in bfloat16. Their speed is measured on a
GPU by benchmarks/gpu_check.py, never here."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from omni_model.batching import StreamPacker
from omni_model.masking import add_tail_pad
from omni_model.objective import Objective, diffusion_loss_of_batch
from omni_model.transformer import Transformer, TransformerConfig
from omni_model.vocab import Vocab
from pipelines.train.config import ModelConfig, OptimConfig, StageConfig
from pipelines.train.parallelism import adamw, compile_blocks
from pipelines.train.prefetch import BatchFeed, Prefetcher, prefetch_depth

CPU = torch.device("cpu")


def _vocab() -> Vocab:
    return Vocab.fresh(64, 32, 16)


def _model(vocab: Vocab, seed: int = 0, layers: int = 2) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=vocab.size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))


def _samples(vocab: Vocab, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        length = int(torch.randint(8, 40, (), generator=gen))
        ids = torch.randint(0, 64, (length,), generator=gen)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length // 2:] = True
        yield ids, mask, int(torch.randint(0, 3, (), generator=gen))


def _padded(stream, vocab: Vocab, gen: torch.Generator):
    for ids, mask, tag in stream:
        ids, mask = add_tail_pad(ids, mask, vocab.pad_id, 4, gen)
        yield ids, mask, tag


def test_fused_adamw_makes_the_default_update():
    """`optim.adamw`: auto is torch's default implementation on a CPU and fused on a GPU;
    fused and default give the same weights after steps of the real objective."""
    vocab = _vocab()
    cfg = StageConfig(optim=OptimConfig(lr=1e-2, weight_decay=0.1))
    assert adamw(_model(vocab).parameters(), cfg, CPU).defaults["fused"] is None
    assert adamw(_model(vocab).parameters(), cfg, torch.device("cuda")).defaults["fused"] is True
    fused_cfg = StageConfig(optim=OptimConfig(lr=1e-2, weight_decay=0.1, adamw="fused"))
    with pytest.raises(ValueError, match="optim.adamw"):
        OptimConfig(adamw="apex")

    packer = StreamPacker(96, 2, vocab.pad_id)
    batch = packer.next_batch(_padded(_samples(vocab, 40, 1), vocab, torch.Generator().manual_seed(0)))[0]
    start = _model(vocab).state_dict()
    weights = []
    for config in (cfg, fused_cfg):
        model = _model(vocab)
        opt = adamw(model.parameters(), config, CPU)
        assert opt.defaults["fused"] is (True if config is fused_cfg else None)
        torch.manual_seed(3)
        for _ in range(5):
            diffusion_loss_of_batch(model, batch, vocab, Objective()).loss.backward()
            opt.step()
            opt.zero_grad()
        weights.append(model.state_dict())
    moved = max((weights[0][k] - start[k]).abs().max().item() for k in weights[0])
    assert moved > 1e-3  # the steps changed the weights ...
    for k in weights[0]:  # ... and both implementations the same way
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6)


def test_a_prefetcher_keeps_the_order_and_raises_where_the_error_was():
    made = iter(range(5))

    def make():
        value = next(made)
        if value == 3:
            raise RuntimeError("the data ran out")
        return value

    pre = Prefetcher(make, depth=2)
    assert [pre.next(), pre.next(), pre.next()] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="the data ran out"):
        pre.next()
    assert not pre._thread.is_alive()


def test_a_prefetcher_makes_ahead_and_stops_when_closed():
    calls = []

    def make():
        calls.append(threading.current_thread().name)
        return len(calls)

    pre = Prefetcher(make, depth=2, name="ahead")
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:  # 2 queued + 1 waiting to be queued
        time.sleep(0.01)
    assert len(calls) == 3 and set(calls) == {"ahead"}
    assert pre.next() == 1
    pre.close()
    assert not pre._thread.is_alive()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(make, depth=0)
    assert prefetch_depth(None, CPU) == 0 and prefetch_depth(None, torch.device("cuda")) == 2
    assert prefetch_depth(3, CPU) == 3


def test_batches_made_ahead_are_the_loops_own_with_the_generator_state_of_each():
    """The same packed batches, samples consumed and tail-pad generator states as when
    the loop makes each batch itself; the generator itself has run ahead (so a
    checkpoint must save the state that came with the last batch taken)."""
    vocab = _vocab()
    taken = []
    for depth in (0, 2):
        gen = torch.Generator().manual_seed(5)
        stream = _padded(_samples(vocab, 200, 2), vocab, gen)
        packer = StreamPacker(96, 2, vocab.pad_id)

        def make():
            batch, tags, consumed = packer.next_batch(stream)
            return (batch, tags, None), consumed

        feed = BatchFeed(make, gen, CPU, depth)
        got = [feed.next() for _ in range(6)]
        time.sleep(0.2)
        ahead = not torch.equal(gen.get_state(), got[-1][2])
        feed.close()
        taken.append((got, ahead))
    (plain, plain_ahead), (fed, fed_ahead) = taken
    assert not plain_ahead and fed_ahead
    for ((b0, t0, x0), n0, rng0), ((b1, t1, x1), n1, rng1) in zip(plain, fed):
        assert x0 is None and x1 is None and n0 == n1 and torch.equal(rng0, rng1)
        assert torch.equal(t0, t1)
        for name in ("input_ids", "response_mask", "attention_mask", "doc_ids"):
            assert torch.equal(getattr(b0, name), getattr(b1, name))


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """`model.compile: blocks` (real inductor kernels on the CPU, ~25 s to compile):
    the same loss and gradients on packed rows with the document mask, gradient
    checkpointing on as the base configs have it; the weights keep their names."""
    vocab = _vocab()
    packer = StreamPacker(96, 2, vocab.pad_id)
    batch = packer.next_batch(_padded(_samples(vocab, 40, 3), vocab, torch.Generator().manual_seed(1)))[0]
    assert int(batch.doc_ids.max()) > 1  # several documents a row
    results = []
    for compiled in (False, True):
        model = _model(vocab).set_gradient_checkpointing(True).train()
        names = list(model.state_dict())
        if compiled:
            compile_blocks(model)
            assert all(block._compiled_call_impl is not None for block in model.model.layers)
            assert list(model.state_dict()) == names
        torch.manual_seed(7)
        out = diffusion_loss_of_batch(model, batch, vocab, Objective())
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="model.compile"):
        ModelConfig(compile="model")


def test_a_model_in_bfloat16_answers_every_task_as_trained(any2any):
    """What a GPU replica loads (`weights_dtype`: bfloat16 on cuda): the shared tiny
    model's weights in bfloat16 on the CPU still give back every trained answer, code
    for code; the sampler reads the logits in float32 either way."""
    from omni_model.any_to_any import AnyToAny, weights_dtype
    from omni_model.sampler import SamplerConfig
    from omni_model.templates import Image, Text
    from serve.config import ModelPaths
    from tests.any2any import IMAGE_TOKENIZER, answer_lengths

    assert weights_dtype("cuda:0") is torch.bfloat16 and weights_dtype("cpu") is torch.float32
    assert ModelPaths().torch_dtype("cuda") is torch.bfloat16
    assert ModelPaths(dtype="float32").torch_dtype("cuda") is torch.float32
    with pytest.raises(ValueError, match="model.dtype"):
        ModelPaths(dtype="float16")
    folder, codec, tasks = any2any
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=IMAGE_TOKENIZER, speech_tokenizer=codec,
                                    dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    for task in ("t2i", "vqa", "asr", "tts", "s2i", "svqa", "all"):
        inputs, outputs, parts = tasks[task]
        out = pipe.generate(inputs, outputs, SamplerConfig(steps=128), lengths=answer_lengths(parts, outputs))
        for part in parts:
            if isinstance(part, Text):
                assert out.text == part.text, task
            elif isinstance(part, Image):
                assert out.image_codes == list(part.codes), task
            else:
                assert out.speech_codes == list(part.codes), task
