"""A local Hugging Face dataset into media files and a manifest in the published format.

Reads what a user has on disk, never a hub: a `save_to_disk` folder (`Dataset` or
`DatasetDict`), a folder of Parquet files with `Image`/`Audio` features, an
`imagefolder` (images + `metadata.csv`/`metadata.jsonl`) or an `audiofolder` (the same
with audio). A column mapping names, per task, which column plays which role:

| task | roles (required) | optional |
|---|---|---|
| asr | audio, text | |
| tts | text, audio | |
| caption | image, text (a string or a list of captions) | |
| vqa | image, question, answer (or answers) | answers (human answers: strings or `{"answer": ...}`) |
| t2i | text, image | |

Every row becomes media files under `OUT/media/` (images re-encoded as PNG after a full,
bounded decode; audio as 16-bit WAV at its own rate) and one line of `OUT/{task}.jsonl`;
a row that cannot be goes to `OUT/quarantine.jsonl` with its reason (and, for an
audiofolder's metadata, its file and line), and nothing is lost silently. Any exception
one row raises quarantines that row, whatever its type: undecodable media, an empty
text, a metadata line that is not JSON, a `file_name` that is not a string.

Whatever field or type carries a media path (`file_name`, a `{"bytes", "path"}` object,
a plain string, in any column a role is mapped to), it resolves inside the dataset
folder or the row is quarantined; stored bytes are used as bytes and only as bytes (a
string in `bytes`, which Parquet allows, is refused, never followed as a path). Only
regular files are opened (a FIFO would block the import), each within
`max_file_bytes`, and a row's media are checked from their headers against their
limits and `max_row_decoded_bytes` before they are decoded.

The manifest then goes through the tokenize job (Ray Data, the same quarantine) or
straight into the evaluation (`evaluate.manifests`).

Audio is read from the stored bytes with soundfile: `datasets` 5 decodes audio through
torchcodec and FFmpeg, which this project does not install, so audio columns are cast
to `decode=False` and an `audiofolder` is read without the `datasets` builder.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf

from pipelines.data.manifest import ManifestError, load_json, read_bounded_lines
from pipelines.data.media import (AUDIO_SUFFIXES, IMAGE_SUFFIXES, MediaError, MediaLimits, check_regular_file,
                             check_row_media, load_audio, load_image, read_regular_file)

logger = logging.getLogger(__name__)

#: task: (required roles, optional roles)
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "asr": (("audio", "text"), ()),
    "tts": (("text", "audio"), ()),
    "caption": (("image", "text"), ()),
    "vqa": (("image", "question", "answer"), ("answers",)),
    "t2i": (("text", "image"), ()),
}
#: the instruction of each task (the embedded world's first wording, which its model knows)
PROMPTS = {
    "asr": "Transcribe the audio.\n<|audio|>",
    "tts": "Say this out loud.\n{text}",
    "caption": "<|image|>\nWhat is in this picture?",
    "vqa": "<|image|>\n{question}",
    "t2i": "Generate an image of {text}.",
}
LAYOUTS = ("auto", "disk", "parquet", "imagefolder", "audiofolder")


@dataclass(frozen=True)
class ImportConfig:
    dataset: str  #: the local dataset folder
    task: str  #: asr | tts | caption | vqa | t2i
    out: str  #: the folder for media/, {task}.jsonl and quarantine.jsonl
    #: role -> column; unnamed roles default to the role's own name (`answer` also: `answers`)
    columns: dict[str, str] = field(default_factory=dict)
    split: str | None = None  #: of a DatasetDict; None: "test" if present, else the only split
    layout: str = "auto"
    limit: int | None = None  #: the first rows only
    max_image_pixels: int = 40_000_000  #: width x height of an image, from its header
    max_audio_seconds: float = 600.0  #: length of a clip, from its header
    max_sample_rate: int = 192_000  #: a clip above this rate is refused (from its header)
    max_channels: int = 8  #: a clip with more channels is refused
    #: a media file (or a row's stored bytes) larger than this is refused unread; only
    #: regular files are opened
    max_file_bytes: int = 256 * 2**20
    #: a row's image and audio decoded (RGB at 4 bytes a pixel, float32 audio), summed
    #: from their headers before either is decoded
    max_row_decoded_bytes: int = 256 * 2**20
    max_text_chars: int = 100_000  #: a longer text, question or answer is refused
    max_line_bytes: int = 1_000_000  #: a longer metadata line (audiofolder) is refused unparsed

    def __post_init__(self) -> None:
        if self.task not in ROLES:
            raise ValueError(f"task {self.task!r}: one of {sorted(ROLES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: one of {LAYOUTS}")
        required, optional = ROLES[self.task]
        unknown = set(self.columns) - set(required) - set(optional)
        if unknown:
            raise ValueError(f"{self.task} has no role {sorted(unknown)}; its roles: {required + optional}")

    def column(self, role: str) -> str:
        return self.columns.get(role, role)

    def media_limits(self) -> MediaLimits:
        return MediaLimits(max_file_bytes=self.max_file_bytes, max_image_pixels=self.max_image_pixels,
                           max_audio_seconds=self.max_audio_seconds, max_sample_rate=self.max_sample_rate,
                           max_channels=self.max_channels, max_row_decoded_bytes=self.max_row_decoded_bytes)


def import_dataset(cfg: ImportConfig) -> dict:
    """Write media, the manifest and the quarantine; returns a summary."""
    root = Path(cfg.dataset).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset folder at {cfg.dataset}")
    rows, columns = _open(root, cfg)
    required, optional = ROLES[cfg.task]
    missing = [cfg.column(r) for r in required if cfg.column(r) not in columns
               and not (r == "answer" and cfg.column("answers") in columns)]  # VQA v2: human answers only
    if missing:
        raise ValueError(f"the dataset has no column {missing} for {cfg.task} (columns: {sorted(columns)}; "
                         f"map roles with --columns role=column)")
    out = Path(cfg.out)
    (out / "media").mkdir(parents=True, exist_ok=True)
    written = quarantined = 0
    with open(out / f"{cfg.task}.jsonl", "w") as manifest, open(out / "quarantine.jsonl", "w") as quarantine:
        for index, (where, row) in enumerate(rows):
            if cfg.limit is not None and index >= cfg.limit:
                break
            try:
                if isinstance(row, Exception):  # the row could not even be read
                    raise row
                line = _manifest_row(cfg, root, out, index, row, columns)
            except Exception as err:  # noqa: BLE001 - one row's content never stops the import
                reason = f"{type(err).__name__}: {err}"[:2000]
                quarantine.write(json.dumps({"index": index, **where, "reason": reason}) + "\n")
                quarantined += 1
                continue
            manifest.write(json.dumps(line) + "\n")
            written += 1
    summary = {"dataset": str(root), "task": cfg.task, "rows": written + quarantined, "written": written,
               "quarantined": quarantined, "manifest": str(out / f"{cfg.task}.jsonl")}
    (out / "import.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("imported %s: %d rows, %d quarantined", root, written, quarantined)
    return summary


# ---------------------------------------------------------------------- one row
def _manifest_row(cfg: ImportConfig, root: Path, out: Path, index: int, row: dict, columns: set[str]) -> dict:
    task = cfg.task
    value = {role: row.get(cfg.column(role)) for role in ROLES[task][0]}
    meta: dict[str, Any] = {"source": str(root), "index": index}
    images, audios = [], []
    limits = cfg.media_limits()
    image = _media_bytes(value["image"], root, limits.max_file_bytes) if "image" in value else None
    audio = _media_bytes(value["audio"], root, limits.max_file_bytes) if "audio" in value else None
    check_row_media([image] if image is not None else [], [audio] if audio is not None else [], limits)
    text_of = lambda v, role: _text(v, role, cfg.max_text_chars)  # noqa: E731
    if image is not None:
        picture = load_image(image, cfg.max_image_pixels)
        name = f"media/{task}_{index:07d}.png"
        picture.save(out / name)
        images.append(name)
    if audio is not None:
        wave, rate = load_audio(audio, cfg.max_audio_seconds, cfg.max_sample_rate, cfg.max_channels)
        name = f"media/{task}_{index:07d}.wav"
        sf.write(out / name, np.clip(wave, -1, 1), rate, subtype="PCM_16")
        audios.append(name)
    if task in ("asr", "tts", "t2i"):
        text = text_of(value["text"], "text")
        user = PROMPTS[task].format(text=text)
        answer = {"asr": text, "tts": "<|audio|>", "t2i": "<|image|>"}[task]
    elif task == "caption":
        captions = _texts(value["text"], "text", cfg.max_text_chars)
        user, answer = PROMPTS[task], captions[0]
        if len(captions) > 1:
            meta["captions"] = captions
    else:  # vqa
        user = PROMPTS[task].format(question=text_of(value["question"], "question"))
        has_humans = cfg.column("answers") in columns
        humans = _answers(row.get(cfg.column("answers")), cfg.max_text_chars) if has_humans else []
        given = row.get(cfg.column("answer"))
        answer = text_of(given, "answer") if given is not None and given != "" else _most_common(humans)
        if humans:
            meta["answers"] = humans
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "images": images, "audios": audios, "task": task, "meta": meta}


def _media_bytes(value: Any, root: Path, max_bytes: int) -> bytes:
    """The stored bytes of an undecoded `Image`/`Audio` value, or those of the file it
    names: a `{"bytes", "path"}` object or a path string. Bytes are only ever bytes;
    a path must be a string that resolves inside the dataset folder (relative to it,
    or absolute as `datasets`' own folder builders write them) to a regular file
    within `max_bytes`."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
            if len(data) > max_bytes:
                raise MediaError(f"{len(data)} bytes of media, over the limit of {max_bytes} bytes")
            return bytes(data)
        if isinstance(data, str) and data:
            raise ValueError(f"the media's 'bytes' is text, not bytes ({data[:60]!r}); "
                             "a path there is not followed")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview, str)):
            raise ValueError(f"the media's bytes must be bytes, not {type(data).__name__}")
        path = value.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"the media's path must be a non-empty string, not {_kind(path)}")
    elif isinstance(value, str) and value:
        path = value
    elif value is None or value == "":
        raise ValueError("no media in this row")
    else:
        raise ValueError(f"media must be an object with 'bytes' or 'path', or a path string; "
                         f"not {_kind(value)}")
    if "\0" in path:
        raise ValueError(f"media path {path[:80]!r} holds a NUL byte")
    file = (root / path).resolve()  # symlinks followed: where the file really is counts
    if not file.is_relative_to(root):
        raise ValueError(f"media path {path[:200]!r} lies outside the dataset folder")
    return read_regular_file(file, max_bytes)


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _text(value: Any, role: str, max_chars: int = 100_000) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"the {role} is empty or not text: {str(value)[:60]!r}")
    if len(value) > max_chars:
        raise ValueError(f"the {role} of {len(value)} characters is over the limit of {max_chars}")
    return " ".join(value.split())


