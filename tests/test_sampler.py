import pytest
import torch

from omni_model.sampler import (Denoiser, Region, SamplerConfig, filter_logits, generate, make_layout, sample,
                                spoken_layout, transfer_schedule)

REGIONS = [Region("text", 6), Region("image", 8), Region("speech", 5)]


class CallRecorder(torch.nn.Module):
    """Wraps the real model to record what the sampler feeds it and the shape of the
    logits it gets back (not a mock)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs = []
        self.shapes = []

    def forward(self, input_ids, **kwargs):
        self.inputs.append(input_ids.clone())
        out = self.model(input_ids, **kwargs)
        self.shapes.append(tuple((out[0] if isinstance(out, tuple) else out).shape))
        return out

    def forward_span(self, *args):
        out = self.model.forward_span(*args)
        self.shapes.append(tuple(out.shape))
        return out


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


# ---------------------------------------------------------------- strategies
class Scripted(torch.nn.Module):
    """A model whose response logits are a fixed table `[R, V]` (whatever the input), so a
    strategy's effect on the decoding order can be predicted exactly. A real nn.Module
    driven through the real sampler; only the network's numbers are chosen by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, logits_range=None, **kwargs):
        batch, length = input_ids.shape
        r, v = self.table.shape
        out = torch.full((batch, length, v), -1e4)
        out[:, length - r:] = self.table
        start, end = logits_range or (0, length)
        return out[:, start:end]


def _table(vocab, rows: list[list[float]], length: int | None = None) -> torch.Tensor:
    """Logits from per-position probabilities over ids 0, 1, 2, ... (text ids)."""
    table = torch.full((length or len(rows), vocab.size), -1e4)
    for i, probs in enumerate(rows):
        table[i, :len(probs)] = torch.log(torch.tensor(probs))
    return table


def test_each_confidence_measure_picks_its_own_most_confident_position(vocab):
    a = [0.62] + [0.038] * 10  # highest probability
    b = [0.55, 0.45]  # lowest entropy
    c = [0.61] + [0.0039] * 100  # largest margin
    model = Scripted(_table(vocab, [a, b, c]))
    layout = make_layout(vocab, [Region("text", 3)])
    first = {}
    for measure in ("probability", "margin", "entropy"):
        out = sample(model, torch.tensor([[1, 2]]), layout, SamplerConfig(steps=3, confidence=measure))
        first[measure] = int((out.committed[0] == 0).nonzero())
    assert first == {"probability": 0, "margin": 2, "entropy": 1}
    orders = {tuple(sample(model, torch.tensor([[1, 2]]), layout,
                           SamplerConfig(steps=3, confidence="random", seed=s)).committed[0].tolist())
              for s in range(12)}
    assert len(orders) > 1  # random order depends on the seed only


@pytest.mark.parametrize("start", [0, 4])
def test_position_penalty_decodes_an_image_from_the_start_of_its_ramp(vocab, start):
    n = 8
    layout = make_layout(vocab, [Region("image", n)])
    code = vocab.image_range.start
    table = torch.full((layout.length, vocab.size), -1e4)
    for p in range(n):  # later positions are more confident: 0.50 ... 0.60
        conf = 0.5 + 0.1 * p / (n - 1)
        table[1 + p, code] = torch.log(torch.tensor(conf))
        table[1 + p, code + 1] = torch.log(torch.tensor(1 - conf))
    model = Scripted(table)
    order = lambda cfg: sample(model, torch.tensor([[1]]), layout, cfg).committed[0, 1:1 + n]
    plain = order(SamplerConfig(steps=n))
    assert plain.tolist() == list(range(n - 1, -1, -1))  # most confident (last) first
    penalised = order(SamplerConfig(steps=n, position_penalty=3.0, position_penalty_start=start))
    assert int(penalised.argmin()) == start  # the ramp's first position goes first
    assert penalised[start:].tolist() == sorted(penalised[start:].tolist())  # then left to right


def test_repetition_penalty_discourages_ids_already_committed(vocab):
    model = Scripted(_table(vocab, [[0.5, 0.3, 0.2]] * 6))
    layout = make_layout(vocab, [Region("text", 6)])
    plain = generate(model, torch.tensor([[7]]), layout, SamplerConfig(steps=6))
    assert plain[0].tolist() == [0] * 6
    penalised = generate(model, torch.tensor([[7]]), layout, SamplerConfig(steps=6, repetition_penalty=2.0))
    assert penalised[0].tolist().count(0) < 6 and 1 in penalised[0].tolist()


