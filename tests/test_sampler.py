import pytest
import torch

from omni_model.sampler import (Region, SamplerConfig, filter_logits, generate, make_layout,
                                transfer_schedule)

REGIONS = [Region("text", 6), Region("image", 8), Region("speech", 5)]


class CallRecorder(torch.nn.Module):
    """Wraps the real model to record what the sampler feeds it (not a mock)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs = []

    def forward(self, input_ids, **kwargs):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids, **kwargs)


def test_layout_skeleton(vocab):
    layout = make_layout(vocab, REGIONS)
    t = layout.template.tolist()
    assert layout.num_masked == 6 + 8 + 5
    assert t[6] == vocab.boi_id and t[15] == vocab.eoi_id and t[16] == vocab.boa_id
    assert (layout.region_index == -1).sum() == 3
    image_last = make_layout(vocab, [Region("image", 4)])
    assert image_last.template.tolist()[-2:] == [vocab.eoi_id, vocab.im_end_id]


def test_transfer_schedule_is_linear_and_complete():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(5, 8) == [1, 1, 1, 1, 1]  # never more steps than masks
    assert sum(transfer_schedule(257, 16)) == 257


@pytest.mark.parametrize("steps", [1, 4, 19])
def test_fills_every_mask_in_k_steps_within_modality_and_keeps_prompt(tiny_model, vocab, steps):
    layout = make_layout(vocab, REGIONS)
    prompt = torch.randint(0, 256, (3, 7))
    recorder = CallRecorder(tiny_model)
    out = generate(recorder, prompt, layout, SamplerConfig(steps=steps, temperature=1.0, seed=3))
    assert out.shape == (3, layout.length)
    assert len(recorder.inputs) == steps  # one forward pass per step
    for x in recorder.inputs:
        assert torch.equal(x[:, :7], prompt)  # the prompt is never written
    assert not (out == vocab.mask_id).any()
    fixed = layout.region_index == -1
    assert torch.equal(out[:, fixed], layout.template[fixed].expand(3, -1))
    for r, region in enumerate(REGIONS):
        allowed = layout.allowed[r]
        assert allowed[out[:, layout.region_index == r]].all()
    image_ids = out[:, layout.region_index == 1]
    assert ((image_ids >= vocab.image_range.start) & (image_ids < vocab.image_range.stop)).all()
    # masks decrease linearly: after step s exactly sum(schedule[:s+1]) positions are filled
    schedule = transfer_schedule(layout.num_masked, steps)
    for s, x in enumerate(recorder.inputs):
        still_masked = (x[:, 7:] == vocab.mask_id).sum(1)
        assert (still_masked == layout.num_masked - sum(schedule[:s])).all()


def test_seeded_and_deterministic(tiny_model, vocab):
    layout = make_layout(vocab, REGIONS)
    prompt = torch.randint(0, 256, (2, 5))
    sample = lambda **kw: generate(tiny_model, prompt, layout, SamplerConfig(steps=6, **kw))
    assert torch.equal(sample(temperature=1.0, seed=1), sample(temperature=1.0, seed=1))
    assert not torch.equal(sample(temperature=1.0, seed=1), sample(temperature=1.0, seed=2))
    assert torch.equal(sample(temperature=0.0, seed=1), sample(temperature=0.0, seed=2))
    # top_k=1 leaves one candidate: sampling becomes greedy decoding
    assert torch.equal(sample(temperature=1.0, top_k=1, seed=5), sample(temperature=0.0))


def test_batched_prompts_of_different_lengths_match_one_by_one(tiny_model, vocab):
    layout = make_layout(vocab, [Region("text", 5), Region("image", 4)])
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 8, 5)]
    cfg = SamplerConfig(steps=5)
    batched = generate(tiny_model, prompts, layout, cfg, pad_id=vocab.pad_id)
    for p, row in zip(prompts, batched):
        assert torch.equal(generate(tiny_model, p[None], layout, cfg)[0], row)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, None, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 3, None))
    assert kept.tolist() == [[True, True, True, False]]


def test_bad_layouts_raise(vocab):
    with pytest.raises(ValueError):
        Region("video", 3)
    with pytest.raises(ValueError):
        Region("text", 0)
    with pytest.raises(ValueError):
        make_layout(vocab, [])
