"""SenseVoice speech input (omni_model/tokenizers/sensevoice.py) against the original code.

`tests/fixtures/sensevoice_tiny` holds what funasr's `WavFrontend` and Omni-Diffusion's
own `SenseVoiceSmall.inference_encode` / `AudioEncoder` / `ResamplerProjector` computed
for real speech (its `make.py` says how). Targets: log-mel fbank within 1e-3, encoder and
projector within 1e-4 in float32 (on the machine that made them every one is 0.0: the same
float32 operations in the same order; the margins are for other CPUs' FFT and BLAS).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_model.tokenizers.sensevoice import (AUDIO_PREFIX, PROJECTOR_PREFIX, ResamplerProjector,
                                              SenseVoiceEncoder, SenseVoiceEncoderConfig, SenseVoiceFrontend,
                                              SenseVoiceFrontendConfig, SpeechInput, apply_lfr, context_positions,
                                              kaldi_fbank, load_cmvn, read_prefixed, sinusoids)


@pytest.fixture(scope="module")
def folder(fixtures_dir):
    return fixtures_dir / "sensevoice_tiny"


@pytest.fixture(scope="module")
def ref(folder):
    return load_file(str(folder / "reference.safetensors"))


@pytest.fixture(scope="module")
def state(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def batch(ref):
    """The fixture's two utterances: the speech and its prefix, zero-padded."""
    speech, lengths = ref["speech"], ref["waveform_lengths"]
    waves = torch.zeros(2, speech.numel())
    for i, n in enumerate(lengths.tolist()):
        waves[i, :n] = speech[:n]
    return waves, lengths


@pytest.fixture(scope="module")
def encoder(folder, state):
    model = SenseVoiceEncoder(SenseVoiceEncoderConfig.from_folder(folder)).eval()
    model.load_release_state(state)
    return model


@pytest.fixture(scope="module")
def projector(state):
    return ResamplerProjector.from_state(state).eval()


def valid_rows(x: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return [x[i, : int(n)] for i, n in enumerate(lengths)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------- front end


def test_fbank_matches_kaldi(folder, ref, batch):
    frontend = SenseVoiceFrontend.from_folder(folder, dither=0.0)
    fbank, counts = frontend.fbank(*batch)
    assert counts.tolist() == ref["fbank_lengths"].tolist()
    for ours, theirs in zip(valid_rows(fbank, counts), valid_rows(ref["fbank"], counts)):
        assert max_diff(ours, theirs) < 1e-3  # measured 0.0 (log-mel from -16 to 25)


def test_features_match_wav_frontend(folder, ref, batch):
    frontend = SenseVoiceFrontend.from_folder(folder, dither=0.0)
    features, lengths = frontend(*batch)
    assert lengths.tolist() == ref["feature_lengths"].tolist()
    assert features.shape == ref["features"].shape
    assert max_diff(features, ref["features"]) < 1e-3  # padded rows are zero in both
    assert features[1, lengths[1]:].abs().max() == 0


def test_utterance_shorter_than_one_frame(folder, ref):
    # funasr shortens the frame to the utterance: 300 samples give one frame of 300
    frontend = SenseVoiceFrontend.from_folder(folder, dither=0.0)
    features, lengths = frontend([ref["short_waveform"]])
    assert lengths.tolist() == [1]
    assert max_diff(features[0], ref["short_features"]) < 1e-3
    with pytest.raises(ValueError, match="too short"):
        frontend([torch.zeros(1)])


def test_dither_reproduces_seeded_original(folder, ref, batch):
    frontend = SenseVoiceFrontend.from_folder(folder)
    assert frontend.config.dither == 1.0  # SenseVoiceSmall sets none: funasr's default
    seeded = lambda seed: frontend(*batch, generator=torch.Generator().manual_seed(seed))[0]  # noqa: E731
    first = seeded(int(1234))  # the seed make.py gave torch.manual_seed before the original ran
    n = int(ref["feature_lengths"][1])
    assert max_diff(first[1, :n], ref["dither_features_row1"][:n]) < 1e-3
    assert torch.equal(first, seeded(1234))
    assert max_diff(first, seeded(99)) > 1e-3
    clean, _ = SenseVoiceFrontend.from_folder(folder, dither=0.0)(*batch)
    assert torch.equal(clean, SenseVoiceFrontend.from_folder(folder, dither=0.0)(*batch)[0])


@pytest.mark.parametrize("window", ["hamming", "hanning", "povey", "rectangular", "blackman"])
@pytest.mark.parametrize("snip_edges", [True, False])
def test_fbank_options_match_kaldi(ref, window, snip_edges):
    config = SenseVoiceFrontendConfig(window=window, snip_edges=snip_edges, dither=0.0)
    for tag, n in (("", 1601), ("short_", 150)):
        expected = ref[f"options_{tag}fbank_{window}_{int(snip_edges)}"]
        wave = ref["speech"][2000:2000 + n] * (1 << 15)
        ours, counts = kaldi_fbank(wave[None], [n], config)
        assert counts.tolist() == [expected.shape[0]] == [config.fbank_frames(n)]
        assert max_diff(ours[0], expected) < 1e-3  # measured <= 2e-6


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 36, 37])
def test_lfr_matches_funasr(ref, t):
    inputs, expected = ref[f"lfr_in_{t}"], ref[f"lfr_out_{t}"]
    out, lengths = apply_lfr(inputs[None], torch.tensor([t]), 7, 6)
    assert lengths.tolist() == [expected.shape[0]]
    assert torch.equal(out[0], expected)