def test_pre_infilling_places_boa_and_keeps_it(tiny_model, vocab):
    layout = spoken_layout(vocab, 20, boa_fraction=0.25)
    assert layout.template[5] == vocab.boa_id
    assert [r.modality for r in layout.regions] == ["text", "speech"]
    recorder = CallRecorder(tiny_model)
    out = generate(recorder, torch.tensor([[3, 4, 5]]), layout, SamplerConfig(steps=6, temperature=1.0))
    assert all(x[0, 3 + 5] == vocab.boa_id for x in recorder.inputs)  # never masked, never moved
    assert out[0, 5] == vocab.boa_id
    assert layout.allowed[0][out[0, :5]].all() and layout.allowed[1][out[0, 6:]].all()


def test_semi_autoregressive_blocks_decode_left_to_right(tiny_model, vocab):
    layout = make_layout(vocab, [Region("text", 12)])
    out = sample(tiny_model, torch.tensor([[3, 4]]), layout,
                 SamplerConfig(steps=8, block_length=4, temperature=1.0))
    steps = out.committed[0]
    blocks = [steps[i:i + 4] for i in (0, 4, 8)]
    assert blocks[0].max() < blocks[1].min() and blocks[1].max() < blocks[2].min()
    assert out.steps == [8]  # the steps split 3, 3, 2 between the blocks


@pytest.mark.parametrize("steps, block_length, size", [(1, 1, 12), (3, 1, 4), (4, 2, 3), (6, 5, 5)])
def test_steps_bound_the_forward_passes_whatever_the_block_length(tiny_model, vocab, steps, block_length,
                                                                  size):
    """One block a step at least: blocks shorter than masks/steps are widened, so a
    request for 1 step in blocks of 1 makes one pass, not one per position."""
    layout = make_layout(vocab, [Region("text", 12)])
    recorder = CallRecorder(tiny_model)
    out = sample(recorder, torch.tensor([[3, 4]]), layout,
                 SamplerConfig(steps=steps, block_length=block_length, temperature=1.0))
    assert len(recorder.inputs) == out.steps[0] <= steps
    order = out.committed[0]
    for start in range(size, 12, size):  # still left to right, block by block
        assert order[:start].max() < order[start:].min()


def test_classifier_free_guidance(tiny_model, vocab):
    layout = make_layout(vocab, [Region("text", 4), Region("image", 6)])
    prompt = torch.randint(0, 256, (2, 6))
    plain = generate(tiny_model, prompt, layout, SamplerConfig(steps=5))
    assert torch.equal(generate(tiny_model, prompt, layout, SamplerConfig(steps=5, cfg_scale=0.0)), plain)
    # the guided path, in one batch with its unconditional rows: an unconditional prompt
    # equal to the prompt leaves nothing to amplify, whatever the scale
    recorder = CallRecorder(tiny_model)
    same = generate(recorder, prompt, layout, SamplerConfig(steps=5, cfg_scale=3.0),
                    uncond_prompt_ids=list(prompt))
    assert torch.equal(same, plain) and recorder.inputs[0].shape[0] == 4
    guided = generate(tiny_model, prompt, layout, SamplerConfig(steps=5, cfg_scale=3.0))
    assert not torch.equal(guided, plain)


def test_threshold_commits_confident_positions_together_and_uses_fewer_steps(vocab):
    layout = make_layout(vocab, [Region("text", 8)])
    sure = Scripted(_table(vocab, [[0.97, 0.03]] * 4 + [[0.6, 0.4]] * 4))
    out = sample(sure, torch.tensor([[1]]), layout, SamplerConfig(steps=8, threshold=0.9))
    assert (out.committed[0, :4] == 0).all()  # all four confident positions in step one
    assert out.steps == [5]  # then one at a time: 5 steps instead of 8
    unsure = Scripted(_table(vocab, [[0.6, 0.4]] * 8))
    assert sample(unsure, torch.tensor([[1]]), layout, SamplerConfig(steps=8, threshold=0.9)).steps == [8]
    capped = sample(unsure, torch.tensor([[1]]), layout, SamplerConfig(steps=3, threshold=0.9))
    assert capped.steps == [3]  # `steps` stays the upper bound


