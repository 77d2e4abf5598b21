"""The MAGVIT-v2 image tokenizer: a VQGAN-style convolutional encoder/decoder with a
lookup-free quantizer (LFQ, Yu et al. 2023, sec. 3.1).

The layout is that of the `magvitv2` checkpoint Show-o and Omni-Diffusion use: encoder
and decoder trunks of ResNet blocks (GroupNorm 32, eps 1e-6, swish), attention blocks at
the listed resolutions, stride-2 convolutions after a (0, 1, 0, 1) pad to downsample,
nearest-neighbour x2 plus a conv to upsample; the encoder ends in `quant_conv`, the
decoder starts with `post_quant_conv`. The quantizer maps each latent vector z (13
channels for 8,192 codes) to the corner of the hypercube sign(z); its code is the binary
number `sum_c 2^(D-1-c) [z_c > 0]` (`quantize.power_vals`), and `quantize.embedding`
holds the +-1 corner of every code for decoding.

The default config is the real 256px tokenizer (16x16 = 256 codes); the embedded default
trains a narrow one (`omni_model/tokenizers/train_image.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn

from omni_model.model_folder import read_config
from omni_model.tokenizers.base import check_finite, fingerprint, load_strict, save_folder


@dataclass(frozen=True)
class TrunkConfig:
    """One VQGAN trunk (encoder or decoder)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    attn_resolutions: tuple[int, ...] = (5,)
    resolution: int = 256
    z_channels: int = 13
    in_ch: int = 3
    out_ch: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ch_mult", "num_res_blocks", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,) * (len(self.ch_mult) if name == "num_res_blocks" else 1)
            object.__setattr__(self, name, tuple(value))
        if len(self.num_res_blocks) != len(self.ch_mult):
            raise ValueError("num_res_blocks needs one entry per ch_mult level")
        if min(self.num_res_blocks) < 1 or self.ch % 32:
            raise ValueError("every level needs a ResNet block, and ch must be a multiple of 32 "
                             "(GroupNorm uses 32 groups)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrunkConfig":
        if data.get("double_z"):  # Show-o's VQGAN argument: conv_out would feed quant_conv twice z_channels
            raise ValueError("double_z: true: MAGVIT-v2's quant_conv takes z_channels, not twice as many "
                             "(the original cannot run it)")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _decoder_default() -> TrunkConfig:
    return TrunkConfig(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=(4, 4, 3, 4, 3))


@dataclass(frozen=True)
class MagVitConfig:
    encoder: TrunkConfig = field(default_factory=TrunkConfig)
    decoder: TrunkConfig = field(default_factory=_decoder_default)
    codebook_dim: int = 13  #: bits per code: 2**codebook_dim codes
    resolution: int = 256  #: the square input size the tokenizer's preprocessing produces

    def __post_init__(self) -> None:
        for trunk in ("encoder", "decoder"):
            if getattr(self, trunk).z_channels != self.codebook_dim:
                raise ValueError(f"{trunk}.z_channels {getattr(self, trunk).z_channels} != codebook_dim "
                                 f"{self.codebook_dim}: the lookup-free quantizer reads one bit per latent channel")

    @property
    def codebook_size(self) -> int:
        return 2 ** self.codebook_dim

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for trunk in ("encoder", "decoder"):
            out[trunk] = {k: list(v) if isinstance(v, tuple) else v for k, v in out[trunk].items()}
        out["pixel_range"] = [-1, 1]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MagVitConfig":
        # A config.json without trunk entries (the released checkpoint ships its
        # architecture in code) means the real 256px architecture.
        default = cls()
        return cls(
            encoder=TrunkConfig.from_dict(data["encoder"]) if "encoder" in data else default.encoder,
            decoder=TrunkConfig.from_dict(data["decoder"]) if "decoder" in data else default.decoder,
            codebook_dim=int(data.get("codebook_dim", default.codebook_dim)),
            resolution=int(data.get("resolution", default.resolution)),
        )


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1 conv projections)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5, as the reference
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block`s, optional `attn` after each block, resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    @classmethod
    def build(cls, cin: int, cout: int, n_blocks: int, attention: bool, dropout: float) -> "_Level":
        """`n_blocks` ResNet blocks cin -> cout (the first changes width), each followed
        by an attention block when the level's resolution is listed."""
        blocks = [ResnetBlock(cin if i == 0 else cout, cout, dropout) for i in range(n_blocks)]
        return cls(blocks, [AttnBlock(cout) for _ in range(n_blocks)] if attention else [])

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_ch, cfg.ch, 3, padding=1)
        res, levels = cfg.resolution, []
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level.build(cin, cfg.ch * mult, cfg.num_res_blocks[i],
                                 res in cfg.attn_resolutions, cfg.dropout)
            cin = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(cin, cfg.dropout)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: TrunkConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, cfg.dropout)
        levels: list[nn.Module] = [None] * n  # type: ignore[list-item]
        for i in reversed(range(n)):
            level = _Level.build(cin, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks[i],
                                 res in cfg.attn_resolutions, cfg.dropout)
            cin = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LookupFreeQuantizer(nn.Module):
    """sign(z) quantization with a binary code per latent vector.

    Training losses (returned by `forward`): a commitment term pulling z towards its
    corner, and the LFQ entropy term: low per-sample entropy (confident bits) and high
    entropy of the batch-average bit distribution (every code used).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        powers = 2 ** torch.arange(dim - 1, -1, -1)
        bits = (torch.arange(2 ** dim)[:, None] >> torch.arange(dim - 1, -1, -1)) & 1
        self.register_buffer("embedding", bits.float() * 2 - 1)
        self.register_buffer("power_vals", powers)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, D, h, w]` latents -> `[B, h*w]` int64 codes (row-major)."""
        bits = (z > 0).long()
        return (bits * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)

    def corners(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`[B, h*w]` codes -> `[B, D, h, w]` +-1 latents."""
        b = codes.shape[0]
        return self.embedding[codes].view(b, grid[0], grid[1], self.dim).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Straight-through quantized z, commitment loss, entropy loss."""
        zq = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
        commit = F.mse_loss(z, zq.detach())
        # p(bit_c = 1 | z) from the distances to +1 and -1
        logit = -(z - 1).pow(2) + (z + 1).pow(2)  # = 4 z
        p = torch.sigmoid(logit).movedim(1, -1).reshape(-1, self.dim)
        per_sample = _binary_entropy(p).sum(-1).mean()
        return z + (zq - z).detach(), commit, per_sample - self._codebook_entropy(p)

    def _codebook_entropy(self, p: torch.Tensor) -> torch.Tensor:
        """Entropy of the batch-average code distribution. Each vector's code distribution
        is the product of its bits' Bernoullis; averaged over the batch it no longer
        factorises, so for codebooks up to 2^14 it is computed over every code (bits that
        are each balanced but move together would otherwise look like full usage)."""
        if self.dim > 14:
            return _binary_entropy(p.mean(0)).sum()
        p = p.clamp(1e-6, 1 - 1e-6)
        bits = (self.embedding > 0).to(p.dtype)  # [K, D]
        log_q = p.log() @ bits.T + (1 - p).log() @ (1 - bits).T  # [N, K]
        avg = log_q.exp().mean(0)
        return -(avg * avg.clamp_min(1e-12).log()).sum()


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class MagVitTokenizer(nn.Module):
    """MAGVIT-v2 tokenizer: images in [-1, 1] <-> `[B, h*w]` codes."""

    name = "magvit2"

    def __init__(self, config: MagVitConfig = MagVitConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder)
        self.decoder = Decoder(config.decoder)
        self.quantize = LookupFreeQuantizer(config.codebook_dim)

    # ------------------------------------------------------------------ properties
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        f = self.config.downsample
        return height // f, width // f

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.name, self.config.to_dict(), self.state_dict())

    #: MAGVIT-v2 carries its decoder: codes always turn back into pixels
    can_decode = True

    # ------------------------------------------------------------------ input handling
    def preprocess(self, images: Sequence[PILImage.Image]) -> torch.Tensor:
        """PIL images (any mode, any aspect) -> `[B, 3, R, R]` in [-1, 1].

        Centre-crop a square, resize it to R x R (bicubic), scale to [-1, 1]. Cropping
        first keeps the cost at R x R whatever the aspect (a 1 x 40,000 strip resized
        before cropping would be 256 x 10,240,000); any size from 1 x 1 up is taken.
        """
        r = self.config.resolution
        out = []
        for img in images:
            if img.width < 1 or img.height < 1:
                raise ValueError(f"image of {img.width}x{img.height} has no pixels")
            side = min(img.width, img.height)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.convert("RGB").crop((left, top, left + side, top + side))
            img = img.resize((r, r), PILImage.Resampling.BICUBIC)
            out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
        return torch.stack(out) / 127.5 - 1.0

    def _as_pixels(self, images: torch.Tensor | Sequence[PILImage.Image]) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            images = self.preprocess(list(images))
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        f = self.config.downsample
        h, w = images.shape[-2:]
        if h < f or w < f or h % f or w % f:
            raise ValueError(f"image size {h}x{w} must be a positive multiple of {f}")
        check_finite(images, "images")
        return images.to(self.device, torch.float32)

    # ------------------------------------------------------------------ codec
    @torch.no_grad()
    def encode(self, images: torch.Tensor | Sequence[PILImage.Image]) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [-1, 1] (or PIL images) -> codes `[B, h*w]` int64."""
        return self.quantize.codes(self.encoder(self._as_pixels(images)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes `[B, h*w]` -> images `[B, 3, H, W]` (unclamped decoder output).

        `grid` defaults to a square. Codes outside the codebook raise `ValueError`.
        """
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.device)
        if codes.dim() == 1:
            codes = codes[None]
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"image codes must lie in [0, {self.codebook_size})")
        if grid is None:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} codes are not a square grid; pass grid=")
            grid = (side, side)
        return self.decoder(self.quantize.corners(codes, grid))

    def decode_images(self, codes: torch.Tensor, grid: tuple[int, int] | None = None
                      ) -> list[PILImage.Image]:
        """Codes -> PIL RGB images."""
        pixels = ((self.decode(codes, grid).clamp(-1, 1) + 1) * 127.5).round().byte()
        return [PILImage.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass: reconstruction plus the quantizer's losses."""
        zq, commit, entropy = self.quantize(self.encoder(images))
        return {"reconstruction": self.decoder(zq), "commit": commit, "entropy": entropy}

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "MagVitTokenizer":
        config = MagVitConfig.from_dict(read_config(path))
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        # The quantizer's buffers are a function of codebook_dim; a checkpoint that omits
        # them still loads, one that has them must match.
        fresh = LookupFreeQuantizer(config.codebook_dim).to(device)
        model.quantize.embedding.copy_(fresh.embedding)
        model.quantize.power_vals.copy_(fresh.power_vals)
        load_strict(model, path, device, skip=("quantize.embedding", "quantize.power_vals"))
        return model.eval()

    def save_pretrained(self, path: str | Path) -> Path:
        return save_folder(self, path, self.config.to_dict())
