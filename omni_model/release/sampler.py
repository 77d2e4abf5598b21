"""The released model's own sampler, step for step: `DreamModel.generate` of the
official Omni-Diffusion code, so a request gives the ids the authors' code gives.

How it differs from `omni_model.sampler` (the project's sampler):

* the response is free: `max_new_tokens` masks after the prompt, no regions and no
  per-region vocabulary; the model writes its own markers and end-of-text pads;
* each step predicts every masked position and commits `int(M * (1 - s/t))` of the M
  still masked in the current block (at least one; all at the block's last step) on
  `linspace(1, eps, steps + 1)`, chosen by top-k of a confidence (`alg`: `entropy` =
  negative entropy of the filtered distribution, `topk_margin`, `maskgit_plus` = the
  probability, `entropy-penalty` = entropy after the repetition rule; `origin` commits
  each position with probability `1 - s/t` instead); `alg_temp` > 0 draws the committed
  positions from a softmax of the confidence;
* filters and penalties act on the logits in the official order: temperature, top-p,
  top-k, the repetition rule (every id already in the sequence other than 0 and the
  mask: negative logits times `repeat_penalty`, positive ones divided by it), then the
  position penalty (the masked positions after the first 100 get a ramp from 1 to
  `max_position_penalty` applied the same way);
* `add_boa_token` fixes `<|begin_of_audio|>` at `prompt + int(0.2 N)`;
* classifier-free guidance (`cfg`) exists for speech-to-image and text-to-image only,
  with the unconditional prompt the official code builds (`unconditional_prompt`), run
  in the same forward pass as a second row without attention mask, combined position by
  position as `u + (cfg + 1) (c - u)`;
* blocks of `block_size` positions are decoded left to right, each with its share of
  the steps; one request at a time (batch 1).

Options that are not the official code's (all off by default, where the ids are the
official ones; `omni_model.release.speed` has the other two, step-level batching and a
cache of the prompt's keys and values, and docs/release.md what each changes):

* `threshold`: a step commits at least every position of the block whose chosen id has
  a probability above it (in the distribution the id is drawn from), as the project's
  sampler does (Fast-dLLM); the schedule's count stays the least;
* `early_stop`: once the response holds a committed end (`<|im_end|>` or
  `<|endoftext|>`; after the fixed `<|begin_of_audio|>` with `add_boa_token`), every
  masked position after it that this step predicts as an end too is committed at once.
  The official parse skips those ids, so the answer changes only where the official
  sampler would have gone on otherwise: later written something else there, or, with
  that tail still masked, other ids before the end.

Fewer masks save passes only once fewer positions are masked than steps are left: the
official schedule commits a fraction of what is masked, at least one a step.

`steps` is the loop as a coroutine (it yields each step's input vectors and is sent
their logits), so that drivers other than `generate` can run it.

The arithmetic that decides how many positions a step commits is done in float32
tensors, as in the official code, so the counts are equal too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import torch
import torch.nn.functional as F

from omni_model.vocab import Vocab

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy", "entropy-penalty")
GUIDED_TASKS = ("s2i", "t2i")


@dataclass(frozen=True)
class OfficialSamplerConfig:
    """The official `generate` options (defaults: the official `generate` signature and
    `DreamGenerationConfig`; the per-task settings of the official inference are in
    `INFERENCE_PRESETS` below)."""

    max_new_tokens: int = 512
    steps: int = 512
    alg: str = "entropy"
    temperature: float = 0.2
    top_p: float | None = 0.95
    #: 50 although no official script passes it: `generate` builds its settings from the
    #: model config, which brings transformers' legacy default `top_k=50` with it
    top_k: int | None = 50
    alg_temp: float | None = 0.0
    eps: float = 1e-3
    block_size: int = -1            #: -1: the whole response is one block
    cfg: float = 0.0
    add_boa_token: bool = False
    max_position_penalty: float = 1.0
    repeat_penalty: float = 1.0
    task: str | None = None         #: which unconditional prompt `cfg` uses (s2i, t2i)
    # not in the official code (None / False: the official sampler)
    threshold: float | None = None  #: also commit every position whose id is this probable
    early_stop: bool = False        #: commit the ends predicted after a committed end at once

    def __post_init__(self) -> None:
        if self.alg not in ALGORITHMS:
            raise ValueError(f"alg {self.alg!r}: one of {', '.join(ALGORITHMS)}")
        if self.max_new_tokens < 1 or self.steps < 1:
            raise ValueError("max_new_tokens and steps must be at least 1")
        if self.cfg > 0 and self.task not in GUIDED_TASKS:
            raise ValueError(f"cfg > 0 needs task s2i or t2i (the official code has no unconditional "
                             f"prompt for {self.task!r})")
        if self.block_size == 0 or self.block_size < -1:
            raise ValueError("block_size: a positive number of positions, or -1 for one block")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        if (self.threshold is not None or self.early_stop) and self.alg == "origin":
            raise ValueError("threshold and early_stop rank positions by confidence: not with alg 'origin'")


#: logits of a batch of input vectors `[B, L, H]` for positions `start:` (shifted as the
#: model predicts them), and the embeddings of ids
Forward = Callable[[torch.Tensor, int], torch.Tensor]
Embed = Callable[[torch.Tensor], torch.Tensor]


def sample_tokens(logits: torch.Tensor, config: OfficialSamplerConfig, confidence: str,
                  past: torch.Tensor | None, mask_id: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and chosen id of each row of `logits` `[n, V]` (the masked positions in
    order). `confidence`: `probability`, `margin` or `neg_entropy`; `past`: the sequence
    whose ids the repetition rule penalises (None: no rule this step)."""
    score, x0, _ = _draw(logits, config, confidence, past, mask_id, generator)
    return score, x0


