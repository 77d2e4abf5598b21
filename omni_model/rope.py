"""Rotary position embeddings in the rotate-half form, with the RoPE variants of
transformers (`rope_scaling`: linear, NTK-dynamic, YaRN, LongRoPE, Llama 3) computed as
the rope initialisers that Dream's rotary embedding calls compute them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omni_model.transformer import TransformerConfig

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def rope_type(config: "TransformerConfig") -> str:
    """The RoPE variant of `config` (`rope_scaling.rope_type`, or its older key `type`)."""
    rope = config.rope_scaling or {}
    return rope.get("rope_type", rope.get("type", "default"))


def rope_parameters(config: "TransformerConfig", seq_len: int | None,
                    device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[head_dim / 2]` and the cos/sin scale of `config`'s RoPE, as
    transformers' rope initialisers (which Dream's rotary embedding calls) compute them.
    `seq_len`: the longest position + 1 of this pass (NTK-dynamic scaling grows the base
    past `max_position_embeddings`; Dream keeps the grown table for later, shorter
    passes, here each pass computes its own)."""
    rope = dict(config.rope_scaling or {})
    kind = rope_type(config)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r}: one of {ROPE_TYPES}")

    def need(*keys: str) -> list:
        missing = [k for k in keys if rope.get(k) is None]
        if missing:
            raise ValueError(f"rope_scaling ({kind}) needs {missing}")
        return [rope[k] for k in keys]

    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    scale = 1.0
    if kind == "default":
        inv_freq = 1.0 / base ** exponents
    elif kind == "linear":
        (factor,) = need("factor")
        inv_freq = 1.0 / base ** exponents / factor
    elif kind == "dynamic":
        (factor,) = need("factor")
        longest = max(seq_len or 0, config.max_position_embeddings)
        base = base * ((factor * longest / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / base ** exponents
    elif kind == "llama3":
        factor, low, high, old = need("factor", "low_freq_factor", "high_freq_factor",
                                      "original_max_position_embeddings")
        inv_freq = 1.0 / base ** exponents
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        (factor,) = need("factor")
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings

        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        scale = rope.get("attention_factor")
        if scale is None:
            m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
            scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def correction(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction(rope.get("beta_fast") or 32), correction(rope.get("beta_slow") or 1)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low)
                / ((high + 0.001 if high == low else high) - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        freqs = base ** exponents
        inv_freq = (1.0 / (factor * freqs)) * (1 - extrapolate) + (1.0 / freqs) * extrapolate
    else:  # longrope: Dream builds its table once, without a sequence length: the short factors
        short, _ = need("short_factor", "long_factor")
        if len(short) != dim // 2:
            raise ValueError(f"rope_scaling (longrope) short_factor has {len(short)} entries, not {dim // 2}")
        original = config.extra.get("original_max_position_embeddings")
        factor = config.max_position_embeddings / original if original else rope.get("factor")
        scale = rope.get("attention_factor")
        if scale is None:
            scale = 1.0 if not factor or factor <= 1 else math.sqrt(
                1 + math.log(factor) / math.log(original or config.max_position_embeddings))
        inv_freq = 1.0 / (torch.tensor(short, dtype=torch.float32, device=device) * base ** exponents)
    return inv_freq.float(), float(scale)


def rotary_cos_sin(position_ids: torch.Tensor, config: "TransformerConfig",
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[batch, 1, length, head_dim]` for the rotate-half RoPE form."""
    dynamic = rope_type(config) == "dynamic"
    longest = int(position_ids.max()) + 1 if dynamic and position_ids.numel() else None  # a sync: only when needed
    inv_freq, scale = rope_parameters(config, longest, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension: `x * cos + rotate_half(x) * sin` rotates each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
