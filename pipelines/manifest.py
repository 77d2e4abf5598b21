"""The raw input manifest: JSONL, one sample a line, in the format the published model's
training data uses, so existing data sets drop in:

    {"messages": [{"role": "user", "content": "Convert the speech to text.\\n<|audio|>"},
                  {"role": "assistant", "content": "the transcript"}],
     "audios": ["relative/path.wav"], "images": []}

`<|image|>` and `<|audio|>` placeholders refer, in order, to the entries of `images` and
`audios`, paths relative to the data root that may never leave it. Optional keys: `task`
(t2i, caption, vqa, asr, tts, s2i, svqa, text, ...), `id`, `meta` (free-form, e.g. the
scene's ground truth).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from omni_model.templates import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, ROLES

TASKS = ("t2i", "caption", "vqa", "asr", "tts", "s2i", "svqa", "text")


class ManifestError(ValueError):
    """A manifest row that cannot be used; the message is the quarantine reason."""


@dataclass
class Sample:
    """One validated manifest row."""

    messages: list[dict[str, str]]
    images: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    task: str = ""
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        out: dict[str, Any] = {"messages": self.messages, "images": self.images,
                               "audios": self.audios}
        for key in ("task", "id"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.meta:
            out["meta"] = self.meta
        return json.dumps(out, ensure_ascii=False)

    def spoken_outputs(self) -> list[str]:
        """The audios the assistant speaks (its turns' `<|audio|>`, in order)."""
        spoken, seen = [], 0
        for m in self.messages:
            n = m["content"].count(AUDIO_PLACEHOLDER)
            if m["role"] == "assistant":
                spoken += self.audios[seen:seen + n]
            seen += n
        return spoken


def infer_task(messages: list[dict[str, str]]) -> str:
    """A task name from where media placeholders sit (when the row does not say)."""
    user = " ".join(m["content"] for m in messages if m["role"] != "assistant")
    answer = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
    ui, ua = IMAGE_PLACEHOLDER in user, AUDIO_PLACEHOLDER in user
    ai, aa = IMAGE_PLACEHOLDER in answer, AUDIO_PLACEHOLDER in answer
    if ai:
        return "s2i" if ua else "t2i"
    if aa:
        return "svqa" if ui else "tts"
    if ui:
        return "vqa" if "?" in user else "caption"
    if ua:
        return "asr"
    return "text"


def resolve_media(root: Path, rel: str) -> Path:
    """`root / rel`, refusing absolute paths and anything that escapes `root`."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"media path must be a non-empty string, got {rel!r}")
    if Path(rel).is_absolute():
        raise ManifestError(f"absolute media path {rel!r} is not allowed")
    base = root.resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise ManifestError(f"media path {rel!r} escapes the data root")
    return path


def parse_line(line: str, root: Path | None = None, check_files: bool = True) -> Sample:
    """Parse and validate one JSONL line (raises ManifestError with the reason)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise ManifestError(f"not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(data, dict):
        raise ManifestError("a manifest line must be a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ManifestError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ManifestError(f"message {i} needs a string 'content'")
        if m.get("role") not in ROLES:
            raise ManifestError(f"message {i} has unknown role {m.get('role')!r}")
    if messages[-1]["role"] != "assistant":
        raise ManifestError("the last message must be the assistant's")
    images, audios = data.get("images", []) or [], data.get("audios", []) or []
    if not isinstance(images, list) or not isinstance(audios, list):
        raise ManifestError("'images' and 'audios' must be lists")
    text = "".join(m["content"] for m in messages)
    n_img, n_aud = text.count(IMAGE_PLACEHOLDER), text.count(AUDIO_PLACEHOLDER)
    if n_img != len(images):
        raise ManifestError(f"{n_img} <|image|> placeholders but {len(images)} images")
    if n_aud != len(audios):
        raise ManifestError(f"{n_aud} <|audio|> placeholders but {len(audios)} audios")
    task = data.get("task") or infer_task(messages)
    if task not in TASKS:
        raise ManifestError(f"unknown task {task!r}")
    if root is not None:
        for rel in [*images, *audios]:
            path = resolve_media(root, rel)
            if check_files and not path.is_file():
                raise ManifestError(f"missing file {rel!r}")
    meta = data.get("meta") or {}
    return Sample([{"role": m["role"], "content": m["content"]} for m in messages],
                  list(images), list(audios), task, str(data.get("id", "")), dict(meta))


def sample_id(source: str, line_number: int, line: str) -> str:
    """Stable id of a manifest row: the same file, line and content, the same id."""
    return hashlib.sha256(f"{source}\0{line_number}\0{line}".encode()).hexdigest()[:20]


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, raw line) of the non-blank lines of a JSONL file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line.rstrip("\n")


def write_manifest(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples as JSONL (atomically: a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(s.to_json() + "\n")
            n += 1
    tmp.replace(path)
    return n
