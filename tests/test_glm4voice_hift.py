"""HiFT vocoder against GLM-4-Voice's original (fixture: tests/fixtures/glm4voice_decoder).

Tolerance: on the project's 2-core x86 dev CPU (torch 2.13.0) every reference is reproduced
bit for bit with one torch thread, and within 1.2e-7 with the default two (the fixture was
written with one thread; oneDNN's convolutions split their sums differently across threads).
The random draws themselves are exact: the NSF source matches with 0 difference either way.
ATOL = 1e-6 keeps that margin without depending on the thread count or the CPU's vector
extensions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni_model.tokenizers.glm4voice.config import load_decoder_config
from omni_model.tokenizers.glm4voice.hift import HiFTConfig, HiFTVocoder

ATOL = 1e-6


@pytest.fixture(scope="module")
def folder(fixtures_dir: Path) -> Path:
    return fixtures_dir / "glm4voice_decoder"


@pytest.fixture(scope="module")
def state_dict(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "hift.pt", weights_only=True)


@pytest.fixture(scope="module")
def vocoder(folder: Path, state_dict: dict[str, torch.Tensor]) -> HiFTVocoder:
    model = HiFTVocoder(load_decoder_config(folder).hift).eval()
    model.load_original(state_dict)
    return model


@pytest.fixture(scope="module")
def refs(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "reference.safetensors")


def after_flow_generator(mel: torch.Tensor) -> torch.Generator:
    """The RNG state HiFT saw in the fixture: the flow model seeded 42 and drew its noise."""
    g = torch.Generator().manual_seed(42)
    torch.randn(mel.shape, generator=g)
    return g


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_seed0_speech_and_source(vocoder: HiFTVocoder, refs: dict[str, torch.Tensor]) -> None:
    speech, source = vocoder.inference(refs["eval_len13_mel"], [torch.Generator().manual_seed(0)])
    assert max_diff(source, refs["eval_len13_hift_seed0_source"]) <= ATOL
    assert max_diff(speech, refs["eval_len13_hift_seed0_speech"]) <= ATOL


@pytest.mark.parametrize("n", [1, 13, 50, 200])
def test_speech_after_flow(vocoder: HiFTVocoder, refs: dict[str, torch.Tensor], n: int) -> None:
    mel = refs[f"eval_len{n}_mel"]
    speech, source = vocoder.inference(mel, [after_flow_generator(mel)])
    assert speech.shape == (1, mel.shape[-1] * vocoder.samples_per_frame)
    assert source.shape == (1, 1, speech.shape[-1])
    assert max_diff(speech, refs[f"eval_len{n}_speech"]) <= ATOL


def test_batch_items_equal_batch_one(vocoder: HiFTVocoder, refs: dict[str, torch.Tensor]) -> None:
    mel = refs["eval_len13_mel"]
    alone, alone_source = vocoder.inference(mel, [torch.Generator().manual_seed(5)])
    both, both_source = vocoder.inference(torch.cat([mel, mel]),
                                          [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)])
    # Random draws are per item, so the sources are exact; the convolutions are batched and
    # CPU kernels pick their algorithm by batch size, so speech agrees to rounding (~1e-7).
    assert torch.equal(both_source[0], alone_source[0]) and torch.equal(both_source[1], alone_source[0])
    assert torch.equal(both[0], both[1])
    assert max_diff(both[:1], alone) <= ATOL


def test_each_item_uses_its_own_generator(vocoder: HiFTVocoder, refs: dict[str, torch.Tensor]) -> None:
    mel = refs["eval_len13_mel"]
    speech, source = vocoder.inference(torch.cat([mel, mel]),
                                       [torch.Generator().manual_seed(0), after_flow_generator(mel)])
    assert max_diff(source[:1], refs["eval_len13_hift_seed0_source"]) <= ATOL
    assert max_diff(speech[:1], refs["eval_len13_hift_seed0_speech"]) <= ATOL
    assert max_diff(speech[1:], refs["eval_len13_speech"]) <= ATOL


def test_cache_source_overwrites_the_start(vocoder: HiFTVocoder, refs: dict[str, torch.Tensor]) -> None:
    mel = refs["eval_len13_mel"]
    plain, plain_source = vocoder.inference(mel, [torch.Generator().manual_seed(0)])
    cached, cached_source = vocoder.inference(mel, [torch.Generator().manual_seed(0)],
                                              cache_source=torch.zeros(1, 1, 100))
    assert torch.equal(cached_source[..., :100], torch.zeros(1, 1, 100))
    assert torch.equal(cached_source[..., 100:], plain_source[..., 100:])
    assert not torch.equal(cached, plain)


def test_generator_count_must_match_batch(vocoder: HiFTVocoder, refs: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="one generator per batch item"):
        vocoder.inference(refs["eval_len1_mel"], [])


def test_missing_and_unexpected_keys_are_named(folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    model = HiFTVocoder(load_decoder_config(folder).hift)
    missing = {k: v for k, v in state_dict.items() if k != "conv_post.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['conv_post.bias'\]"):
        model.load_original(missing)
    extra = {**state_dict, "ups.9.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['ups.9.bias'\]"):
        model.load_original(extra)
    orphan = {k: v for k, v in state_dict.items() if k != "conv_pre.weight_g"}
    with pytest.raises(ValueError, match="conv_pre.weight_v"):
        model.load_original(orphan)


def test_unknown_hift_option_is_named(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        HiFTConfig.from_section({"base_channels": 16, "bogus": 1})
    with pytest.raises(ValueError, match="istft_params.'win_len'"):
        HiFTConfig.from_section({"istft_params": {"n_fft": 16, "hop_len": 4, "win_len": 16}})
    # and through the decoder's config reader, as a released folder would hit it
    text = (folder / "config.yaml").read_text()
    head = "hift: !new:cosyvoice.hifigan.generator.HiFTGenerator\n"
    assert head in text
    (tmp_path / "config.yaml").write_text(text.replace(head, head + "    upsample_mode: 'nearest'\n"))
    with pytest.raises(ValueError, match="'upsample_mode'"):
        load_decoder_config(tmp_path)


def test_section_maps_onto_the_config(folder: Path) -> None:
    assert load_decoder_config(folder).hift == HiFTConfig(base_channels=16, f0_cond_channels=16)
    assert HiFTConfig.from_section({"nsf_sigma": "3e-3", "upsample_rates": [8, 8]}).nsf_sigma == 0.003
