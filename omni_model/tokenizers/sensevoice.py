"""SenseVoice speech input: how the released Omni-Diffusion model hears speech.

The released 7B model takes a spoken prompt not as discrete codes but as continuous
embeddings (Omni-Diffusion's `AudioEncoder` + `audio_projection`):

1. **front end** (`SenseVoiceFrontend`, funasr's `WavFrontend` with SenseVoiceSmall's
   `frontend_conf`): 16 kHz mono samples scaled by 2^15, Kaldi fbank (80 mel bins, 25 ms
   frames every 10 ms, Hamming window, pre-emphasis 0.97, DC removed per frame, FFT size
   rounded up to a power of two, natural log floored at float32's epsilon, edges
   snipped), low frame rate stacking (LFR: 7 frames every 6 -> 560 values, about 16.7
   frames a second), then CMVN from `am.mvn` (`(x + shift) * scale`);
2. **encoder** (`SenseVoiceEncoder`, SenseVoiceSmall's `SenseVoiceEncoderSmall` run by
   `inference_encode`): four learned query rows (language, event, emotion, text norm)
   are put before the features, then SAN-M layers (self-attention plus an FSMN memory, a
   depthwise convolution over the values) -> `[B, T + 4, 512]`;
3. **projector** (`ResamplerProjector`): LayerNorm, Linear, GELU, Linear -> the language
   model's hidden size; the rows overwrite the `<|context_of_audio|>` positions of the
   prompt, one position per row (`context_positions`).

`SpeechInput` chains the three. Parameter names are the official ones, so the released
state dict loads strictly (`AUDIO_PREFIX`, `PROJECTOR_PREFIX`).

**The bfloat16 cast.** The official `AudioEncoder.forward` casts the padded features to
bfloat16 before the encoder, whatever the model's dtype. With bfloat16 weights (the
released inference loads the whole model in bfloat16) that is the model's own dtype;
with float32 weights the encoder still runs in float32 (the query rows are float32 and
concatenation promotes) on features rounded to bfloat16's 8-bit mantissa.
`SpeechInput(features_bf16=True)` (the default) reproduces that rounding;
`features_bf16=False` feeds the float32 features unrounded (what `inference_encode`
alone computes).

**Dither.** SenseVoiceSmall's config sets no `dither`, so funasr's default 1.0 applies:
Gaussian noise of standard deviation 1 (in 16-bit sample units) is added to every frame,
and two runs on the same audio differ. Pass a `torch.Generator` to make a run
repeatable, or set `dither=0.0` for features that depend on the audio alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from torch import nn

from omni_model.config import with_extra
from omni_model.model_folder import weight_files
from omni_model.tokenizers.mel import SAMPLE_RATE, resample, to_mono

logger = logging.getLogger(__name__)

CONFIG_YAML = "config.yaml"  #: SenseVoiceSmall's model folder: its config ...
CMVN_FILE = "am.mvn"  #: ... and its CMVN (`configuration.json` names it as `cmvn_file`)
#: Where the released DreamModel's state dict keeps the speech encoder (the
#: `SenseVoiceSmall` inside `AudioEncoder`) and the projector.
AUDIO_PREFIX = "model.audio_model.model."
PROJECTOR_PREFIX = "model.audio_projection."

# SenseVoiceSmall's query rows (`SenseVoiceSmall.lid_dict`, `textnorm_dict`); its `embed`
# has 7 + 7 + 2 rows. `inference_encode` puts [language, event, emotion, text norm] first.
LANGUAGE_ROWS = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
TEXT_NORM_ROWS = {"withitn": 14, "woitn": 15}
EVENT_EMOTION_ROWS = (1, 2)
QUERY_TABLE_SIZE = 7 + len(LANGUAGE_ROWS) + len(TEXT_NORM_ROWS)
NUM_QUERIES = 4
#: SenseVoiceSmall's CTC head (speech -> text), in its state dict but not on the speech
#: input path: accepted by name when loading, never silently.
UNUSED_AUDIO_KEYS = ("ctc.ctc_lo.weight", "ctc.ctc_lo.bias")

# Kaldi fbank options funasr leaves at torchaudio's defaults (`kaldi.fbank` as
# `WavFrontend.forward` calls it).
PREEMPHASIS = 0.97
LOW_FREQ = 20.0  # Hz; the high edge is Nyquist
BLACKMAN_COEFF = 0.42
LOG_FLOOR = float(torch.finfo(torch.float32).eps)  # Kaldi floors mel energies at FLT_EPSILON


def context_positions(num_feature_frames: int) -> int:
    """`<|context_of_audio|>` positions an utterance of `num_feature_frames` LFR frames
    takes: one per encoder output row, the 4 query rows included (the official
    `add_audio_input_contiguous`: `audio.size(0) + 4`). `<|begin_of_audio|>` and
    `<|end_of_audio|>` come on top."""
    return int(num_feature_frames) + NUM_QUERIES


# --------------------------------------------------------------------------- front end


@dataclass(frozen=True)
class SenseVoiceFrontendConfig:
    """funasr `WavFrontend` settings (`frontend_conf` of SenseVoiceSmall's config.yaml);
    the defaults are SenseVoiceSmall's, `dither` funasr's default (the config sets none)."""

    fs: int = SAMPLE_RATE  #: sample rate the front end expects (Hz)
    window: str = "hamming"  #: hamming, hanning, povey, rectangular or blackman
    n_mels: int = 80
    frame_length: float = 25.0  #: ms
    frame_shift: float = 10.0  #: ms
    lfr_m: int = 7  #: frames stacked into one LFR frame
    lfr_n: int = 6  #: LFR hop, in frames
    dither: float = 1.0  #: std of the noise added to each frame, in 16-bit sample units
    snip_edges: bool = True  #: only frames that fit in the audio (else reflect at the ends)
    upsacle_samples: bool = True  #: funasr's spelling: scale [-1, 1] samples by 2^15
    #: Keys of `frontend_conf` that do not change the features (e.g. `cmvn_file`,
    #: `filter_length_min`), kept as read.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.window not in ("hamming", "hanning", "povey", "rectangular", "blackman"):
            raise ValueError(f"window {self.window!r}: hamming, hanning, povey, rectangular or blackman")
        if self.lfr_m < 1 or self.lfr_n < 1:
            raise ValueError(f"lfr_m {self.lfr_m} and lfr_n {self.lfr_n} must be >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SenseVoiceFrontendConfig":
        return with_extra(cls, data)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SenseVoiceFrontendConfig":
        return cls.from_dict(read_sensevoice_yaml(folder).get("frontend_conf") or {})

    @property
    def output_size(self) -> int:
        """Values per LFR frame (560 for SenseVoiceSmall): the encoder's input size."""
        return self.n_mels * self.lfr_m

    @property
    def shift_samples(self) -> int:
        return int(self.fs * self.frame_shift * 0.001)

    def window_samples(self, num_samples: int) -> int:
        """Samples per frame. funasr shortens the frame to the utterance when the
        utterance is shorter than one frame (`min(frame_length, duration)`)."""
        frame_ms = min(self.frame_length, num_samples / self.fs * 1000)
        return int(self.fs * frame_ms * 0.001)  # the float arithmetic torchaudio does

    def fbank_frames(self, num_samples: int) -> int:
        """Kaldi fbank frames of an utterance of `num_samples` samples."""
        window, shift = self.window_samples(num_samples), self.shift_samples
        if self.snip_edges:
            return 1 + (num_samples - window) // shift
        return (num_samples + shift // 2) // shift

    def num_frames(self, num_samples: int) -> int:
        """LFR feature frames (the encoder's input rows) of an utterance."""
        return -(-self.fbank_frames(num_samples) // self.lfr_n)


def read_sensevoice_yaml(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_YAML
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_YAML} in {folder} (a SenseVoiceSmall model folder has one)")
    return yaml.safe_load(path.read_text()) or {}


def load_cmvn(path: str | Path) -> torch.Tensor:
    """`[2, D]` (shift, scale) from a Kaldi nnet text file such as SenseVoiceSmall's
    `am.mvn`: the vectors of its `<AddShift>` and `<Rescale>` components (each the
    bracketed list after `<LearnRateCoef> 0`)."""
    tokens = Path(path).read_text().split()
    vectors = {}
    for name in ("<AddShift>", "<Rescale>"):
        if name not in tokens:
            raise ValueError(f"{path}: no {name} component")
        start = tokens.index("[", tokens.index(name)) + 1
        end = tokens.index("]", start)
        vectors[name] = np.asarray(tokens[start:end], dtype=np.float32)
    shift, scale = vectors["<AddShift>"], vectors["<Rescale>"]
    if shift.shape != scale.shape:
        raise ValueError(f"{path}: <AddShift> has {shift.size} values, <Rescale> {scale.size}")
    return torch.from_numpy(np.stack([shift, scale]))


def _next_power_of_two(n: int) -> int:
    return 1 if n == 0 else 2 ** (n - 1).bit_length()


@lru_cache(maxsize=16)
def kaldi_mel_banks(n_mels: int, fft_size: int, sample_rate: float, low_freq: float = LOW_FREQ,
                    high_freq: float = 0.0) -> torch.Tensor:
    """`[fft_size // 2 + 1, n_mels]` Kaldi triangular filters: equally spaced on the mel
    scale `1127 ln(1 + f / 700)` from `low_freq` to `high_freq` (<= 0: Nyquist minus it),
    weights read off the mel axis; the Nyquist bin gets no weight, as in Kaldi."""
    # float32 throughout, as Kaldi (BaseFloat) and torchaudio compute them: mel values
    # near 2,800 carry float32's rounding, and a float64 bank moves the log-mel of a bin
    # fed mostly through a triangle's edge by up to ~1e-4.
    nyquist = sample_rate / 2
    high_freq = high_freq + nyquist if high_freq <= 0 else high_freq
    lo, hi = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, high_freq))
    delta = (hi - lo) / (n_mels + 1)
    index = torch.arange(n_mels, dtype=torch.float32)[:, None]
    left, centre, right = lo + index * delta, lo + (index + 1.0) * delta, lo + (index + 2.0) * delta
    freqs = sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float32)
    bins = (1127.0 * (1.0 + freqs / 700.0).log())[None, :]
    weights = torch.minimum((bins - left) / (centre - left), (right - bins) / (right - centre)).clamp(min=0.0)
    return F.pad(weights, (0, 1)).T.contiguous()  # the Nyquist bin gets no weight


