"""Speech codes -> 80-bin mel frames: GLM-4-Voice's flow-matching model.

CosyVoice's `MaskedDiffWithXvec` as GLM-4-Voice runs it (`flow.inference`): the codes
(after an optional prompt of earlier codes) are embedded and encoded by the block-causal
Conformer (`conformer.py`), projected to 80 channels, stretched to the mel frame rate
(`InterpolateRegulator`: nearest-neighbour resampling then a small conv stack) and used
as the condition `mu` of conditional flow matching (Lipman et al. 2023; Mehta et al. 2024):
starting from Gaussian noise, 10 Euler steps on a cosine time grid follow the velocity of
the U-Net estimator (`estimator.py`) with classifier-free guidance (Le et al. 2023,
VoiceBox): v = (1 + w) v(x | mu, spk, prompt) - w v(x | 0, 0, 0), w = 0.7.

Seeding is the original's: `ConditionalCFM.forward` calls `torch.manual_seed(42)` before
drawing the noise, so the same codes give the same mel. We draw from a generator seeded 42
per utterance instead of reseeding the process, which gives the same numbers on CPU
without touching the caller's random state, and lets a batch give each utterance the
noise it would get alone. The generator is returned so the vocoder continues it, as the
original's HiFT continues the global one.

The original decodes one utterance at a time; `mel_frames` takes a batch. Utterances
are encoded together (padding masked), regulated one by one (the regulator's GroupNorm
sees the whole sequence), and integrated together with length masks (see `estimator.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omni_model.tokenizers.glm4voice.conformer import BlockConformerEncoder, EncoderConfig
from omni_model.tokenizers.glm4voice.estimator import ConditionalDecoder, EstimatorConfig

#: the original's seed, set before the noise of every call (`ConditionalCFM.forward`)
NOISE_SEED = 42
#: `flow.inference` sizes its output as int(codes / frame_rate * 22050 / 256): these two
#: numbers are written into the original code, not read from its config
MEL_SAMPLE_RATE, MEL_HOP = 22050, 256


@dataclass(frozen=True)
class FlowConfig:
    """`MaskedDiffWithXvec` and its parts, as read from the decoder's `config.yaml`."""

    input_size: int = 512
    """Width of the code embeddings."""
    output_size: int = 80
    """Mel bins."""
    spk_embed_dim: int = 192
    """Width of the speaker (x-vector) embedding; GLM-4-Voice passes zeros."""
    vocab_size: int = 16384
    """Number of speech codes."""
    input_frame_rate: float = 12.5
    """Codes per second."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The code encoder."""
    sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)
    """`InterpolateRegulator`: one conv + GroupNorm + Mish per entry."""
    regulator_groups: int = 1
    """GroupNorm groups of the regulator."""
    cfm_in_channels: int = 240
    """`ConditionalCFM.in_channels` (informational: the estimator's own in_channels rules)."""
    n_spks: int = 1
    """Whether a speaker vector is used (must be 1 for GLM-4-Voice)."""
    spk_emb_dim: int = 80
    """Width of the projected speaker vector fed to the estimator."""
    sigma_min: float = 1e-6
    """Training-time minimum noise (unused at inference)."""
    solver: str = "euler"
    """ODE solver (only Euler exists in the original)."""
    t_scheduler: str = "cosine"
    """Time grid: cosine (t = 1 - cos(pi/2 s)) or linear."""
    inference_cfg_rate: float = 0.7
    """Classifier-free guidance weight w."""
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    """The velocity U-Net."""
    n_timesteps: int = 10
    """Euler steps: 10 in GLM-4-Voice's `flow.inference`; the fork Omni-Diffusion pins
    (shenyunhang/GLM-4-Voice 54d6672) makes it `option_steps`, default 10."""


