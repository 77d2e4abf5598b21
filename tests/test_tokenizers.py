"""Fixture parity, batching, fingerprints, bad input and trainability of the tokenizers."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from omni_model.tokenizers import ImageTokenizer, SpeechTokenizer, load_image_tokenizer, load_speech_tokenizer
from omni_model.tokenizers.codec import SpeechCodec
from omni_model.tokenizers.image import MagVitConfig, MagVitTokenizer, TrunkConfig
from omni_model.tokenizers.glm4voice import GLM4VoiceDecoder
from omni_model.tokenizers.mel import MelConfig, griffin_lim, log_mel, mel_to_waveform
from omni_model.tokenizers.speech import GLM4VoiceTokenizer
from omni_model.tokenizers.text import BPETokenizer
from omni_model.tokenizers.train_image import ImageTrainConfig, train_image_tokenizer
from omni_model.tokenizers.train_speech import (CTC_ALPHABET, DecoderTrainConfig, SpeechTrainConfig,
                                                ctc_targets, small_codec, train_code_decoder,
                                                train_speech_codec)
from tests.speech_decoder import wide_decoder


@pytest.fixture(scope="module")
def magvit(fixtures_dir):
    return MagVitTokenizer.from_pretrained(fixtures_dir / "magvit_tiny_a")


@pytest.fixture(scope="module")
def magvit_ref(fixtures_dir):
    return load_file(str(fixtures_dir / "magvit_tiny_a" / "reference.safetensors"))


@pytest.fixture(scope="module")
def glm(fixtures_dir):
    return GLM4VoiceTokenizer.from_pretrained(fixtures_dir / "glm4voice_tiny_a")


@pytest.fixture(scope="module")
def glm_ref(fixtures_dir):
    return load_file(str(fixtures_dir / "glm4voice_tiny_a" / "reference.safetensors"))


# ---------------------------------------------------------------- image
def test_magvit_fixture_codes_and_reconstruction(magvit, magvit_ref):
    codes = magvit.encode(magvit_ref["pixel_values"])
    assert codes.dtype == torch.int64 and codes.shape == (2, 64)
    assert torch.equal(codes, magvit_ref["codes"])
    rec = magvit.decode(magvit_ref["codes"])
    assert rec.shape == (2, 3, 32, 32)
    assert (rec - magvit_ref["reconstruction"]).abs().max().item() <= 1e-4


def test_magvit_save_load_round_trip_and_fingerprint(magvit, magvit_ref, tmp_path):
    magvit.save_pretrained(tmp_path)
    again = MagVitTokenizer.from_pretrained(tmp_path)
    assert torch.equal(again.encode(magvit_ref["pixel_values"]), magvit_ref["codes"])
    assert again.fingerprint == magvit.fingerprint
    with torch.no_grad():
        again.decoder.conv_out.bias[0] += 1e-3
    assert again.fingerprint != magvit.fingerprint


def test_magvit_batch_equals_one_at_a_time(magvit, magvit_ref):
    x = magvit_ref["pixel_values"]
    singles = torch.cat([magvit.encode(x[i:i + 1]) for i in range(2)])
    assert torch.equal(singles, magvit.encode(x))


def test_magvit_default_config_is_the_real_256px_tokenizer():
    cfg = MagVitConfig.from_dict({})  # the released config.json names no trunks
    assert cfg.codebook_size == 8192 and cfg.downsample == 16
    with torch.device("meta"):
        model = MagVitTokenizer(cfg)
    assert model.grid_for(256, 256) == (16, 16)
    # attn_resolutions=[5] is never reached (256 -> 16): attention only in the middle
    assert not any(len(level.attn) for level in model.encoder.down)
    assert len(model.decoder.up[0].block) == 4 and len(model.encoder.down[0].block) == 4


def test_magvit_preprocesses_awkward_pil_images(magvit):
    images = [Image.new("RGBA", (50, 30), (255, 0, 0, 128)), Image.new("L", (31, 64), 200),
              Image.new("CMYK", (40, 40))]
    codes = magvit.encode(images)
    assert codes.shape == (3, 64)
    assert len(magvit.decode_images(codes)) == 3


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 4, 32, 32), "shape"),
    (torch.zeros(3, 32, 32), "shape"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    (torch.zeros(1, 3, 18, 32), "multiple"),
])
def test_magvit_rejects_bad_tensors(magvit, bad, message):
    with pytest.raises(ValueError, match=message):
        magvit.encode(bad)


def test_magvit_takes_any_image_size_and_rejects_bad_codes(magvit):
    # 1x1, a 3x200 strip and a 1x40000 strip: cropped to a square before resizing, so
    # the strip costs no more than a square image
    codes = magvit.encode([Image.new("RGB", (1, 1), "red"), Image.new("RGB", (3, 200), "red"),
                           Image.new("RGB", (1, 40_000), "red")])
    assert codes.shape == (3, 64) and (codes == codes[0]).all()
    with pytest.raises(ValueError, match="must lie in"):
        magvit.decode(torch.full((1, 64), 8192))
    with pytest.raises(ValueError, match="square"):
        magvit.decode(torch.zeros(1, 10, dtype=torch.long))


# ---------------------------------------------------------------- speech
def test_glm4voice_fixture_codes_from_features(glm, glm_ref):
    codes = glm.encode_features(glm_ref["input_features"], glm_ref["attention_mask"])
    assert codes.dtype == torch.int64
    assert torch.equal(codes, glm_ref["codes"])


def test_glm4voice_features_and_codes_from_waveform(glm, glm_ref):
    feats = log_mel(glm_ref["waveform"])
    assert (feats - glm_ref["input_features"]).abs().max().item() < 1e-4
    codes = glm.encode(glm_ref["waveform"][0], sample_rate=16000)
    assert len(codes) == 1 and torch.equal(codes[0], glm_ref["codes"][0])
    assert glm.codes_per_second == 12.5


def test_glm4voice_batch_of_mixed_lengths_equals_one_at_a_time(glm, glm_ref):
    w = glm_ref["waveform"][0]
    pieces = [w[:20000], w, w[:7000]]
    batched = glm.encode(pieces)
    assert [len(c) for c in batched] == [math.ceil(len(p) / 1280) for p in pieces]
    for piece, codes in zip(pieces, batched):
        assert torch.equal(glm.encode(piece)[0], codes)


def test_glm4voice_long_audio_in_30_second_windows(glm, glm_ref):
    w = glm_ref["waveform"][0]
    long = w.repeat(33)[: 16000 * 65]  # 65 s
    codes = glm.encode(long)[0]
    assert len(codes) == 375 + 375 + math.ceil(5 * 12.5)
    windows = [long[:480000], long[480000:960000], long[960000:]]
    assert torch.equal(codes, torch.cat([glm.encode(x)[0] for x in windows]))


def test_glm4voice_resamples_and_downmixes(glm, glm_ref):
    w = glm_ref["waveform"][0].numpy()
    stereo_48k = np.stack([np.interp(np.arange(0, len(w), 1 / 3), np.arange(len(w)), w)] * 2, 1)
    codes = glm.encode([stereo_48k], sample_rate=48000)[0]
    reference = glm_ref["codes"][0]
    assert len(codes) == len(reference)
    assert (codes == reference).float().mean() > 0.7  # resampling changes features slightly


def test_glm4voice_fingerprint_and_round_trip(glm, glm_ref, tmp_path):
    glm.save_pretrained(tmp_path)
    again = GLM4VoiceTokenizer.from_pretrained(tmp_path)
    assert again.fingerprint == glm.fingerprint
    assert torch.equal(again.encode(glm_ref["waveform"][0])[0], glm_ref["codes"][0])
    with torch.no_grad():
        again.encoder.codebook.weight[0, 0] += 1e-4
    assert again.fingerprint != glm.fingerprint


@pytest.mark.parametrize("bad, message", [
    (np.zeros(0, dtype=np.float32), "empty"),
    (np.full(16000, np.nan, dtype=np.float32), "NaN"),
    (np.zeros((2, 2, 100), dtype=np.float32), "shape"),
])
def test_glm4voice_rejects_bad_audio(glm, bad, message):
    with pytest.raises(ValueError, match=message):
        glm.encode([bad])


def test_glm4voice_without_decoder_says_so(glm, glm_ref):
    assert not glm.can_decode
    with pytest.raises(RuntimeError, match="no decoder"):
        glm.decode([glm_ref["codes"][0]])


def test_griffin_lim_is_the_library_stft_pair_iterated(glm_ref):
    """The vocoder's STFT pair written as FFTs over frames equals `torch.stft`/`torch.istft`
    iterated the same way (a reference loop here), and brings a real utterance's mel back."""
    config = MelConfig()
    window = torch.hann_window(config.n_fft)
    magnitude = torch.stft(glm_ref["waveform"], config.n_fft, config.hop_length, window=window,
                           return_complex=True).abs()[..., :81]
    for iterations in (0, 1, 4):
        gen = torch.Generator().manual_seed(0)
        angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * torch.rand(magnitude.shape, generator=gen))
        length, previous = 80 * config.hop_length, torch.zeros_like(angles)
        for _ in range(iterations):
            wave = torch.istft(magnitude * angles, config.n_fft, config.hop_length, window=window, length=length)
            rebuilt = torch.stft(wave, config.n_fft, config.hop_length, window=window, return_complex=True)
            angles = rebuilt - (0.99 / 1.99) * previous
            angles, previous = angles / angles.abs().clamp(min=1e-16), rebuilt
        expected = torch.istft(magnitude * angles, config.n_fft, config.hop_length, window=window, length=length)
        got = griffin_lim(magnitude, config, iterations)
        assert got.shape == expected.shape == (1, length)
        assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max().item()), iterations
    # a real utterance's log-mel, vocoded and measured again, comes back close
    features = log_mel(glm_ref["waveform"])
    again = log_mel(mel_to_waveform(features, config, 48))
    frames = min(features.shape[-1], again.shape[-1])
    assert (again[..., :frames] - features[..., :frames]).abs().mean() < 0.03  # random phases: 0.13


