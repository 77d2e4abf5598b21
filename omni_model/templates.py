"""Chat/task templates: a sample (messages made of text, image and speech parts) to ids
plus a response mask, and generated ids back to parts.

The rendering follows the Qwen/Dream chat format the published model uses::

    <|im_start|>user\\n{parts}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>

with images as `<|begin_of_image|> codes <|end_of_image|>` and speech as
`<|begin_of_audio|> codes <|end_of_audio|>`. The *response* is the content of the
final assistant message plus its closing `<|im_end|>` (the model learns to end a turn);
everything before it, earlier assistant turns included, is prompt and never masked.
Role names and text are tokenised by any tokenizer with `encode`/`decode`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

import torch

from omni_model.tokenizers.text import TextTokenizer
from omni_model.vocab import Vocab

ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<|image|>"
AUDIO_PLACEHOLDER = "<|audio|>"
#: the media placeholders of manifest content, as one pattern (`split` keeps them as pieces)
PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    """Local image codes (0..codebook-1), row-major over `grid` (height, width)."""

    codes: tuple[int, ...]
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class Speech:
    """Local speech codes (0..codebook-1) at `frame_rate` codes per second."""

    codes: tuple[int, ...]
    frame_rate: float | None = None


Part = Union[Text, Image, Speech]


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    response_mask: list[bool]

    @property
    def prompt_length(self) -> int:
        """Number of leading prompt tokens (the response is one contiguous tail)."""
        return self.response_mask.index(True) if True in self.response_mask else len(self.ids)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.ids, dtype=torch.long),
                torch.tensor(self.response_mask, dtype=torch.bool))


def split_placeholders(content: str, images: Iterator[Part], audios: Iterator[Part]) -> list[Part]:
    """Split manifest content text at `<|image|>`/`<|audio|>`, taking media parts in order."""
    parts: list[Part] = []
    for piece in PLACEHOLDERS.split(content):
        if piece == IMAGE_PLACEHOLDER:
            parts.append(next(images))
        elif piece == AUDIO_PLACEHOLDER:
            parts.append(next(audios))
        elif piece:
            parts.append(Text(piece))
    return parts


def encode_parts(parts: Iterable[Part], tokenizer: TextTokenizer, vocab: Vocab) -> list[int]:
    """The ids of a message body."""
    ids: list[int] = []
    for part in parts:
        if isinstance(part, Text):
            ids += tokenizer.encode(part.text)
        elif isinstance(part, Image):
            ids += [vocab.boi_id, *vocab.image_to_ids(list(part.codes)).tolist(), vocab.eoi_id]
        elif isinstance(part, Speech):
            ids += [vocab.boa_id, *vocab.speech_to_ids(list(part.codes)).tolist(), vocab.eoa_id]
        else:
            raise TypeError(f"not a message part: {part!r}")
    return ids


def _role_header(role: str, tokenizer: TextTokenizer, vocab: Vocab) -> list[int]:
    return [vocab.im_start_id, *tokenizer.encode(f"{role}\n")]


def encode_prompt(messages: Sequence[Message], tokenizer: TextTokenizer, vocab: Vocab) -> list[int]:
    """Ids of a conversation up to and including the assistant header (for generation)."""
    ids: list[int] = []
    for m in messages:
        ids += _role_header(m.role, tokenizer, vocab)
        ids += encode_parts(m.parts, tokenizer, vocab)
        ids += [vocab.im_end_id, *tokenizer.encode("\n")]
    return ids + _role_header("assistant", tokenizer, vocab)


def encode_sample(messages: Sequence[Message], tokenizer: TextTokenizer, vocab: Vocab) -> Encoded:
    """Ids and response mask of a training sample; the last message must be the assistant's."""
    if not messages or messages[-1].role != "assistant":
        raise ValueError("a training sample must end with an assistant message")
    prompt = encode_prompt(messages[:-1], tokenizer, vocab)
    response = encode_parts(messages[-1].parts, tokenizer, vocab) + [vocab.im_end_id]
    return Encoded(prompt + response, [False] * len(prompt) + [True] * len(response))


def decode_response(ids: Sequence[int] | torch.Tensor, tokenizer: TextTokenizer,
                    vocab: Vocab) -> list[Part]:
    """Generated response ids -> parts, up to the first `im_end`, pad or end-of-text.

    Consecutive ids of one modality form one part; begin/end markers only separate.
    An unfilled mask ends decoding too (a sampler stopped early).
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    stop = {vocab.im_end_id, vocab.pad_id, vocab.eot_id, vocab.mask_id}
    parts: list[Part] = []
    run: list[int] = []
    run_modality: str | None = None

    def flush() -> None:
        if not run:
            return
        if run_modality == "text":
            parts.append(Text(tokenizer.decode(run)))
        elif run_modality == "image":
            parts.append(Image(tuple(vocab.ids_to_image(run).tolist())))
        else:
            parts.append(Speech(tuple(vocab.ids_to_speech(run).tolist())))
        run.clear()

    for token in ids:
        if token in stop:
            break
        modality = vocab.modality_of(token)
        if modality in (None, "special"):
            flush()
            run_modality = None
            continue
        if modality != run_modality:
            flush()
            run_modality = modality
        run.append(token)
    flush()
    return parts
