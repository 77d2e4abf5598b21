"""The iterative unmasking sampler of masked discrete diffusion, and its strategies.

Knows token ids only (the vocab for ranges and specials), never text or media.

Start from an all-mask response of the requested layout; at each of K steps predict
every masked position, commit the most confident predictions and keep the rest masked
("low-confidence remasking", LLaDA sec. 2.4 and Algorithm 5). The number committed per
step follows a linear schedule: the masked count falls linearly from all to none over
the K steps (LLaDA's `get_num_transfer_tokens`). Each response region's logits are
restricted to its modality's ids, so an image region can only ever hold image codes.

Strategies (all in `SamplerConfig`, all vectorised over the batch):

- confidence: top-1 probability, margin (top-1 minus top-2), negative entropy, or random
  order;
- position penalty: lowers the confidence of later positions of an image region (a ramp
  from 1 at `position_penalty_start` to `position_penalty` at the region's end), faded
  out as the masks are filled, so an image is not decoded from both ends at once;
- repetition penalty: ids the row has already committed become less likely (CTRL style);
- special-token pre-infilling: `spoken_layout` fixes `boa` at a chosen fraction of a
  spoken answer, so text and speech each get their region; fixed tokens are never
  remasked;
- semi-autoregressive blocks: the masked positions in blocks of `block_length`, left to
  right, the steps split between the blocks (a block takes at least one step, so blocks
  are widened until there are no more of them than steps: `steps` bounds the forward
  passes whatever `block_length` says);
- classifier-free guidance: an unconditional prompt per row runs in the same forward
  batch; `cfg_scale` 0 is the plain sampler;
- confidence-threshold parallel decoding (Fast-dLLM): every masked position whose
  top-1 probability exceeds `threshold` is committed in the same step, at least as many as the
  linear schedule asks, so confident content takes fewer steps; `steps` stays the
  upper bound. `text_threshold`, `image_threshold`, `speech_threshold` set it per region
  modality (the model is surer of some than of others); `factor` is Fast-dLLM's factor
  rule instead: the n most confident positions are committed while the n-th confidence
  is at least `1 - factor / (n + 1)`;
- early stop: once the final text or speech region commits its end (`im_end`, or `eoa`
  then `im_end`), its masked positions after the end become the tail pads the model
  learned, at once, and the steps the block had left shrink in proportion: no passes
  are spent on padding;
- key-value caches (Fast-dLLM): `cache="prefix"` computes the keys and values of the
  prompt (and of the blocks before the current one) in a full pass, then recomputes only
  the rest of the response against them; `cache="dual"` recomputes only the current
  block, caching what lies after it too. A full pass refreshes the cache every
  `cache_refresh` steps and whenever a row enters a new block; `cache_refresh=1` is the
  uncached sampler exactly.

Every random draw comes from a generator seeded per row (`seeds`), so a row's output does
not depend on the rows it was batched with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omni_model.spans import KVCache
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab

#: Specials a region of each modality may emit besides its own ids: a text or speech
#: response can end early (close the turn, then tail pads; speech closes its audio).
_REGION_EXTRA_SPECIALS = {
    "text": ("im_end", "pad"),
    "image": (),
    "speech": ("eoa", "im_end", "pad"),
}


@dataclass(frozen=True)
class Region:
    """One span of the response: `length` positions of `modality`."""

    modality: str
    length: int

    def __post_init__(self) -> None:
        if self.modality not in _REGION_EXTRA_SPECIALS:
            raise ValueError(f"unknown modality {self.modality!r}")
        if self.length < 1:
            raise ValueError("a region needs at least one position")


@dataclass(frozen=True)
class Layout:
    """The response skeleton: fixed structural tokens and masked positions.

    Built by `make_layout`. An image region is `boi [length masks] eoi`, a speech
    region `boa [length masks]`, a text region `[length masks]`; a layout that ends
    with an image closes the turn with a fixed `im_end`.
    """

    regions: tuple[Region, ...]
    template: torch.Tensor  #: `[R]` initial response ids (mask id where to fill)
    region_index: torch.Tensor  #: `[R]` region of each position, -1 for fixed tokens
    allowed: torch.Tensor  #: `[n_regions, V]` bool, ids each region may hold
    mask_id: int
    pad_id: int = -1  #: the tail pad, im_end and eoa (for early stop)
    im_end_id: int = -1
    eoa_id: int = -1

    @property
    def length(self) -> int:
        return self.template.numel()

    @property
    def num_masked(self) -> int:
        return int((self.template == self.mask_id).sum())


def make_layout(vocab: Vocab, regions: Sequence[Region]) -> Layout:
    """Build the response skeleton for `regions` under `vocab`."""
    if not regions:
        raise ValueError("a layout needs at least one region")
    ids: list[int] = []
    index: list[int] = []
    for i, region in enumerate(regions):
        if region.modality == "image":
            ids.append(vocab.boi_id), index.append(-1)
        elif region.modality == "speech":
            ids.append(vocab.boa_id), index.append(-1)
        ids += [vocab.mask_id] * region.length
        index += [i] * region.length
        if region.modality == "image":
            ids.append(vocab.eoi_id), index.append(-1)
    if regions[-1].modality == "image":
        ids.append(vocab.im_end_id), index.append(-1)
    allowed = torch.stack([vocab.allowed_mask(r.modality, _REGION_EXTRA_SPECIALS[r.modality])
                           for r in regions])
    return Layout(tuple(regions), torch.tensor(ids, dtype=torch.long),
                  torch.tensor(index, dtype=torch.long), allowed, vocab.mask_id, vocab.pad_id,
                  vocab.im_end_id, vocab.eoa_id)


CONFIDENCES = ("probability", "margin", "entropy", "random")
CACHES = ("none", "prefix", "dual")
#: a request's steps work on the columns of the ids its regions may hold when these are
#: at most this share of the vocabulary (below it, the gather costs less than it saves)
NARROW_SHARE = 0.5


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 32  #: K, denoising steps (the most; capped at the number of masked positions)
    temperature: float = 0.0  #: 0 = greedy (argmax) predictions
    top_k: int | None = None  #: keep the k most likely ids before sampling
    top_p: float | None = None  #: nucleus: keep the smallest set with mass >= top_p
    seed: int = 0  #: seeds every random draw; same seed, same output
    confidence: str = "probability"  #: probability | margin | entropy | random
    position_penalty: float = 1.0  #: >1 lowers later image positions' confidence; 1 = off
    position_penalty_start: int = 0  #: positions of an image region before the ramp starts
    repetition_penalty: float = 1.0  #: >1 discourages ids already committed in the row
    block_length: int | None = None  #: semi-autoregressive blocks of masked positions
    cfg_scale: float = 0.0  #: classifier-free guidance; 0 = off (needs unconditional prompts)
    threshold: float | None = None  #: commit every position above this confidence (Fast-dLLM)
    text_threshold: float | None = None  #: `threshold` for text regions; None: `threshold`
    image_threshold: float | None = None
    speech_threshold: float | None = None
    factor: float | None = None  #: Fast-dLLM's factor rule (e.g. 1.0); None: off
    early_stop: bool = False  #: fill a final text/speech region with pads once its end is committed
    cache: str = "none"  #: none | prefix | dual
    cache_refresh: int = 4  #: steps between full passes that refresh the cache (1: exact)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, not {self.confidence!r}")
        if self.position_penalty < 1 or self.repetition_penalty < 1:
            raise ValueError("position_penalty and repetition_penalty must be >= 1 (1 = off)")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError("block_length must be at least 1")
        if self.cfg_scale < 0:
            raise ValueError("cfg_scale must be >= 0")
        for name in ("threshold", "text_threshold", "image_threshold", "speech_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.factor is not None and self.factor <= 0:
            raise ValueError("factor must be > 0")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, not {self.cache!r}")
        if self.cache_refresh < 1:
            raise ValueError("cache_refresh must be at least 1")

    def threshold_for(self, modality: str) -> float | None:
        """The confidence threshold of a region of `modality` (None: none)."""
        own = getattr(self, f"{modality}_threshold")
        return own if own is not None else self.threshold


def spoken_layout(vocab: Vocab, length: int, boa_fraction: float = 0.2) -> Layout:
    """A spoken answer (text then speech) of `length` positions with `boa` pre-infilled.

    The text region takes `round(boa_fraction * length)` positions and the speech region
    the rest, `boa` fixed between them (the published recipe puts it at 20-25%).
    """
    if not 0 < boa_fraction < 1:
        raise ValueError("boa_fraction must be in (0, 1)")
    text = min(length - 2, max(1, round(boa_fraction * length)))
    if text < 1:
        raise ValueError("a spoken answer needs at least 3 positions")
    return make_layout(vocab, [Region("text", text), Region("speech", length - 1 - text)])


def transfer_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each step: `num_masked` split evenly, remainder first."""
    return split_evenly(num_masked, max(1, min(steps, num_masked)))


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares that differ by at most one, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (the most likely id always stays)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this id
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _left_pad(prompts: torch.Tensor | Sequence[torch.Tensor], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts if prompts.dim() == 2 else prompts[None]
        return prompts.to(device), torch.ones_like(prompts, dtype=torch.long, device=device)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        p = torch.as_tensor(p, dtype=torch.long)
        ids[row, width - len(p):] = p
        attn[row, width - len(p):] = 1
    return ids.to(device), attn.to(device)


@dataclass
class Generated:
    """What `sample` returns."""

    ids: torch.Tensor  #: `[B, R]` response ids: the template with every mask filled
    steps: list[int]  #: forward passes each row needed
    committed: torch.Tensor  #: `[B, R]` the step at which each position was committed (-1 fixed)


class _Plan:
    """Where each masked position sits: its block and, in image regions, its ramp."""

    def __init__(self, layout: Layout, config: SamplerConfig, device: torch.device) -> None:
        masked = layout.template == layout.mask_id
        order = torch.cumsum(masked.long(), 0) - 1  # index among the masked positions
        size = max(config.block_length or layout.num_masked, math.ceil(layout.num_masked / config.steps), 1)
        self.block = torch.where(masked, order // size, -1).to(device)  # [R]
        self.n_blocks = int(self.block.max()) + 1
        # steps per block: the total split evenly (at least one per block)
        self.block_steps = torch.tensor(
            [max(1, s) for s in split_evenly(config.steps, self.n_blocks)], device=device)
        ramp = torch.zeros(layout.length)
        for r, region in enumerate(layout.regions):
            if region.modality != "image" or config.position_penalty == 1:
                continue
            pos = torch.arange(region.length, dtype=torch.float)
            span = max(1, region.length - config.position_penalty_start)
            ramp[layout.region_index == r] = ((pos - config.position_penalty_start) / span).clamp(0, 1)
        self.ramp = ramp.to(device)  # [R] 0..1
        # where each block starts and ends (response positions), for the caches' spans
        pos, inside = torch.arange(layout.length, device=device), self.block >= 0
        self.block_start = torch.full((self.n_blocks,), layout.length, device=device).scatter_reduce(
            0, self.block[inside], pos[inside], "amin")
        self.block_end = torch.zeros(self.n_blocks, dtype=torch.long, device=device).scatter_reduce(
            0, self.block[inside], pos[inside] + 1, "amax")
        # the confidence above which a position is committed at once (inf: none)
        limits = [config.threshold_for(r.modality) for r in layout.regions]
        self.thresholds = None
        if any(t is not None for t in limits):
            per_region = torch.tensor([t if t is not None else float("inf") for t in limits])
            self.thresholds = torch.where(layout.region_index >= 0, per_region[layout.region_index.clamp(min=0)],
                                          float("inf")).to(device)  # [R]
        # the final region, when it is text or speech, may end early (early stop)
        last = len(layout.regions) - 1
        self.end_region = None
        if config.early_stop and layout.regions[-1].modality in ("text", "speech"):
            self.end_region = (layout.region_index == last).to(device)  # [R] bool
            self.end_modality = layout.regions[-1].modality


class Denoiser:
    """The state of one sampling call between steps: rows that share a layout and
    sampler options, each with its own prompt and seed. Its methods are the sampler's
    step API; the state changes through them only.

    A step is `begin()` (which positions this step predicts, `[a, b)` of the response,
    and whether it is a full pass), a forward pass made by the caller, then
    `advance(logits)` with the logits of those positions (conditional rows, then the
    unconditional ones with `cfg_scale > 0`). The pass: a full one over `inputs()`, whose
    cache (with `config.cache`) the caller hands back with `keep_cache`; between
    refreshes, a span pass over `span(a, b)` against that cache. `sample` drives one
    (`forward_window`); a scheduler can drive many, sharing forward passes between them:
    `inputs(left, right)` pads the rows into a pass shared with longer prompts or
    responses, and `keep_cache(cache, (left, right))` says so.
    """

    def __init__(self, prompt_ids: torch.Tensor | Sequence[torch.Tensor], layout: Layout,
                 config: SamplerConfig, pad_id: int | None, device: torch.device,
                 uncond_prompt_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 seeds: Sequence[int] | None = None) -> None:
        if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        self.batch = batch = len(prompt_ids)
        if not isinstance(prompt_ids, torch.Tensor) and pad_id is None:
            raise ValueError("prompts of different lengths need pad_id for left padding")
        self.layout, self.config = layout, config
        self.guided = config.cfg_scale > 0
        if self.guided:  # the unconditional rows run in the same forward batch, after the others
            if uncond_prompt_ids is None:
                uncond_prompt_ids = [torch.full_like(torch.as_tensor(p), layout.mask_id) for p in prompt_ids]
            if len(uncond_prompt_ids) != batch:
                raise ValueError("one unconditional prompt per row")
            prompt_ids = [*prompt_ids, *uncond_prompt_ids]
        self.pad_id = pad_id if pad_id is not None else layout.mask_id
        self.prompt, attn = _left_pad(prompt_ids, self.pad_id, device)
        self.plen = self.prompt.shape[1]
        template = layout.template.to(device)
        self.x = torch.cat([self.prompt[:batch], template.expand(batch, -1)], dim=1)
        self.attn = torch.cat([attn, torch.ones(self.prompt.shape[0], layout.length, dtype=attn.dtype,
                                                device=device)], 1)
        # ids each response position may hold, by region ([n_regions, V]; a [R, V] copy
        # would cost the response length x the vocabulary in every request)
        allowed = layout.allowed.to(device)
        # Every step reads the logits only at the ids some region may hold (`columns`,
        # ascending): a t2i answer's 8,192 image codes of the release's 176k ids. The
        # rest are -inf, so each softmax, sort and draw gives what the whole row would.
        columns = allowed.any(0).nonzero().squeeze(1)
        self.columns = columns if len(columns) <= NARROW_SHARE * allowed.shape[1] else None
        self.allowed = allowed if self.columns is None else allowed[:, columns]
        if self.columns is not None:  # id -> its column, len(columns) for ids outside
            self.column_of = torch.full((allowed.shape[1],), len(columns), dtype=torch.long, device=device)
            self.column_of[columns] = torch.arange(len(columns), device=device)
        self.region = layout.region_index.clamp(min=0).to(device)  # [R]
        self.gens = [torch.Generator(device=device).manual_seed(int(s))
                     for s in (seeds if seeds is not None else [config.seed] * batch)]
        if len(self.gens) != batch:
            raise ValueError("one seed per row")
        self.plan = _Plan(layout, config, device)
        self.committed = torch.full((batch, layout.length), -1, dtype=torch.long, device=device)
        self.block_step = torch.zeros(batch, dtype=torch.long, device=device)  # steps spent in the block
        self.budget = torch.zeros(batch, dtype=torch.long, device=device)  # steps the block may take
        self.current = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.step = 0
        self._cache: KVCache | None = None  #: the cache of the last full pass, when `config.cache` uses one
        #: extra left and right padding of its rows in that pass (a scheduler's shared pass)
        self._frame = (0, 0)
        self.since = 0  #: steps since the last full pass
        self._masked_now()

    # ------------------------------------------------------------------ state
    @property
    def response(self) -> torch.Tensor:
        """`[B, R]` the response ids so far (mask id where still to fill)."""
        return self.x[:, self.plen:]

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    @property
    def rows(self) -> int:
        """Rows of the forward batch (twice `batch` with guidance)."""
        return self.prompt.shape[0]

    @property
    def uses_cache(self) -> bool:
        """Whether its full passes keep a cache (`keep_cache`) for span passes (`span`)."""
        return self.config.cache != "none"

    def _masked_now(self) -> None:
        self.masked = self.response == self.layout.mask_id
        self.active = self.masked.any(1)

    def result(self) -> Generated:
        return Generated(self.response, self.steps.tolist(), self.committed)

    # ------------------------------------------------------------------ a step
    def begin(self) -> tuple[int, int, bool]:
        """Start a step: each row moves to its first block with masks; returns the
        response positions `[a, b)` to predict and whether this is a full pass (always
        without a cache; with one, every `cache_refresh` steps and on entering a block)."""
        plan, config = self.plan, self.config
        block_of = torch.where(self.masked, plan.block, plan.n_blocks)
        new_block = block_of.min(1).values
        entered = new_block != self.current
        self.block_step = torch.where(entered, 0, self.block_step)
        self.budget = torch.where(entered, plan.block_steps[new_block.clamp(max=plan.n_blocks - 1)], self.budget)
        self.current = new_block
        self.eligible = self.masked & (plan.block[None] == self.current[:, None])
        self.full = (config.cache == "none" or self._cache is None or bool(entered[self.active].any())
                     or self.since >= config.cache_refresh)
        self.since = 1 if self.full else self.since + 1
        if config.cache == "none":
            self.window = (0, self.layout.length)
        else:
            blocks = self.current[self.active]
            a = int(plan.block_start[blocks].min())
            b = int(plan.block_end[blocks].max()) if config.cache == "dual" else self.layout.length
            self.window = (a, b)
        return (*self.window, self.full)

    def inputs(self, left: int = 0, right: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The full pass's ids `[rows, left + P + R + right]` (the unconditional rows after
        the others) and attention mask: `left` and `right` extra positions of padding
        (pad id, masked out of attention) place the rows in a pass shared with longer
        prompts (left) or responses (right)."""
        ids = self.x if not self.guided else torch.cat(
            [self.x, torch.cat([self.prompt[self.batch:], self.response], 1)])
        attn = self.attn
        if left or right:
            ids = F.pad(ids, (left, right), value=self.pad_id)
            attn = F.pad(attn, (left, right), value=0)
        return ids, attn

    def keep_cache(self, cache: KVCache, frame: tuple[int, int] = (0, 0)) -> None:
        """Hand over the cache of this step's full pass, made over `inputs(*frame)`
        (only these rows: `KVCache.rows` of a shared pass); span passes use it until the
        next full pass."""
        self._cache, self._frame = cache, frame

    def span(self, a: int, b: int) -> tuple[torch.Tensor, KVCache, int, int]:
        """What `Transformer.forward_span` (or, with other spans, `forward_spans`) needs
        for response positions `[a, b)` against the cache of the last full pass: the ids
        in that pass's padding, the cache, and the span's start and end in it."""
        if self._cache is None:
            raise RuntimeError("a span pass needs the cache of a full pass first (keep_cache)")
        ids, _ = self.inputs(*self._frame)
        start = self.plen + self._frame[0]
        return ids, self._cache, start + a, start + b

    def advance(self, logits: torch.Tensor) -> None:
        """Commit this step's positions from the logits of the window `[rows, b - a, V]`."""
        plan, config, layout = self.plan, self.config, self.layout
        a, b = self.window
        response, masked, eligible, active = self.response, self.masked, self.eligible, self.active
        if self.columns is not None and logits.shape[-1] != len(self.columns):  # the whole row's logits
            logits = logits.index_select(-1, self.columns)
        logits = logits.float()
        if self.guided:
            cond, uncond = logits[:self.batch], logits[self.batch:]
            logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
        logits = logits.masked_fill(~self.allowed[self.region[a:b]], float("-inf"))
        if config.repetition_penalty != 1:
            held = response if self.columns is None else self.column_of[response]
            logits = _repetition_penalty(logits, held, ~masked & (plan.block[None] >= 0),
                                         config.repetition_penalty)
        x0, confidence, prob = _predict(logits, config, self.gens, a, layout.length)
        if self.columns is not None:
            x0 = self.columns[x0]
        score = _position_penalty(confidence, plan.ramp[a:b], masked, layout, config)
        window = eligible[:, a:b]
        score = score.masked_fill(~window, float("-inf"))
        # the linear schedule's share of this block for this row ...
        steps_left = (self.budget - self.block_step).clamp(min=1)
        n = torch.ceil(eligible.sum(1).float() / steps_left.float()).long()
        # ... or more, every position the model is sure enough of
        if plan.thresholds is not None:
            n = torch.maximum(n, (window & (prob > plan.thresholds[a:b])).sum(1))
        if config.factor is not None:
            n = torch.maximum(n, _factor_count(prob, window, config.factor))
        n = torch.where(active, n.clamp(min=1), 0)
        rank = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
        commit = torch.zeros_like(masked)
        commit[:, a:b] = (rank < n[:, None]) & window
        filled = response.clone()
        filled[:, a:b] = x0
        self.x[:, self.plen:] = torch.where(commit, filled, response)
        self.committed = torch.where(commit, self.step, self.committed)
        if plan.end_region is not None:
            self._end_early(eligible & ~commit)
        self.block_step += active.long()
        self.steps += active.long()
        self.step += 1
        self._masked_now()

    def _end_early(self, remaining: torch.Tensor) -> None:
        """Early stop: the tail after a committed end filled at once; the block's
        remaining steps shrink with its remaining masks."""
        ended = _end_early(self.response, self.plan, self.layout)
        if not ended.any():
            return
        self.x[:, self.plen:] = torch.where(ended, _tail(self.response, self.plan, self.layout), self.response)
        self.committed = torch.where(ended, self.step, self.committed)
        before, after = remaining.sum(1), (remaining & ~ended).sum(1)
        left = self.budget - self.block_step - 1
        shrunk = self.block_step + 1 + torch.ceil(left * after / before.clamp(min=1)).long()
        self.budget = torch.where(ended.any(1), shrunk, self.budget)


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: torch.Tensor | Sequence[torch.Tensor], layout: Layout,
           config: SamplerConfig = SamplerConfig(), pad_id: int | None = None,
           uncond_prompt_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
           seeds: Sequence[int] | None = None,
           on_step: Callable[[int, torch.Tensor], None] | None = None) -> Generated:
    """Fill the layout's masked positions for each prompt.

    Args:
        model: maps `(input_ids, attention_mask=..., logits_range=(start, end))` to the
            logits `[B, end - start, V]` of those positions (the Transformer applies the
            Dream shift itself); with a cache, a `Transformer` (`return_cache`,
            `forward_span`).
        prompt_ids: `[B, P]`, or a list of 1-D prompts of different lengths (left-padded
            with `pad_id` and masked out of attention).
        layout: the response skeleton from `make_layout` or `spoken_layout`.
        config: the strategies above.
        uncond_prompt_ids: one unconditional prompt per row, for `cfg_scale > 0`; without
            them every prompt id is replaced by the mask id (as LLaDA does).
        seeds: one seed per row; `config.seed` for every row when not given.
        on_step: called after every step with `(step, response ids [B, R])` (progress).
    """
    device = next(model.parameters()).device
    state = Denoiser(prompt_ids, layout, config, pad_id, device, uncond_prompt_ids, seeds)
    was_training = model.training
    model.eval()
    try:
        while not state.done:
            a, b, full = state.begin()
            state.advance(forward_window(model, state, a, b, full))
            if on_step is not None:
                on_step(state.step, state.response)
    finally:
        model.train(was_training)
    return state.result()


def forward_window(model: nn.Module, state: Denoiser, a: int, b: int, full: bool) -> torch.Tensor:
    """Logits of response positions `[a, b)` for one `Denoiser`, alone: a full pass
    (its cache handed to the state when it uses one) or only those positions against
    its cache."""
    # a Transformer computes the logits of the request's columns only (other models: all)
    columns = {}
    if state.columns is not None and isinstance(model, Transformer):
        columns = {"logits_columns": state.columns}
    if full or not state.uses_cache:
        ids, attn = state.inputs()
        window = (state.plen + a, state.plen + b)
        if not state.uses_cache:
            return model(ids, attention_mask=attn, logits_range=window, **columns)
        logits, cache = model(ids, attention_mask=attn, return_cache=True, logits_range=window, **columns)
        state.keep_cache(cache)
        return logits
    return model.forward_span(*state.span(a, b), **columns)


def _factor_count(prob: torch.Tensor, eligible: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule: the largest n such that each of the n most confident
    eligible positions has probability >= 1 - factor / (its rank + 1), at least one."""
    ranked = prob.masked_fill(~eligible, -1.0).sort(dim=1, descending=True).values
    ranks = torch.arange(1, prob.shape[1] + 1, device=prob.device, dtype=prob.dtype)
    ok = ranked >= 1 - factor / (ranks + 1)
    ok[:, 0] = True
    return torch.cumprod(ok.long(), dim=1).sum(1)


def _end_early(response: torch.Tensor, plan: _Plan, layout: Layout) -> torch.Tensor:
    """`[B, R]` bool: the masked positions of the final region after its committed end."""
    ends = (response == layout.im_end_id)
    if plan.end_modality == "speech":
        ends |= response == layout.eoa_id
    ends &= plan.end_region[None]
    pos = torch.arange(response.shape[1], device=response.device)
    first = torch.where(ends, pos, response.shape[1]).min(1).values  # [B]
    return plan.end_region[None] & (pos[None] > first[:, None]) & (response == layout.mask_id)


def _tail(response: torch.Tensor, plan: _Plan, layout: Layout) -> torch.Tensor:
    """What follows an end: pads, after an `eoa` first the turn's `im_end` (as trained)."""
    tail = torch.full_like(response, layout.pad_id)
    if plan.end_modality == "speech":
        eoa = (response == layout.eoa_id) & plan.end_region[None]
        after_eoa = torch.zeros_like(eoa)
        after_eoa[:, 1:] = eoa[:, :-1]
        tail = torch.where(after_eoa, layout.im_end_id, tail)
    return tail


def generate(model: nn.Module, prompt_ids: torch.Tensor | Sequence[torch.Tensor],
             layout: Layout, config: SamplerConfig = SamplerConfig(),
             pad_id: int | None = None, **kwargs) -> torch.Tensor:
    """`sample(...)` returning only the `[B, R]` response ids."""
    return sample(model, prompt_ids, layout, config, pad_id, **kwargs).ids


def _repetition_penalty(logits: torch.Tensor, response: torch.Tensor, filled: torch.Tensor,
                        penalty: float) -> torch.Tensor:
    """Divide positive and multiply negative logits of ids the row already holds."""
    vocab_size = logits.shape[-1]
    seen = torch.zeros(logits.shape[0], vocab_size + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(filled, response, vocab_size), True)  # column V: unfilled
    seen = seen[:, None, :vocab_size]
    return torch.where(seen & (logits > 0), logits / penalty,
                       torch.where(seen, logits * penalty, logits))


def _position_penalty(confidence: torch.Tensor, ramp: torch.Tensor, masked: torch.Tensor,
                      layout: Layout, config: SamplerConfig) -> torch.Tensor:
    """Scale confidences down along the ramp; fades as the row's masks are filled."""
    if config.position_penalty == 1:
        return confidence
    remaining = masked.sum(1, keepdim=True).float() / max(1, layout.num_masked)  # [B, 1]
    factor = 1 + (config.position_penalty - 1) * ramp[None] * remaining  # [B, R] >= 1
    # "lower" for both signs: probabilities shrink, negative entropies grow more negative
    return torch.where(confidence >= 0, confidence / factor, confidence * factor)


def _predict(logits: torch.Tensor, config: SamplerConfig, gens: list[torch.Generator], offset: int = 0,
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted ids, their confidence (by `config.confidence`) and their probability.

    Confidence is measured on the model's own (modality-restricted) distribution, before
    temperature and top-k/p: those shape which id is drawn, not how sure the model is of
    it (as in LLaDA's sampler). `logits` may cover positions `offset:` of a response of
    `length`: random draws are made for the whole response and sliced, so a row draws
    the same numbers whichever positions a step computes.
    """
    width = logits.shape[1]
    length = length or width
    if config.temperature > 0:
        filtered = filter_logits(logits / config.temperature, config.top_k, config.top_p)
        # One uniform number a position, reproducibly per row, through the inverse of the
        # cumulative distribution of softmax(filtered): an exact draw that costs one
        # number, not one per vocabulary id (Gumbel-max would draw positions x 176k).
        u = torch.stack([torch.rand(length, generator=g, device=filtered.device)
                         for g in gens])[:, offset:offset + width]
        cdf = filtered.softmax(-1).cumsum_(-1)
        # right=True: an id of probability 0 repeats its predecessor's cdf and is never chosen
        x0 = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True).squeeze(-1)
        x0 = x0.clamp_(max=logits.shape[-1] - 1)
    else:
        x0 = logits.argmax(-1)
    probs = logits.softmax(-1)
    prob = probs.gather(-1, x0[..., None]).squeeze(-1)
    if config.confidence == "probability":
        confidence = prob
    elif config.confidence == "margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif config.confidence == "entropy":
        logp = logits.log_softmax(-1)
        confidence = (probs * logp.masked_fill(probs == 0, 0)).sum(-1)  # -H <= 0
    else:
        confidence = torch.stack([torch.rand(length, generator=g, device=logits.device)
                                  for g in gens])[:, offset:offset + width]
    return x0, confidence, prob