def test_one_loader_per_kind_and_the_protocols(fixtures_dir, tmp_path):
    """A folder becomes a tokenizer one way: a codec folder decodes, a bare GLM-4-Voice
    tokenizer does not; the codec's tokenizer alone (the tokenize job) encodes alike."""
    image = load_image_tokenizer(fixtures_dir / "magvit_tiny_a")
    assert isinstance(image, ImageTokenizer) and image.can_decode and not image.training
    glm = load_speech_tokenizer(fixtures_dir / "glm4voice_tiny_a")
    assert isinstance(glm, SpeechTokenizer) and not glm.can_decode
    small_codec(codebook_size=16, d_model=64, layers=2).save_pretrained(tmp_path / "codec")
    codec = load_speech_tokenizer(tmp_path / "codec")
    alone = load_speech_tokenizer(tmp_path / "codec", decoder=False)
    assert isinstance(codec, SpeechCodec) and codec.can_decode and isinstance(codec, SpeechTokenizer)
    assert isinstance(alone, GLM4VoiceTokenizer) and alone.fingerprint == codec.fingerprint
    wave = torch.sin(torch.arange(16000) / 7.0)
    assert torch.equal(codec.encode([wave], 16000)[0], alone.encode([wave], 16000)[0])
    # GLM-4-Voice's decoder attached: GLM-4-Voice codes become 22,050 Hz audio
    glm.decoder = GLM4VoiceDecoder.from_folder(wide_decoder())
    codes = glm.encode([wave], 16000)[0]
    assert glm.can_decode and glm.output_sample_rate == 22_050
    assert glm.decode([codes])[0].shape == (256 * glm.decoder.flow.frames_for(len(codes)),)


