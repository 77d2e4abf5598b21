"""The flow-matching vector field: Matcha-TTS's 1-D U-Net with Transformer blocks.

CosyVoice's `ConditionalDecoder` (built from Matcha-TTS's components, Mehta et al. 2024,
section 3) predicts the velocity of the mel frames at flow time t from the noisy frames
`x`, the encoder's frame-rate condition `mu`, the speaker vector and the prompt frames
`cond` (stacked on the channel axis): down blocks (ResNet block, Transformer blocks,
stride-2 convolution), mid blocks, up blocks with skip connections (transposed
convolution), all conditioned on a sinusoidal embedding of t.

Two things differ from the original only when a batch holds utterances of different
lengths (the original decodes one at a time): GroupNorm statistics are taken over the
valid frames only, and padded frames are excluded as attention keys. With one utterance,
or equal lengths, the computation is the original's, including its habit of *adding* the
0/1 attention mask to the scores (a constant shift softmax ignores, kept for identical
rounding). That is what lets a batch decode to what each utterance gives alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EstimatorConfig:
    """`ConditionalDecoder` options (CosyVoice `flow/decoder.py`)."""

    in_channels: int = 320
    """x, mu, speaker vector and prompt frames stacked (4 x 80 in the released model)."""
    out_channels: int = 80
    """Mel bins predicted."""
    channels: tuple[int, ...] = (256, 256)
    """Width of each U-Net level."""
    attention_head_dim: int = 64
    """Width of each attention head."""
    n_blocks: int = 4
    """Transformer blocks per level."""
    num_mid_blocks: int = 12
    """ResNet + Transformer blocks at the bottom of the U."""
    num_heads: int = 8
    """Attention heads."""
    act_fn: str = "gelu"
    """Feed-forward activation of the Transformer blocks: gelu (the released decoder),
    gelu-approximate, geglu, geglu-approximate or snakebeta, as Matcha-TTS names them."""


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
    if not padded:
        return norm(x)
    b, c, t = x.shape
    g = norm.num_groups
    xg = x.view(b, g, c // g, t)
    m = mask.view(b, 1, 1, t)
    count = m.sum(dim=(2, 3), keepdim=True) * (c // g)
    mean = (xg * m).sum(dim=(2, 3), keepdim=True) / count
    var = (((xg - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + norm.eps)).view(b, c, t)
    return y * norm.weight[None, :, None] + norm.bias[None, :, None]


class Block1D(nn.Module):
    """Conv(3) -> GroupNorm(8) -> Mish on masked frames."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out),
                                   nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
        conv, norm, act = self.block
        return act(_group_norm(norm, conv(x * mask), mask, padded)) * mask


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, groups)
        self.block2 = Block1D(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, padded: bool) -> torch.Tensor:
        h = self.block1(x, mask, padded)
        h += self.mlp(t).unsqueeze(-1)
        h = self.block2(h, mask, padded)
        return h + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000) -> torch.Tensor:
    """[B] or scalar flow times -> [B, dim] (sin half, cos half), as Matcha-TTS."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
    angles = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Attention(nn.Module):
    """diffusers' `Attention` as Matcha uses it: no q/k/v bias, an output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim]; bias [B, T, T] added to the scores."""
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        bias = bias.repeat_interleave(self.heads, dim=0).view(b, self.heads, t, t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELUProjection(nn.Module):
    """diffusers' GELU (`gelu`, `gelu-approximate`) and GEGLU (`geglu`: half the projection
    gates the other half)."""

    def __init__(self, dim: int, inner: int, approximate: str, gated: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2 if gated else inner)
        self.approximate, self.gated = approximate, gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.gated:
            x, gate = x.chunk(2, dim=-1)
            return x * F.gelu(gate, approximate=self.approximate)
        return F.gelu(x, approximate=self.approximate)


class SigmoidGELUProjection(nn.Module):
    """diffusers' ApproximateGELU (`geglu-approximate`): x * sigmoid(1.702 x)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


class SnakeBetaProjection(nn.Module):
    """Matcha's SnakeBeta: x + sin^2(a x) / b, a and b learned on a log scale."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.alpha = nn.Parameter(torch.zeros(inner))
        self.beta = nn.Parameter(torch.zeros(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        alpha, beta = torch.exp(self.alpha), torch.exp(self.beta)
        return x + (1.0 / (beta + 0.000000001)) * torch.pow(torch.sin(x * alpha), 2)


def _activation(act_fn: str, dim: int, inner: int) -> nn.Module:
    if act_fn in ("gelu", "gelu-approximate"):
        return GELUProjection(dim, inner, "none" if act_fn == "gelu" else "tanh")
    if act_fn == "geglu":
        return GELUProjection(dim, inner, "none", gated=True)
    if act_fn == "geglu-approximate":
        return SigmoidGELUProjection(dim, inner)
    return SnakeBetaProjection(dim, inner)


ACT_FNS = ("gelu", "gelu-approximate", "geglu", "geglu-approximate", "snakebeta")


class FeedForward(nn.Module):
    def __init__(self, dim: int, act_fn: str, mult: int = 4) -> None:
        super().__init__()
        # index 1 is the (inactive) dropout of the original's ModuleList; keeping the slot
        # keeps the `net.2` parameter names
        self.net = nn.ModuleList([_activation(act_fn, dim, dim * mult), nn.Identity(),
                                  nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class TransformerBlock(nn.Module):
    """Matcha's `BasicTransformerBlock` in its self-attention-only, layer-norm form."""

    def __init__(self, dim: int, heads: int, head_dim: int, act_fn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, act_fn)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


def _attention_bias(mask: torch.Tensor, padded: bool) -> torch.Tensor:
    """[B, 1, T] 0/1 frames -> [B, T, T]: the original's 0/1 product, and -inf on padded keys."""
    bias = torch.matmul(mask.transpose(1, 2).contiguous(), mask)
    if padded:
        bias = bias.masked_fill(mask == 0, -float("inf"))
    return bias


class ConditionalDecoder(nn.Module):
    """The U-Net: (x, mask, mu, t, spks, cond) -> velocity [B, out_channels, T]."""

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        if config.act_fn not in ACT_FNS:
            raise ValueError(f"estimator act_fn {config.act_fn!r} is not supported: one of "
                             f"{', '.join(ACT_FNS)} (the released decoder uses 'gelu')")
        self.config = config
        channels = tuple(config.channels)
        time_dim = channels[0] * 4

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(dim, config.num_heads, config.attention_head_dim,
                                                  config.act_fn) for _ in range(config.n_blocks))

        self.time_mlp = TimestepEmbedding(config.in_channels, time_dim)
        self.down_blocks = nn.ModuleList()
        out = config.in_channels
        for i, width in enumerate(channels):
            last = i == len(channels) - 1
            down = nn.Conv1d(width, width, 3, padding=1) if last else Downsample1D(width)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(out, width, time_dim), transformers(width), down]))
            out = width
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], channels[-1], time_dim), transformers(channels[-1])])
            for _ in range(config.num_mid_blocks))
        ups = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(ups) - 1):
            last = i == len(ups) - 2
            width = ups[i + 1]
            up = nn.Conv1d(width, width, 3, padding=1) if last else Upsample1D(width)
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(ups[i] * 2, width, time_dim), transformers(width), up]))
        self.final_block = Block1D(ups[-1], ups[-1])
        self.final_proj = nn.Conv1d(ups[-1], config.out_channels, 1)

    @staticmethod
    def _attend(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
        bias = _attention_bias(mask, padded)
        x = x.transpose(1, 2).contiguous()
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """x, mu, cond [B, 80, T]; mask [B, 1, T]; t scalar or [B]; spks [B, 80].

        `padded` says that some utterance in the batch is shorter than T (see the module
        docstring); with it False the arithmetic is the original's.
        """
        temb = self.time_mlp(sinusoidal_embedding(t, self.config.in_channels))
        x = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)
        hiddens, masks = [], [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            x = self._attend(blocks, resnet(x, m, temb, padded), m, padded)
            hiddens.append(x)
            x = down(x * m)
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        for resnet, blocks in self.mid_blocks:
            x = self._attend(blocks, resnet(x, m, temb, padded), m, padded)
        for resnet, blocks, up in self.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = self._attend(blocks, resnet(x, m, temb, padded), m, padded)
            x = up(x * m)
        x = self.final_block(x, m, padded)
        return self.final_proj(x * m) * mask