class InterpolateRegulator(nn.Module):
    """Nearest-neighbour resampling to the mel frame count, then conv/GroupNorm/Mish layers."""

    def __init__(self, channels: int, sampling_ratios: Sequence[int], groups: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in sampling_ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        """One utterance: h [1, L, C] -> [1, frames, C]."""
        x = F.interpolate(h.transpose(1, 2).contiguous(), size=frames, mode="nearest")
        return self.model(x).transpose(1, 2).contiguous()


class _CFM(nn.Module):
    """Holds the estimator under the original's name (`decoder.estimator.*`)."""

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        self.estimator = ConditionalDecoder(config)


@dataclass
class FlowRequest:
    """One utterance for `FlowModel.mel_frames`."""

    codes: torch.Tensor
    """[L] speech codes to speak."""
    prompt_codes: torch.Tensor | None = None
    """[P] earlier codes (chunked decoding), or None."""
    prompt_mel: torch.Tensor | None = None
    """[Tp, n_mels] mel frames already produced for the prompt, or None."""


class FlowModel(nn.Module):
    """codes -> mel frames (`MaskedDiffWithXvec.inference`, batched)."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        if config.solver != "euler" or config.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"flow solver {config.solver!r} / t_scheduler {config.t_scheduler!r} "
                             "not supported (the original has euler with cosine or linear)")
        if config.n_spks != 1:
            raise ValueError("flow n_spks must be 1 (a speaker vector input), as GLM-4-Voice's")
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = BlockConformerEncoder(config.encoder)
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)
        self.length_regulator = InterpolateRegulator(config.output_size, config.sampling_ratios,
                                                     config.regulator_groups)
        self.decoder = _CFM(config.estimator)

    def frames_for(self, n_codes: int) -> int:
        """Mel frames the original makes for n codes: int(n / 12.5 * 22050 / 256), in float32
        tensor arithmetic as there (the rounding decides the last frame)."""
        n = torch.tensor([n_codes], dtype=torch.int32)
        return int((n / self.config.input_frame_rate * MEL_SAMPLE_RATE / MEL_HOP).int())

    def time_grid(self, device: torch.device, steps: int | None = None) -> torch.Tensor:
        steps = torch.linspace(0, 1, (steps or self.config.n_timesteps) + 1, device=device)
        return 1 - torch.cos(steps * 0.5 * torch.pi) if self.config.t_scheduler == "cosine" else steps

    @torch.inference_mode()
    def mel_frames(self, requests: Sequence[FlowRequest], speaker: torch.Tensor | None = None,
                   steps: int | None = None) -> tuple[list[torch.Tensor], list[torch.Generator]]:
        """Mel frames [n_mels, T_i] of each request's codes (prompt frames cut off), and each
        utterance's noise generator, advanced past the noise (the vocoder continues it).
        `speaker`: an x-vector [spk_embed_dim] (GLM-4-Voice passes zeros); `steps`: Euler
        steps (default `n_timesteps`)."""
        if steps is not None and steps < 1:
            raise ValueError(f"flow steps must be at least 1, got {steps}")
        if not requests:
            return [], []
        cfg = self.config
        device = self.input_embedding.weight.device
        dtype = self.input_embedding.weight.dtype
        full, prompt_frames = [], []
        for r in requests:
            codes = torch.as_tensor(r.codes).reshape(-1).long()
            prompt = (torch.as_tensor(r.prompt_codes).reshape(-1).long()
                      if r.prompt_codes is not None else codes.new_zeros(0))
            tokens = torch.cat([prompt, codes])
            if codes.numel() == 0:
                raise ValueError("no speech codes to decode")
            if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
                raise ValueError(f"speech codes must lie in [0, {cfg.vocab_size}); got "
                                 f"{int(tokens.min())}..{int(tokens.max())}")
            full.append(tokens.to(device))
            prompt_frames.append(0 if r.prompt_mel is None else int(r.prompt_mel.shape[0]))
        b = len(full)
        lengths = torch.tensor([len(t) for t in full], device=device)
        tokens = nn.utils.rnn.pad_sequence(full, batch_first=True)
        valid = (torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]).to(dtype)

        spk = torch.zeros(b, cfg.spk_embed_dim, device=device, dtype=dtype) if speaker is None \
            else speaker.to(device, dtype).expand(b, -1)
        spk = self.spk_embed_affine_layer(F.normalize(spk, dim=1))
        h = self.input_embedding(tokens) * valid.unsqueeze(-1)
        h = self.encoder_proj(self.encoder(h, lengths))

        frames = [self.frames_for(len(t)) for t in full]
        width = max(frames)
        mu = h.new_zeros(b, cfg.output_size, width)
        cond = h.new_zeros(b, cfg.output_size, width)
        mask = h.new_zeros(b, 1, width)
        noise = h.new_zeros(b, cfg.output_size, width)
        generators = []
        for i, (r, n) in enumerate(zip(requests, frames)):
            mu[i, :, :n] = self.length_regulator(h[i: i + 1, : len(full[i])], n)[0].T
            if r.prompt_mel is not None and prompt_frames[i]:
                cond[i, :, : prompt_frames[i]] = r.prompt_mel.to(device, dtype).T
            mask[i, :, :n] = 1
            g = torch.Generator(device=device).manual_seed(NOISE_SEED)
            noise[i, :, :n] = torch.randn((1, cfg.output_size, n), generator=g, device=device, dtype=dtype)[0]
            generators.append(g)
        mel = self._solve(noise, mu, mask, spk, cond, padded=min(frames) != width, steps=steps)
        return [mel[i, :, p:n] for i, (p, n) in enumerate(zip(prompt_frames, frames))], generators

    def _solve(self, x: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spk: torch.Tensor,
               cond: torch.Tensor, padded: bool, steps: int | None = None) -> torch.Tensor:
        """Euler integration of the guided velocity from t=0 (noise) to t=1 (mel)."""
        estimator = self.decoder.estimator
        w = self.config.inference_cfg_rate
        b = x.shape[0]
        grid = self.time_grid(x.device, steps)
        t, dt = grid[0], grid[1] - grid[0]
        # the conditional and unconditional passes run as one batch of 2B
        mask2 = torch.cat([mask, mask])
        mu2 = torch.cat([mu, torch.zeros_like(mu)])
        spk2 = torch.cat([spk, torch.zeros_like(spk)])
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
        for step in range(1, len(grid)):
            if w > 0:
                v = estimator(torch.cat([x, x]), mask2, mu2, t, spk2, cond2, padded=padded)
                v = (1.0 + w) * v[:b] - w * v[b:]
            else:
                v = estimator(x, mask, mu, t, spk, cond, padded=padded)
            x = x + dt * v
            t = t + dt
            if step < len(grid) - 1:
                dt = grid[step + 1] - t
        return x
