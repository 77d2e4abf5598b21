"""The any-to-any API on the tiny model of tests/any2any.py (trained once per session
until it has memorised one example of every task, built from real parts: a rendered
world scene through the trained image tokenizer in tests/assets, espeak-ng speech through
a real, untrained, small speech codec). Each task then goes through `AnyToAny` from a saved checkpoint folder and must
give back exactly what was trained."""

import numpy as np
import pytest
from PIL import Image as PILImage

from omni_model.any_to_any import AnyToAny, Audio, LengthPresets, RequestError, batch_key, batches
from omni_model.sampler import SamplerConfig
from omni_model.templates import Image, Text
from omni_model.tokenizers.text import ByteTokenizer
from tests.any2any import IMAGE_TOKENIZER, answer_lengths


@pytest.fixture
def trained(any2any):
    return any2any


@pytest.mark.parametrize("task", ["t2i", "vqa", "asr", "tts", "s2i", "svqa", "all"])
def test_every_task_round_trips_through_the_api(trained, task):
    folder, codec, tasks = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=IMAGE_TOKENIZER,
                                    speech_tokenizer=codec)
    inputs, outputs, parts = tasks[task]
    out = pipe.generate(inputs, outputs, SamplerConfig(steps=128), lengths=answer_lengths(parts, outputs))
    for part in parts:
        if isinstance(part, Text):
            assert out.text == part.text
        elif isinstance(part, Image):
            assert out.image_codes == list(part.codes)
            assert isinstance(out.image, PILImage.Image) and out.image.size == (32, 32)
        else:
            assert out.speech_codes == list(part.codes)
            assert out.speech.dtype == np.float32 and len(out.speech) > 0.1 * 16000 * len(part.codes) / 12.5
    assert out.steps <= 128 and out.tokens > 0 and out.prompt_tokens > 0
    asked = set(outputs)
    assert (out.text is None) == ("text" not in asked) and (out.image is None) == ("image" not in asked)


def test_a_batch_of_requests_matches_one_by_one(trained):
    folder, codec, tasks = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=IMAGE_TOKENIZER,
                                    speech_tokenizer=codec)
    requests = [pipe.prepare(tasks[t][0], ["image"]) for t in ("t2i", "s2i")]
    cfg = SamplerConfig(steps=8, temperature=1.0)
    batched = pipe.generate_batch(requests, cfg, seeds=[3, 4])
    for request, seed, out in zip(requests, (3, 4), batched):
        assert pipe.generate_batch([request], cfg, seeds=[seed])[0].image_codes == out.image_codes


def test_batches_keep_equal_keys_together_in_arrival_order():
    assert batches(["a", "b", "a", "a", "c", "b"]) == [[0, 2, 3], [1, 5], [4]]
    assert batches(["a", "b", "a", "a", "c", "b"], max_size=2) == [[0, 2], [3], [1, 5], [4]]
    assert batches([]) == []


def test_mixed_requests_run_in_shared_calls_and_match_one_by_one(trained):
    folder, codec, tasks = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=IMAGE_TOKENIZER, speech_tokenizer=codec)
    requests = [pipe.prepare(tasks[t][0], tasks[t][1]) for t in ("t2i", "vqa", "s2i", "asr", "t2i")]
    cfg = SamplerConfig(steps=8, temperature=1.0, seed=5)
    keys = [batch_key(r, cfg) for r in requests]
    assert keys[0] == keys[2] == keys[4] and keys[0] != keys[1]
    assert batch_key(requests[0], cfg) == batch_key(requests[0], SamplerConfig(steps=8, temperature=1.0, seed=9))
    calls = []
    outputs = pipe.generate_many(requests, cfg, batch_size=2, on_batch=calls.append)
    assert sorted(calls) == [1, 1, 1, 2] and sum(calls) == len(requests)
    for i, (request, out) in enumerate(zip(requests, outputs)):
        alone = pipe.generate_batch([request], cfg, seeds=[cfg.seed + i])[0]
        assert (alone.text, alone.image_codes) == (out.text, out.image_codes)


def test_presets_size_the_response_from_the_input(trained):
    folder, codec, tasks = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=IMAGE_TOKENIZER,
                                    speech_tokenizer=codec,
                                    presets=LengthPresets(tts_codes_per_token=3.5, speech_min=4,
                                                          asr_tokens_per_second=10.0, asr_min=2))
    short, long = (pipe.prepare([f"Say: {t}"], ["speech"]) for t in ("hi", "a much longer sentence to say"))
    assert short.regions[0].length < long.regions[0].length
    assert long.regions[0].length == int(np.ceil(3.5 * len(ByteTokenizer().encode("Say: a much longer sentence to say"))))
    one_second = Audio(np.zeros(16000, dtype=np.float32), 16000)
    assert pipe.prepare(["Transcribe.", one_second], ["text"]).regions[0].length == 10
    assert pipe.prepare(["Draw."], ["image"]).regions[0].length == 64  # the tokenizer's 8x8 grid
    spoken = pipe.prepare(["Answer."], ["text", "speech"])
    assert [r.modality for r in spoken.regions] == ["text", "speech"]
    # presets also carry sampler options per kind of output (presets.json's `sampler`)
    pipe.presets = LengthPresets(sampler={"spoken": {"cache": "prefix", "cache_refresh": 2}})
    assert pipe.sampler_for(["speech", "text"]).cache == "prefix" and pipe.sampler_for(["text"]).cache == "none"
    assert pipe.sampler_for(["text", "speech"], SamplerConfig(steps=4)).steps == 4
    widths: list[int] = []  # positions each forward computes (a hook on the real embedding)
    hook = pipe.model.model.embed_tokens.register_forward_hook(lambda m, a, out: widths.append(a[0].shape[1]))
    try:
        pipe.generate(["Answer."], ["text", "speech"])  # no config: the presets' prefix cache
        cached, widths[:] = list(widths), []
        pipe.generate(["Answer."], ["text", "speech"], SamplerConfig())
    finally:
        hook.remove()
    assert len(cached) == len(widths) and cached[1] < cached[0] == widths[1] == widths[0]


def test_bad_requests_raise_clear_errors(trained, fixtures_dir):
    folder, codec, _ = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=IMAGE_TOKENIZER,
                                    speech_tokenizer=codec)
    with pytest.raises(RequestError, match="unsupported outputs"):
        pipe.prepare(["hi"], ["image", "text"])
    with pytest.raises(RequestError, match="unsupported outputs"):
        pipe.prepare(["hi"], ["video"])
    with pytest.raises(RequestError, match="at least one input"):
        pipe.prepare([], ["text"])
    with pytest.raises(RequestError, match="unsupported input"):
        pipe.prepare([b"bytes"], ["text"])
    text_only = AnyToAny.from_pretrained(folder)
    with pytest.raises(RequestError, match="speech tokenizer"):
        text_only.prepare(["Say: hi"], ["speech"])
    with pytest.raises(ValueError, match="fingerprint"):  # not the image tokenizer it was trained with
        AnyToAny.from_pretrained(folder, image_tokenizer=fixtures_dir / "magvit_tiny_a")