def test_a_rows_output_does_not_depend_on_its_batch(tiny_model, vocab):
    layout = make_layout(vocab, [Region("text", 5), Region("speech", 6)])
    prompts = [torch.randint(0, 256, (n,)) for n in (4, 7)]
    cfg = SamplerConfig(steps=4, temperature=1.0, top_p=0.9, confidence="entropy")
    batched = generate(tiny_model, prompts, layout, cfg, pad_id=vocab.pad_id, seeds=[11, 12])
    for p, seed, row in zip(prompts, (11, 12), batched):
        assert torch.equal(generate(tiny_model, p[None], layout, cfg, seeds=[seed])[0], row)


def test_bad_sampler_options_raise():
    for bad in ({"steps": 0}, {"confidence": "loudest"}, {"position_penalty": 0.5},
                {"threshold": 1.5}, {"cfg_scale": -1.0}, {"top_p": 0.0}, {"block_length": 0}):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)


# ---------------------------------------------------------------- caches and adaptive decoding
def _copy(model, shift: bool = False):
    """A copy of the same weights, with Dream's logit shift (position i predicted from
    i-1) when `shift`."""
    from omni_model.transformer import Transformer

    copy = Transformer(model.config.replace(shift_logits=shift))
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("options", [
    {"temperature": 1.0, "top_p": 0.9, "confidence": "entropy"},
    {"block_length": 4, "confidence": "random"},
    {"cfg_scale": 1.5, "temperature": 0.7, "block_length": 5},
    {"threshold": 0.2, "position_penalty": 2.0, "repetition_penalty": 1.3},
])
@pytest.mark.parametrize("shift", [False, True])
def test_a_cache_refreshed_every_step_is_the_uncached_sampler_exactly(tiny_model, vocab, cache, options, shift):
    model = _copy(tiny_model, shift) if shift else tiny_model
    layout = make_layout(vocab, [Region("text", 5), Region("image", 6), Region("speech", 4)])
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 6)]
    plain = sample(model, prompts, layout, SamplerConfig(steps=6, **options), pad_id=vocab.pad_id, seeds=[1, 2, 3])
    cached = sample(model, prompts, layout, SamplerConfig(steps=6, cache=cache, cache_refresh=1, **options),
                    pad_id=vocab.pad_id, seeds=[1, 2, 3])
    assert torch.equal(plain.ids, cached.ids) and plain.steps == cached.steps
    assert torch.equal(plain.committed, cached.committed)



@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cache_refreshed_every_step_is_exact_with_image_position_embeddings(tiny_model, vocab, cache):
    """The span passes give image codes their places too (from the whole sequence)."""
    from omni_model.transformer import Transformer

    config = tiny_model.config.replace(image_position_embeddings=6, image_start_token_id=vocab.boi_id,
                                       image_end_token_id=vocab.eoi_id)
    model = Transformer.from_config(config, seed=2).eval()
    layout = make_layout(vocab, [Region("text", 3), Region("image", 6), Region("text", 3)])
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 7)]
    options = {"block_length": 4, "confidence": "probability"}
    plain = sample(model, prompts, layout, SamplerConfig(steps=6, **options), pad_id=vocab.pad_id, seeds=[1, 2])
    cached = sample(model, prompts, layout, SamplerConfig(steps=6, cache=cache, cache_refresh=1, **options),
                    pad_id=vocab.pad_id, seeds=[1, 2])
    assert torch.equal(plain.ids, cached.ids) and torch.equal(plain.committed, cached.committed)