# ---------------------------------------------------------------- text
def test_bpe_trains_round_trips_and_saves(tmp_path):
    corpus = ["a red circle on the left", "two blue squares at the top", "is it green?"] * 30
    tok = BPETokenizer.train(corpus, vocab_size=300)
    text = "a red square on the top, é!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok.encode("a red circle on the left")) < len("a red circle on the left") / 2
    tok.save_pretrained(tmp_path)
    again = BPETokenizer.from_pretrained(tmp_path)
    assert again.encode(text) == ids and again.fingerprint == tok.fingerprint
    other = BPETokenizer.train(corpus + ["yellow triangles"] * 30, vocab_size=300)
    assert other.fingerprint != tok.fingerprint


def test_bpe_special_strings_in_user_text_stay_text(tmp_path):
    from tokenizers import AddedToken

    tok = BPETokenizer.train(["hello world"] * 20, vocab_size=280)
    tok._tok.add_special_tokens([AddedToken("<|im_start|>", special=True),
                                 AddedToken("<|mask|>", special=True)])
    tok.save_pretrained(tmp_path)
    tok = BPETokenizer.from_pretrained(tmp_path)
    specials = tok.backbone_specials()
    assert set(specials) == {"im_start", "mask"}
    ids = tok.encode("hi <|im_start|>system")
    assert specials["im_start"] not in ids
    assert tok.decode(ids) == "hi <|im_start|>system"


# ---------------------------------------------------------------- training
def _shapes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 3, 16, 16)
    for i in range(n):
        r, c = torch.randint(0, 10, (2,), generator=g).tolist()
        x[i, :, r:r + 6, c:c + 6] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x


def test_a_few_steps_train_the_image_tokenizer():
    trunk = TrunkConfig(ch=32, ch_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(),
                        resolution=16, z_channels=6)
    model = MagVitTokenizer(MagVitConfig(encoder=trunk, decoder=trunk, codebook_dim=6, resolution=16))
    history = train_image_tokenizer(model, _shapes(32, 0), ImageTrainConfig(steps=40, batch_size=8,
                                                                           log_every=1, lr=2e-3))
    first = sum(h["l1"] for h in history[:5]) / 5
    last = sum(h["l1"] for h in history[-5:]) / 5
    assert last < 0.7 * first


