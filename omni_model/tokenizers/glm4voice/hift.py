"""GLM-4-Voice's vocoder: CosyVoice's HiFT generator (HiFTNet = neural source filter + iSTFTNet).

Mel frames [B, 80, T] become 22.05 kHz speech [B, 256*T] in three stages:

1. an F0 predictor (five 3-tap convolutions with ELU, then a linear layer and `abs`) gives a
   pitch per mel frame, repeated to one value per sample;
2. a harmonic-plus-noise source (NSF): sines at F0 and its 8 overtones with random start
   phases, zeroed where the pitch is below the voiced threshold, plus Gaussian noise, merged
   into one excitation by a linear layer and `tanh`;
3. a HiFi-GAN-like generator upsamples the mel (transposed convolutions, Snake residual
   blocks), adds the source's STFT brought to each resolution by strided convolutions, and
   predicts a small STFT (n_fft 16, hop 4) that an inverse STFT turns into the waveform.

The numerics follow the original (`cosyvoice/hifigan/{generator,f0_predictor}.py` in
THUDM/GLM-4-Voice at eb00ce9) operation by operation, so that on CPU in float32 the output
equals the original's bit for bit when both draw the same random numbers. Quirks that are
copied on purpose (changing any of them changes the waveform):

- the random numbers: per item, `Uniform(-pi, pi)` start phases `[1, H+1, 1]` (harmonic 0's
  phase then set to 0), then `randn` `[1, H+1, L]` for the additive noise, then `randn`
  `[1, L, 1]` for a "noise branch" whose result the original never uses (it still advances
  the generator, so we draw it too);
- the phase is passed through `sin` before the inverse STFT's `cos`/`sin` (the original's
  comment calls it redundant; it is not the identity, so it stays), the magnitude is
  `exp` clipped at 1e2 and the waveform clamped to +-`audio_limit`;
- `ReflectionPad1d((1, 0))` after the last upsampling, so the generator's frame count
  matches the source STFT's `L/hop + 1` frames (centred STFT);
- the leaky ReLU before `conv_post` uses torch's default slope 0.01, not `lrelu_slope`;
- the STFT window is SciPy's periodic Hann computed in float64 and rounded to float32,
  which is not always equal to `torch.hann_window` computed in float32.

Weights are plain convolutions: the original's `weight_norm` parametrisation is folded once
when loading (`fold_weight_norm`), with the very op torch's `weight_norm` hook runs, so the
folded weight equals the one the original computes on every call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HiFTConfig:
    """Constructor arguments of the original `HiFTGenerator` and its `ConvRNNF0Predictor`,
    with the original's defaults (`istft_params` split in two fields, lists as tuples)."""

    in_channels: int = 80
    """Mel bins of the input."""
    base_channels: int = 512
    """Width after `conv_pre`; halved by every upsampling."""
    nb_harmonics: int = 8
    """Overtones of F0 in the NSF source (the source has nb_harmonics + 1 sines)."""
    sampling_rate: int = 22050
    """Output sample rate (Hz); F0 is divided by it to get cycles per sample."""
    nsf_alpha: float = 0.1
    """Amplitude of the source sines (unvoiced noise has std nsf_alpha / 3)."""
    nsf_sigma: float = 0.003
    """Std of the noise added to voiced samples."""
    nsf_voiced_threshold: float = 10.0
    """F0 (Hz) above which a sample counts as voiced."""
    upsample_rates: tuple[int, ...] = (8, 8)
    """Stride of each transposed convolution."""
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    """Kernel of each transposed convolution."""
    istft_n_fft: int = 16
    """FFT size (and window length) of the source STFT and the output inverse STFT."""
    istft_hop_len: int = 4
    """Hop of the source STFT and the output inverse STFT."""
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    """Kernels of the parallel residual blocks after each upsampling (outputs averaged)."""
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    """Dilations of each of those residual blocks."""
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    """Kernel of the residual block on the source at each resolution (one per upsampling)."""
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    """Dilations of those source residual blocks."""
    lrelu_slope: float = 0.1
    """Leaky ReLU slope before each upsampling (not before conv_post: that one is 0.01)."""
    audio_limit: float = 0.99
    """The waveform is clamped to +-audio_limit."""
    f0_in_channels: int = 80
    """F0 predictor: mel bins of its input."""
    f0_cond_channels: int = 512
    """F0 predictor: width of its convolutions."""
    f0_num_class: int = 1
    """F0 predictor: outputs per frame (the original generator only works with 1)."""

    def __post_init__(self) -> None:
        # The original zips these lists silently; a mismatch would build a different (broken)
        # network rather than fail, so refuse it here.
        n_up = len(self.upsample_rates)
        if len(self.upsample_kernel_sizes) != n_up:
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if not (len(self.source_resblock_kernel_sizes) == len(self.source_resblock_dilation_sizes) == n_up):
            raise ValueError("need one source resblock kernel and dilation list per upsampling")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.f0_num_class != 1:
            raise ValueError("f0_num_class must be 1 (the original upsamples a single F0 track)")
        if self.f0_in_channels != self.in_channels:
            raise ValueError("the F0 predictor reads the same mel: f0_in_channels must equal in_channels")

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame: prod(upsample_rates) * istft_hop_len (256)."""
        return math.prod(self.upsample_rates) * self.istft_hop_len

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> HiFTConfig:
        """Build from the parsed `hift:` mapping of the decoder's YAML (keys as there).

        `istft_params` is a mapping with `n_fft`/`hop_len`; `f0_predictor` a mapping of the
        predictor's keyword arguments (its YAML tag is the caller's business). Lists become
        tuples. Any key we do not know raises ValueError naming it: silently ignoring an
        option would build a different vocoder than the config describes.
        """
        kwargs: dict[str, Any] = {}
        for key, value in section.items():
            if key in _NESTED_SECTIONS:
                if not isinstance(value, Mapping):
                    raise ValueError(f"hift section: {key!r} must be a mapping, got {type(value).__name__}")
                renames = _NESTED_SECTIONS[key]
                for sub_key, sub_value in value.items():
                    if sub_key not in renames:
                        raise ValueError(f"hift section: unknown key {key}.{sub_key!r} "
                                         f"(known: {', '.join(sorted(renames))})")
                    kwargs[renames[sub_key]] = sub_value
            elif key in _DIRECT_KEYS:
                kwargs[key] = value
            else:
                known = sorted(_DIRECT_KEYS | set(_NESTED_SECTIONS))
                raise ValueError(f"hift section: unknown key {key!r} (known: {', '.join(known)})")
        return cls(**{name: _coerce(name, value) for name, value in kwargs.items()})


_NESTED_SECTIONS: dict[str, dict[str, str]] = {
    "istft_params": {"n_fft": "istft_n_fft", "hop_len": "istft_hop_len"},
    "f0_predictor": {"num_class": "f0_num_class", "in_channels": "f0_in_channels",
                     "cond_channels": "f0_cond_channels"},
}
_NESTED_FIELDS = {name for renames in _NESTED_SECTIONS.values() for name in renames.values()}
_DIRECT_KEYS = {f.name for f in fields(HiFTConfig)} - _NESTED_FIELDS
_FLOAT_FIELDS = {"nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope", "audio_limit"}
_NESTED_TUPLE_FIELDS = {"resblock_dilation_sizes", "source_resblock_dilation_sizes"}
_TUPLE_FIELDS = {"upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                 "source_resblock_kernel_sizes"}


def _as_int(name: str, value: Any) -> int:
    # YAML gives ints; a float or bool here is a config mistake, not something to truncate.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"hift section: {name} needs integers, got {value!r}")
    return int(value)


def _coerce(name: str, value: Any) -> Any:
    """YAML values to the field's type: lists to tuples, ints checked, floats made float."""
    if name in _FLOAT_FIELDS:
        # PyYAML (YAML 1.1) reads `3e-3` (no dot) as a string; HyperPyYAML reads a float
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"hift section: {name} needs a number, got {value!r}")
        return float(value)
    if name in _TUPLE_FIELDS:
        return tuple(_as_int(name, v) for v in value)
    if name in _NESTED_TUPLE_FIELDS:
        return tuple(tuple(_as_int(name, v) for v in inner) for inner in value)
    return _as_int(name, value)