def test_the_step_api_in_shared_passes_gives_each_request_what_sample_gives_it_alone(tiny_model, vocab):
    """What Serve's scheduler does with `Denoiser`s: requests of different prompt lengths,
    layouts and options (a prefix cache, a dual cache in blocks, guidance) stepped together,
    their full passes shared (`inputs` padded into one frame, `keep_cache` with it) and their
    span passes too (`span`, `forward_spans`); each ends where `sample` alone does."""
    gen = torch.Generator().manual_seed(5)
    requests = [  # (prompt, layout, config, seed)
        (torch.randint(0, 256, (5,), generator=gen), make_layout(vocab, [Region("text", 6)]),
         SamplerConfig(steps=6, cache="prefix", cache_refresh=3), 1),
        (torch.randint(0, 256, (11,), generator=gen), make_layout(vocab, [Region("text", 3), Region("image", 8)]),
         SamplerConfig(steps=4, temperature=0.8, block_length=4, cache="dual", cache_refresh=2), 2),
        (torch.randint(0, 256, (8,), generator=gen), spoken_layout(vocab, 10), SamplerConfig(steps=5, cfg_scale=1.5), 3),
    ]
    states = [Denoiser([prompt], layout, config, vocab.pad_id, torch.device("cpu"), seeds=[seed])
              for prompt, layout, config, seed in requests]
    with torch.no_grad():
        while not all(s.done for s in states):
            live = [s for s in states if not s.done]
            window = {id(s): s.begin() for s in live}
            logits = {}
            full = [s for s in live if window[id(s)][2]]
            if full:
                plen, rlen = max(s.plen for s in full), max(s.layout.length for s in full)
                frames = [(plen - s.plen, rlen - s.layout.length) for s in full]
                ids, attn = zip(*(s.inputs(*frame) for s, frame in zip(full, frames)))
                lo, hi = min(window[id(s)][0] for s in full), max(window[id(s)][1] for s in full)
                out, cache = tiny_model(torch.cat(ids), attention_mask=torch.cat(attn), return_cache=True,
                                        logits_range=(plen + lo, plen + hi))
                row = 0
                for s, frame in zip(full, frames):
                    rows, (a, b, _) = slice(row, row + s.rows), window[id(s)]
                    row += s.rows
                    logits[id(s)] = out[rows, a - lo:b - lo]
                    if s.uses_cache:
                        s.keep_cache(cache.rows(rows), frame)
            spans = [s for s in live if not window[id(s)][2]]
            if spans:
                outs = tiny_model.forward_spans([s.span(*window[id(s)][:2]) for s in spans])
                logits.update({id(s): out for s, out in zip(spans, outs)})
            for s in live:
                s.advance(logits[id(s)])
    assert any(s.uses_cache for s in states)
    for (prompt, layout, config, seed), state in zip(requests, states):
        alone = sample(tiny_model, [prompt], layout, config, pad_id=vocab.pad_id, seeds=[seed])
        assert torch.equal(state.result().ids, alone.ids) and state.result().steps == alone.steps


def _positions_computed(model):
    """Records how many positions each forward computes (a hook on the real embedding)."""
    widths = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    return widths


@pytest.mark.parametrize("shift", [False, True])
def test_the_prefix_cache_computes_the_prompt_only_on_refresh(tiny_model, vocab, shift):
    model = _copy(tiny_model, shift)
    widths = _positions_computed(model)
    layout = make_layout(vocab, [Region("text", 8)])
    prompt = torch.randint(0, 256, (1, 20))
    out = sample(model, prompt, layout, SamplerConfig(steps=8, cache="prefix", cache_refresh=3))
    full, span = 20 + 8, 8 + shift  # with the shift, one position before the response too
    assert widths == [full, span, span, full, span, span, full, span]
    assert out.steps == [8] and not (out.ids == vocab.mask_id).any()


def test_the_dual_cache_computes_only_the_current_block_and_refreshes_at_each_new_block(tiny_model, vocab):
    model = _copy(tiny_model)
    widths = _positions_computed(model)
    layout = make_layout(vocab, [Region("text", 12)])
    sample(model, torch.randint(0, 256, (1, 10)), layout,
           SamplerConfig(steps=6, block_length=4, cache="dual", cache_refresh=8))
    # three blocks of four, two steps each: a full pass entering each block, then the block alone
    assert widths == [22, 4, 22, 4, 22, 4]
    widths.clear()
    sample(model, torch.randint(0, 256, (1, 10)), layout,
           SamplerConfig(steps=6, block_length=4, cache="prefix", cache_refresh=8))
    assert widths == [22, 12, 22, 8, 22, 4]  # the prefix cache: the block and all after it


def _mixed_table(vocab, text: list[float], speech: list[float]) -> torch.Tensor:
    """Text positions sure of id 0 with the given probabilities, then speech positions sure
    of the first speech id (the rest of each position's mass on one other id)."""
    s0, s1 = vocab.speech_to_ids([0, 1]).tolist()
    table = torch.full((len(text) + 1 + len(speech), vocab.size), -1e4)
    for i, p in enumerate(text):
        table[i, 0], table[i, 1] = torch.log(torch.tensor(p)), torch.log(torch.tensor(1 - p))
    for i, p in enumerate(speech):
        row = len(text) + 1 + i
        table[row, s0], table[row, s1] = torch.log(torch.tensor(p)), torch.log(torch.tensor(1 - p))
    return table


