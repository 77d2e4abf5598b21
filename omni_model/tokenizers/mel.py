"""Whisper's log-mel features, resampling, and the way back from mels to a waveform.

`log_mel` reproduces Hugging Face's `WhisperFeatureExtractor` (which GLM-4-Voice uses):
16 kHz mono, a 400-point STFT with a periodic Hann window and hop 160 (100 frames a
second, the last frame dropped), power spectrum, a Slaney-normalised Slaney-scale mel
filterbank from 0 to 8 kHz, log10 clamped at 1e-10, dynamic range limited to 8 (80 dB)
below the utterance's maximum, then `(x + 4) / 4`.

`mel_to_waveform` inverts that representation approximately (non-negative least squares
back to a linear spectrogram, then Griffin-Lim): the first vocoder of the embedded codec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 128

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_region = f >= 1000.0
    mel = np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0), mel)
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f = m * (200.0 / 3)
    return np.where(m >= 15.0, 1000.0 * np.exp((math.log(6.4) / 27.0) * (m - 15.0)), f)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int = 128, n_fft: int = 400, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """`[n_fft//2 + 1, n_mels]` triangular Slaney filters with Slaney area normalisation."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    filter_freqs = _mel_to_hz(mel_pts)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (filter_freqs[2:n_mels + 2] - filter_freqs[:n_mels])
    return torch.from_numpy(filters.astype(np.float32))


def to_mono(waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`[T]`, `[T, C]` (soundfile) or `[C, T]` -> mono float32 `[T]`."""
    w = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
    w = w.float()
    if w.dim() == 2:
        w = w.mean(dim=0 if w.shape[0] < w.shape[1] else 1)
    if w.dim() != 1:
        raise ValueError(f"expected a mono or multi-channel waveform, got shape {tuple(w.shape)}")
    return w


def resample(waveform: torch.Tensor, orig_sr: int, target_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """High-quality resampling (libsoxr, 'HQ')."""
    if orig_sr == target_sr:
        return waveform
    if orig_sr <= 0:
        raise ValueError(f"invalid sample rate {orig_sr}")
    import soxr  # imported here: only callers that resample need it

    out = soxr.resample(waveform.detach().cpu().numpy().astype(np.float32), orig_sr, target_sr)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def log_mel(waveforms: torch.Tensor, config: MelConfig = MelConfig()) -> torch.Tensor:
    """`[B, T]` 16 kHz waveforms -> `[B, n_mels, T // hop]` Whisper log-mel features.

    The 80 dB floor is taken per utterance (per row), as the reference does.
    """
    if waveforms.dim() == 1:
        waveforms = waveforms[None]
    window = torch.hann_window(config.n_fft, device=waveforms.device)
    stft = torch.stft(waveforms.float(), config.n_fft, config.hop_length, window=window,
                      return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = mel_filters(config.n_mels, config.n_fft, config.sample_rate).to(waveforms.device)
    mel = filters.T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def mel_to_waveform(features: torch.Tensor, config: MelConfig = MelConfig(),
                    iterations: int = 48) -> torch.Tensor:
    """Approximate inverse of `log_mel`: `[B, n_mels, F]` -> `[B, F * hop]` waveforms.

    Undo the log, recover a linear power spectrogram by projected gradient non-negative
    least squares through the filterbank, then Griffin-Lim (fast variant, momentum 0.99).
    """
    if features.dim() == 2:
        features = features[None]
    device = features.device
    mel_power = torch.pow(10.0, features.float() * 4.0 - 4.0)
    filters = mel_filters(config.n_mels, config.n_fft, config.sample_rate).to(device)  # [K, M]
    # NNLS: min ||F^T S - M|| over S >= 0, initialised with the pseudo-inverse.
    power = (torch.linalg.pinv(filters.T) @ mel_power).clamp(min=0)
    step = 1.0 / (torch.linalg.matrix_norm(filters, ord=2) ** 2)
    for _ in range(30):
        grad = filters @ (filters.T @ power - mel_power)
        power = (power - step * grad).clamp(min=0)
    magnitude = power.sqrt()
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)  # the frame log_mel drops
    return griffin_lim(magnitude, config, iterations)[..., : features.shape[-1] * config.hop_length]


def griffin_lim(magnitude: torch.Tensor, config: MelConfig, iterations: int = 48,
                momentum: float = 0.99, seed: int = 0) -> torch.Tensor:
    """Phase reconstruction for a `[B, n_fft//2+1, F]` magnitude (Perraudin et al. 2013).

    The STFT pair is `torch.stft`/`torch.istft` (centred, reflect padding, Hann window)
    written out as FFTs over frames with the window envelope computed once: the same
    transform at about 1.5x the speed, since each iteration is two short transforms and
    the library calls re-check and rebuild their window sums every time.
    """
    n_fft, hop = config.n_fft, config.hop_length
    window = torch.hann_window(n_fft, device=magnitude.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    angles = torch.polar(torch.ones_like(magnitude),
                         2 * math.pi * torch.rand(magnitude.shape, generator=gen).to(magnitude.device))
    batch, _, frames = magnitude.shape
    length = (frames - 1) * hop
    padded = length + n_fft  # the centred signal before trimming
    trim = slice(n_fft // 2, n_fft // 2 + length)
    fold = dict(output_size=(1, padded), kernel_size=(1, n_fft), stride=(1, hop))
    envelope = F.fold(window.pow(2)[None, :, None].expand(1, n_fft, frames), **fold).reshape(padded)[trim]

    def istft(spectrum: torch.Tensor) -> torch.Tensor:  # [B, F, K] -> [B, length]
        pieces = torch.fft.irfft(spectrum, n=n_fft, dim=-1) * window
        wave = F.fold(pieces.transpose(1, 2), **fold).reshape(batch, padded)
        return wave[:, trim] / envelope

    def stft(wave: torch.Tensor) -> torch.Tensor:  # [B, length] -> [B, F, K]
        centred = F.pad(wave[:, None], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]
        return torch.fft.rfft(centred.unfold(-1, n_fft, hop) * window, dim=-1)

    magnitude = magnitude.transpose(1, 2)
    angles = angles.transpose(1, 2)
    previous = torch.zeros_like(angles)
    for _ in range(iterations):
        rebuilt = stft(istft(magnitude * angles))
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
    return istft(magnitude * angles)
