"""GLM-4-Voice's speech decoder (flow model + HiFT) against the original code's outputs.

Fixtures `tests/fixtures/glm4voice_decoder` and `glm4voice_decoder_b` (two configurations
of different sizes and structure) were written by GLM-4-Voice's own `AudioDecoder.token2wav`
with tiny random weights (their README and make.py say how). Float32 on CPU.

Tolerances, and why: the flow model's mel frames match within MEL_ATOL (seen: 5e-6 on
values up to 7) and the waveform within WAVE_ATOL (seen: 1.1e-7). The random numbers are
drawn exactly as the original draws them; what differs is summation order: we run the
conditional and unconditional estimator passes as one batch (the original runs two),
and oneDNN picks kernels by shape and thread count; the original itself, rerun with a
different thread count, moves its mel by 3e-6. Ten Euler steps carry such rounding into
the result, so the bound is set ten times above what is seen.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni_model.tokenizers.glm4voice.conformer import BlockConformerEncoder, EncoderConfig
from omni_model.tokenizers.glm4voice.decoder import GLM4VoiceDecoder
from omni_model.tokenizers.glm4voice.estimator import ACT_FNS, ConditionalDecoder, EstimatorConfig

MEL_ATOL = 5e-5
WAVE_ATOL = 1e-5
FOLDERS = ("glm4voice_decoder", "glm4voice_decoder_b")


def lengths(refs: dict, prefix: str = "eval") -> list[int]:
    return sorted({int(k.split("_len")[1].split("_")[0]) for k in refs
                   if k.startswith(f"{prefix}_len") and k.endswith("_tokens")})


@pytest.fixture(scope="module", params=FOLDERS)
def loaded(request, fixtures_dir: Path) -> tuple[GLM4VoiceDecoder, dict]:
    folder = fixtures_dir / request.param
    return GLM4VoiceDecoder.from_folder(folder), load_file(folder / "reference.safetensors")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_one_pass_matches_token2wav(loaded) -> None:
    decoder, refs = loaded
    for n in lengths(refs):
        (wave, mel), = decoder.decode_with_mel([refs[f"eval_len{n}_tokens"][0]])
        assert mel.shape[-1] == decoder.flow.frames_for(n)
        assert max_diff(mel, refs[f"eval_len{n}_mel"][0]) < MEL_ATOL, n
        assert max_diff(wave, refs[f"eval_len{n}_speech"][0]) < WAVE_ATOL, n
    assert decoder.sample_rate == 22_050


def test_a_batch_of_different_lengths_gives_each_what_it_gives_alone(loaded) -> None:
    """Padding is masked everywhere (the estimator's GroupNorm and attention keys
    included), and each utterance keeps its own noise: batching changes nothing."""
    decoder, refs = loaded
    ns = lengths(refs)
    outs = decoder.decode_with_mel([refs[f"eval_len{n}_tokens"][0] for n in reversed(ns)], batch_size=len(ns))
    for n, (wave, mel) in zip(reversed(ns), outs):
        assert max_diff(mel, refs[f"eval_len{n}_mel"][0]) < MEL_ATOL, n
        assert max_diff(wave, refs[f"eval_len{n}_speech"][0]) < WAVE_ATOL, n


def test_the_codes_decide_the_sound(loaded) -> None:
    decoder, refs = loaded
    n = lengths(refs)[-1]
    codes = refs[f"eval_len{n}_tokens"][0]
    flipped = decoder.flow.config.vocab_size - 1 - codes
    (wave_a, mel_a), (wave_b, mel_b) = decoder.decode_with_mel([codes, flipped], batch_size=2)
    assert mel_a.shape == mel_b.shape and (mel_a - mel_b).abs().max() > 0.1
    assert wave_a.shape == wave_b.shape and not torch.equal(wave_a, wave_b)
    assert torch.equal(decoder.decode([codes])[0], decoder.decode([codes])[0])  # seeded as the original


def test_chunked_decoding_matches_the_original_streaming(loaded) -> None:
    """Every chunk of the original's streaming schedules (`stream_inference`: chunks of
    the encoder's block size; the web demo: 25, 50, 100, ... codes), decoded with the
    earlier codes and mel frames as the prompt, the held-back frames cross-faded and the
    vocoder's source cached, as `token2wav(finalize=False)` does chunk after chunk."""
    decoder, refs = loaded
    schedules = sorted(k[: -len("_bounds")] for k in refs if k.endswith("_bounds"))
    assert schedules, "the fixture has no chunked references"
    for name in schedules:
        bounds = refs[f"{name}_bounds"].tolist()
        codes = refs[f"eval_len{name.split('_len')[1]}_tokens"][0]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        chunks = list(decoder.stream(codes, blocks=sizes))
        stream = decoder.start_stream()
        for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
            wave = stream.push(codes[start:end], final=end == bounds[-1])
            assert max_diff(stream.mels[-1], refs[f"{name}_chunk{i}_mel"][0]) < MEL_ATOL * 2, (name, i)
            assert max_diff(wave, refs[f"{name}_chunk{i}_speech"][0]) < WAVE_ATOL, (name, i)
            assert torch.equal(wave, chunks[i])  # `stream` is the same loop
        with pytest.raises(RuntimeError, match="finished"):
            stream.push(codes[:1])


