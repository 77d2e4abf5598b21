"""The raw input manifest: JSONL, one sample a line, in the format the published model's
training data uses, so existing data sets drop in:

    {"messages": [{"role": "user", "content": "Convert the speech to text.\\n<|audio|>"},
                  {"role": "assistant", "content": "the transcript"}],
     "audios": ["relative/path.wav"], "images": []}

`<|image|>` and `<|audio|>` placeholders refer, in order, to the entries of `images` and
`audios`, paths relative to the data root that may never leave it. Optional keys: `task`
(t2i, caption, vqa, asr, tts, s2i, svqa, text, ...), `id`, `meta` (a JSON object, e.g.
the scene's ground truth).

Every way a line can be wrong is a `ManifestError` whose message is the quarantine
reason: not JSON (or nested deeper than `MAX_NESTING`), a wrong type anywhere, text that
is not valid Unicode, a path that is absolute, escapes the root, holds a NUL byte or
passes the file-system's name limits, more media than `MAX_MEDIA_PER_ROW` (or the
caller's limit), a number outside `MAX_JSON_INT` or not finite (`NaN`, `Infinity`,
`1e999`): every numeric field a row can carry is bounded where it is parsed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from omni_model.templates import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, ROLES

#: the task names a manifest row may carry (`task`, else inferred from its turns); training
#: counts its loss per task in this order (`pipelines.evaluation.tasks.EVAL_TASKS`: what is scored)
TASKS = ("t2i", "caption", "vqa", "asr", "tts", "s2i", "svqa", "text")

#: Deepest JSON nesting a line may have. A line of 100,000 `[` would otherwise exhaust
#: the parser's recursion; the manifest format itself needs depth 4.
MAX_NESTING = 64
#: Media files one row may name (each is opened and tokenized).
MAX_MEDIA_PER_ROW = 64
#: Largest integer a line may hold anywhere (`id`, `meta`): a 64-bit signed integer.
#: Python parses any length (up to 4,300 digits); nothing downstream can store that.
MAX_JSON_INT = 2**63 - 1
#: Limits of POSIX file systems: bytes of one path component, and of a whole path.
NAME_MAX, PATH_MAX = 255, 4096


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


def check_media_path(rel: Any) -> str:
    """A manifest's media path as written: a relative string without NUL bytes, within
    the file-system's name limits (checked before the file system sees it)."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"media path must be a non-empty string, got {_short(rel)}")
    if "\0" in rel:
        raise ManifestError(f"media path {_short(rel)} contains a NUL byte")
    encoded = _utf8(rel, "media path")
    if len(encoded) > PATH_MAX:
        raise ManifestError(f"media path of {len(encoded)} bytes is over the limit of {PATH_MAX}")
    longest = max(len(part.encode("utf-8")) for part in rel.split("/"))
    if longest > NAME_MAX:
        raise ManifestError(f"media path {_short(rel)} has a file name of {longest} bytes, over the "
                            f"limit of {NAME_MAX}")
    if Path(rel).is_absolute():
        raise ManifestError(f"absolute media path {_short(rel)} is not allowed")
    return rel


