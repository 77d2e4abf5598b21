"""The any-to-any API on a tiny model trained here until it has memorised one example of
every task, built from real parts: a rendered world scene through the trained image
tokenizer in tests/assets, espeak-ng speech through a real (untrained, small) speech
codec. Each task then goes through `AnyToAny` from a saved checkpoint folder and must
give back exactly what was trained."""

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from omni_model.pipeline import AnyToAny, Audio, LengthPresets, RequestError
from omni_model.sampler import SamplerConfig
from omni_model.templates import Image, Message, Speech, Text
from omni_model.tokenizers.image import MagVitTokenizer
from omni_model.tokenizers.text import ByteTokenizer
from omni_model.tokenizers.train_speech import small_codec
from omni_model.toy import FitConfig, fit, toy_model
from omni_model.vocab import Vocab
from pipelines.tts import EspeakEngine
from pipelines.world import make_scene, render
from tests.conftest import ROOT

MAX_PADS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("any2any")
    text = ByteTokenizer()
    image_tok = MagVitTokenizer.from_pretrained(ROOT / "tests/assets/world_magvit32")
    codec = small_codec(codebook_size=64, d_model=64, layers=2, seed=0).eval()
    codec.save_pretrained(root / "codec")
    vocab = Vocab.fresh(text.vocab_size, image_tok.codebook_size, codec.codebook_size)
    pipe = AnyToAny(toy_model(vocab, hidden=192, layers=3, seed=0), vocab, text, image_tok, codec)

    picture = render(make_scene(0, 3), 32)
    espeak = EspeakEngine()
    caption_audio = Audio(espeak.synthesize("two blue squares"), 16000)
    question_audio = Audio(espeak.synthesize("how many shapes"), 16000)
    image = Image(tuple(image_tok.encode([picture])[0].tolist()))
    speech = Speech(tuple(codec.encode([torch.tensor(caption_audio.waveform)])[0].tolist()))
    answer = Speech(tuple(codec.encode([torch.tensor(espeak.synthesize("two", "en-us+f3"))])[0].tolist()))
    tasks = {  # name: (inputs, outputs, answer parts)
        "t2i": (["Draw two blue squares."], ["image"], (image,)),
        "vqa": ([picture, "how many shapes?"], ["text"], (Text("two"),)),
        "asr": (["Transcribe.", caption_audio], ["text"], (Text("two blue squares"),)),
        "tts": (["Say: two blue squares"], ["speech"], (speech,)),
        "s2i": ([caption_audio], ["image"], (image,)),
        "svqa": ([picture, question_audio], ["text", "speech"], (Text("two"), answer)),
        "all": (["Show and tell: two blue squares"], ["text", "image", "speech"],
                (Text("two blue squares"), image, speech)),
    }
    samples = [[Message("user", tuple(pipe._part(x) for x in inputs)), Message("assistant", parts)]
               for inputs, _, parts in tasks.values()]
    losses = fit(pipe.model, samples, text, vocab, FitConfig(steps=1000, max_pads=MAX_PADS, log_every=0))
    assert losses[-1] < 0.1 * losses[0]

    folder = root / "model"
    pipe.model.save_pretrained(folder)
    vocab.save(folder)
    (folder / "tokenizers.json").write_text(json.dumps({
        "text": None, "image": {"fingerprint": image_tok.fingerprint},
        "speech": {"fingerprint": codec.fingerprint}}))
    return folder, root / "codec", tasks


def _lengths(parts, outputs) -> dict:
    """Region lengths that fit the trained answer, with room for the tail pads."""
    text = ByteTokenizer()
    n_text = next((len(text.encode(p.text)) for p in parts if isinstance(p, Text)), 0)
    n_speech = next((len(p.codes) for p in parts if isinstance(p, Speech)), 0)
    if outputs == ["text"]:
        return {"text": n_text + 1 + MAX_PADS}
    if outputs == ["speech"]:
        return {"speech": n_speech + 2 + MAX_PADS}
    if outputs == ["text", "speech"]:
        return {"text": n_text, "spoken": n_text + 1 + n_speech + 2 + MAX_PADS}
    if outputs == ["text", "image", "speech"]:
        return {"text": n_text, "speech": n_speech + 2 + MAX_PADS}
    return {}


@pytest.mark.parametrize("task", ["t2i", "vqa", "asr", "tts", "s2i", "svqa", "all"])
def test_every_task_round_trips_through_the_api(trained, task):
    folder, codec, tasks = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=ROOT / "tests/assets/world_magvit32",
                                    speech_tokenizer=codec)
    inputs, outputs, parts = tasks[task]
    out = pipe.generate(inputs, outputs, SamplerConfig(steps=128), lengths=_lengths(parts, outputs))
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
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=ROOT / "tests/assets/world_magvit32",
                                    speech_tokenizer=codec)
    requests = [pipe.prepare(tasks[t][0], ["image"]) for t in ("t2i", "s2i")]
    cfg = SamplerConfig(steps=8, temperature=1.0)
    batched = pipe.generate_batch(requests, cfg, seeds=[3, 4])
    for request, seed, out in zip(requests, (3, 4), batched):
        assert pipe.generate_batch([request], cfg, seeds=[seed])[0].image_codes == out.image_codes


def test_presets_size_the_response_from_the_input(trained):
    folder, codec, tasks = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=ROOT / "tests/assets/world_magvit32",
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


def test_bad_requests_raise_clear_errors(trained, fixtures_dir):
    folder, codec, _ = trained
    pipe = AnyToAny.from_pretrained(folder, image_tokenizer=ROOT / "tests/assets/world_magvit32",
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