def test_thresholds_apply_per_region_modality(vocab):
    layout = make_layout(vocab, [Region("text", 4), Region("speech", 4)])
    model = Scripted(_mixed_table(vocab, [0.8] * 4, [0.8] * 4))
    text_only = sample(model, torch.tensor([[1]]), layout, SamplerConfig(steps=8, text_threshold=0.7))
    assert (text_only.committed[0, :4] == 0).all()  # every text position in step one
    assert (text_only.committed[0, 5:] > 0).sum() >= 3  # speech at the schedule's pace
    both = sample(model, torch.tensor([[1]]), layout,
                  SamplerConfig(steps=8, threshold=0.7, speech_threshold=0.9))
    assert (both.committed[0, :4] == 0).all() and (both.committed[0, 5:] > 0).sum() >= 3
    assert SamplerConfig(threshold=0.5, image_threshold=0.9).threshold_for("image") == 0.9
    assert SamplerConfig(threshold=0.5).threshold_for("speech") == 0.5


def test_the_factor_rule_commits_while_the_nth_confidence_clears_one_minus_factor_over_n_plus_one(vocab):
    layout = make_layout(vocab, [Region("text", 6)])
    # sorted: 0.97, 0.85, 0.78, 0.7, ...: thresholds 0.5, 0.667, 0.75, 0.8 -> three pass
    model = Scripted(_table(vocab, [[0.97, 0.03], [0.78, 0.22], [0.85, 0.15], [0.7, 0.3], [0.6, 0.4], [0.6, 0.4]]))
    out = sample(model, torch.tensor([[1]]), layout, SamplerConfig(steps=6, factor=1.0))
    assert sorted(out.committed[0, :3].tolist()) == [0, 0, 0] and (out.committed[0, 3:] > 0).all()
    strict = sample(model, torch.tensor([[1]]), layout, SamplerConfig(steps=6, factor=0.1))
    assert (strict.committed[0] == 0).sum() == 1  # only the schedule's one


def test_early_stop_fills_the_tail_after_the_end_and_spends_no_passes_on_it(vocab):
    layout = make_layout(vocab, [Region("text", 8)])
    rows = [[0.9, 0.1], [0.1, 0.9]] + [[0.0] * vocab.im_end_id + [0.99]] + [[0.3, 0.3, 0.4]] * 5
    model = Scripted(_table(vocab, rows))
    plain = sample(model, torch.tensor([[1]]), layout, SamplerConfig(steps=8))
    early = sample(model, torch.tensor([[1]]), layout, SamplerConfig(steps=8, early_stop=True))
    assert plain.steps == [8] and early.steps == [3]
    assert early.ids[0].tolist() == [0, 1, vocab.im_end_id] + [vocab.pad_id] * 5
    assert (early.committed[0, 3:] == 0).all()  # the tail, in the step the end was committed
    # speech: after `eoa` the turn's im_end, then pads
    layout = make_layout(vocab, [Region("speech", 6)])
    s0 = vocab.speech_to_ids([0]).item()
    table = torch.full((7, vocab.size), -1e4)
    table[1, s0] = table[2, s0] = 0.0
    table[3, vocab.eoa_id] = 0.0
    table[4:, s0] = -1.0
    table[4:, vocab.pad_id] = -1.2
    out = sample(Scripted(table), torch.tensor([[1]]), layout, SamplerConfig(steps=6, early_stop=True))
    assert out.ids[0].tolist() == [vocab.boa_id, s0, s0, vocab.eoa_id, vocab.im_end_id, vocab.pad_id, vocab.pad_id]
    assert out.steps[0] < 6


def test_new_sampler_options_are_checked():
    for bad in ({"text_threshold": 0.0}, {"factor": 0.0}, {"cache": "everything"}, {"cache_refresh": 0}):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)