def test_lfr_padded_batch_rows_equal_alone(ref):
    a, b = ref["lfr_in_37"], ref["lfr_in_13"]
    padded = torch.zeros(2, 37, 3)
    padded[0], padded[1, :13] = a, b
    out, lengths = apply_lfr(padded, torch.tensor([37, 13]), 7, 6)
    assert lengths.tolist() == [7, 3]
    assert torch.equal(out[0], ref["lfr_out_37"])
    assert torch.equal(out[1, :3], ref["lfr_out_13"]) and out[1, 3:].abs().max() == 0


def test_cmvn_parses_kaldi_nnet_text(folder, ref, tmp_path):
    cmvn = load_cmvn(folder / "am.mvn")
    assert cmvn.shape == (2, 560) and torch.equal(cmvn, ref["cmvn"])
    bad = tmp_path / "am.mvn"
    bad.write_text("<Nnet>\n<AddShift> 2 2\n<LearnRateCoef> 0 [ 1 2 ]\n</Nnet>\n")
    with pytest.raises(ValueError, match="Rescale"):
        load_cmvn(bad)
    # CMVN is (x + shift) * scale on every LFR value, nothing on the padding
    frontend = SenseVoiceFrontend(SenseVoiceFrontendConfig(dither=0.0), cmvn)
    plain = SenseVoiceFrontend(SenseVoiceFrontendConfig(dither=0.0))
    wave = torch.sin(torch.arange(4000) * 0.05) * 0.3
    normed, lengths = frontend([wave, wave[:2000]])
    raw, _ = plain([wave, wave[:2000]])
    assert torch.allclose(normed[0], (raw[0] + cmvn[0]) * cmvn[1])
    assert normed[1, lengths[1]:].abs().max() == 0


def test_frontend_config_from_folder(folder):
    config = SenseVoiceFrontendConfig.from_folder(folder)
    assert (config.fs, config.window, config.n_mels, config.lfr_m, config.lfr_n) == (16000, "hamming", 80, 7, 6)
    assert config.output_size == 560 and "cmvn_file" in config.extra
    assert config == SenseVoiceFrontendConfig()  # the fixture carries SenseVoiceSmall's settings
    with pytest.raises(ValueError, match="window"):
        SenseVoiceFrontendConfig(window="kaiser")


# --------------------------------------------------------------------------- encoder


def test_encoder_config_and_queries(folder):
    config = SenseVoiceEncoderConfig.from_folder(folder)
    assert (config.input_size, config.output_size, config.num_blocks, config.tp_blocks) == (560, 32, 3, 2)
    assert config.query_rows == (0, 1, 2, 15)  # language auto, event, emotion, text norm "woitn"
    assert SenseVoiceEncoderConfig().output_size == 512
    with pytest.raises(ValueError, match="language"):
        SenseVoiceEncoderConfig(language="xx")


def test_encoder_matches_inference_encode(encoder, ref):
    with torch.no_grad():
        hidden, lengths = encoder(ref["features"], ref["feature_lengths"])
    assert lengths.tolist() == ref["encoder_out_lengths"].tolist() == [n + 4 for n in ref["feature_lengths"].tolist()]
    assert hidden.shape == ref["encoder_out"].shape
    assert max_diff(hidden, ref["encoder_out"]) < 1e-4  # padded rows included


def test_projector_matches(projector, ref):
    with torch.no_grad():
        assert max_diff(projector(ref["encoder_out"]), ref["projected"]) < 1e-4


