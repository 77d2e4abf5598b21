"""A bidirectional transformer in the Dream / Qwen2 layout.

RMSNorm, rotary position embeddings (rotate-half form), grouped-query attention with
q/k/v biases, SwiGLU MLP, untied (or tied) embeddings, and *no* causal mask: every
position attends to every other one in its document, which is what a masked diffusion
model needs. Parameter names equal Hugging Face's Qwen2/Dream names, so a Dream-7B
folder (`config.json` + `model*.safetensors`) loads strictly and `save_pretrained`
writes a folder the same loaders read.

Written for one device; data/model parallelism (DDP, DeepSpeed) is applied by
`pipelines/train/`, never here.

For sampling, `forward(..., return_cache=True)` also returns every layer's keys and
values (`KVCache`), and `forward_span` recomputes only a span of positions against
them: the span's queries attend to the cached keys and values of every other position
and to the span's own fresh ones (which replace the cached ones in place). In a
bidirectional model the cached entries go stale as the rest of the sequence changes;
the sampler decides how often to refresh them (Fast-dLLM's prefix and dual caches).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni_model.activations import ACTIVATIONS
from omni_model.config import with_extra

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of the backbone; the fields of a Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    #: transformers' RoPE variants, as Dream's rotary embedding reads them: None (default),
    #: {"rope_type": linear | dynamic | yarn | longrope | llama3, "factor": ..., ...}
    rope_scaling: dict | None = None
    hidden_act: str = "silu"  #: the MLP's gate activation (transformers' names)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    #: Dream-style checkpoints predict token i from the hidden state at i-1 (they were
    #: initialised from an autoregressive model). When set, `forward` shifts the logits
    #: right by one so that `logits[:, i]` always scores position i.
    shift_logits: bool = False
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    #: Learned embeddings of a code's place in its image (0 = off, as in Dream): the
    #: codes of a region `<|begin_of_image|> c_0 .. c_{n-1} <|end_of_image|>` get
    #: `embed_image_positions[i]` added to `c_i`'s embedding. A convolutional image
    #: tokenizer gives an object the same codes wherever it is, and rotary positions are
    #: only relative, so without them a small model reads *where* something is slowly.
    image_position_embeddings: int = 0
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    #: Keys of the source config.json we do not interpret, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if self.image_position_embeddings and (self.image_start_token_id is None or self.image_end_token_id is None):
            raise ValueError("image_position_embeddings needs image_start_token_id and image_end_token_id")
        # what Dream's code cannot run (its rotary tables would not fit the heads)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: one of {sorted(ACTIVATIONS)}")
        if self.extra.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor: Dream rotates every dimension of a head (1.0 only)")
        if self.extra.get("head_dim") not in (None, self.head_dim):
            raise ValueError(f"head_dim {self.extra['head_dim']}: Dream's heads are hidden_size / "
                             f"num_attention_heads = {self.head_dim}")
        rope_parameters(self, None)  # an unknown RoPE type or a missing parameter fails here

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        return with_extra(cls, data)

    def to_dict(self) -> dict[str, Any]:
        out = {"architectures": ["DreamModel"], "model_type": "Dream",
               "torch_dtype": "float32", "use_cache": False}
        out.update(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "extra"})
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as Qwen2 does; bf16 variance loses too much precision.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class KVCache:
    """Keys and values of every layer for a whole sequence, with what a span needs."""

    keys: list[torch.Tensor]  #: per layer `[B, kv_heads, L, head_dim]`, after RoPE
    values: list[torch.Tensor]
    mask: torch.Tensor | None  #: `[B, 1, L, L]` bool, the full sequence's attention mask
    cos: torch.Tensor  #: `[B, 1, L, head_dim]` RoPE tables of the full sequence
    sin: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, rows: slice) -> "KVCache":
        """The cache of some rows of the batch (views: a span pass writes through)."""
        mask = self.mask if self.mask is None or self.mask.shape[0] == 1 else self.mask[rows]
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], mask,
                       self.cos[rows], self.sin[rows])


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads,
                                                  cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None, kv: list | None = None,
                span: tuple[int, int] | torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of `x`. With `kv` and no `span`, the keys and values are
        appended to `kv`; with both, `x` holds positions `span` of a cached sequence
        (a range, or a `[B, n]` tensor of positions per row): their keys and values
        replace the cached ones there and the queries attend to the whole cached sequence."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv is not None and span is None:
            kv.append((k, v))
        elif kv is not None:
            keys, values = kv
            if isinstance(span, tuple):
                keys[:, :, span[0]:span[1]] = k
                values[:, :, span[0]:span[1]] = v
            else:  # `[B, n]` cache positions, row by row (`Transformer.forward_spans`)
                where = span[:, None, :, None].expand_as(k)
                keys.scatter_(2, where, k)
                values.scatter_(2, where, v)
            k, v = keys, values
        if isinstance(attn_mask, torch.Tensor) or attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False,
                                                 enable_gqa=self.n_kv != self.n_heads)
        else:  # a FlexAttention BlockMask (`Transformer.attention = "flex"`)
            out = _flex_attention(q.is_cuda)(q, k, v, block_mask=attn_mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None, kv: list | None = None,
                span: tuple[int, int] | torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv, span)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.*` part of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.image_position_embeddings:
            self.embed_image_positions = nn.Embedding(cfg.image_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def image_code_index(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """Each position's index among the codes of the image region it lies in
    (`<|begin_of_image|>` excluded), -1 outside image regions."""
    b, n = input_ids.shape
    pos = torch.arange(n, device=input_ids.device).expand(b, n)
    none = torch.full_like(pos, -1)
    last_start = torch.where(input_ids == start_id, pos, none).cummax(dim=1).values
    last_end = torch.where(input_ids == end_id, pos, none).cummax(dim=1).values
    inside = (last_start >= 0) & (last_start > last_end) & (pos > last_start)
    return torch.where(inside, pos - last_start - 1, none)


def positions_from_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where `doc_ids` changes along each row."""
    b, n = doc_ids.shape
    idx = torch.arange(n, device=doc_ids.device).expand(b, n)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def attention_mask_4d(attention_mask: torch.Tensor | None,
                      doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean `[batch, 1, L, L]` (True = may attend) from key padding and documents.

    A query attends to a key when the key is not padding and both lie in the same
    document; rows that would attend to nothing (padding queries) attend to themselves
    so softmax stays finite.
    """
    if attention_mask is None and doc_ids is None:
        return None
    ref = doc_ids if doc_ids is not None else attention_mask
    b, n = ref.shape
    allowed = torch.ones(b, n, n, dtype=torch.bool, device=ref.device)
    if doc_ids is not None:
        allowed &= doc_ids[:, :, None] == doc_ids[:, None, :]
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool, device=ref.device)
    return allowed[:, None]


def document_block_mask(doc_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """`attention_mask_4d`'s rule as a FlexAttention `BlockMask`: a query attends to the
    non-padding keys of its own document (and to itself). Packed rows leave most blocks
    of the `[L, L]` grid empty, which FlexAttention skips; the dense boolean mask that
    SDPA takes instead rules out its flash kernels and is computed in full."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = doc_ids.shape
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(doc_ids, dtype=torch.bool)

    def same_document(batch, head, q, kv):
        return ((doc_ids[batch, q] == doc_ids[batch, kv]) & keep[batch, kv]) | (q == kv)

    return create_block_mask(same_document, b, None, n, n, device=doc_ids.device)


@functools.lru_cache(maxsize=2)
def _flex_attention(compiled: bool):
    """FlexAttention, compiled into one fused kernel on a GPU; eager elsewhere (a
    reference implementation: right, slow, for tests on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


ATTENTION_KERNELS = ("sdpa", "flex")


class Transformer(nn.Module):
    """Bidirectional transformer: `forward(input_ids) -> logits [batch, length, vocab]`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        #: how packed documents attend in a pass without a cache: `sdpa` with a dense
        #: `[L, L]` boolean mask, or `flex` with a block-sparse one (GPU training)
        self.attention = "sdpa"

    # ------------------------------------------------------------------ compute
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_cache: bool = False, image_index: torch.Tensor | None = None,
                logits_range: tuple[int, int] | None = None, logits_at: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Logits for every position, or for `logits_range` only (and, with
        `return_cache`, a `KVCache`).

        Args:
            input_ids: `[batch, length]` int64.
            attention_mask: `[batch, length]`, 1 for real tokens, 0 for padding keys.
            doc_ids: `[batch, length]` document index of each position in a packed row;
                positions attend only within their document, and RoPE positions restart
                at each document unless `position_ids` is given.
            position_ids: `[batch, length]`; by default 0.. per document, or
                0.. over the non-padding tokens.
            image_index: `[batch, length]` each position's index within its image (-1
                elsewhere; `image_code_index`), read by `image_position_embeddings`; by
                default found from `input_ids`. Training passes the clean sequence's,
                since masking may hide an image's `<|begin_of_image|>`.
            logits_range: `(start, end)`: logits of positions `start:end` only. The
                output layer is the largest tensor of a step at a real vocabulary
                (positions x 176k): a sampler needs only the positions it predicts.
            logits_at: `[batch, length]` bool: logits `[N, V]` of the N positions set
                (row by row), and nothing else: training scores the masked positions only.
            inputs_embeds: `[batch, length, hidden]` input vectors instead of the embeddings
                of `input_ids` (which still give the shape): the released model writes its
                speech encoder's outputs over `<|context_of_audio|>` positions.
        """
        if logits_at is not None and (return_cache or logits_range is not None):
            raise ValueError("logits_at goes without return_cache and logits_range")
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_documents(doc_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
                position_ids = position_ids.expand_as(input_ids)
        x = self.embed(input_ids, image_index) if inputs_embeds is None else inputs_embeds
        cos, sin = rotary_cos_sin(position_ids, self.config, x.dtype)
        if self.attention == "flex" and doc_ids is not None and not return_cache:
            mask = document_block_mask(doc_ids, attention_mask)
        else:
            mask = attention_mask_4d(attention_mask, doc_ids)
        kv: list = []
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv if return_cache else None)
        if logits_at is not None:
            rows, cols = logits_at.nonzero(as_tuple=True)
            if self.config.shift_logits:  # as in `head`: position i from position i-1, 0 from 0
                cols = (cols - 1).clamp(min=0)
            return self.lm_head(self.model.norm(x[rows, cols]))
        logits = self.head(x, *(logits_range or (0, input_ids.shape[1])))
        if not return_cache:
            return logits
        if mask is None:
            mask = torch.ones(1, 1, input_ids.shape[1], input_ids.shape[1], dtype=torch.bool, device=x.device)
        return logits, KVCache([k for k, _ in kv], [v for _, v in kv], mask, cos, sin)

    def forward_span(self, input_ids: torch.Tensor, cache: KVCache, start: int, end: int) -> torch.Tensor:
        """Logits of positions `start:end` of `input_ids` (`[B, L]`, the cached sequence's
        length), computing only those positions (one more before them with
        `shift_logits`) against `cache`, whose entries for them are replaced."""
        first = start - 1 if self.config.shift_logits and start > 0 else start
        span = (first, end)
        index = self.image_index(input_ids)
        x = self.embed(input_ids[:, first:end], None if index is None else index[:, first:end])
        cos, sin = cache.cos[:, :, first:end], cache.sin[:, :, first:end]
        mask = cache.mask[:, :, first:end]
        for layer, keys, values in zip(self.model.layers, cache.keys, cache.values):
            x = layer(x, cos, sin, mask, [keys, values], span)
        return self.head(x, start, end, offset=first)

    def head(self, hidden: torch.Tensor, start: int, end: int, offset: int = 0) -> torch.Tensor:
        """Logits of positions `start:end` from the hidden states `[B, W, H]` of positions
        `offset:offset + W`. With `shift_logits` (Dream) the logit for position i comes
        from position i-1, and position 0 keeps its own (always a prompt token, never
        predicted), so the hidden states must start at `start - 1` (or at 0)."""
        if self.config.shift_logits:
            h = hidden[:, max(start - 1, 0) - offset:end - 1 - offset]
            if start == 0:
                h = torch.cat([hidden[:, :1], h], dim=1)
        else:
            h = hidden[:, start - offset:end - offset]
        return self.lm_head(self.model.norm(h))

    def forward_spans(self, spans: Sequence[tuple[torch.Tensor, KVCache, int, int]]) -> list[torch.Tensor]:
        """`forward_span` of several cached sequences in one pass: `(input_ids, cache,
        start, end)` each, of any lengths and span widths (each may hold several rows).
        Spans are right-padded to the widest and caches to the longest; a padded query
        attends only to a scratch column that no real query sees. Returns each one's
        logits; each cache's entries for its span are replaced, as `forward_span` does."""
        cfg = self.config
        firsts = [start - 1 if cfg.shift_logits and start > 0 else start for _, _, start, _ in spans]
        widths = [end - first for (_, _, _, end), first in zip(spans, firsts)]
        counts = [ids.shape[0] for ids, _, _, _ in spans]
        batch, width = sum(counts), max(widths)
        length = max(cache.length for _, cache, _, _ in spans) + 1  # the last column: scratch
        first_cache = spans[0][1]
        device, dtype = first_cache.keys[0].device, first_cache.keys[0].dtype
        ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        code_index = torch.full((batch, width), -1, dtype=torch.long, device=device)
        embeds_images = bool(cfg.image_position_embeddings)
        cos = first_cache.cos.new_zeros(batch, 1, width, cfg.head_dim)
        sin = torch.zeros_like(cos)
        mask = torch.zeros(batch, 1, width, length, dtype=torch.bool, device=device)
        where = torch.full((batch, width), length - 1, dtype=torch.long, device=device)
        shape = (batch, first_cache.keys[0].shape[1], length, cfg.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.model.layers]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.model.layers]
        row = 0
        for (input_ids, cache, _, end), first, w, n in zip(spans, firsts, widths, counts):
            rows, cached = slice(row, row + n), cache.length
            ids[rows, :w] = input_ids[:, first:end]
            if embeds_images:
                code_index[rows, :w] = self.image_index(input_ids)[:, first:end]
            cos[rows, :, :w], sin[rows, :, :w] = cache.cos[:, :, first:end], cache.sin[:, :, first:end]
            mask[rows, :, :w, :cached] = cache.mask[:, :, first:end]
            mask[rows, :, w:, -1] = True
            where[rows, :w] = torch.arange(first, end, device=device)
            for layer in range(len(keys)):
                keys[layer][rows, :, :cached] = cache.keys[layer]
                values[layer][rows, :, :cached] = cache.values[layer]
            row += n
        x = self.embed(ids, code_index)
        for layer, k, v in zip(self.model.layers, keys, values):
            x = layer(x, cos, sin, mask, [k, v], where)
        out, row = [], 0
        for (_, cache, start, end), first, w, n in zip(spans, firsts, widths, counts):
            rows = slice(row, row + n)
            row += n
            for layer in range(len(keys)):
                cache.keys[layer][:, :, first:end] = keys[layer][rows, :, first:end]
                cache.values[layer][:, :, first:end] = values[layer][rows, :, first:end]
            out.append(self.head(x[rows, :w], start, end, offset=first))  # no logits for padding
        return out

    def image_index(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """`image_code_index` of `input_ids` when the model embeds image positions, else None."""
        cfg = self.config
        if not cfg.image_position_embeddings:
            return None
        return image_code_index(input_ids, cfg.image_start_token_id, cfg.image_end_token_id)

    def embed(self, input_ids: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, plus each image code's place (`image_position_embeddings`)."""
        x = self.model.embed_tokens(input_ids)
        if not self.config.image_position_embeddings:
            return x
        if image_index is None:
            image_index = self.image_index(input_ids)
        inside = (image_index >= 0) & (image_index < self.config.image_position_embeddings)
        table = self.model.embed_image_positions(torch.where(inside, image_index, torch.zeros_like(image_index)))
        return x + table * inside[..., None].to(table.dtype)

    def set_attention(self, kernel: str) -> "Transformer":
        """`sdpa` or `flex` for packed documents (see `attention`)."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention {kernel!r}: one of {', '.join(ATTENTION_KERNELS)}")
        self.attention = kernel
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> "Transformer":
        """Recompute each block in the backward pass (less memory, ~30% more compute)."""
        self.gradient_checkpointing = enabled
        return self

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ init
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Normal(0, initializer_range) linears/embeddings, zero biases, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
        return self

    def resize_vocab(self, new_size: int, seed: int = 0) -> "Transformer":
        """Grow (or shrink) the embedding and output rows to `new_size`.

        Existing rows are kept. New rows are drawn from a Gaussian with the mean and
        covariance-free per-dimension spread of the existing rows (the "mean resizing"
        of Hewitt 2021): a new token starts as a plausible average token, so the
        pretrained model's outputs barely move until it is trained on the new codes.
        """
        old = self.config.vocab_size
        if new_size == old:
            return self
        gen = torch.Generator().manual_seed(seed)

        def grow(weight: torch.Tensor) -> torch.Tensor:
            out = weight.new_empty(new_size, weight.shape[1])
            keep = min(old, new_size)
            out[:keep] = weight[:keep]
            if new_size > old:
                w = weight.float()
                mean, std = w.mean(0), w.std(0) if old > 1 else torch.zeros_like(w[0])
                noise = torch.randn(new_size - old, w.shape[1], generator=gen)
                out[old:] = (mean + 0.1 * std * noise.to(w.device)).to(weight.dtype)
            return out

        with torch.no_grad():
            embed = nn.Embedding(new_size, self.config.hidden_size,
                                 device=self.model.embed_tokens.weight.device,
                                 dtype=self.model.embed_tokens.weight.dtype)
            embed.weight.copy_(grow(self.model.embed_tokens.weight))
            self.model.embed_tokens = embed
            head = nn.Linear(self.config.hidden_size, new_size, bias=False,
                             device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
            if self.config.tie_word_embeddings:
                head.weight = embed.weight
            else:
                head.weight.copy_(grow(self.lm_head.weight))
            self.lm_head = head
        self.config = self.config.replace(vocab_size=new_size)
        return self

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_config(cls, config: TransformerConfig, seed: int | None = 0) -> "Transformer":
        return cls(config).init_weights(seed)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu",
                        **overrides: Any) -> "Transformer":
        """Load a Dream/Qwen2-layout folder strictly (every tensor named and shaped).

        Accepts a single `model.safetensors` or a sharded set with
        `model.safetensors.index.json`. The module is built on the meta device and
        the tensors are assigned, so a 7B checkpoint needs one copy of its weights in
        memory, not two. `overrides` replace config fields (e.g. `shift_logits=True`).
        """
        path = Path(path)
        config = TransformerConfig.from_json(path / CONFIG_FILE)
        if overrides:
            config = config.replace(**overrides)
        return cls.from_state(config, load_safetensors_folder(path, device), dtype, where=str(path))

    @classmethod
    def from_state(cls, config: TransformerConfig, state: dict[str, torch.Tensor],
                   dtype: torch.dtype | None = None, where: str = "the state dict") -> "Transformer":
        """A model of `config` holding exactly the tensors of `state` (every name and shape
        checked; `state` is consumed)."""
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()
                    if not (config.tie_word_embeddings and k == "lm_head.weight")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
        if missing or unexpected or wrong:
            raise ValueError(f"checkpoint {where} does not match its config: missing={missing[:5]} "
                             f"unexpected={unexpected[:5]} wrong_shape={wrong[:5]}")
        model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        logger.info("loaded %s (%.1fM parameters)", where, model.num_parameters / 1e6)
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` in the layout `from_pretrained` reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return path


def load_safetensors_folder(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a folder's `model.safetensors` or of the shards its index names."""
    index = path / WEIGHTS_INDEX_FILE
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        shard = (path / name).resolve()
        if path.resolve() not in shard.parents:
            raise ValueError(f"weight shard {name!r} escapes the checkpoint folder {path}")
        state.update(load_file(str(shard), device=str(device)))
    return state

