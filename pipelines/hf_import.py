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
a row that cannot be (undecodable media, an empty text, a media path outside the
dataset folder) goes to `OUT/quarantine.jsonl` with its reason, and nothing is lost
silently. The manifest then goes through the tokenize job (Ray Data, the same
quarantine) or straight into the evaluation (`evaluate.manifests`).

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

from pipelines.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, MediaError, load_audio, load_image

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
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0

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
        for index, row in enumerate(rows):
            if cfg.limit is not None and index >= cfg.limit:
                break
            try:
                line = _manifest_row(cfg, root, out, index, row, columns)
            except (MediaError, ValueError, OSError) as err:
                quarantine.write(json.dumps({"index": index, "reason": f"{type(err).__name__}: {err}"}) + "\n")
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
    if "image" in value:
        picture = load_image(_media_bytes(value["image"], root), cfg.max_image_pixels)
        name = f"media/{task}_{index:07d}.png"
        picture.save(out / name)
        images.append(name)
    if "audio" in value:
        wave, rate = load_audio(_media_bytes(value["audio"], root), cfg.max_audio_seconds)
        name = f"media/{task}_{index:07d}.wav"
        sf.write(out / name, np.clip(wave, -1, 1), rate, subtype="PCM_16")
        audios.append(name)
    if task in ("asr", "tts", "t2i"):
        text = _text(value["text"], "text")
        user = PROMPTS[task].format(text=text)
        answer = {"asr": text, "tts": "<|audio|>", "t2i": "<|image|>"}[task]
    elif task == "caption":
        captions = _texts(value["text"], "text")
        user, answer = PROMPTS[task], captions[0]
        if len(captions) > 1:
            meta["captions"] = captions
    else:  # vqa
        user = PROMPTS[task].format(question=_text(value["question"], "question"))
        humans = _answers(row.get(cfg.column("answers"))) if cfg.column("answers") in columns else []
        given = row.get(cfg.column("answer"))
        answer = _text(given, "answer") if given not in (None, "") else _most_common(humans)
        if humans:
            meta["answers"] = humans
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "images": images, "audios": audios, "task": task, "meta": meta}


def _media_bytes(value: Any, root: Path) -> bytes:
    """The stored bytes of an undecoded `Image`/`Audio` value, or the file it names
    (which must lie inside the dataset folder)."""
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    path = value.get("path") if isinstance(value, dict) else value
    if not path:
        raise ValueError("no media in this row")
    file = (root / path).resolve()
    if not file.is_relative_to(root):
        raise ValueError(f"media path {path!r} lies outside the dataset folder")
    return file.read_bytes()


def _text(value: Any, role: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"the {role} is empty or not text: {str(value)[:60]!r}")
    return " ".join(value.split())


def _texts(value: Any, role: str) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        texts = [_text(v, role) for v in value]
        if not texts:
            raise ValueError(f"the {role} list is empty")
        return texts
    return [_text(value, role)]


def _answers(value: Any) -> list[str]:
    """Human answers: strings, or VQA v2's `{"answer": ..., "answer_confidence": ...}`."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    return [_text(v.get("answer") if isinstance(v, dict) else v, "answers") for v in items]


def _most_common(answers: list[str]) -> str:
    if not answers:
        raise ValueError("neither an answer nor human answers")
    return Counter(answers).most_common(1)[0][0]


# ---------------------------------------------------------------------- reading
def _open(root: Path, cfg: ImportConfig) -> tuple[Iterator[dict], set[str]]:
    """The rows (media undecoded) and the column names of the dataset."""
    layout = cfg.layout if cfg.layout != "auto" else _detect(root)
    if layout == "audiofolder":
        rows = _audiofolder(root)
        return iter(rows), set().union(*(r.keys() for r in rows)) if rows else set()
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
    return iter(data), set(data.column_names)


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


def _audiofolder(root: Path) -> list[dict]:
    """`datasets`' audiofolder layout: audio files and a metadata.csv or metadata.jsonl
    whose `file_name` names each (relative to the metadata file's folder)."""
    rows: list[dict] = []
    for meta in sorted([*root.rglob("metadata.csv"), *root.rglob("metadata.jsonl")]):
        if meta.suffix == ".csv":
            with open(meta, newline="") as f:
                entries = list(csv.DictReader(f))
        else:
            entries = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        for entry in entries:
            name = entry.pop("file_name", None)
            path = str((meta.parent / name).relative_to(root)) if name and not Path(name).is_absolute() else name
            rows.append({"audio": {"bytes": None, "path": path}, **entry})
    if not rows:
        raise ValueError(f"{root}: an audiofolder needs a metadata.csv or metadata.jsonl with file_name")
    return rows
