"""Fine-tuning the released model: its training examples, its trainable module and its
masked-diffusion loss, in plain PyTorch (the Ray Train wiring is
`pipelines/train/release_loop.py`).

**Examples, as the official training builds them** (`omni_diffusion/data/dataset_qwen2.py`,
`preprocess`): every message is `<|im_start|>` + role + `\\n` + content + `<|im_end|>` +
`\\n`, the role, the newline and the content tokenized apart (the official inference
renders the whole prompt at once instead; the ids differ only where a content starts
with a newline). The response, the only part that is ever masked, is each assistant
turn's content followed by its `<|im_end|>` and `\\n`; the sample then ends with 1..16
`<|endoftext|>` (the release's pad) that belong to the response too and are masked with
the attenuated probability (`omni_model.masking.add_tail_pad`). There is no default
system message. A user's speech becomes `<|begin_of_audio|>` + one `<|context_of_audio|>`
per encoder row (feature frames + 4) + `<|end_of_audio|>`, the rows written over the
context positions; images are MAGVIT-v2 codes between `<|begin_of_image|>` and
`<|end_of_image|>` (512 px in a user turn, 256 px in an assistant's, as the official
code encodes them); an assistant's speech is GLM-4-Voice codes between begin and end of
audio. Text a user wrote is never read as a special token (the official code would).

**What is trained** (the official `finetune.sh` passes `--audio-model-freeze`): the
SenseVoice encoder is frozen (`requires_grad=False`, run without a graph, so it has no
gradients and no optimizer state); the projector and the whole Dream backbone train.

**The loss**: cross-entropy on the masked response positions (position i scored from
i - 1, Dream's shift), averaged over them, weighted by 1/t or not. Two forward
processes (`MASKINGS`): `per_sample`, the project's objective (`omni_model.masking`: one
t ~ U(eps, 1) per sample, response tokens masked with probability t, tail pads with
`pad_ratio * t`), or `per_position`, the official training's `forward_process`: a fresh
t for every response position (each token masked independently, with probability 1/2
on average; pads with `pad_ratio * t`), unweighted. `configs/release/stage3.yaml`
reproduces the official one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from omni_model.batching import Batch
from omni_model.masking import MaskedBatch, diffusion_loss, mask_for_training
from omni_model.objective import Objective, StepResult
from omni_model.release.model import ReleaseModel
from omni_model.release.prompts import audio_segments, encode_segments, image_segments
from omni_model.release.tokenizer import ReleaseTokenizer
from omni_model.tokenizers.sensevoice import AUDIO_PREFIX, PROJECTOR_PREFIX, UNUSED_AUDIO_KEYS, load_prefixed
from omni_model.model_folder import read_weights
from omni_model.vocab import Vocab

MASKINGS = ("per_sample", "per_position")

#: a content part: text, `("audio_in", frames)` (a user's speech: its feature frames),
#: `("image", codes)` or `("audio_out", codes)` (local codes)
Part = Union[str, tuple[str, object]]


@dataclass(frozen=True)
class Turn:
    role: str  #: system, user or assistant
    parts: tuple[Part, ...]


@dataclass
class ReleaseExample:
    """One training sample: ids, which of them are response, and where each speech
    input's encoder rows go (`(start, length)` of its context positions, in order)."""

    ids: list[int]
    response_mask: list[bool]
    audio_spans: list[tuple[int, int]] = field(default_factory=list)


def release_example(turns: Sequence[Turn], tokenizer: ReleaseTokenizer, vocab: Vocab) -> ReleaseExample:
    """The ids of a conversation as the official training builds them (module docstring);
    tail pads are added later, at every draw."""
    if not turns or turns[-1].role != "assistant":
        raise ValueError("a training conversation ends with the assistant's turn")
    start, end = vocab.special("im_start"), vocab.special("im_end")
    newline = tokenizer.encode_text("\n")
    ids: list[int] = []
    response: list[bool] = []
    spans: list[tuple[int, int]] = []
    for turn in turns:
        if turn.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {turn.role!r}")
        content = encode_segments(_content_segments(turn, vocab), tokenizer, vocab)
        head = [start, *tokenizer.encode_text(turn.role), *newline]
        spans += [(len(ids) + len(head) + s, n) for s, n in content.audio_spans]
        body = [*content.ids, end, *newline]
        ids += head + body
        response += [False] * len(head) + [turn.role == "assistant"] * len(body)
    return ReleaseExample(ids, response, spans)