def test_a_chunk_too_small_to_hold_back_its_overlap_is_refused(loaded) -> None:
    decoder, refs = loaded
    codes = refs[f"eval_len{lengths(refs)[-1]}_tokens"][0]
    with pytest.raises(ValueError, match="holds back"):
        list(decoder.stream(codes, blocks=(5,)))


def test_fewer_flow_steps_is_an_option(loaded) -> None:
    decoder, refs = loaded
    n = lengths(refs)[-1]
    codes = refs[f"eval_len{n}_tokens"][0]
    (wave, mel), = decoder.decode_with_mel([codes], steps=4)
    assert mel.shape == refs[f"eval_len{n}_mel"][0].shape
    assert max_diff(mel, refs[f"eval_len{n}_mel"][0]) > 1e-3  # a different integration
    with pytest.raises(ValueError, match="at least 1"):
        decoder.decode([codes], steps=0)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([], dtype=torch.long), "no speech codes"),
    (torch.tensor([3, -1]), "must lie in"),
    (torch.tensor([3, 10**6]), "must lie in"),
])
def test_bad_codes_are_refused(loaded, bad, message) -> None:
    decoder, _ = loaded
    with pytest.raises(ValueError, match=message):
        decoder.decode([bad])


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_each_estimator_activation_matches_matcha(fixtures_dir: Path, act_fn: str) -> None:
    """The U-Net with each feed-forward activation Matcha-TTS offers (the released decoder
    uses gelu), against the original `ConditionalDecoder` on a batch whose second row is
    padded: in the original's arithmetic (`padded=False`) both rows match it."""
    refs = load_file(fixtures_dir / "glm4voice_decoder" / "parts.safetensors")
    net = ConditionalDecoder(EstimatorConfig(in_channels=320, out_channels=80, channels=(8,), attention_head_dim=4,
                                             n_blocks=1, num_mid_blocks=1, num_heads=2, act_fn=act_fn)).eval()
    net.load_state_dict({k[len(act_fn) + 1:]: v for k, v in refs.items() if k.startswith(f"{act_fn}.")
                         and k != f"{act_fn}.out"})
    with torch.no_grad():
        out = net(refs["x"], refs["mask"], refs["mu"], refs["t"], refs["spks"], refs["cond"])
    assert max_diff(out, refs[f"{act_fn}.out"]) < 1e-5


@pytest.mark.parametrize("name, options", [
    ("macaron", dict(macaron_style=True, normalize_before=True, activation_type="relu", key_bias=True)),
    ("postnorm", dict(macaron_style=False, normalize_before=False, activation_type="gelu", key_bias=False)),
])
def test_encoder_layer_options_match_cosyvoice(fixtures_dir: Path, name: str, options: dict) -> None:
    """The block conformer in the layer options the released decoder does not use (a
    macaron feed-forward; post-norm without a key bias), against CosyVoice's encoder on a
    batch with a padded row: the valid positions match."""
    refs = load_file(fixtures_dir / "glm4voice_decoder" / "parts.safetensors")
    enc = BlockConformerEncoder(EncoderConfig(input_size=12, output_size=12, attention_heads=3, linear_units=20,
                                              num_blocks=2, block_size=5, **options)).eval()
    prefix = f"enc.{name}."
    enc.load_state_dict({k[len(prefix):]: v for k, v in refs.items() if k.startswith(prefix) and k != prefix + "out"})
    with torch.no_grad():
        out = enc(refs["enc_x"], refs["enc_lengths"])
    ref = refs[prefix + "out"]
    for row, n in enumerate(refs["enc_lengths"].tolist()):
        assert max_diff(out[row, :n], ref[row, :n]) < 1e-5, (name, row)


