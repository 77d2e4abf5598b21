"""The project's sampler techniques on the official sampler (`omni_model.release.speed`,
`OfficialSamplerConfig.threshold/early_stop`), on the fixture release tiny_a: off by
default (the official ids, which tests/test_release.py checks), step-level batching
gives each request its own ids, the prompt cache computes what a full pass computes
until the response changes, a threshold saves passes, early stop fills only ends after
an end. benchmarks/release_sampler.py measures what each changes."""

from __future__ import annotations

import random
from dataclasses import fields, replace

import pytest
import torch

from omni_model.release.model import ReleaseModel
from omni_model.release.prompts import task_prompt
from omni_model.release.response import parse_response
from omni_model.release.sampler import OfficialSamplerConfig, _end_early, generate, preset, unconditional_prompt
from omni_model.release.speed import PromptCache, _buckets, generate_batch, generate_prompts, masked_forward
from omni_model.tokenizers.sensevoice import context_positions
from tests.conftest import ROOT

RELEASE = ROOT / "tests/fixtures/omni_release/tiny_a"


@pytest.fixture(scope="module")
def model() -> ReleaseModel:
    return ReleaseModel.from_folder(RELEASE, dtype=torch.float32, dither=0.0)


def requests(model: ReleaseModel, new_tokens: int = 8):
    """Four requests of different prompt lengths and settings: speech (guided
    speech-to-image), text, an image, speech + image with a fixed boa."""
    vocab, tok = model.vocab, model.tokenizer
    speech = [torch.randn(25, 560, generator=torch.Generator().manual_seed(0))]
    frames = context_positions(25)
    image = list(range(256))
    specs = [("s2i", dict(audio_frames=frames)), ("tts", dict(text="hello there")),
             ("vqa", dict(text="what is it?", image_codes=image)),
             ("svqa", dict(audio_frames=frames, image_codes=image[:64]))]
    out = []
    for task, given in specs:
        prompt = task_prompt(task, tok, vocab, **given)
        vectors = model.prompt_embeds(prompt, speech if "audio_frames" in given else ())
        config = preset(task, max_new_tokens=new_tokens, steps=new_tokens // (2 if task == "tts" else 1))
        unconditional = (unconditional_prompt(task, tok.encode, vocab, len(prompt.ids), random.Random(0))
                         if config.cfg > 0 else None)
        out.append((vectors, config, unconditional))
    return out


def single(model, vectors, config, unconditional=None, seed=0, forward=None):
    return generate(forward or model.logits, model.transformer.model.embed_tokens, vectors, model.vocab, config,
                    unconditional, torch.Generator().manual_seed(seed))


def counted(forward):
    calls = []

    def f(vectors, start):
        calls.append(vectors.shape[0])
        return forward(vectors, start)
    return f, calls


def test_every_technique_is_off_by_default():
    config = OfficialSamplerConfig()
    assert config.threshold is None and config.early_stop is False
    assert all(preset(t).threshold is None and not preset(t).early_stop for t in ("asr", "s2i", "svqa"))
    assert {f.name for f in fields(OfficialSamplerConfig)} >= {"threshold", "early_stop"}
    with pytest.raises(ValueError, match="origin"):
        OfficialSamplerConfig(alg="origin", early_stop=True)


@pytest.mark.parametrize("max_padding", [None, 0.5])
def test_a_batch_gives_each_request_its_own_ids(model, max_padding):
    """Different prompt lengths (left padding kept out of attention), a guided request
    (two rows), a fixed boa, different step counts: every row is its batch-1 run (in
    float32 on the fixture; the logits move by up to 6e-6, below every tie here)."""
    batch = requests(model)
    alone = [single(model, *r) for r in batch]
    rows = []
    together = generate_batch(masked_forward(model.transformer), model.transformer.model.embed_tokens,
                              [v for v, _, _ in batch], model.vocab, [c for _, c, _ in batch],
                              [u for _, _, u in batch], [torch.Generator().manual_seed(0) for _ in batch],
                              max_padding, on_pass=rows.append)
    for a, t in zip(alone, together):
        assert t.tolist() == a.tolist()
    if max_padding is None:
        # s2i has two rows; tts takes 4 steps and leaves, svqa (its boa fixed) has 7 masks
        # and leaves after 7, s2i and vqa take 8
        assert rows == [5] * 4 + [4] * 3 + [3]
    else:  # lengths 292 (vqa) and 156 (svqa) share a pass, 83 (s2i, two rows) and 41 (tts) another
        assert rows == [2, 3] * 4 + [2, 2] * 3 + [1, 2]


def test_max_padding_bounds_each_pass_s_padding():
    waiting = {i: torch.zeros(1, n, 1) for i, n in enumerate([30, 100, 40, 90])}
    assert _buckets(waiting, 0.5) == [[1, 3, 2], [0]]  # 4 x 100 > 1.5 x 260: 30 gets its own
    assert _buckets(waiting, 0) == [[1], [3], [2], [0]]
    assert _buckets(waiting, 10) == [[1, 3, 2, 0]]


def test_padded_batch_logits_equal_the_unpadded_ones_to_the_last_bits(model):
    short, long = requests(model)[1][0], requests(model)[2][0]
    forward = masked_forward(model.transformer)
    width = long.shape[1]
    padded = torch.cat([torch.nn.functional.pad(short, (0, 0, width - short.shape[1], 0)), long])
    attention = torch.ones(2, width, dtype=torch.long)
    attention[0, :width - short.shape[1]] = 0
    with torch.no_grad():
        both = forward(padded, width - 4, attention)
        alone = model.logits(short, short.shape[1] - 4)
    assert torch.allclose(both[0], alone[0], atol=1e-5, rtol=0)


def test_a_batch_keeps_each_request_s_random_draws(model):
    """With sampling (temperature > 0) each request draws from its own generator, so a
    row's ids do not depend on what it is batched with."""
    batch = [(v, replace(c, temperature=1.0, top_p=0.95), u) for v, c, u in requests(model)[1:3]]
    alone = [single(model, *r, seed=i) for i, r in enumerate(batch)]
    together = generate_batch(masked_forward(model.transformer), model.transformer.model.embed_tokens,
                              [v for v, _, _ in batch], model.vocab, [c for _, c, _ in batch],
                              [u for _, _, u in batch], [torch.Generator().manual_seed(i) for i in range(2)])
    assert [t.tolist() for t in together] == [a.tolist() for a in alone]


def test_the_prompt_cache_computes_what_a_full_pass_computes(model):
    vectors, config, _ = requests(model)[2]
    N = config.max_new_tokens
    masks = model.transformer.model.embed_tokens(torch.full((1, N), model.vocab.mask_id))
    full = torch.cat([vectors, masks], 1)
    cache = PromptCache(model.transformer, refresh=4)
    with torch.no_grad():
        first, again = cache(full, vectors.shape[1]), cache(full, vectors.shape[1])
    assert (cache.full, cache.spans) == (1, 1)
    assert torch.allclose(again, first, atol=1e-5, rtol=0)  # nothing changed: the span pass is exact


def test_the_prompt_cache_refreshing_every_step_is_the_official_sampler(model):
    for vectors, config, unconditional in requests(model)[:2]:
        cache = PromptCache(model.transformer, refresh=1)
        ids = single(model, vectors, config, unconditional, forward=cache)
        assert ids.tolist() == single(model, vectors, config, unconditional).tolist()
        assert cache.spans == 0 and cache.full == config.steps
    vectors, config, unconditional = requests(model)[0]  # guided: both rows against their caches
    cache = PromptCache(model.transformer, refresh=4)
    single(model, vectors, config, unconditional, forward=cache)
    assert (cache.full, cache.spans) == (2, 6)


def test_a_threshold_saves_passes_and_one_of_1_changes_nothing(model):
    vectors, config, unconditional = requests(model)[0]
    forward, official = counted(model.logits)
    ids = single(model, vectors, config, unconditional, forward=forward)
    forward, never = counted(model.logits)
    assert single(model, vectors, replace(config, threshold=1.0), unconditional, forward=forward).equal(ids)
    assert len(never) == len(official) == config.steps
    forward, calls = counted(model.logits)
    fewer = single(model, vectors, replace(config, threshold=0.3), unconditional, forward=forward)
    assert len(calls) < len(official) and (fewer != model.vocab.mask_id).all()


def scripted(vocab_size: int, N: int, end_at: int, pad_id: int, seed: int = 0):
    """A model whose logits do not depend on its input: random, with `<|endoftext|>`
    the likeliest id from response position `end_at` on."""
    logits = torch.randn(1, N, vocab_size, generator=torch.Generator().manual_seed(seed))
    logits[0, end_at:, pad_id] += 8.0

    def forward(vectors, start):
        return logits.expand(vectors.shape[0], -1, -1).clone()
    return forward


@pytest.mark.parametrize("task,steps", [("vqa", 16), ("asr", 8)])
def test_early_stop_saves_passes_and_keeps_the_answer_where_the_model_would_pad(model, task, steps):
    """Where a model predicts each position the same whatever the rest holds, the
    positions early stop fills would have been filled with the same ends: the ids are
    the official ones, in fewer passes."""
    vectors, _, _ = requests(model)[2]
    config = preset(task, max_new_tokens=16, steps=steps)
    forward = scripted(model.vocab.size, 16, 4, model.vocab.pad_id)
    f, official = counted(forward)
    ids = single(model, vectors, config, forward=f)
    f, early = counted(forward)
    stopped = single(model, vectors, replace(config, early_stop=True), forward=f)
    assert stopped.tolist() == ids.tolist()
    assert len(early) < len(official)
    parsed = parse_response(stopped.tolist(), model.tokenizer, model.vocab)
    assert parsed == parse_response(ids.tolist(), model.tokenizer, model.vocab)


def test_early_stop_fills_only_ends_after_a_committed_end(model):
    vocab = model.vocab
    M, E, P = vocab.mask_id, vocab.pad_id, vocab.special("im_end")
    response = torch.tensor([5, M, E, M, M, M, 7, M])
    predicted = torch.tensor([M, 9, M, E, 11, P, M, E])
    ends = torch.tensor([E, P])
    filled = response.clone()
    _end_early(filled, predicted, ends, 0, M)
    assert filled.tolist() == [5, M, E, E, M, P, 7, E]  # 9 before the end and 11 stay masked
    later = response.clone()
    _end_early(later, predicted, ends, 3, M)  # with a fixed boa at 3: the end at 2 is the text's
    assert later.tolist() == response.tolist()


def test_early_stop_never_fires_without_an_end(model):
    """The fixture's random weights never commit an end: early stop changes nothing."""
    vectors, config, unconditional = requests(model)[1]
    ids = single(model, vectors, config, unconditional)
    assert not any(i in (model.vocab.pad_id, model.vocab.special("im_end")) for i in ids.tolist())
    assert single(model, vectors, replace(config, early_stop=True), unconditional).equal(ids)


def test_without_padding_a_batch_is_exact_in_bfloat16_too():
    """The release's own dtype: padding moves bfloat16 logits by a unit in the last
    place, enough to change ids; requests of one length share a pass without any (and
    on the fixture keep their batch-1 logits to the bit)."""
    model = ReleaseModel.from_folder(RELEASE, dither=0.0)  # bfloat16, as stored
    assert model.dtype == torch.bfloat16
    texts = ["hello there", "the dog", "a red house under a tree"]
    prompts = [task_prompt("tts", model.tokenizer, model.vocab, text=t) for t in texts]
    assert len(prompts[0].ids) == len(prompts[1].ids) != len(prompts[2].ids)
    vectors = [model.prompt_embeds(p) for p in prompts]
    config = preset("tts", max_new_tokens=8, steps=4)
    alone = [single(model, v, config) for v in vectors]
    rows = []
    together = generate_batch(masked_forward(model.transformer), model.transformer.model.embed_tokens, vectors,
                              model.vocab, config, max_padding=0, on_pass=rows.append)
    assert [t.tolist() for t in together] == [a.tolist() for a in alone]
    assert rows == [1, 2] * 4  # one pass per length a step, the longer first


def test_generate_prompts_is_release_model_generate_for_each(model):
    prompts = [task_prompt("tts", model.tokenizer, model.vocab, text=t) for t in ("hello there", "good morning")]
    config = preset("tts", max_new_tokens=6, steps=3)
    alone = [model.generate(p, config, generator=torch.Generator().manual_seed(42)) for p in prompts]
    assert generate_prompts(model, prompts, config) == alone
