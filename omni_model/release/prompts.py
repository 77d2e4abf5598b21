"""The released model's prompts: Qwen2's chat template without a default system
message, the per-task system prompts and instructions of the official inference code,
images as `<|begin_of_image|>` + 1,024 codes + `<|end_of_image|>`, and speech input as
`<|begin_of_audio|>` + one `<|context_of_audio|>` per speech-encoder frame +
`<|end_of_audio|>` (the frames' embeddings are written over the context positions).

A prompt is built as a list of segments: text, or ids the template itself places
(chat markers, media). Text between two placed ids is tokenized as one span, which is
what the official code's tokenizer does with the whole rendered string (it splits at
added tokens first); so ids are equal to the official ones, while text a user wrote can
never smuggle in a special token by spelling it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

from omni_model.release.tokenizer import ReleaseTokenizer
from omni_model.vocab import Vocab

Segment = Union[str, int]

#: task -> (system prompt or None, what the user turn holds). Written as the official
#: inference code (`tools/inference.py`) builds them: the instruction text comes first,
#: then a newline and the media placeholder.
TASKS: dict[str, dict] = {
    "t2i": {"system": None, "instruction": "Generate an image based on the provided text description.\n",
            "inputs": ("text",)},
    "vqa": {"system": None, "instruction": "", "inputs": ("text", "image")},
    "asr": {"system": None, "instruction": "Convert the speech to text.", "inputs": ("audio",)},
    "tts": {"system": None, "instruction": "Convert the text to speech.\n", "inputs": ("text",)},
    "s2i": {"system": "Please generate an image based on the input audio.", "instruction": "",
            "inputs": ("audio",)},
    "sqa": {"system": "Please response the input audio.", "instruction": "", "inputs": ("audio",)},
    "svqa": {"system": "Please response the input audio based on the given image.", "instruction": "",
             "inputs": ("audio", "image")},
}


@dataclass(frozen=True)
class Message:
    role: str  # system / user / assistant
    content: tuple[Segment, ...]


@dataclass(frozen=True)
class ReleasePrompt:
    """Prompt ids and where each speech input's embeddings go: `(start, length)` of
    its `<|context_of_audio|>` positions, in order."""

    ids: list[int]
    audio_spans: list[tuple[int, int]]


def chat_segments(messages: Sequence[Message], vocab: Vocab, add_generation_prompt: bool = True) -> list[Segment]:
    """Qwen2's chat template (the official inference's copy: no tools, and no default
    system message when the conversation has none)."""
    start, end = vocab.special("im_start"), vocab.special("im_end")
    out: list[Segment] = []
    for message in messages:  # a leading system turn renders like every other turn
        if message.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {message.role!r}")
        out += [start, message.role + "\n", *message.content, end, "\n"]
    if add_generation_prompt:
        out += [start, "assistant\n"]
    return out


def image_segments(vocab: Vocab, codes: Sequence[int]) -> list[Segment]:
    """An input image: its MAGVIT-v2 codes between begin/end of image."""
    return [vocab.special("boi"), *vocab.image_to_ids(codes).tolist(), vocab.special("eoi")]


def audio_segments(vocab: Vocab, frames: int) -> list[Segment]:
    """A speech input of `frames` encoder outputs (the SenseVoice encoder's frames,
    its 4 query tokens included): context positions its embeddings are written over."""
    if frames <= 0:
        raise ValueError(f"a speech input needs at least one frame, got {frames}")
    return [vocab.special("boa"), *[vocab.special("context_of_audio")] * frames, vocab.special("eoa")]


def task_messages(task: str, vocab: Vocab, text: str | None = None, image_codes: Sequence[int] | None = None,
                  audio_frames: int | None = None) -> list[Message]:
    """The conversation the official inference builds for `task` (see `TASKS`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    spec = TASKS[task]
    wanted = {"text": text is not None, "image": image_codes is not None, "audio": audio_frames is not None}
    missing = [k for k in spec["inputs"] if not wanted[k]]
    extra = [k for k, given in wanted.items() if given and k not in spec["inputs"]]
    if missing or extra:
        raise ValueError(f"task {task!r} takes {', '.join(spec['inputs'])}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; not {', '.join(extra)}" if extra else ""))
    message = spec["instruction"] + (text or "")
    image = image_segments(vocab, image_codes) if image_codes is not None else []
    audio = audio_segments(vocab, audio_frames) if audio_frames is not None else []
    if audio and image:       # the official user turn is "<|audio|>\n<|image|>" (no text)
        content: list[Segment] = [*audio, "\n", *image]
    elif audio:
        content = [message + "\n", *audio]
    elif image:
        content = [message + "\n", *image]
    else:
        content = [message]
    system = [Message("system", (spec["system"],))] if spec["system"] else []
    return [*system, Message("user", tuple(content))]


def encode_segments(segments: Sequence[Segment], tokenizer: ReleaseTokenizer, vocab: Vocab) -> ReleasePrompt:
    """Ids of a segment list: each run of text between placed ids is one BPE span."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    text: list[str] = []
    context = vocab.special("context_of_audio")

    def flush() -> None:
        if text:
            ids.extend(tokenizer.encode_text("".join(text)))
            text.clear()

    for seg in segments:
        if isinstance(seg, str):
            text.append(seg)
            continue
        flush()
        if seg == context:  # a run of context positions is one speech input
            start, n = spans.pop() if ids and ids[-1] == context else (len(ids), 0)
            spans.append((start, n + 1))
        ids.append(int(seg))
    flush()
    return ReleasePrompt(ids, spans)


def task_prompt(task: str, tokenizer: ReleaseTokenizer, vocab: Vocab, text: str | None = None,
                image_codes: Sequence[int] | None = None, audio_frames: int | None = None) -> ReleasePrompt:
    """The official prompt ids of one task (see `task_messages`)."""
    messages = task_messages(task, vocab, text, image_codes, audio_frames)
    return encode_segments(chat_segments(messages, vocab), tokenizer, vocab)