def _window(kind: str, size: int) -> torch.Tensor:
    """Kaldi's frame windows (symmetric; `povey` is Hann to the power 0.85)."""
    if kind == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46)
    if kind == "hanning":
        return torch.hann_window(size, periodic=False)
    if kind == "povey":
        return torch.hann_window(size, periodic=False).pow(0.85)
    if kind == "rectangular":
        return torch.ones(size)
    a = 2 * math.pi / (size - 1)
    n = torch.arange(size, dtype=torch.float32)
    return BLACKMAN_COEFF - 0.5 * torch.cos(a * n) + (0.5 - BLACKMAN_COEFF) * torch.cos(2 * a * n)


def _frames(wave: torch.Tensor, window: int, shift: int, snip_edges: bool) -> torch.Tensor:
    """`[m, window]` frames of one utterance, as Kaldi cuts them."""
    if not snip_edges:
        # frames centred on multiples of the shift; the ends mirrored sample for sample
        # (Kaldi repeats the edge sample, unlike `reflect` padding)
        m = (wave.numel() + shift // 2) // shift
        pad = window // 2 - shift // 2
        flipped = wave.flip(0)
        wave = torch.cat([flipped[-pad:], wave, flipped]) if pad > 0 else torch.cat([wave[-pad:], flipped])
        return wave.unfold(0, window, shift)[:m]
    return wave.unfold(0, window, shift)


def kaldi_fbank(waveforms: torch.Tensor, lengths: Sequence[int], config: SenseVoiceFrontendConfig,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel filterbank of each row's first `lengths[b]` samples (already scaled, e.g.
    to 16-bit units), as funasr calls `torchaudio.compliance.kaldi.fbank`:
    `[B, M, n_mels]` zero-padded after each row's frame count, and the counts.

    With `config.dither` > 0 each row draws `randn(frames, window)` in row order, from
    `generator` or else the global generator, as funasr's per-utterance loop does: the
    same seed gives the same features as the original.
    """
    batch = waveforms.shape[0]
    device = waveforms.device
    shift = config.shift_samples
    windows = [config.window_samples(int(n)) for n in lengths]
    if min(windows, default=2) < 2:
        raise ValueError(f"an utterance of {min(int(n) for n in lengths)} samples is too short for one frame")
    counts = [config.fbank_frames(int(n)) for n in lengths]
    noise = [None] * batch
    if config.dither != 0.0:  # drawn first, in row order, so the stream is the original's
        noise = [torch.randn((c, w), generator=generator) * config.dither for c, w in zip(counts, windows)]
    out = torch.zeros(batch, max(counts, default=0), config.n_mels, device=device)
    for window in sorted(set(windows)):  # all rows but those shorter than one frame share one
        rows = [b for b in range(batch) if windows[b] == window]
        frames = nn.utils.rnn.pad_sequence(
            [_frames(waveforms[b, : int(lengths[b])].float(), window, shift, config.snip_edges) for b in rows],
            batch_first=True)  # [R, M, window]
        if noise[rows[0]] is not None:
            frames = frames + nn.utils.rnn.pad_sequence([noise[b] for b in rows], batch_first=True).to(device)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        # pre-emphasis x[j] - 0.97 x[j - 1], the first sample against itself
        frames = frames - PREEMPHASIS * torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames * _window(config.window, window).to(device)
        fft_size = _next_power_of_two(window)
        power = torch.fft.rfft(frames, n=fft_size).abs().pow(2.0)
        mel = power @ kaldi_mel_banks(config.n_mels, fft_size, float(config.fs)).to(device)
        mel = mel.clamp(min=LOG_FLOOR).log()
        for i, b in enumerate(rows):
            out[b, : counts[b]] = mel[i, : counts[b]]
    return out, torch.tensor(counts, dtype=torch.long)


def apply_lfr(features: torch.Tensor, lengths: torch.Tensor, lfr_m: int, lfr_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Low frame rate: LFR frame i of a row stacks frames `i*n - (m-1)//2 ... + m - 1`,
    indices clamped into the row's real frames (funasr repeats the first frame
    `(m-1)//2` times in front and the last one behind). `[B, T, D]` -> `[B, ceil(T/n),
    m*D]`, zero after each row's `ceil(len/n)` frames."""
    batch, _, dim = features.shape
    lengths = lengths.to(torch.long).cpu()
    out_lengths = (lengths + lfr_n - 1) // lfr_n
    steps = int(out_lengths.max()) if batch else 0
    index = (torch.arange(steps)[:, None] * lfr_n + torch.arange(lfr_m)[None, :] - (lfr_m - 1) // 2)  # [S, m]
    index = torch.minimum(index.clamp(min=0)[None], (lengths - 1).clamp(min=0)[:, None, None])  # [B, S, m]
    stacked = torch.gather(features, 1, index.reshape(batch, -1, 1).expand(-1, -1, dim).to(features.device))
    stacked = stacked.reshape(batch, steps, lfr_m * dim)
    valid = torch.arange(steps)[None, :] < out_lengths[:, None]
    return stacked * valid[..., None].to(stacked.device, stacked.dtype), out_lengths


class SenseVoiceFrontend(nn.Module):
    """Waveforms -> SenseVoice features `[B, T, 560]` (funasr `WavFrontend` + padding).

    No weights, and always float32 on the waveforms' device: the CMVN is a plain tensor,
    not a buffer, so casting a `SpeechInput` to bfloat16 leaves the features as the
    original computes them (its front end is not part of the model).
    """

    def __init__(self, config: SenseVoiceFrontendConfig = SenseVoiceFrontendConfig(),
                 cmvn: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        if cmvn is not None and cmvn.shape[-1] < config.output_size:
            raise ValueError(f"CMVN has {cmvn.shape[-1]} values, features {config.output_size}")
        self.cmvn = None if cmvn is None else cmvn[:, : config.output_size].float().clone()

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides: Any) -> "SenseVoiceFrontend":
        """SenseVoiceSmall's folder: `config.yaml`'s `frontend_conf` (fields replaced by
        `overrides`, e.g. `dither=0.0`) and the CMVN of its `cmvn_file`, else `am.mvn`."""
        folder = Path(folder)
        config = dataclasses.replace(SenseVoiceFrontendConfig.from_folder(folder), **overrides)
        named = config.extra.get("cmvn_file")
        path = folder / (Path(named).name if named else CMVN_FILE)
        if not path.exists():
            raise FileNotFoundError(f"no CMVN file {path.name} in {folder}: SenseVoice's features need it")
        return cls(config, load_cmvn(path))

    def fbank(self, waveforms: torch.Tensor, lengths: Sequence[int],
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kaldi log-mel frames `[B, M, n_mels]` of `[-1, 1]` waveforms, and their counts."""
        scale = float(1 << 15) if self.config.upsacle_samples else 1.0
        return kaldi_fbank(waveforms.float() * scale, lengths, self.config, generator)

    def forward(self, waveforms: torch.Tensor | Sequence[torch.Tensor | np.ndarray],
                lengths: Sequence[int] | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, N]` (with `lengths`, else all N) or a list of 1-D waveforms at `config.fs`,
        in [-1, 1] -> features `[B, T, output_size]` (zero after each row's length) and
        the lengths (long)."""
        waveforms, lengths = _pad_waveforms(waveforms, lengths)
        fbank, counts = self.fbank(waveforms, lengths, generator)
        feats, out_lengths = apply_lfr(fbank, counts, self.config.lfr_m, self.config.lfr_n)
        if self.cmvn is not None:
            valid = (torch.arange(feats.shape[1])[None, :] < out_lengths[:, None]).to(feats.device)
            # add, then multiply, as funasr does: the same float32 roundings
            cmvn = self.cmvn.to(feats.device)
            feats = (feats + cmvn[0]) * cmvn[1] * valid[..., None]
        return feats, out_lengths

    def num_frames(self, num_samples: int) -> int:
        """Feature frames for an utterance of `num_samples` samples at `config.fs`."""
        return self.config.num_frames(num_samples)


def _pad_waveforms(waveforms: torch.Tensor | Sequence[torch.Tensor | np.ndarray],
                   lengths: Sequence[int] | torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    if isinstance(waveforms, torch.Tensor) and waveforms.dim() == 2:
        batch = waveforms
        lengths = [batch.shape[1]] * batch.shape[0] if lengths is None else [int(n) for n in lengths]
    else:
        rows = [torch.as_tensor(w, dtype=torch.float32).reshape(-1) for w in waveforms]
        batch = nn.utils.rnn.pad_sequence(rows, batch_first=True) if rows else torch.zeros(0, 0)
        lengths = [r.numel() for r in rows] if lengths is None else [int(n) for n in lengths]
    if len(lengths) != batch.shape[0] or any(n > batch.shape[1] for n in lengths):
        raise ValueError(f"lengths {lengths} do not fit waveforms of shape {tuple(batch.shape)}")
    return batch, lengths


# --------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class SenseVoiceEncoderConfig:
    """`encoder_conf` of SenseVoiceSmall's config.yaml (defaults are SenseVoiceSmall's),
    plus the queries `inference_encode` is called with by Omni-Diffusion."""

    input_size: int = 560  #: the front end's output size (funasr passes it, not the yaml)
    output_size: int = 512
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50  #: `encoders0` (1 layer) + `encoders` (num_blocks - 1)
    tp_blocks: int = 20  #: `tp_encoders`, after `after_norm`
    kernel_size: int = 11  #: FSMN memory width
    sanm_shfit: int = 0  #: funasr's spelling: FSMN window moved this many frames to the past
    language: str = "auto"  #: AudioEncoder passes "auto"
    text_norm: str = "woitn"  #: AudioEncoder passes use_itn=False
    #: Keys read but not used. The official encoder ignores `normalize_before`,
    #: `input_layer`, `pos_enc_class` and `selfattention_layer_type` too (always
    #: pre-norm SAN-M layers with sinusoidal positions); dropouts are off at inference.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.output_size % self.attention_heads:
            raise ValueError(f"output_size {self.output_size} is not a multiple of attention_heads "
                             f"{self.attention_heads}")
        if self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1 (encoders0 holds the first layer)")
        if self.language not in LANGUAGE_ROWS:
            raise ValueError(f"language {self.language!r}: one of {sorted(LANGUAGE_ROWS)}")
        if self.text_norm not in TEXT_NORM_ROWS:
            raise ValueError(f"text_norm {self.text_norm!r}: one of {sorted(TEXT_NORM_ROWS)}")
        if self.input_size % 2:
            raise ValueError(f"input_size {self.input_size} must be even (sin and cos halves)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SenseVoiceEncoderConfig":
        return with_extra(cls, data)

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides: Any) -> "SenseVoiceEncoderConfig":
        """`encoder_conf`, with `input_size` from `frontend_conf` as funasr derives it."""
        data = read_sensevoice_yaml(folder)
        if data.get("encoder", "SenseVoiceEncoderSmall") != "SenseVoiceEncoderSmall":
            raise ValueError(f"{folder}: encoder {data['encoder']!r} is not SenseVoiceEncoderSmall")
        frontend = SenseVoiceFrontendConfig.from_dict(data.get("frontend_conf") or {})
        conf = {"input_size": frontend.output_size, **(data.get("encoder_conf") or {}), **overrides}
        return cls.from_dict(conf)

    @property
    def query_rows(self) -> tuple[int, int, int, int]:
        """Rows of `embed` put before the features: language, event, emotion, text norm."""
        return (LANGUAGE_ROWS[self.language], *EVENT_EMOTION_ROWS, TEXT_NORM_ROWS[self.text_norm])


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (funasr's `LayerNorm`), so a bfloat16
    encoder normalises as the original does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class SANMAttention(nn.Module):
    """Self-attention with an FSMN memory (SAN-M): `attention(x) + fsmn(v) + v`, the
    memory a depthwise convolution over the (unsplit) values."""

    def __init__(self, heads: int, in_size: int, size: int, kernel_size: int, shift: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear_q_k_v = nn.Linear(in_size, 3 * size)
        self.linear_out = nn.Linear(size, size)
        self.fsmn_block = nn.Conv1d(size, size, kernel_size, groups=size, bias=False)
        left = (kernel_size - 1) // 2 + max(shift, 0)
        self.padding = (left, kernel_size - 1 - left)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.linear_q_k_v(x).chunk(3, dim=-1)
        d = q.shape[-1] // self.heads
        keep = valid[:, :, None].to(x.dtype)  # [B, T, 1]
        # FSMN memory: padding frames are zeroed first so they never leak into real ones
        masked_v = v * keep
        memory = self.fsmn_block(F.pad(masked_v.transpose(1, 2), self.padding)).transpose(1, 2)
        memory = (memory + masked_v) * keep
        q, k, vh = (z.reshape(b, t, self.heads, d).transpose(1, 2) for z in (q, k, v))
        # explicit softmax (not SDPA) keeps the original's roundings in bfloat16
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)
        hidden_keys = ~valid[:, None, None, :]
        weights = scores.masked_fill(hidden_keys, -math.inf).softmax(dim=-1).masked_fill(hidden_keys, 0.0)
        out = (weights @ vh).transpose(1, 2).reshape(b, t, self.heads * d)
        return self.linear_out(out) + memory


class FeedForward(nn.Module):
    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class SANMLayer(nn.Module):
    """Pre-norm SAN-M layer; without the attention residual when it changes the width
    (the first layer, 560 -> 512)."""

    def __init__(self, in_size: int, cfg: SenseVoiceEncoderConfig) -> None:
        super().__init__()
        size = cfg.output_size
        self.residual = in_size == size
        self.self_attn = SANMAttention(cfg.attention_heads, in_size, size, cfg.kernel_size, cfg.sanm_shfit)
        self.feed_forward = FeedForward(size, cfg.linear_units)
        self.norm1 = FloatLayerNorm(in_size)
        self.norm2 = FloatLayerNorm(size)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        attended = self.self_attn(self.norm1(x), valid)
        x = x + attended if self.residual else attended
        return x + self.feed_forward(self.norm2(x))


class SANMEncoder(nn.Module):
    """SenseVoiceSmall's `SenseVoiceEncoderSmall` (its module names)."""

    def __init__(self, cfg: SenseVoiceEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoders0 = nn.ModuleList([SANMLayer(cfg.input_size, cfg)])
        self.encoders = nn.ModuleList([SANMLayer(cfg.output_size, cfg) for _ in range(cfg.num_blocks - 1)])
        self.after_norm = FloatLayerNorm(cfg.output_size)
        self.tp_encoders = nn.ModuleList([SANMLayer(cfg.output_size, cfg) for _ in range(cfg.tp_blocks)])
        self.tp_norm = FloatLayerNorm(cfg.output_size)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x * self.config.output_size ** 0.5
        x = x + sinusoids(x.shape[1], x.shape[2], x.dtype, x.device)
        for layer in [*self.encoders0, *self.encoders]:
            x = layer(x, valid)
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = layer(x, valid)
        return self.tp_norm(x)


def sinusoids(length: int, depth: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """`[1, length, depth]` SenseVoice positions 1..length: sines in the first half,
    cosines in the second, timescales `10000^(-i / (depth/2 - 1))`. Computed in `dtype`
    as the original does: in bfloat16 positions above 256 round (257 -> 256), and the
    released model was run that way."""
    positions = torch.arange(1, length + 1, device=device).to(dtype)
    step = torch.log(torch.tensor([10000.0], dtype=dtype, device=device)) / (depth / 2 - 1)
    inv = torch.exp(torch.arange(depth // 2, device=device).to(dtype) * -step)
    scaled = positions[None, :, None] * inv[None, None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=2).to(dtype)


class SenseVoiceEncoder(nn.Module):
    """SenseVoiceSmall's speech encoder as Omni-Diffusion calls it (`inference_encode`):
    features `[B, T, input_size]` + lengths -> `[B, T + 4, output_size]` + lengths + 4.

    State names are `SenseVoiceSmall`'s: `embed.weight` (the query rows) and `encoder.*`.
    Rows past a row's length are computed (the original does too) but mean nothing;
    they never change the real rows.
    """

    def __init__(self, config: SenseVoiceEncoderConfig = SenseVoiceEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(QUERY_TABLE_SIZE, config.input_size)
        self.encoder = SANMEncoder(config)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, _ = features.shape
        rows = torch.tensor(self.config.query_rows, device=features.device)
        queries = self.embed(rows)[None].expand(batch, -1, -1)
        # run in the weights' dtype: float32 weights promote bfloat16 features (as the
        # original's concatenation does), bfloat16 weights take them as they are
        x = torch.cat([queries, features.to(queries.dtype)], dim=1)
        lengths = lengths.to(device=features.device, dtype=torch.long) + NUM_QUERIES
        valid = torch.arange(steps + NUM_QUERIES, device=features.device)[None, :] < lengths[:, None]
        return self.encoder(x, valid), lengths

    def load_release_state(self, state: Mapping[str, torch.Tensor], prefix: str = AUDIO_PREFIX) -> None:
        """Strictly load the entries of `state` under `prefix` (`""` for SenseVoiceSmall's
        own checkpoint): every name and shape must match, the CTC head is accepted by name."""
        load_prefixed(self, state, prefix, unused=UNUSED_AUDIO_KEYS)


# --------------------------------------------------------------------------- projector


class ResamplerProjector(nn.Module):
    """Omni-Diffusion's `ResamplerProjector`: LayerNorm -> Linear -> GELU -> Linear (no
    biases), encoder rows to the language model's hidden size."""

    def __init__(self, input_size: int = 512, hidden_size: int = 3584) -> None:
        super().__init__()
        self.pre_proj_layernorm = nn.LayerNorm(input_size)
        self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size, bias=False), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_proj_layernorm(x.reshape(x.shape[0], -1, x.shape[-1])))

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str = PROJECTOR_PREFIX) -> "ResamplerProjector":
        """Sized by `state[prefix + 'mlp.0.weight']`, then loaded strictly."""
        key = prefix + "mlp.0.weight"
        if key not in state:
            raise KeyError(f"{key} not in the state dict: no projector under {prefix!r}")
        hidden, size = state[key].shape
        projector = cls(size, hidden)
        load_prefixed(projector, state, prefix)
        return projector


# --------------------------------------------------------------------------- loading


def load_prefixed(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str,
                  unused: tuple[str, ...] = ()) -> None:
    """Load `state`'s entries under `prefix` into `module`: every name and shape must
    match (names are given in full in the error). Entries named in `unused` (relative to
    the prefix) may be present and are dropped; everything else outside the module is an
    error. Entries not under `prefix` are ignored (a whole DreamModel state may be given)."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(prefix + k for k in expected.keys() - own.keys())
    unexpected = sorted(prefix + k for k in own.keys() - expected.keys() - set(unused))
    wrong = sorted(f"{prefix}{k} {tuple(own[k].shape)} != {tuple(expected[k].shape)}"
                   for k in expected.keys() & own.keys() if own[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"state does not match {type(module).__name__} under {prefix!r}: "
                         f"missing={missing[:5]} unexpected={unexpected[:5]} wrong_shape={wrong[:5]}")
    dropped = sorted(own.keys() & set(unused))
    if dropped:
        logger.info("not loaded (not on the speech input path): %s", [prefix + k for k in dropped])
    module.load_state_dict({k: v for k, v in own.items() if k in expected}, strict=True)


def read_prefixed(path: str | Path, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors under `prefixes` of a `.safetensors` file or a folder (`model.safetensors`,
    or shards listed by `model.safetensors.index.json`), read without loading the rest:
    the speech input of a 7B release is a few hundred MB of a 15 GB checkpoint."""
    path = Path(path)
    paths = weight_files(path, prefixes) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"no {p.name} in {p.parent}")
        with safe_open(str(p), framework="pt") as f:
            for key in f.keys():
                if key.startswith(tuple(prefixes)):
                    state[key] = f.get_tensor(key)
    return state


# --------------------------------------------------------------------------- the chain


class SpeechInput(nn.Module):
    """Waveforms -> the embeddings written over `<|context_of_audio|>` positions
    (the official `AudioEncoder` + `audio_projection`): `[B, T + 4, hidden]` and the
    lengths; row b's first `lengths[b]` rows go to its context positions in order.

    `features_bf16` rounds the features to bfloat16 before the encoder, as the official
    `AudioEncoder.forward` does (see the module docstring); False skips the rounding.
    """

    def __init__(self, frontend: SenseVoiceFrontend, encoder: SenseVoiceEncoder, projector: ResamplerProjector,
                 features_bf16: bool = True) -> None:
        super().__init__()
        if frontend.config.output_size != encoder.config.input_size:
            raise ValueError(f"front end gives {frontend.config.output_size} values per frame, "
                             f"the encoder takes {encoder.config.input_size}")
        self.frontend = frontend
        self.encoder = encoder
        self.projector = projector
        self.features_bf16 = features_bf16

    @classmethod
    def from_pretrained(cls, sensevoice_folder: str | Path, weights: str | Path | None = None,
                        audio_prefix: str = AUDIO_PREFIX, projector_prefix: str = PROJECTOR_PREFIX,
                        features_bf16: bool = True, **frontend_overrides: Any) -> "SpeechInput":
        """`sensevoice_folder`: SenseVoiceSmall's `config.yaml` and `am.mvn`; `weights`:
        the release's checkpoint (a folder, sharded or not, or a `.safetensors` file;
        default the same folder) holding the encoder and projector under the prefixes.
        `frontend_overrides` replace front-end settings (e.g. `dither=0.0`)."""
        frontend = SenseVoiceFrontend.from_folder(sensevoice_folder, **frontend_overrides)
        encoder = SenseVoiceEncoder(SenseVoiceEncoderConfig.from_folder(sensevoice_folder))
        state = read_prefixed(weights if weights is not None else sensevoice_folder, [audio_prefix, projector_prefix])
        encoder.load_release_state(state, audio_prefix)
        projector = ResamplerProjector.from_state(state, projector_prefix)
        return cls(frontend, encoder, projector, features_bf16).eval()

    def embed_features(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Front-end features `[B, T, 560]` -> projected rows and lengths (+4)."""
        if self.features_bf16:
            features = features.to(torch.bfloat16)
        hidden, lengths = self.encoder(features, lengths)
        return self.projector(hidden), lengths

    def forward(self, waveforms: torch.Tensor | Sequence[torch.Tensor | np.ndarray], sample_rate: int = SAMPLE_RATE,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Utterances at `sample_rate`, in [-1, 1] -> projected rows, lengths. A list of
        waveforms (each mono `[T]`, or `[C, T]` / `[T, C]`, averaged to mono as the
        official code does), a 1-D tensor (one utterance) or a 2-D tensor (mono rows).

        Other rates are resampled to 16 kHz with soxr; the official code uses
        torchaudio's sinc resampler, so only 16 kHz input is sample-exact.
        """
        if isinstance(waveforms, torch.Tensor) and waveforms.dim() == 1:
            waveforms = [waveforms]
        rows = [self.prepare(w, sample_rate) for w in waveforms]
        features, lengths = self.frontend(rows, generator=generator)
        return self.embed_features(features.to(self.projector.mlp[0].weight.device), lengths)  # front end on CPU

    def prepare(self, waveform: torch.Tensor | np.ndarray, sample_rate: int) -> torch.Tensor:
        """One utterance -> mono float32 at the front end's rate."""
        return resample(to_mono(waveform), sample_rate, self.frontend.config.fs)

    def context_positions(self, num_samples: int) -> int:
        """`<|context_of_audio|>` positions for `num_samples` samples at the front end's rate."""
        return context_positions(self.frontend.num_frames(num_samples))