def test_bf16_feature_cast_matches_audio_encoder(folder, encoder, projector, ref):
    chain = SpeechInput(SenseVoiceFrontend.from_folder(folder, dither=0.0), encoder, projector)
    assert chain.features_bf16  # the official AudioEncoder's behaviour is the default
    with torch.no_grad():
        out, lengths = chain.embed_features(ref["features"], ref["feature_lengths"])
        unrounded, _ = SpeechInput(chain.frontend, encoder, projector, features_bf16=False).embed_features(
            ref["features"], ref["feature_lengths"])
    assert max_diff(out, ref["projected_bf16_features"]) < 1e-4
    assert max_diff(unrounded, ref["projected"]) < 1e-4
    assert max_diff(out, unrounded) > 1e-3  # the rounding is visible


def test_bf16_weights_match_released_inference(folder, state, ref):
    # The released inference loads the whole model in bfloat16. The same bf16 operations in
    # the same order; CPU bf16 matmuls may still round differently, hence a bf16 tolerance.
    encoder = SenseVoiceEncoder(SenseVoiceEncoderConfig.from_folder(folder)).eval()
    encoder.load_release_state(state)
    projector = ResamplerProjector.from_state(state).eval()
    encoder.to(torch.bfloat16)
    projector.to(torch.bfloat16)
    with torch.no_grad():
        hidden, _ = encoder(ref["features"].to(torch.bfloat16), ref["feature_lengths"])
        out = projector(hidden)
    scale = ref["projected_bf16_model"].abs().max().item()
    assert max_diff(hidden, ref["encoder_out_bf16_model"]) <= 2 ** -7 * ref["encoder_out_bf16_model"].abs().max()
    assert max_diff(out, ref["projected_bf16_model"]) <= 2 ** -7 * scale  # measured 0.0
    # a whole SpeechInput cast to bfloat16 keeps its front end in float32, as the original's is
    chain = SpeechInput(SenseVoiceFrontend.from_folder(folder, dither=0.0), encoder, projector).to(torch.bfloat16)
    speech, lengths = ref["speech"], ref["waveform_lengths"].tolist()
    features, _ = chain.frontend([speech, speech[: lengths[1]]])
    assert features.dtype == torch.float32 and max_diff(features, ref["features"]) < 1e-3
    with torch.no_grad():
        out, _ = chain([speech, speech[: lengths[1]]])
    assert out.dtype == torch.bfloat16 and max_diff(out, ref["projected_bf16_model"]) <= 2 ** -7 * scale


def test_padded_row_equals_alone(encoder, ref):
    n = int(ref["feature_lengths"][1])
    with torch.no_grad():
        batched, lengths = encoder(ref["features"], ref["feature_lengths"])
        alone, alone_len = encoder(ref["features"][1:2, :n], torch.tensor([n]))
    assert alone_len.tolist() == [lengths[1].item()]
    assert max_diff(batched[1, : n + 4], alone[0]) < 1e-5
    # padding content never reaches the real rows
    noisy = ref["features"].clone()
    noisy[1, n:] = torch.randn_like(noisy[1, n:]) * 100
    with torch.no_grad():
        again, _ = encoder(noisy, ref["feature_lengths"])
    assert max_diff(again[1, : n + 4], batched[1, : n + 4]) < 1e-5


def test_fsmn_window_moves_to_the_past_with_sanm_shfit():
    from omni_model.tokenizers.sensevoice import SANMAttention

    assert SANMAttention(4, 32, 32, kernel_size=11, shift=0).padding == (5, 5)
    assert SANMAttention(4, 32, 32, kernel_size=11, shift=2).padding == (7, 3)


def test_sinusoids_positions_start_at_one():
    enc = sinusoids(3, 8, torch.float32)
    inv = torch.tensor([10000.0]).log() / 3
    assert torch.allclose(enc[0, :, 0], torch.sin(torch.tensor([1.0, 2.0, 3.0])))
    assert torch.allclose(enc[0, 1, 4:], torch.cos(2 * torch.exp(-torch.arange(4) * inv)))
    # bfloat16 positions round as the original's do: 257 becomes 256
    bf = sinusoids(260, 8, torch.bfloat16)
    assert torch.equal(bf[0, 255], bf[0, 256])


# --------------------------------------------------------------------------- loading


