"""The flow model's token encoder: a block-causal Conformer with relative positions.

GLM-4-Voice's decoder encodes its 12.5 Hz speech codes with CosyVoice's
`BlockConformerEncoder` (`input_layer: linear`, `pos_enc_layer_type: rel_pos_espnet`,
`selfattention_layer_type: block_rel_selfattn`): a linear input layer, Transformer-XL
style relative-position attention (Dai et al. 2019, section 3.3: the `u`/`v` biases and
the "relative shift") and pre-norm feed-forward blocks. Its one unusual part is the
attention mask: a code attends to every code up to the end of its own block of
`block_size` codes, so a prefix of whole blocks encodes the same whatever follows it,
which is what lets the original decode speech in chunks.

Parameter names follow the original's `state_dict` (`embed.out.0`, `encoders.N.self_attn.
linear_q`, ...), so the released `flow.pt` loads without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: the original precomputes its position table for this many positions and slices it; we
#: do the same so the sines are computed by the same kernels (bit-identical tables)
_TABLE_POSITIONS = 5000


@dataclass(frozen=True)
class EncoderConfig:
    """`BlockConformerEncoder` options the released decoder uses (others are refused)."""

    input_size: int = 512
    """Width of the code embeddings fed in."""
    output_size: int = 512
    """Model width."""
    attention_heads: int = 8
    """Heads of each self-attention."""
    linear_units: int = 2048
    """Hidden width of each feed-forward block."""
    num_blocks: int = 6
    """Number of Conformer layers."""
    block_size: int = 10
    """Codes per attention block (a code sees all earlier blocks and its own)."""
    normalize_before: bool = True
    """Pre-norm layers (the released model) or post-norm."""
    macaron_style: bool = False
    """A second, half-weighted feed-forward block before attention (Conformer's macaron)."""
    key_bias: bool = True
    """Whether the key projection has a bias."""
    activation_type: str = "swish"
    """Feed-forward activation: swish (SiLU), relu, gelu or tanh."""


_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def block_mask(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[length, length] bool: query i may see key j when j is before the end of i's block."""
    ends = (torch.arange(length, device=device) // block_size + 1) * block_size
    return torch.arange(length, device=device)[None, :] < ends[:, None]


class RelativePositions(nn.Module):
    """ESPnet's relative position table: entry k is the encoding of distance (L-1-k)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self._table: torch.Tensor | None = None  # float32 on the CPU, as built
        self._placed: torch.Tensor | None = None  # the same on the model's device and dtype

    def _build(self, positions: int) -> torch.Tensor:
        position = torch.arange(0, positions, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.width, 2, dtype=torch.float32)
                        * -(math.log(10000.0) / self.width))
        positive = torch.zeros(positions, self.width)
        negative = torch.zeros(positions, self.width)
        positive[:, 0::2] = torch.sin(position * div)
        positive[:, 1::2] = torch.cos(position * div)
        negative[:, 0::2] = torch.sin(-1 * position * div)
        negative[:, 1::2] = torch.cos(-1 * position * div)
        return torch.cat([torch.flip(positive, [0]), negative[1:]], dim=0)

    def forward(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """[1, 2*length-1, width]: distances length-1 ... -(length-1)."""
        if self._table is None or self._table.size(0) < 2 * length - 1:
            self._table, self._placed = self._build(max(_TABLE_POSITIONS, length)), None
        if self._placed is None or self._placed.device != like.device or self._placed.dtype != like.dtype:
            self._placed = self._table.to(device=like.device, dtype=like.dtype)  # once, not per call
        table = self._placed
        middle = table.size(0) // 2
        return table[middle - length + 1: middle + length].unsqueeze(0)


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions and a block mask."""

    def __init__(self, heads: int, width: int, key_bias: bool, block_size: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"encoder width {width} is not divisible by {heads} heads")
        self.h, self.d_k, self.block_size = heads, width // heads, block_size
        self.linear_q = nn.Linear(width, width)
        self.linear_k = nn.Linear(width, width, bias=key_bias)
        self.linear_v = nn.Linear(width, width)
        self.linear_out = nn.Linear(width, width)
        self.linear_pos = nn.Linear(width, width, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.d_k))

    @staticmethod
    def _shift(x: torch.Tensor) -> torch.Tensor:
        """[B, H, L, 2L-1] scores per relative distance -> [B, H, L, L] per key position."""
        b, h, length, width = x.shape
        padded = torch.cat([x.new_zeros(b, h, length, 1), x], dim=-1)
        padded = padded.view(b, h, width + 1, length)
        return padded[:, :, 1:].view_as(x)[:, :, :, : width // 2 + 1]

    def forward(self, x: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; keep [B, L, L] bool (True = may attend); pos [1, 2L-1, D]."""
        b, length, _ = x.shape
        q = self.linear_q(x).view(b, -1, self.h, self.d_k)  # (B, L, H, d_k)
        k = self.linear_k(x).view(b, -1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, -1, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(pos.size(0), -1, self.h, self.d_k).transpose(1, 2)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        if content.shape != position.shape:
            position = self._shift(position)
        scores = (content + position) / math.sqrt(self.d_k)
        blocked = ~keep.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(blocked, -float("inf")), dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).contiguous().view(b, -1, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.w_1 = nn.Linear(width, hidden)
        self.w_2 = nn.Linear(hidden, width)
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Attention and feed-forward (and, macaron style, a half feed-forward first)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        width = config.output_size
        self.normalize_before = config.normalize_before
        self.self_attn = RelativeSelfAttention(config.attention_heads, width, config.key_bias,
                                               config.block_size)
        self.feed_forward = FeedForward(width, config.linear_units, config.activation_type)
        self.norm_ff = nn.LayerNorm(width, eps=1e-5)
        self.norm_mha = nn.LayerNorm(width, eps=1e-5)
        self.ff_scale = 1.0
        if config.macaron_style:
            self.feed_forward_macaron = FeedForward(width, config.linear_units, config.activation_type)
            self.norm_ff_macaron = nn.LayerNorm(width, eps=1e-5)
            self.ff_scale = 0.5

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, block, scale: float = 1.0) -> torch.Tensor:
        y = block(norm(x) if self.normalize_before else x)
        x = x + scale * y
        return x if self.normalize_before else norm(x)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "feed_forward_macaron"):
            x = self._residual(x, self.norm_ff_macaron, self.feed_forward_macaron, self.ff_scale)
        x = self._residual(x, self.norm_mha, lambda h: self.self_attn(h, keep, pos))
        return self._residual(x, self.norm_ff, self.feed_forward, self.ff_scale)


class LinearInput(nn.Module):
    """`input_layer: linear`: Linear + LayerNorm (+ dropout, inactive at inference)."""

    def __init__(self, input_size: int, width: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(input_size, width), nn.LayerNorm(width, eps=1e-5))
        self.pos_enc = RelativePositions(width)


class BlockConformerEncoder(nn.Module):
    """Codes' embeddings [B, L, input_size] + lengths -> [B, L, output_size]."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = LinearInput(config.input_size, config.output_size)
        self.encoders = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_blocks))
        self.after_norm = nn.LayerNorm(config.output_size, eps=1e-5)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        valid = torch.arange(length, device=x.device)[None, :] < lengths[:, None]  # (B, L)
        keep = valid[:, None, :] & block_mask(length, self.config.block_size, x.device)[None]
        x = self.embed.out(x) * math.sqrt(self.config.output_size)
        pos = self.embed.pos_enc(length, x)
        for layer in self.encoders:
            x = layer(x, keep, pos)
        return self.after_norm(x) if self.config.normalize_before else x