def periodic_hann(n: int) -> Tensor:
    """SciPy's `get_window("hann", n, fftbins=True)` in float64, rounded to float32.

    The original builds its window that way; `torch.hann_window(n)` (float32 arithmetic)
    differs from it in the last bit for some entries (n=16 included).
    """
    # scipy.signal.windows.general_cosine on n + 1 points with the last dropped (periodic).
    fac = np.linspace(-np.pi, np.pi, n + 1)
    window = 0.5 + 0.5 * np.cos(fac)
    return torch.from_numpy(window[:n].astype(np.float32))


def fold_weight_norm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace each `x.weight_g` / `x.weight_v` pair by `x.weight`; other entries unchanged.

    Uses `torch._weight_norm(v, g, 0)`, the op `torch.nn.utils.weight_norm` runs before every
    forward (with its default dim 0), so the weight is bit-identical to the original's.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_v"):
            continue
        if not key.endswith(".weight_g"):
            out[key] = value
            continue
        prefix = key[: -len("_g")]
        v = state_dict.get(prefix + "_v")
        if v is None:
            raise ValueError(f"{key} has no matching {prefix}_v")
        if prefix in state_dict:
            raise ValueError(f"{prefix} is given both plain and weight-normalised")
        if tuple(value.shape) != (v.shape[0],) + (1,) * (v.dim() - 1):
            raise ValueError(f"{key} has shape {tuple(value.shape)}: only weight_norm over dim 0 "
                             f"is supported (weight {tuple(v.shape)})")
        out[prefix] = torch._weight_norm(v, value, 0)
    orphans = [k for k in state_dict if k.endswith(".weight_v") and k[:-2] + "_g" not in state_dict]
    if orphans:
        raise ValueError(f"weight_v without weight_g: {', '.join(orphans)}")
    return out