def test_strict_loading_names_the_bad_key(folder, state):
    config = SenseVoiceEncoderConfig.from_folder(folder)
    missing = {k: v for k, v in state.items() if k != AUDIO_PREFIX + "encoder.encoders.1.norm2.bias"}
    with pytest.raises(ValueError, match=r"missing=\['model\.audio_model\.model\.encoder\.encoders\.1\.norm2\.bias'\]"):
        SenseVoiceEncoder(config).load_release_state(missing)
    extra = {**state, AUDIO_PREFIX + "encoder.encoders.9.norm1.weight": torch.ones(32)}
    with pytest.raises(ValueError, match=r"unexpected=\['model\.audio_model\.model\.encoder\.encoders\.9\.norm1"):
        SenseVoiceEncoder(config).load_release_state(extra)
    wrong = {**state, AUDIO_PREFIX + "embed.weight": torch.zeros(16, 80)}
    with pytest.raises(ValueError, match=r"wrong_shape=\['model\.audio_model\.model\.embed\.weight \(16, 80\)"):
        SenseVoiceEncoder(config).load_release_state(wrong)
    projector = {k: v for k, v in state.items() if k != PROJECTOR_PREFIX + "mlp.2.weight"}
    with pytest.raises(ValueError, match=r"missing=\['model\.audio_projection\.mlp\.2\.weight'\]"):
        ResamplerProjector.from_state(projector)
    # the CTC head is in the release and accepted by name; other parts of a DreamModel are ignored
    assert any(k.startswith(AUDIO_PREFIX + "ctc.") for k in state)
    bare = {k[len(AUDIO_PREFIX):]: v for k, v in state.items() if k.startswith(AUDIO_PREFIX)}
    SenseVoiceEncoder(config).load_release_state(bare, prefix="")  # SenseVoiceSmall's own checkpoint
    with pytest.raises(ValueError, match=r"unexpected=\['unrelated'\]"):  # no prefix: every key is ours
        SenseVoiceEncoder(config).load_release_state({**bare, "unrelated": torch.zeros(1)}, prefix="")
    SenseVoiceEncoder(config).load_release_state({**state, "model.layers.0.mlp.up_proj.weight": torch.zeros(2)})


def test_read_prefixed_reads_only_the_audio_shards(state, tmp_path):
    audio = {k: v for k, v in state.items() if k.startswith(AUDIO_PREFIX)}
    rest = {k: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    other = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}
    save_file(audio, str(tmp_path / "model-00001-of-00003.safetensors"))
    save_file(rest, str(tmp_path / "model-00002-of-00003.safetensors"))
    (tmp_path / "model-00003-of-00003.safetensors").write_bytes(b"never opened")
    weight_map = {**{k: "model-00001-of-00003.safetensors" for k in audio},
                  **{k: "model-00002-of-00003.safetensors" for k in rest},
                  **{k: "model-00003-of-00003.safetensors" for k in other}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = read_prefixed(tmp_path, [AUDIO_PREFIX, PROJECTOR_PREFIX])
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# --------------------------------------------------------------------------- the chain


def test_speech_input_from_waveforms(folder, ref):
    # float32 features: with the bfloat16 rounding a feature 1 ulp off may round the other
    # way (measured equal here; test_bf16_feature_cast_matches_audio_encoder covers it)
    chain = SpeechInput.from_pretrained(folder, dither=0.0, features_bf16=False)
    speech, lengths = ref["speech"], ref["waveform_lengths"].tolist()
    with torch.no_grad():
        out, out_lengths = chain([speech, speech[: lengths[1]].numpy()])
    assert out_lengths.tolist() == ref["encoder_out_lengths"].tolist()
    assert out.shape == ref["projected"].shape
    assert max_diff(out, ref["projected"]) < 1e-4
    # context positions from the sample count alone, as add_audio_input_contiguous counts them
    for n, frames, rows in zip(lengths, ref["feature_lengths"].tolist(), out_lengths.tolist()):
        assert chain.frontend.num_frames(n) == frames
        assert chain.context_positions(n) == context_positions(frames) == rows == frames + 4
    assert chain.context_positions(300) == 5


def test_speech_input_resamples_and_mixes_down(folder):
    chain = SpeechInput.from_pretrained(folder, dither=0.0)
    wave = torch.sin(torch.arange(16000) * 0.07) * 0.2
    stereo_24k = torch.stack([wave, wave])  # [C, T]
    prepared = chain.prepare(stereo_24k, 24000)
    assert prepared.dim() == 1 and abs(prepared.numel() - 16000 * 16000 / 24000) <= 1
    with torch.no_grad():
        out, lengths = chain([stereo_24k], sample_rate=24000)
    assert out.shape == (1, lengths[0], 48) and torch.isfinite(out).all()