def _content_segments(turn: Turn, vocab: Vocab) -> list:
    out: list = []
    for part in turn.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        kind, value = part
        if kind == "audio_in":
            if turn.role == "assistant":
                raise ValueError("an assistant's speech is codes (audio_out), not encoder input")
            out += audio_segments(vocab, int(value))
        elif kind == "image":
            out += image_segments(vocab, value)
        elif kind == "audio_out":
            out += [vocab.special("boa"), *vocab.speech_to_ids(value).tolist(), vocab.special("eoa")]
        else:
            raise ValueError(f"unknown content part {kind!r}")
    return out


def freeze_speech_encoder(model: ReleaseModel) -> ReleaseModel:
    """Freeze SenseVoice's encoder as the official fine-tuning does (`--audio-model-freeze`):
    no gradients, hence no optimizer state; the projector and backbone keep training."""
    model.speech.encoder.requires_grad_(False)
    return model


def load_release_weights(model: ReleaseModel, folder: str | Path) -> ReleaseModel:
    """Load the weights of a release folder (a checkpoint of a fine-tuning run) into
    `model`, strictly, keeping its tokenizer and source folder (where its saves copy
    the tokenizer files and SenseVoiceSmall from)."""
    state = read_weights(Path(folder))
    params = model.transformer.lm_head.weight
    state = {k: v.to(device=params.device, dtype=params.dtype) for k, v in state.items()}
    load_prefixed(model.speech.encoder, state, AUDIO_PREFIX, unused=UNUSED_AUDIO_KEYS)
    load_prefixed(model.speech.projector, state, PROJECTOR_PREFIX)
    rest = {k: v for k, v in state.items() if not k.startswith((AUDIO_PREFIX, PROJECTOR_PREFIX))}
    model.transformer.load_state_dict(rest, strict=True)
    return model