class Snake(nn.Module):
    """BigVGAN's periodic activation x + sin²(αx)/α with one α per channel (linear scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        # the original's 1e-9 guard against α = 0, kept for identical rounding
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation, Snake -> dilated conv -> Snake -> conv, added back."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size - 1) * d // 2)
            for d in dilations)
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
            for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """CosyVoice's `ConvRNNF0Predictor` (no RNN despite the name): mel [B, C, T] -> F0 [B, T] in Hz."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # indices 0, 2, ... 8 hold the convs, as in the original
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: Tensor) -> Tensor:
        hidden = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(hidden).squeeze(-1))


class HarmonicSource(nn.Module):
    """The NSF excitation (`SourceModuleHnNSF` with its `SineGen`), one batch item at a time.

    One item at a time because each item draws from its own generator; the draws' shapes are
    those of the original with batch size 1, so an item's source does not depend on its batch.
    """

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.harmonics = config.nb_harmonics + 1
        self.sampling_rate = config.sampling_rate
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def forward(self, f0: Tensor, generator: torch.Generator) -> Tensor:
        """F0 per sample [1, 1, L] (Hz) -> excitation [1, 1, L]."""
        length = f0.shape[-1]
        # cycles per sample of each harmonic; (f0 * k) / sr in that order, as the original
        k = torch.arange(1, self.harmonics + 1, dtype=f0.dtype, device=f0.device)[None, :, None]
        cycles = f0 * k / self.sampling_rate  # [1, H+1, L]
        theta = 2 * math.pi * (torch.cumsum(cycles, dim=-1) % 1)

        # torch.distributions.Uniform(-pi, pi).sample(): low + rand * (high - low), with the
        # bounds as float32 tensors (the default dtype the original builds them in)
        low = torch.tensor(-math.pi, dtype=torch.float32)
        high = torch.tensor(math.pi, dtype=torch.float32)
        rand = torch.rand((1, self.harmonics, 1), generator=generator, dtype=torch.float32,
                          device=generator.device)
        phase = (low.to(rand.device) + rand * (high - low).to(rand.device)).to(f0)
        phase[:, 0, :] = 0  # the fundamental starts at phase 0

        sines = self.sine_amp * torch.sin(theta + phase)
        voiced = (f0 > self.voiced_threshold).to(f0.dtype)
        # voiced: small noise on the sines; unvoiced: noise alone, std sine_amp / 3
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        noise = noise_amp * _randn((1, self.harmonics, length), generator, f0)
        sines = sines * voiced + noise

        merged = torch.tanh(self.l_linear(sines.transpose(1, 2)))  # [1, L, 1]
        # the original's noise branch: drawn, returned, never used; it advances the generator
        _randn((1, length, 1), generator, f0)
        return merged.transpose(1, 2)


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """`randn_like` from a given generator: drawn on the generator's device, moved to `like`'s."""
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