def _texts(value: Any, role: str, max_chars: int = 100_000) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        texts = [_text(v, role, max_chars) for v in value]
        if not texts:
            raise ValueError(f"the {role} list is empty")
        return texts
    return [_text(value, role, max_chars)]


def _answers(value: Any, max_chars: int = 100_000) -> list[str]:
    """Human answers: strings, or VQA v2's `{"answer": ..., "answer_confidence": ...}`."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    return [_text(v.get("answer") if isinstance(v, dict) else v, "answers", max_chars) for v in items]


def _most_common(answers: list[str]) -> str:
    if not answers:
        raise ValueError("neither an answer nor human answers")
    return Counter(answers).most_common(1)[0][0]


# ---------------------------------------------------------------------- reading
def _open(root: Path, cfg: ImportConfig) -> tuple[Iterator[tuple[dict, dict | Exception]], set[str]]:
    """The rows (media undecoded) and the column names of the dataset. Each row comes
    with where it is (`{"file", "line"}` for an audiofolder's metadata); a row that
    cannot be read comes as the exception, to be quarantined."""
    layout = cfg.layout if cfg.layout != "auto" else _detect(root)
    if layout == "audiofolder":
        rows = _audiofolder(root, cfg.max_line_bytes)
        columns = set().union(*(r.keys() for _, r in rows if isinstance(r, dict)))
        return iter(rows), columns
    import datasets

    if layout == "disk":
        data = datasets.load_from_disk(str(root))
    else:
        data = datasets.load_dataset(layout, data_dir=str(root))
    if isinstance(data, datasets.DatasetDict):
        data = data[_split(list(data), cfg.split)]
    for name, feature in data.features.items():  # media stay bytes: decoded here, bounded
        if isinstance(feature, (datasets.Image, datasets.Audio)):
            data = data.cast_column(name, type(feature)(decode=False))
    return _indexed(data), set(data.column_names)


def _indexed(data) -> Iterator[tuple[dict, dict | Exception]]:
    """A Dataset's rows one by one, so that a row its reader fails on is quarantined
    and the rows after it are still read."""
    for i in range(len(data)):
        try:
            yield {}, data[i]
        except Exception as err:  # noqa: BLE001 - quarantined by the caller
            yield {}, err


def _detect(root: Path) -> str:
    if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        return "disk"
    files = [p for p in root.rglob("*") if p.is_file()]
    if any(p.suffix == ".parquet" for p in files):
        return "parquet"
    if any(p.suffix.lower() in AUDIO_SUFFIXES for p in files):
        return "audiofolder"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return "imagefolder"
    raise ValueError(f"{root}: not a saved dataset, Parquet files, an imagefolder or an audiofolder")


def _split(splits: list[str], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise ValueError(f"no split {wanted!r}; the dataset has {splits}")
        return wanted
    if "test" in splits:
        return "test"
    if len(splits) == 1:
        return splits[0]
    raise ValueError(f"the dataset has splits {splits}: choose one with --split")


def _audiofolder(root: Path, max_line_bytes: int) -> list[tuple[dict, dict | Exception]]:
    """`datasets`' audiofolder layout: audio files and a metadata.csv or metadata.jsonl
    whose `file_name` names each (relative to the metadata file's folder). A metadata
    line that cannot be read (not JSON, not an object, a `file_name` that is not a
    string) becomes its exception, so the lines after it are still read."""
    rows: list[tuple[dict, dict | Exception]] = []
    for meta in sorted([*root.rglob("metadata.csv"), *root.rglob("metadata.jsonl")]):
        real = meta.resolve()
        if not real.is_relative_to(root):
            logger.warning("skipping %s: it leads outside the dataset folder", meta)
            continue
        try:
            check_regular_file(real, 2**63 - 1)  # read line by line: only FIFOs and devices refused
        except MediaError as err:
            logger.warning("skipping %s: %s", meta, err)
            continue
        folder = real.parent.relative_to(root)
        name = str(meta.relative_to(root))
        entries = _csv_entries(real, max_line_bytes) if meta.suffix == ".csv" else _jsonl_entries(real, max_line_bytes)
        for line, entry in entries:
            where = {"file": name, "line": line}
            if not isinstance(entry, Exception):
                try:
                    entry = _audiofolder_row(entry, folder)
                except Exception as err:  # noqa: BLE001 - quarantined by the caller
                    entry = err
            rows.append((where, entry))
    if not rows:
        raise ValueError(f"{root}: an audiofolder needs a metadata.csv or metadata.jsonl with file_name")
    return rows


def _audiofolder_row(entry: dict, folder: Path) -> dict:
    file_name = entry.pop("file_name", None)
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"file_name must be a non-empty string, not {_kind(file_name)}")
    if "audio" in entry:  # which one is the audio? neither is guessed (nor followed)
        raise ValueError("the metadata line has an 'audio' column beside file_name, which names the audio")
    return {**entry, "audio": {"bytes": None, "path": str(folder / file_name)}}


def _jsonl_entries(path: Path, max_line_bytes: int) -> Iterator[tuple[int, dict | Exception]]:
    for number, line, size in read_bounded_lines(path, max_line_bytes):
        try:
            if size > max_line_bytes:
                raise ManifestError(f"metadata line of {size} bytes is over the limit of {max_line_bytes}")
            entry = load_json(line)  # numbers bounded, as in a manifest
            if not isinstance(entry, dict):
                raise ManifestError(f"a metadata line must be a JSON object, not {type(entry).__name__}")
            yield number, entry
        except Exception as err:  # noqa: BLE001 - quarantined by the caller
            yield number, err


def _csv_entries(path: Path, max_line_bytes: int) -> Iterator[tuple[int, dict | Exception]]:
    """Rows of a CSV with a header; a malformed row (a NUL byte, a field over csv's
    limit, more fields than the header) is its exception and reading goes on."""
    with open(path, newline="", errors="replace") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            return
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield reader.line_num, ValueError(f"not a CSV row: {err}")
                continue
            if not values:
                continue
            if len(values) > len(header):
                yield reader.line_num, ValueError(f"{len(values)} fields, the header has {len(header)}")
                continue
            yield reader.line_num, dict(zip(header, values))