class ReleaseDiffusion(nn.Module):
    """The released model as one trainable module (what DDP or DeepSpeed wraps): noisy
    ids and speech features in, the masked positions' logits out."""

    def __init__(self, release: ReleaseModel) -> None:
        super().__init__()
        self.release = release

    def forward(self, noisy_ids: torch.Tensor, features: torch.Tensor | None, feature_lengths: torch.Tensor | None,
                audio_spans: Sequence[tuple[int, int, int]], attention_mask: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """`features` `[A, T, 560]` (front-end features of the batch's A speech inputs,
        `feature_lengths` their frames) go over `audio_spans` `(row, start, length)`.
        Returns the logits of the `logits_at` positions (`[N, V]`), or all."""
        release = self.release
        vectors = release.transformer.model.embed_tokens(noisy_ids)
        speech = release.speech
        if features is not None and len(audio_spans):
            with torch.no_grad() if not _trains(speech.encoder) else contextlib.nullcontext():
                feats = features.to(torch.bfloat16) if speech.features_bf16 else features
                hidden, lengths = speech.encoder(feats, feature_lengths)
            rows = speech.projector(hidden.to(speech.projector.mlp[0].weight.dtype))
            where_b, where_p, values = [], [], []
            for (row, start, length), r, n in zip(audio_spans, rows, lengths):
                if int(n) != length:
                    raise ValueError(f"a speech input of {int(n)} encoder rows for {length} context positions")
                where_b.append(torch.full((length,), row, dtype=torch.long))
                where_p.append(torch.arange(start, start + length))
                values.append(r[:length])
            index = (torch.cat(where_b).to(vectors.device), torch.cat(where_p).to(vectors.device))
            vectors = vectors.index_put(index, torch.cat(values).to(vectors.dtype))
        else:
            # every trainable weight takes part in every step (DDP waits for each one's
            # gradient), as the official forward does with its one-frame fake audio
            dummy = speech.projector.pre_proj_layernorm.weight.new_zeros(1, 1, speech.encoder.config.output_size)
            vectors = vectors + speech.projector(dummy).sum() * 0.0
        return release.transformer(noisy_ids, attention_mask=attention_mask, doc_ids=doc_ids,
                                   logits_at=logits_at, inputs_embeds=vectors)

    def save_pretrained(self, path: str | Path) -> Path:
        """The release format (`ReleaseModel.save_pretrained`): what checkpoints hold."""
        return self.release.save_pretrained(path)

    def set_gradient_checkpointing(self, enabled: bool = True) -> "ReleaseDiffusion":
        self.release.transformer.set_gradient_checkpointing(enabled)
        return self


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass
class SpeechBatch:
    """The speech inputs of a batch: padded features `[A, T, D]`, frames `[A]`, and
    `(row, start, length)` of each one's context positions."""

    features: torch.Tensor | None
    lengths: torch.Tensor | None
    spans: list[tuple[int, int, int]]

    @classmethod
    def of(cls, features: Sequence[torch.Tensor], spans: Sequence[tuple[int, int, int]]) -> "SpeechBatch":
        if not features:
            return cls(None, None, [])
        lengths = torch.tensor([f.shape[0] for f in features])
        out = features[0].new_zeros(len(features), int(lengths.max()), features[0].shape[1])
        for i, f in enumerate(features):
            out[i, :f.shape[0]] = f
        return cls(out, lengths, list(spans))

    def to(self, device: torch.device | str) -> "SpeechBatch":
        if self.features is None:
            return self
        return SpeechBatch(self.features.to(device), self.lengths.to(device), self.spans)


def mask_per_position(ids: torch.Tensor, response_mask: torch.Tensor, mask_id: int, pad_id: int,
                      pad_ratio: float = 0.6, eps: float = 1e-3,
                      generator: torch.Generator | None = None) -> MaskedBatch:
    """The official training's forward process (`dataset_qwen2.forward_process`): every
    response position draws its own t ~ U(eps, 1) and is masked when a uniform draw is
    at most t (a pad, `pad_id`, when it is at most `pad_ratio * t`); the prompt never."""
    t = eps + (1 - eps) * torch.rand(ids.shape, generator=generator, device=ids.device)
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)
    response = response_mask.bool()
    threshold = torch.where(response & (ids == pad_id), pad_ratio * t, t)
    target = response & (draw <= threshold)
    return MaskedBatch(torch.where(target, torch.full_like(ids, mask_id), ids), target, t)


def release_loss(net: nn.Module, batch: Batch, speech: SpeechBatch, vocab: Vocab, objective: Objective,
                 generator: torch.Generator | None = None,
                 autocast: contextlib.AbstractContextManager | None = None,
                 masking: str = "per_sample") -> StepResult:
    """Mask a (packed) batch's responses (`masking`: one of `MASKINGS`), predict with the
    speech rows in place, and score the masked positions (`diffusion_loss_of_batch`'s
    steps, with the release's speech input; `net` a `ReleaseDiffusion`, maybe wrapped)."""
    if masking == "per_sample":
        noisy: MaskedBatch = mask_for_training(batch.input_ids, batch.response_mask, vocab.mask_id, vocab.pad_id,
                                               objective.pad_ratio, objective.eps_t, batch.doc_ids,
                                               generator=generator, schedule=objective.schedule)
    elif masking == "per_position":
        noisy = mask_per_position(batch.input_ids, batch.response_mask, vocab.mask_id, vocab.pad_id,
                                  objective.pad_ratio, objective.eps_t, generator)
    else:
        raise ValueError(f"masking {masking!r}: one of {MASKINGS}")
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = net(noisy.noisy_ids, speech.features, speech.lengths, speech.spans,
                     attention_mask=batch.attention_mask, doc_ids=batch.doc_ids, logits_at=noisy.target_mask)
    per_position = diffusion_loss(logits, batch.input_ids, noisy.target_mask, noisy.t, objective.weighting,
                                  reduction="none")
    if noisy.target_mask.any():
        loss = per_position.sum() / noisy.target_mask.sum()
    else:
        loss = logits.sum() * 0.0
    return StepResult(loss, per_position, logits, noisy)