def resolve_media(root: Path, rel: str) -> Path:
    """`root / rel`, refusing what `check_media_path` refuses and anything that escapes
    `root`."""
    check_media_path(rel)
    base = root.resolve()
    try:
        path = (base / rel).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop, say
        raise ManifestError(f"media path {_short(rel)} cannot be resolved: {err}") from None
    if path != base and base not in path.parents:
        raise ManifestError(f"media path {_short(rel)} escapes the data root")
    return path


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _utf8(text: str, what: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (JSON's "\\ud800") cannot be stored in a shard."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{what} is not valid Unicode text (a lone surrogate)") from None


def _nesting(line: str) -> int:
    """The deepest bracket nesting of a JSON line (brackets inside strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in line:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # checked on the digits, before Python converts them
        raise ManifestError(f"integer of {len(text.lstrip('-'))} digits is outside ±{MAX_JSON_INT}")
    value = int(text)
    if abs(value) > MAX_JSON_INT:
        raise ManifestError(f"integer {value} is outside ±{MAX_JSON_INT}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ManifestError(f"number {text[:40]} is not finite")
    return value


def _no_constant(name: str) -> float:
    raise ManifestError(f"{name} is not a JSON number")


def load_json(text: str) -> Any:
    """`json.loads` with every number bounded: integers within ±`MAX_JSON_INT`, floats
    finite, no `NaN`/`Infinity` (which Python's parser accepts). Raises ManifestError."""
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise ManifestError(f"not valid JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise ManifestError("JSON nested too deeply") from None


def parse_line(line: str, root: Path | None = None, check_files: bool = True,
               max_media: int = MAX_MEDIA_PER_ROW) -> Sample:
    """Parse and validate one JSONL line (raises ManifestError with the reason)."""
    if line.count("[") + line.count("{") > MAX_NESTING:  # only then can it nest that deep
        depth = _nesting(line)
        if depth > MAX_NESTING:
            raise ManifestError(f"JSON nested {depth} levels deep, over the limit of {MAX_NESTING}")
    data = load_json(line)
    if not isinstance(data, dict):
        raise ManifestError("a manifest line must be a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ManifestError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ManifestError(f"message {i} needs a string 'content'")
        if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise ManifestError(f"message {i} has unknown role {_short(m.get('role'))}")
        _utf8(m["content"], f"message {i}'s content")
    if messages[-1]["role"] != "assistant":
        raise ManifestError("the last message must be the assistant's")
    images, audios = data.get("images", []) or [], data.get("audios", []) or []
    if not isinstance(images, list) or not isinstance(audios, list):
        raise ManifestError("'images' and 'audios' must be lists")
    if len(images) + len(audios) > max_media:
        raise ManifestError(f"{len(images) + len(audios)} media files, over the limit of "
                            f"{max_media} per row")
    meta = data.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ManifestError(f"'meta' must be a JSON object, not {type(meta).__name__}")
    task = data.get("task") or infer_task(messages)
    if not isinstance(task, str) or task not in TASKS:
        raise ManifestError(f"unknown task {_short(task)}")
    row_id = data.get("id", "")
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise ManifestError(f"'id' must be a string or an integer, not {type(row_id).__name__}")
    _utf8(str(row_id), "'id'")
    text = "".join(m["content"] for m in messages)
    n_img, n_aud = text.count(IMAGE_PLACEHOLDER), text.count(AUDIO_PLACEHOLDER)
    if n_img != len(images):
        raise ManifestError(f"{n_img} <|image|> placeholders but {len(images)} images")
    if n_aud != len(audios):
        raise ManifestError(f"{n_aud} <|audio|> placeholders but {len(audios)} audios")
    for rel in [*images, *audios]:
        if root is None:
            check_media_path(rel)
            continue
        path = resolve_media(root, rel)
        if check_files and not path.is_file():  # stat only: a FIFO is never opened here
            if path.exists() and not path.is_dir():
                raise ManifestError(f"media path {_short(rel)} is not a regular file")
            raise ManifestError(f"missing file {_short(rel)}")
    try:
        json.dumps(meta).encode("utf-8")
    except (ValueError, TypeError):
        raise ManifestError("'meta' holds values that cannot be stored") from None
    return Sample([{"role": m["role"], "content": m["content"]} for m in messages],
                  list(images), list(audios), task, str(row_id), meta)


def sample_id(source: str, line_number: int, line: str) -> str:
    """Stable id of a manifest row: the same file, line and content, the same id."""
    return hashlib.sha256(f"{source}\0{line_number}\0{line}".encode()).hexdigest()[:20]


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, raw line) of the non-blank lines of a JSONL file."""
    for number, line, _ in read_bounded_lines(path, None):
        yield number, line


def read_bounded_lines(path: str | Path, max_bytes: int | None) -> Iterator[tuple[int, str, int]]:
    """(line number, line, its size in bytes) of the non-blank lines; a line longer than
    `max_bytes` is read in pieces and returned cut to `max_bytes`, so one huge line
    costs no more memory than the limit (its size tells the caller it was cut).
    Bytes that are not UTF-8 are replaced."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(max_bytes + 1) if max_bytes is not None else f.readline()
            if not raw:
                return
            number += 1
            ended = raw.endswith(b"\n")
            size = len(raw) - ended
            if not ended and max_bytes is not None and size > max_bytes:
                while chunk := f.readline(2**20):  # the rest of the line, never held whole
                    ended = chunk.endswith(b"\n")
                    size += len(chunk) - ended
                    if ended:
                        break
                raw = raw[:max_bytes]
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if line.strip():
                yield number, line, size


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