# ---------------------------------------------------------------- work per step
def test_logits_are_computed_for_the_response_positions_only(tiny_model, vocab):
    layout = make_layout(vocab, REGIONS)
    prompt = torch.randint(0, 256, (2, 30))
    recorder = CallRecorder(tiny_model)
    generate(recorder, prompt, layout, SamplerConfig(steps=4))
    assert recorder.shapes == [(2, layout.length, vocab.size)] * 4  # never the 30 prompt positions
    recorder.shapes.clear()  # a block at a time with a dual cache: full passes cover the block only
    generate(recorder, prompt, layout, SamplerConfig(steps=4, block_length=5, cache="dual", cache_refresh=8))
    assert recorder.shapes and all(width <= 5 + 2 for _, width, _ in recorder.shapes)


def test_a_sampled_step_draws_one_number_a_position_not_one_per_vocabulary_id(vocab):
    from omni_model.sampler import _predict

    length, width = 12, 5
    logits = torch.randn(2, width, vocab.size)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    _predict(logits, SamplerConfig(temperature=1.0, top_p=0.9), gens, offset=3, length=length)
    for g, s in zip(gens, (1, 2)):
        expected = torch.Generator().manual_seed(s)
        torch.rand(length, generator=expected)
        assert torch.equal(g.get_state(), expected.get_state())


def test_sampling_at_temperature_one_follows_the_model_distribution(vocab):
    probs = [0.6, 0.3, 0.1]
    model = Scripted(_table(vocab, [probs]))
    layout = make_layout(vocab, [Region("text", 1)])
    rows = 3000
    out = sample(model, torch.tensor([[1, 2]]).expand(rows, -1), layout,
                 SamplerConfig(steps=1, temperature=1.0), seeds=range(rows)).ids[:, 0]
    freq = torch.bincount(out, minlength=3)[:3].float() / rows
    assert int((out > 2).sum()) == 0  # ids of (almost) no probability are never drawn
    torch.testing.assert_close(freq, torch.tensor(probs), atol=0.03, rtol=0)
    # top_p=0.8 keeps 0.6 and 0.3 (renormalised: 2/3, 1/3) and never draws the 0.1 id
    out = sample(model, torch.tensor([[1, 2]]).expand(rows, -1), layout,
                 SamplerConfig(steps=1, temperature=1.0, top_p=0.8), seeds=range(rows)).ids[:, 0]
    freq = torch.bincount(out, minlength=3)[:3].float() / rows
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0.0]), atol=0.03, rtol=0)


@pytest.mark.parametrize("regions", [[("image", 12)], [("speech", 10)], [("text", 3), ("image", 9)]])
@pytest.mark.parametrize("options", [
    {},
    {"temperature": 1.0, "top_p": 0.9, "confidence": "entropy"},
    {"temperature": 0.8, "top_k": 5, "confidence": "margin", "repetition_penalty": 1.3},
    {"cfg_scale": 2.0, "threshold": 0.2, "position_penalty": 1.5},
    {"cache": "dual", "block_length": 4, "temperature": 1.0},
])
def test_steps_on_the_allowed_columns_sample_what_the_whole_vocabulary_does(tiny_model, vocab, monkeypatch,
                                                                             regions, options):
    """A layout whose regions allow a small share of the ids (an image or speech answer)
    is sampled on those columns only (`NARROW_SHARE`): the same ids, steps and commit
    order as over the whole vocabulary, under every strategy that reads the logits.
    Softmax sums over the columns rather than the whole row round differently (by about
    one float32 ulp), which can swap two positions whose confidences tie that closely:
    the output layer is scaled up so that the random model's distributions are peaked
    as a trained model's are, not near-uniform and near-tied."""
    import omni_model.sampler as sampler_module

    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(20)

    layout = make_layout(vocab, [Region(m, n) for m, n in regions])
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 7)]
    config = SamplerConfig(steps=6, **options)
    runs = []
    for share in (sampler_module.NARROW_SHARE, 0.0):
        monkeypatch.setattr(sampler_module, "NARROW_SHARE", share)
        state = Denoiser(prompts, layout, config, vocab.pad_id, torch.device("cpu"))
        runs.append((state.columns, sample(tiny_model, prompts, layout, config, pad_id=vocab.pad_id, seeds=[3, 4])))
    (columns, narrow), (no_columns, whole) = runs
    assert no_columns is None
    if regions[0][0] != "text":  # a text region allows most of the vocabulary: no narrowing
        assert columns is not None and len(columns) < 0.5 * vocab.size
    assert torch.equal(narrow.ids, whole.ids)
    assert torch.equal(narrow.committed, whole.committed) and narrow.steps == whole.steps
