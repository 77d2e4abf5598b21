"""A bidirectional transformer in the Dream / Qwen2 layout.

RMSNorm, rotary position embeddings (rotate-half form, `rope.py`), grouped-query
attention with q/k/v biases, SwiGLU MLP, untied (or tied) embeddings, and *no* causal
mask: every position attends to every other one in its document, which is what a masked
diffusion model needs. Parameter names equal Hugging Face's Qwen2/Dream names, so a
Dream-7B folder (`config.json` + `model*.safetensors`, `model_folder.py`) loads strictly
and `save_pretrained` writes a folder the same loaders read.

Written for one device; data/model parallelism (DDP, DeepSpeed) is applied by
`pipelines/train/`, never here. Beside it: `spans.py` (recomputing spans against cached
keys and values, for the sampler), `vocab_resize.py` (a backbone gaining code rows).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni_model import model_folder
from omni_model.activations import ACTIVATIONS
from omni_model.config import with_extra
from omni_model.rope import rope_parameters, rotary_cos_sin, rotate_half
from omni_model.spans import KVCache, forward_span, forward_spans

logger = logging.getLogger(__name__)


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
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
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
                inputs_embeds: torch.Tensor | None = None, logits_columns: torch.Tensor | None = None,
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
            logits_columns: ids (1-D, ascending): the logits' last dimension holds these
                ids' logits only, in that order (a t2i step's 8,192 image codes, not 176k).
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
            return self.lm_head(self.model.norm(x[rows, self.logit_source(cols)]))
        logits = self.head(x, *(logits_range or (0, input_ids.shape[1])), columns=logits_columns)
        if not return_cache:
            return logits
        if mask is None:
            mask = torch.ones(1, 1, input_ids.shape[1], input_ids.shape[1], dtype=torch.bool, device=x.device)
        return logits, KVCache([k for k, _ in kv], [v for _, v in kv], mask, cos, sin)

    def forward_span(self, input_ids: torch.Tensor, cache: KVCache, start: int, end: int,
                     logits_columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of positions `start:end` against `cache` (`omni_model.spans.forward_span`)."""
        return forward_span(self, input_ids, cache, start, end, logits_columns)

    def forward_spans(self, spans: Sequence[tuple[torch.Tensor, KVCache, int, int]]) -> list[torch.Tensor]:
        """Several cached sequences' spans in one pass (`omni_model.spans.forward_spans`)."""
        return forward_spans(self, spans)

    def logit_source(self, positions: int | torch.Tensor) -> int | torch.Tensor:
        """The positions whose hidden states give the logits of `positions` (an int or a
        tensor). With `shift_logits` (Dream) position i's logit comes from position i-1 and
        position 0 keeps its own (always a prompt token, never predicted); otherwise each
        its own."""
        if not self.config.shift_logits:
            return positions
        if isinstance(positions, torch.Tensor):
            return (positions - 1).clamp(min=0)
        return max(positions - 1, 0)

    def head(self, hidden: torch.Tensor, start: int, end: int, offset: int = 0,
             columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of positions `start:end` from the hidden states `[B, W, H]` of positions
        `offset:offset + W`. With `shift_logits` (Dream) the logit for position i comes
        from position i-1, and position 0 keeps its own (always a prompt token, never
        predicted), so the hidden states must start at `start - 1` (or at 0). With
        `columns`, only those ids' rows of the output layer are multiplied."""
        if self.config.shift_logits:
            h = hidden[:, self.logit_source(start) - offset:end - 1 - offset]
            if start == 0:
                h = torch.cat([hidden[:, :1], h], dim=1)
        else:
            h = hidden[:, start - offset:end - offset]
        if columns is None:
            return self.lm_head(self.model.norm(h))
        return F.linear(self.model.norm(h), self.lm_head.weight.index_select(0, columns))

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
        config = TransformerConfig.from_dict(model_folder.read_config(path))
        if overrides:
            config = config.replace(**overrides)
        return cls.from_state(config, model_folder.read_weights(path, device), dtype, where=str(path))

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
        model_folder.write_weights(path, state)
        model_folder.write_config(path, self.config.to_dict())
        return path

