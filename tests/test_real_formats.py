"""Real formats, every option their original code runs: GLM-4-Voice's speech tokenizer
configs (pooling type and position, causal or bidirectional attention and convolution,
block size, a full encoder, an EMA codebook, the activation), each against codes that
GLM-4-Voice's own `WhisperVQEncoder` computed (tests/fixtures/glm4voice_options/make.py);
and a clear error, naming the option, for what the original cannot run."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni_model.tokenizers.speech import GLM4VoiceTokenizer, WhisperVQConfig

OPTIONS = Path(__file__).parent / "fixtures" / "glm4voice_options"
VARIANTS = sorted(p.name for p in OPTIONS.iterdir() if p.is_dir())


def test_every_option_fixture_is_here():
    assert VARIANTS == ["causal_layers", "full_attention_symmetric_conv", "full_encoder_ema", "gelu_new",
                        "max_pool_block_causal", "no_pooling", "pooling_never_reached"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_codes_equal_the_originals(variant):
    inputs = load_file(str(OPTIONS / "inputs.safetensors"))
    expected = load_file(str(OPTIONS / variant / "reference.safetensors"))["codes"]
    tokenizer = GLM4VoiceTokenizer.from_pretrained(OPTIONS / variant)
    codes = tokenizer.encode_features(inputs["input_features"], inputs["attention_mask"])
    assert codes.shape == expected.shape
    assert torch.equal(codes, expected)
    # the code rate follows where (and whether) the encoder pools
    frames_per_code = inputs["input_features"].shape[-1] // expected.shape[1]
    assert tokenizer.samples_per_code == frames_per_code * tokenizer.mel.hop_length


@pytest.mark.parametrize("variant, mode", [("causal_layers", "causal"), ("full_encoder_ema", "causal"),
                                           ("max_pool_block_causal", "block_causal"),
                                           ("full_attention_symmetric_conv", "full")])
def test_the_attention_is_derived_from_the_original_keys(variant, mode):
    assert GLM4VoiceTokenizer.from_pretrained(OPTIONS / variant).config.attention_mode == mode


def test_the_real_configs_attention_is_block_causal():
    # GLM-4-Voice's released tokenizer: no causal layers, 200-frame blocks
    real = WhisperVQConfig.from_dict({"pooling_kernel_size": 4, "pooling_type": "avg", "pooling_position": 16,
                                      "quantize_position": 16, "quantize_vocab_size": 16384,
                                      "quantize_causal_block_size": 200, "quantize_causal_encoder": False,
                                      "encoder_causal_attention": False, "encoder_causal_convolution": True})
    assert real.attention_mode == "block_causal" and real.pool == 4


@pytest.mark.parametrize("change, message", [
    ({"pooling_type": "median"}, "pooling_type 'median': GLM-4-Voice pools with 'avg' or 'max'"),
    ({"quantize_vocab_size": None}, "quantize_vocab_size is null"),
    ({"pooling_position": 3, "quantize_position": 2}, "pooling_position 3 lies after quantize_position 2"),
    ({"quantize_encoder_only": False, "encoder_layers": 2, "quantize_position": 3}, "quantize_position 3 is not a layer"),
    ({"activation_function": "mish"}, "activation_function 'mish'"),
    ({"attention_mode": "sideways"}, "unknown attention_mode 'sideways'"),
    ({"attention_mode": "block_causal", "quantize_causal_block_size": None}, "needs quantize_causal_block_size"),
])
def test_what_the_original_cannot_run_is_refused_by_name(change, message):
    base = {"d_model": 32, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "encoder_layers": 3,
            "quantize_position": 2, "pooling_position": 1, "quantize_vocab_size": 64}
    with pytest.raises(ValueError, match=message):
        WhisperVQConfig.from_dict({**base, **change})


# ---------------------------------------------------------------------- Dream
DREAM = Path(__file__).parent / "fixtures" / "dream_options"
DREAM_VARIANTS = sorted(p.name for p in DREAM.iterdir() if p.is_dir())


def test_every_dream_option_fixture_is_here():
    assert DREAM_VARIANTS == ["gelu_tanh_act", "rope_dynamic", "rope_linear", "rope_llama3", "rope_longrope",
                              "rope_yarn", "tied_embeddings"]


@pytest.mark.parametrize("variant", DREAM_VARIANTS)
def test_dream_logits_equal_the_references(variant):
    from omni_model.transformer import Transformer

    ref = load_file(str(DREAM / variant / "reference.safetensors"))
    model = Transformer.from_pretrained(DREAM / variant).eval()
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert (logits - ref["logits"]).abs().max().item() <= 1e-4
    # the option matters: the same weights with the default RoPE and activation differ
    plain = model.config.replace(rope_scaling=None, hidden_act="silu")
    if plain != model.config:
        other = Transformer(plain).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (other(ref["input_ids"]) - ref["logits"]).abs().max().item() > 1e-3


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "mish"}, "hidden_act 'mish'"),
    ({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2}}, "rope_scaling type 'ntk-by-parts'"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling \(linear\) needs \['factor'\]"),
    ({"rope_scaling": {"type": "llama3", "factor": 8}}, "needs .*low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"head_dim": 16}, "head_dim 16"),
])
def test_what_dream_cannot_run_is_refused_by_name(change, message):
    from omni_model.transformer import TransformerConfig

    base = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(ValueError, match=message):
        TransformerConfig.from_dict({**base, **change})


# ---------------------------------------------------------------------- MAGVIT-v2
def test_magvit_configs_show_os_code_cannot_run_are_refused_by_name(fixtures_dir):
    """Show-o's MAGVITv2 takes no config (its VQGAN trunks' defaults are the 256px model,
    which an empty config.json loads: tests/test_tokenizers.py); of its trunks' arguments,
    a doubled z and latent channels other than the quantizer's bits cannot run."""
    import json

    from omni_model.tokenizers.image import MagVitConfig

    tiny = json.loads((fixtures_dir / "magvit_tiny_a" / "config.json").read_text())
    assert MagVitConfig.from_dict(tiny).encoder.num_res_blocks == (1, 2, 1)
    # an int num_res_blocks means one per level, as the VQGAN constructor's default shape
    per_level = MagVitConfig.from_dict({**tiny, "encoder": {**tiny["encoder"], "num_res_blocks": 2}})
    assert per_level.encoder.num_res_blocks == (2, 2, 2)
    with pytest.raises(ValueError, match="double_z"):
        MagVitConfig.from_dict({**tiny, "encoder": {**tiny["encoder"], "double_z": True}})
    with pytest.raises(ValueError, match="encoder.z_channels 10 != codebook_dim 13"):
        MagVitConfig.from_dict({**tiny, "encoder": {**tiny["encoder"], "z_channels": 10}})