class HiFTVocoder(nn.Module):
    """HiFT vocoder, mel [B, in_channels, T] -> speech [B, T * samples_per_frame].

    Parameter names are the original's (`conv_pre`, `ups.N`, `source_downs.N`, ...) with
    weight_norm folded, so `load_original` is a rename only.
    """

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.f0_predictor = F0Predictor(c.f0_in_channels, c.f0_cond_channels, c.f0_num_class)
        self.m_source = HarmonicSource(c)
        self.conv_pre = nn.Conv1d(c.in_channels, c.base_channels, 7, padding=3)

        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c.base_channels // 2**i, c.base_channels // 2**(i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)))

        # The source STFT (one frame per hop) is brought down to each upsampling's resolution:
        # after upsampling i the signal is at prod(rates[:i+1]) per mel frame, so the source,
        # at prod(all rates), is strided by the product of the remaining rates.
        spec_channels = c.istft_n_fft + 2
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (k, d) in enumerate(zip(c.source_resblock_kernel_sizes, c.source_resblock_dilation_sizes)):
            stride = math.prod(c.upsample_rates[i + 1:])
            ch = c.base_channels // 2**(i + 1)
            if stride == 1:
                self.source_downs.append(nn.Conv1d(spec_channels, ch, 1))
            else:
                self.source_downs.append(nn.Conv1d(spec_channels, ch, stride * 2, stride, padding=stride // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))

        self.resblocks = nn.ModuleList(
            ResBlock(c.base_channels // 2**(i + 1), k, d)
            for i in range(len(c.upsample_rates))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(c.base_channels // 2**len(c.upsample_rates), spec_channels, 7, padding=3)
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        # not in the original's state_dict; a buffer so that .to() moves it with the module
        self.register_buffer("stft_window", periodic_hann(c.istft_n_fft), persistent=False)

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    def load_original(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the original's `hift.pt` state_dict (weight_norm names), strictly.

        Missing or unexpected keys raise ValueError listing them all, before anything is
        loaded (a silently half-loaded vocoder still produces plausible noise).
        """
        folded = fold_weight_norm(state_dict)
        expected = set(self.state_dict())
        missing = sorted(expected - set(folded))
        unexpected = sorted(set(folded) - expected)
        if missing or unexpected:
            raise ValueError("HiFT state_dict does not match the config: "
                             f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}")
        self.load_state_dict(folded, strict=True)
        logger.debug("loaded HiFT weights: %d tensors (%d weight_norm pairs folded)",
                     len(folded), sum(k.endswith(".weight_g") for k in state_dict))

    def _stft(self, x: Tensor) -> Tensor:
        """[B, L] -> [B, n_fft + 2, L/hop + 1]: real parts then imaginary parts (centred STFT)."""
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_len
        spec = torch.view_as_real(torch.stft(x, n_fft, hop, n_fft, window=self.stft_window, return_complex=True))
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: Tensor, phase: Tensor) -> Tensor:
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_len
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window)

    @torch.inference_mode()
    def inference(self, mel: Tensor, generators: Sequence[torch.Generator],
                  cache_source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Vocode a batch of equal-length mels: returns (speech [B, L], source [B, 1, L]), L = T*256.

        All items share T (the caller groups by length; no padding or masking happens here).
        Item b draws its random numbers from `generators[b]` in the original's order and
        shapes for batch size 1, so each item equals the original run alone with that
        generator's state. `cache_source` [B or 1, 1, L'] (L' <= L) overwrites the start of the
        source, as the original's chunked streaming does to continue the previous chunk's
        excitation without a glitch; the returned source is what a next chunk would cache.
        Runs in the module's device and dtype (the mel is moved there).
        """
        c = self.config
        ref = self.conv_pre.weight
        mel = mel.to(device=ref.device, dtype=ref.dtype)
        if mel.dim() != 3 or mel.shape[1] != c.in_channels:
            raise ValueError(f"mel must be [B, {c.in_channels}, T], got {tuple(mel.shape)}")
        if len(generators) != mel.shape[0]:
            raise ValueError(f"need one generator per batch item: {len(generators)} for batch {mel.shape[0]}")

        f0 = self.f0_predictor(mel)  # [B, T]
        # nn.Upsample(scale_factor=...) in the original: nearest-neighbour repetition
        f0 = F.interpolate(f0[:, None], scale_factor=float(self.samples_per_frame), mode="nearest")
        source = torch.cat([self.m_source(f0[b:b + 1], g) for b, g in enumerate(generators)])
        if cache_source is not None and cache_source.shape[-1] > 0:
            if cache_source.dim() != 3 or cache_source.shape[-1] > source.shape[-1]:
                raise ValueError(f"cache_source must be [B, 1, L'] with L' <= {source.shape[-1]}, "
                                 f"got {tuple(cache_source.shape)}")
            source[:, :, :cache_source.shape[-1]] = cache_source
        source_spec = self._stft(source.squeeze(1))

        x = self.conv_pre(mel)
        last = len(self.ups) - 1
        per_level = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == last:
                x = self.reflection_pad(x)  # one more frame: the source STFT has L/hop + 1
            x = x + self.source_resblocks[i](self.source_downs[i](source_spec))
            # average of the parallel residual blocks, summed in the original's order
            blocks = self.resblocks[i * per_level:(i + 1) * per_level]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs += block(x)
            x = xs / per_level

        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as in the original
        bins = c.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins])
        phase = torch.sin(x[:, bins:])  # sin of the predicted phase: the original's choice
        speech = self._istft(magnitude, phase)
        return torch.clamp(speech, -c.audio_limit, c.audio_limit), source