# ---------------------------------------------------------------------- the folder
@pytest.fixture()
def copy(tmp_path: Path, fixtures_dir: Path) -> Path:
    folder = tmp_path / "decoder"
    shutil.copytree(fixtures_dir / "glm4voice_decoder", folder)
    return folder


def _edit(folder: Path, old: str, new: str) -> None:
    path = folder / "config.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("old, new, message", [
    ("BlockConformerEncoder", "ConformerEncoder", "implements BlockConformerEncoder only"),
    ("pos_enc_layer_type: 'rel_pos_espnet'", "pos_enc_layer_type: 'abs_pos'", "pos_enc_layer_type"),
    ("use_cnn_module: False", "use_cnn_module: True", "use_cnn_module"),
    ("block_size: 10", "block_size: 10\n        mystery_option: 3", "mystery_option"),
    ("solver: 'euler'", "solver: 'midpoint'", "solver"),
    ("act_fn: 'gelu'", "act_fn: 'snake'", "act_fn"),
    ("in_channels: 320", "in_channels: 321", "the estimator takes 321"),
    ("vocab_size: 300", "vocab_size: !ref <nowhere>", "names nothing"),
])
def test_a_config_we_cannot_interpret_is_a_clear_error(copy: Path, old, new, message) -> None:
    _edit(copy, old, new)
    with pytest.raises(ValueError, match=message):
        GLM4VoiceDecoder.from_folder(copy)


def test_references_and_arithmetic_in_the_config_are_resolved(copy: Path, fixtures_dir: Path) -> None:
    _edit(copy, "spk_embed_dim: 192", "spk_embed_dim: 192\nflow_width: 16")
    _edit(copy, "input_size: 32\n    output_size: 80", "input_size: !ref <flow_width> * 2\n    output_size: 80")
    decoder = GLM4VoiceDecoder.from_folder(copy)
    assert decoder.flow.config.input_size == 32 and decoder.flow.config.spk_embed_dim == 192


def test_the_rest_of_a_full_cosyvoice_config_is_ignored(copy: Path) -> None:
    """The released config.yaml also holds CosyVoice's data pipeline and training
    settings (functions by `!name:`, lists of `!ref`s, arithmetic): never executed, never
    needed, and they do not stop the decoder from loading."""
    with open(copy / "config.yaml", "a") as f:
        f.write("""
llm_input_size: 1024
get_tokenizer: !name:whisper.tokenizer.get_tokenizer
    multilingual: True
    language: 'en'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1024
    sampling_rate: !ref <sample_rate>
    fmax: !ref <sample_rate> // 2
compute_fbank: !name:cosyvoice.dataset.processor.compute_fbank
    feat_extractor: !ref <feat_extractor>
data_pipeline: [!ref <compute_fbank>, !ref <get_tokenizer>]
train_conf:
    optim: adam
    optim_conf: {lr: 0.001}
    scheduler: warmuplr
    checkpoint: !PLACEHOLDER
    weird: !some_future_tag <anything at all>
    broken_ref: !ref <nowhere> * 2
""")
    decoder = GLM4VoiceDecoder.from_folder(copy)
    assert decoder.flow.config.vocab_size == 300 and decoder.sample_rate == 22_050


def test_weights_that_do_not_fit_or_are_not_plain_tensors_are_refused(copy: Path) -> None:
    state = torch.load(copy / "flow.pt", weights_only=True)
    state.pop("encoder_proj.bias")
    torch.save(state, copy / "flow.pt")
    with pytest.raises(ValueError, match="encoder_proj.bias"):
        GLM4VoiceDecoder.from_folder(copy)
    torch.save({"weights": Path("not a tensor")}, copy / "flow.pt")  # needs unpickling a class
    with pytest.raises(ValueError, match="refused to unpickle"):
        GLM4VoiceDecoder.from_folder(copy)
    (copy / "hift.pt").unlink()
    with pytest.raises(FileNotFoundError, match="hift.pt"):
        GLM4VoiceDecoder.from_folder(copy)