def _draw(logits: torch.Tensor, config: OfficialSamplerConfig, confidence: str, past: torch.Tensor | None,
          mask_id: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_tokens`, and the probability of each chosen id."""
    if config.temperature > 0:
        logits = logits / config.temperature
    if config.top_p is not None and config.top_p < 1:
        logits = _top_p(logits, config.top_p)
    if config.top_k is not None:
        logits = _top_k(logits, config.top_k)
    if past is not None and config.repeat_penalty != 1.0:
        seen = past[(past != 0) & (past != mask_id)].unique()
        if seen.numel():
            cols = logits[:, seen]
            logits[:, seen] = torch.where(cols < 0, cols * config.repeat_penalty, cols / config.repeat_penalty)
    if config.max_position_penalty != 1.0 and logits.shape[0] > 100:
        ramp_len = logits.shape[0] - 100
        ramp = [i / ramp_len * (config.max_position_penalty - 1.0) + 1.0 for i in range(ramp_len)]
        ramp = torch.tensor(ramp).to(logits.dtype).unsqueeze(-1)
        penalty = torch.cat([torch.ones_like(logits[:100, :1]), ramp.to(logits.device)])
        logits = torch.where(logits < 0, logits * penalty, logits / penalty)
    probs = torch.softmax(logits, dim=-1)
    x0 = _categorical(probs, generator) if config.temperature > 0 else None
    if x0 is not None:
        score = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        score, x0 = probs.max(dim=-1)
    prob = score
    if confidence == "margin":
        top = torch.sort(probs, dim=-1, descending=True)[0]
        score = top[:, 0] - top[:, 1]
    elif confidence == "neg_entropy":
        score = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return score, x0, prob


def _categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    """One id per row drawn as `torch.distributions.Categorical(probs).sample()` draws it
    (the official code), from `generator`; None where that distribution would refuse the
    probabilities (its simplex check: non-negative, summing to 1 within 1e-6 after
    normalising, which a float32 or bf16 softmax over a large vocabulary can miss),
    where the official code falls back to the most probable id."""
    normalised = probs / probs.sum(-1, keepdim=True)
    valid = torch.all(normalised >= 0, dim=-1) & ((normalised.sum(-1) - 1).abs() < 1e-6)
    if not bool(valid.all()):
        return None
    return torch.multinomial(normalised, 1, True, generator=generator).T.reshape(probs.shape[:-1])


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1)
    drop = cumulative > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the first token over the threshold
    drop[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, drop)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    drop = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


_CONFIDENCE = {"maskgit_plus": "probability", "topk_margin": "margin", "entropy": "neg_entropy",
               "entropy-penalty": "neg_entropy"}


def boa_position(prompt_length: int, max_new_tokens: int) -> int:
    """Where `add_boa_token` puts `<|begin_of_audio|>` (the official float32 arithmetic)."""
    return int(torch.tensor(prompt_length) + torch.tensor(max_new_tokens) * 0.2)


def generate(forward: Forward, embed: Embed, prompt_embeds: torch.Tensor, vocab: Vocab,
             config: OfficialSamplerConfig, unconditional: Sequence[int] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The response ids `[max_new_tokens]` for one prompt.

    Args:
        forward: `forward(vectors [B, L, H], start)` -> logits `[B, L - start, V]` of
            positions `start:` (Dream's shift applied: position i scored from i - 1).
        embed: token embeddings of ids `[B, L]`.
        prompt_embeds: `[1, P, H]` the prompt's input vectors (speech embeddings
            written in).
        unconditional: the unconditional prompt's ids when `config.cfg > 0`
            (`unconditional_prompt`).
        generator: random draws of `temperature` > 0, `alg_temp` > 0 and `origin`. The
            official code draws from torch's global generator; None does the same, and a
            generator in the same state draws the same numbers.
    """
    run = steps(embed, prompt_embeds, vocab, config, unconditional, generator)
    start = prompt_embeds.shape[1]
    try:
        vectors = next(run)
        while True:
            vectors = run.send(forward(vectors, start))
    except StopIteration as done:
        return done.value


#: what `steps` yields (a step's input vectors), is sent (their logits) and returns (the response)
Steps = Generator[torch.Tensor, torch.Tensor, torch.Tensor]


def steps(embed: Embed, prompt_embeds: torch.Tensor, vocab: Vocab, config: OfficialSamplerConfig,
          unconditional: Sequence[int] | None = None, generator: torch.Generator | None = None) -> Steps:
    """The official sampler as a coroutine (arguments as `generate`'s): it yields each
    step's input vectors `[rows, P + N, H]` (a second row, the unconditional one, with
    `cfg` > 0), is sent their logits of positions `P:` `[rows, N, V]`, and returns the
    response ids `[N]`. Everything but the forward pass happens here, so a driver that
    batches several requests' steps (`omni_model.release.speed`) gives each its own ids."""
    if prompt_embeds.shape[0] != 1:
        raise ValueError("the official sampler takes one request at a time")
    if config.cfg > 0 and not unconditional:
        raise ValueError("cfg > 0 needs the unconditional prompt")
    mask_id = vocab.mask_id
    device = prompt_embeds.device
    P, N = prompt_embeds.shape[1], config.max_new_tokens
    total_steps = min(config.steps, N)
    # the prompt's own ids are never read again (its vectors are): the official code keeps zeros there
    x = torch.cat([torch.zeros(1, P, dtype=torch.long, device=device),
                   torch.full((1, N), mask_id, dtype=torch.long, device=device)], dim=1)
    if config.add_boa_token:
        x[:, boa_position(P, N)] = vocab.boa_id
    ends = _end_ids(vocab, device) if config.early_stop else None
    end_from = boa_position(P, N) - P if config.add_boa_token else 0  # where the answer's end may be
    block_size = N if config.block_size < 0 else config.block_size
    masked = (x == mask_id).sum()
    blocks = int(masked // block_size)
    if blocks * block_size < masked:
        blocks += 1
    confidence_kind = _CONFIDENCE.get(config.alg)
    last: torch.Tensor | None = None  # the sequence after the previous step
    for b in range(blocks):
        in_block = torch.zeros(x.shape[1], dtype=torch.bool, device=device)
        in_block[P + b * block_size:P + (b + 1) * block_size] = True
        block_steps = int(in_block.sum() / (x.shape[1] - P) * total_steps)
        timesteps = torch.linspace(1, config.eps, block_steps + 1, device=device)
        for i in range(block_steps):
            mask_index = x == mask_id
            if not mask_index.any():
                break
            logits = _guided((yield _vectors(embed, x, prompt_embeds, config, unconditional)), config)
            mask_logits = logits[mask_index[:, P:]]
            t, s = timesteps[i], timesteps[i + 1]
            if config.alg == "origin":
                p_transfer = 1 - s / t if i < block_steps - 1 else 1
                x0 = torch.full_like(x[mask_index], mask_id)
                chosen = torch.rand(x0.shape, device=device, generator=generator) < p_transfer
                _, x0[chosen] = sample_tokens(mask_logits[chosen], config, "probability", None, mask_id, generator)
                x[mask_index] = x0
            else:
                use_past = config.alg == "entropy-penalty" and last is not None
                score, x0, prob = _draw(mask_logits, config, confidence_kind, last if use_past else None,
                                        mask_id, generator)
                score = score + torch.where(in_block[mask_index[0]], 0, -torch.inf).to(score.device)
                in_block_masked = (x[:, in_block] == mask_id).sum()
                n = int(in_block_masked * (1 - s / t)) if i < block_steps - 1 else int(in_block_masked)
                n = max(n, 1)
                if config.threshold is not None:
                    n = max(n, int(((prob > config.threshold) & in_block[mask_index[0]]).sum()))
                if not config.alg_temp:
                    _, where = torch.topk(score, n)
                else:
                    weights = F.softmax(score / config.alg_temp, dim=-1)
                    where = torch.multinomial(weights, num_samples=n, generator=generator)
                commit = torch.full_like(x0, mask_id)
                commit[where] = x0[where]
                x[mask_index] = commit
                if ends is not None:
                    predicted = torch.full_like(x, mask_id)
                    predicted[mask_index] = x0
                    _end_early(x[0, P:], predicted[0, P:], ends, end_from, mask_id)
            last = x.clone()
    return x[0, P:]


def _end_ids(vocab: Vocab, device: torch.device) -> torch.Tensor:
    """The ids that end an answer (and that the official parse skips)."""
    names = ("im_end", "pad", "eot")
    return torch.tensor(sorted({vocab.special(n) for n in names if n in vocab.specials}), device=device)


def _end_early(response: torch.Tensor, predicted: torch.Tensor, ends: torch.Tensor, end_from: int,
               mask_id: int) -> None:
    """Early stop, in place: the masked positions after the first committed end (at or
    after `end_from`) that were predicted as ends take those predictions."""
    is_end = torch.isin(response, ends)
    is_end[:end_from] = False
    if not is_end.any():
        return
    first = int(is_end.nonzero()[0])
    tail = torch.zeros_like(is_end)
    tail[first + 1:] = True
    fill = tail & (response == mask_id) & torch.isin(predicted, ends)
    response[fill] = predicted[fill]


def _vectors(embed: Embed, x: torch.Tensor, prompt_embeds: torch.Tensor, config: OfficialSamplerConfig,
             unconditional: Sequence[int] | None) -> torch.Tensor:
    """A step's input vectors: the prompt's and the response's, and with `cfg` > 0 the
    unconditional row as the official code builds it."""
    P = prompt_embeds.shape[1]
    vectors = torch.cat([prompt_embeds, embed(x[:, P:])], dim=1)  # the prompt's ids are placeholders
    if config.cfg <= 0:
        return vectors
    un_ids = torch.cat([torch.tensor([list(unconditional)], dtype=x.dtype, device=x.device), x[:, P:]], dim=1)
    un_vectors = embed(un_ids)
    if un_vectors.shape[1] > vectors.shape[1]:
        raise ValueError(f"the unconditional prompt ({len(unconditional)} ids) is longer than the prompt ({P}): "
                         "the official code cannot guide this request")
    # the official code pads the unconditional row with zero vectors and attends everywhere
    pad = vectors.new_zeros(1, vectors.shape[1] - un_vectors.shape[1], vectors.shape[2])
    return torch.cat([vectors, torch.cat([un_vectors, pad], dim=1)])


def _guided(logits: torch.Tensor, config: OfficialSamplerConfig) -> torch.Tensor:
    """Logits `[1, N, V]` of the response positions (guided when `cfg` > 0)."""
    if config.cfg <= 0:
        return logits
    cond, uncond = logits[:1], logits[1:]
    return uncond + (config.cfg + 1) * (cond - uncond)


def unconditional_prompt(task: str, encode: Callable[[str], list[int]], vocab: Vocab, prompt_length: int,
                         rng: random.Random) -> list[int]:
    """The official unconditional prompt of guided speech-to-image / text-to-image.

    `encode` tokenizes a rendered string with added tokens recognised
    (`ReleaseTokenizer.encode`). For text-to-image the official code fills the prompt's
    length with ids drawn by `random.sample` below the first audio special (`rng` stands
    for its global `random` state; the official inference seeds it with 42 at start-up),
    between an instruction whose line continuation keeps 50 spaces of indentation.
    """
    if task == "s2i":
        return encode("<|im_start|>system\nPlease generate an image based on the input audio.<|im_end|>\n"
                      "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")
    if task == "t2i":
        empty = encode("<|im_start|>user\nGenerate an image based on the provided text description.\n"
                       "<|im_end|>\n<|im_start|>assistant\n")
        fill = prompt_length - len(empty)
        if fill < 0:
            raise ValueError("the prompt is shorter than the official unconditional prompt")
        head = encode("<|im_start|>user\nGenerate an image based on the provided " + " " * 50
                      + "text description.\n")
        return head + rng.sample(range(vocab.boa_id), fill) + encode("<|im_end|>\n<|im_start|>assistant\n")
    raise ValueError(f"no unconditional prompt for task {task!r}; guided tasks: {', '.join(GUIDED_TASKS)}")


#: The official inference's settings per task (`tools/inference.py`): temperature 0,
#: top-p 0.9, and the task's length, steps, confidence rule and penalties.
INFERENCE_PRESETS: dict[str, dict] = {
    "s2i": dict(max_new_tokens=260, steps=260, alg="entropy-penalty", repeat_penalty=1.5,
                max_position_penalty=2.0, cfg=2.0),
    "t2i": dict(max_new_tokens=260, steps=260, alg="entropy-penalty", repeat_penalty=1.2,
                max_position_penalty=2.0),
    "svqa": dict(max_new_tokens=128, steps=128, alg="entropy-penalty", repeat_penalty=1.2, add_boa_token=True),
    "vqa": dict(max_new_tokens=64, steps=64, alg="entropy"),
    "tts": dict(max_new_tokens=50, steps=25, alg="entropy"),
    "asr": dict(max_new_tokens=50, steps=25, alg="entropy"),
}


def preset(task: str, **changes) -> OfficialSamplerConfig:
    """The official inference's sampler settings of `task`, with `changes` applied."""
    if task not in INFERENCE_PRESETS:
        raise ValueError(f"no official settings for task {task!r}; tasks: {', '.join(INFERENCE_PRESETS)}")
    return OfficialSamplerConfig(**{"temperature": 0.0, "top_p": 0.9, "alg_temp": 0.0, "task": task,
                                    **INFERENCE_PRESETS[task], **changes})


def evaluation_preset(task: str, prompt_length: int = 0, reference_tokens: int = 0) -> OfficialSamplerConfig:
    """The official evaluation scripts' settings: LibriSpeech ASR answers in
    `int(0.2 x prompt length)` tokens at half as many steps (`entropy`); LibriTTS speaks
    `int(3.5 x the reference text's tokens)` at half as many steps (`entropy-penalty`
    1.2); MME answers in 8 tokens and 8 steps (`entropy`)."""
    if task == "asr":
        n = int(prompt_length * 0.2)
        return preset("asr", max_new_tokens=max(n, 1), steps=max(int(n / 2), 1))
    if task == "tts":
        n = int(reference_tokens * 3.5)
        return preset("tts", max_new_tokens=max(n, 1), steps=max(n // 2, 1), alg="entropy-penalty",
                      repeat_penalty=1.2)
    if task == "vqa":
        return preset("vqa", max_new_tokens=8, steps=8)
    raise ValueError(f"no official evaluation settings for task {task!r} (asr, tts, vqa)")
