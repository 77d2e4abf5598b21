"""The project's sampler techniques that need more than the official sampler's loop,
applied to it: step-level batching and a cache of the prompt's keys and values. The
other two, a confidence threshold and early stop, are options of the sampler itself
(`OfficialSamplerConfig.threshold`, `early_stop`). All are off unless asked for; what
each changes, measured on the fixture releases, is in docs/release.md
(`benchmarks/release_sampler.py` prints it).

* Step-level batching (`generate_batch`): several requests, each with its own prompt
  length and settings, share one forward pass per step, as `serve/scheduler.py` does for
  the project's sampler. Each request keeps its own loop (`sampler.steps`: its schedule,
  filters, penalties and random draws), so only the logits can differ from its batch-1
  run: prompts are left-padded with zero vectors kept out of attention (positions count
  from each request's first real one). The sums are the same but not always in the same
  order, so logits can differ in the last bits and, where two positions or ids tie that
  closely, so can the ids (measured in docs/release.md): on the fixtures a padded row's
  float32 logits moved by up to 6e-6 (ids all equal), its bfloat16 ones by a unit in the
  last place (the ids of some requests changed); unpadded rows kept theirs to the bit
  there, but on a larger model a batch of 4 copies of a 1,117-position request moved
  them by 8e-7 (the matrix products are blocked differently), which changed 6 of its 16
  ids. `max_padding` splits a step into passes whose padding stays within that share of
  their real positions (the scheduler's rule), so short requests do not compute a long
  one's width (on a CPU a padded position costs as much as a real one); 0 shares passes
  only between requests of one length. A request leaves the batch when its loop ends.
* Prompt cache (`PromptCache`, Fast-dLLM's prefix cache): a full pass every `refresh`
  steps keeps every layer's keys and values; the steps between compute only the
  response positions (and the one before, for Dream's shift) against them. The model
  attends both ways, so the prompt's keys and values depend on the response and go
  stale between refreshes: an approximation, `refresh=1` is exact. The official presets
  decode the whole response as one block, so a cache of what lies after the current
  block (the project's dual cache) has nothing to hold.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from omni_model.release.model import ReleaseModel
from omni_model.release.prompts import ReleasePrompt
from omni_model.release.sampler import Embed, OfficialSamplerConfig, steps
from omni_model.spans import KVCache
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab


@torch.no_grad()
def generate_prompts(model: ReleaseModel, prompts: Sequence[ReleasePrompt],
                     configs: OfficialSamplerConfig | Sequence[OfficialSamplerConfig],
                     features: Sequence[Sequence[torch.Tensor]] | None = None,
                     unconditionals: Sequence[Sequence[int] | None] | None = None, seeds: Sequence[int] | None = None,
                     max_padding: float | None = None) -> list[list[int]]:
    """`ReleaseModel.generate` of several prompts in one batch (`generate_batch`): each
    prompt's speech `features`, guidance prompt and seed (default 42, the official one)."""
    features = features or [()] * len(prompts)
    seeds = seeds or [42] * len(prompts)
    device = model.transformer.lm_head.weight.device
    out = generate_batch(masked_forward(model.transformer), model.transformer.model.embed_tokens,
                         [model.prompt_embeds(p, f) for p, f in zip(prompts, features)], model.vocab, configs,
                         unconditionals, [torch.Generator(device=device).manual_seed(s) for s in seeds], max_padding)
    return [o.tolist() for o in out]


#: logits `[B, L - start, V]` of positions `start:` of vectors `[B, L, H]`, whose key
#: padding is `attention_mask` `[B, L]` (None: none)
MaskedForward = Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor]