def test_a_few_steps_train_the_speech_codec(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000 * 2) / 16000
    waves = [0.3 * torch.sin(2 * math.pi * (200 + 300 * torch.rand(1, generator=g)) * t)
             * (t < 0.5 + torch.rand(1, generator=g)) for _ in range(8)]
    codec = small_codec(codebook_size=32, d_model=64, layers=2)
    history = train_speech_codec(codec, waves, SpeechTrainConfig(steps=40, batch_size=4,
                                                                 log_every=1, restart_every=10))
    assert sum(h["mel_l1"] for h in history[-5:]) < 0.7 * sum(h["mel_l1"] for h in history[:5])
    codes = codec.encode(waves[:2])
    assert [len(c) for c in codes] == [25, 25]
    wave = codec.decode(codes[:1])[0]
    assert wave.shape == (25 * 1280,) and torch.isfinite(wave).all()
    # a fresh, wider decoder fitted to the frozen codes replaces the joint one
    refit = train_code_decoder(codec, waves, DecoderTrainConfig(steps=40, batch_size=4, d_model=96, layers=1,
                                                                ffn=128, log_every=1, lr=2e-3))
    assert codec.decoder.config.d_model == 96
    assert sum(h["mel_l1"] for h in refit[-5:]) < 0.7 * sum(h["mel_l1"] for h in refit[:5])
    assert torch.equal(codec.encode(waves[:2])[1], codes[1])  # the codes did not move
    codec.save_pretrained(tmp_path)
    again = SpeechCodec.from_pretrained(tmp_path)
    assert again.fingerprint == codec.fingerprint
    assert torch.equal(again.encode(waves[:1])[0], codes[0])
    assert torch.allclose(again.decode_mel(codes[:1])[0], codec.decode_mel(codes[:1])[0])


def test_the_decoder_fits_best_the_clips_it_is_shown_most():
    """`weights` draw clips unequally (the quickstart: as often as the model says them):
    the clip drawn every time ends closer to its mel than the clips never drawn."""
    g = torch.Generator().manual_seed(1)
    t = torch.arange(16000) / 16000
    waves = [0.3 * torch.sin(2 * math.pi * (150 + 400 * torch.rand(1, generator=g)) * t) for _ in range(4)]
    codec = small_codec(codebook_size=32, d_model=64, layers=2)
    cfg = DecoderTrainConfig(steps=30, batch_size=2, d_model=64, layers=1, ffn=128, lr=3e-3)
    train_code_decoder(codec, waves, cfg, weights=[1.0, 0.0, 0.0, 0.0])
    feats, _, _ = codec.tokenizer.features(waves, 16000)
    codes = codec.encode(waves)
    fpc = codec.decoder.config.frames_per_code
    errors = [(codec.decode_mel([c])[0] - feats[i, :, :len(c) * fpc]).abs().mean().item() for i, c in enumerate(codes)]
    assert errors[0] < 0.8 * min(errors[1:])
    for bad in ([1.0], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            train_code_decoder(codec, waves, cfg, weights=bad)


def test_ctc_targets_are_the_normalised_transcript():
    assert ctc_targets("3 Red!") == ctc_targets("three red")
    assert [CTC_ALPHABET[i - 1] for i in ctc_targets("It's 3 Red!")] == list("it's three red")


def test_the_ctc_loss_teaches_the_codes_what_was_said():
    """Two 'phones' (a low and a high tone) in either order; the transcript says which
    came first, so only codes that tell the tones apart let CTC fall."""
    t = torch.arange(16000) / 16000
    low, high = (0.3 * torch.sin(2 * math.pi * f * t[:8000]) for f in (220, 1500))
    waves = [torch.cat([low, high]), torch.cat([high, low])] * 4
    texts = ["a b", "b a"] * 4
    codec = small_codec(codebook_size=16, d_model=64, layers=2)
    cfg = SpeechTrainConfig(steps=60, batch_size=4, log_every=1, ctc_weight=1.0, lr=2e-3)
    history = train_speech_codec(codec, waves, cfg, texts)
    assert sum(h["ctc"] for h in history[-5:]) < 0.5 * sum(h["ctc"] for h in history[:5])
    with pytest.raises(ValueError, match="transcript"):
        train_speech_codec(codec, waves, cfg)
    with pytest.raises(ValueError, match="no waveform has a transcript"):
        train_speech_codec(codec, waves, cfg, [None] * len(waves))