def masked_forward(transformer: Transformer) -> MaskedForward:
    """The release backbone as `generate_batch` calls it."""
    def forward(vectors: torch.Tensor, start: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = torch.zeros(vectors.shape[:2], dtype=torch.long, device=vectors.device)
        return transformer(ids, attention_mask=attention_mask, inputs_embeds=vectors,
                           logits_range=(start, vectors.shape[1]))
    return forward


@torch.no_grad()
def generate_batch(forward: MaskedForward, embed: Embed, prompt_embeds: Sequence[torch.Tensor], vocab: Vocab,
                   configs: OfficialSamplerConfig | Sequence[OfficialSamplerConfig],
                   unconditionals: Sequence[Sequence[int] | None] | None = None,
                   generators: Sequence[torch.Generator | None] | None = None,
                   max_padding: float | None = None,
                   on_pass: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """`sampler.generate` of several requests, one forward pass per step for all the
    requests still running. `prompt_embeds`: one `[1, P_i, H]` per request; `configs`
    one for all or one each; `unconditionals`, `generators`: one each (None: none /
    torch's global generator, shared, so then the draws depend on the batch).
    `max_padding`: None, one pass a step whatever the lengths; a share, passes whose
    padded positions are at most `1 + max_padding` times their real ones (0: one pass
    per length; see the module's docstring for what padding changes). `on_pass(rows)`
    is called before each pass. Returns each request's response ids."""
    count = len(prompt_embeds)
    if isinstance(configs, OfficialSamplerConfig):
        configs = [configs] * count
    unconditionals = unconditionals or [None] * count
    generators = generators or [None] * count
    if not len(configs) == len(unconditionals) == len(generators) == count:
        raise ValueError("one config, unconditional prompt and generator per request (or one config for all)")
    runs = [steps(embed, p, vocab, c, u, g) for p, c, u, g in zip(prompt_embeds, configs, unconditionals, generators)]
    results: list[torch.Tensor | None] = [None] * count
    waiting: dict[int, torch.Tensor] = {}  # request -> its next step's input vectors
    for i, run in enumerate(runs):
        _advance(i, run, None, waiting, results)
    while waiting:
        groups = [list(waiting)] if max_padding is None else _buckets(waiting, max_padding)
        for order in groups:
            _pass(forward, order, waiting, runs, configs, results, on_pass)
    return results


def _buckets(waiting: dict[int, torch.Tensor], max_padding: float) -> list[list[int]]:
    """Requests into passes, longest first, each pass's padded positions within
    `1 + max_padding` times its real ones (`serve/scheduler.py`'s rule)."""
    buckets: list[list[int]] = []
    for i in sorted(waiting, key=lambda i: -waiting[i].shape[1]):
        if buckets:
            members = [waiting[j] for j in buckets[-1] + [i]]
            rows = sum(v.shape[0] for v in members)
            real = sum(v.shape[0] * v.shape[1] for v in members)
            if rows * max(v.shape[1] for v in members) <= (1 + max_padding) * real:
                buckets[-1].append(i)
                continue
        buckets.append([i])
    return buckets


def _pass(forward: MaskedForward, order: list[int], waiting: dict, runs: list, configs, results: list,
          on_pass: Callable[[int], None] | None) -> None:
    """One forward pass for the requests `order`, each then takes its step."""
    vectors = [waiting[i] for i in order]
    rows = [v.shape[0] for v in vectors]
    width = max(v.shape[1] for v in vectors)
    padded = torch.cat([F.pad(v, (0, 0, width - v.shape[1], 0)) for v in vectors])
    attention = None
    if any(v.shape[1] != width for v in vectors):
        attention = torch.cat([F.pad(v.new_ones(v.shape[:2], dtype=torch.long), (width - v.shape[1], 0))
                               for v in vectors])
    tail = max(configs[i].max_new_tokens for i in order)  # every response ends at `width`
    if on_pass is not None:
        on_pass(padded.shape[0])
    logits = forward(padded, width - tail, attention)
    at = 0
    for i, n in zip(order, rows):
        _advance(i, runs[i], logits[at:at + n, tail - configs[i].max_new_tokens:], waiting, results)
        at += n


def _advance(i: int, run, logits: torch.Tensor | None, waiting: dict, results: list) -> None:
    try:
        waiting[i] = next(run) if logits is None else run.send(logits)
    except StopIteration as done:
        waiting.pop(i, None)
        results[i] = done.value


class PromptCache:
    """A `sampler.Forward` that keeps every layer's keys and values from a full pass
    and, for `refresh - 1` calls after it, computes only positions `start - 1:` (the
    response and the position Dream's shift scores its first one from) against them.
    One instance serves one request (its cache is that request's). `full` and `spans`
    count the passes of each kind."""

    def __init__(self, transformer: Transformer, refresh: int = 4) -> None:
        if refresh < 1:
            raise ValueError("refresh must be at least 1")
        self.transformer, self.refresh = transformer, refresh
        self.cache: KVCache | None = None
        self.full = self.spans = 0

    @torch.no_grad()
    def __call__(self, vectors: torch.Tensor, start: int) -> torch.Tensor:
        end = vectors.shape[1]
        if self.cache is None or (self.full + self.spans) % self.refresh == 0:
            self.full += 1
            ids = torch.zeros(vectors.shape[:2], dtype=torch.long, device=vectors.device)
            logits, self.cache = self.transformer(ids, inputs_embeds=vectors, return_cache=True,
                                                  logits_range=(start, end))
            return logits
        self.spans += 1
        # `Transformer.forward_span`, from the vectors (the release's prompt holds speech
        # embeddings no id gives; only the response and one prompt position are read here)
        t, cache = self.transformer, self.cache
        first = t.logit_source(start)
        x = vectors[:, first:]
        cos, sin, mask = cache.cos[:, :, first:end], cache.sin[:, :, first:end], cache.mask[:, :, first:end]
        for layer, keys, values in zip(t.model.layers, cache.keys, cache.values):
            x = layer(x, cos, sin, mask, [keys, values], (first, end))
        return t.head(x, start, end, offset=first)
