"""Public evaluation sets, as their downloads lay them out, into evaluation manifests
(the published JSONL format, one `task` per row), so `jobs/evaluate.py` reads them like
any held-out set. Nothing is downloaded: each function reads a local copy.

- LibriSpeech (ASR, WER): `{speaker}/{chapter}/{speaker}-{chapter}.trans.txt` lines
  `UTTERANCE-ID TRANSCRIPT` beside `UTTERANCE-ID.flac`; point it at a split
  (`test-clean`, `test-other`).
- LibriTTS (TTS, intelligibility): `{speaker}/{chapter}/{id}.wav` beside
  `{id}.normalized.txt`; the text is what the model speaks, the WAV the reference.
- MME (yes/no perception and cognition, accuracy and accuracy+): one folder per
  category holding either the images and `{name}.txt` side by side, or `images/` and
  `questions_answers_YN/`; each text file has two `question<TAB>answer` lines.
- POPE (object hallucination, yes/no): its question files (`coco_pope_random.json`,
  `_popular`, `_adversarial`: one JSON object a line, `image`, `text`, `label`) and the
  COCO val2014 images they name.

Media paths are written relative to `data_root` (the evaluation's `evaluate.data_root`)
and must lie inside it. A row is `meta.image_id` grouped where a set asks questions per
image (MME's accuracy+), and names its `meta.category` / `meta.split`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

from pipelines.data.manifest import ManifestError, Sample, resolve_media, write_manifest

logger = logging.getLogger(__name__)

ASR_INSTRUCTION = "Convert the speech to text."
TTS_INSTRUCTION = "Convert the text to speech."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SETS = ("librispeech", "libritts", "mme", "pope")


def _relative(path: Path, data_root: Path) -> str:
    try:
        return path.resolve().relative_to(data_root.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside the data root {data_root}") from None


def librispeech(split: Path, data_root: Path) -> Iterator[Sample]:
    """ASR rows of a LibriSpeech split, in file order."""
    for transcripts in sorted(split.rglob("*.trans.txt")):
        for line in transcripts.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utterance, _, text = line.partition(" ")
            audio = transcripts.parent / f"{utterance}.flac"
            if not audio.is_file():
                logger.warning("%s: no audio for %s", transcripts, utterance)
                continue
            yield Sample([{"role": "user", "content": f"{ASR_INSTRUCTION}\n<|audio|>"},
                          {"role": "assistant", "content": text.strip()}],
                         audios=[_relative(audio, data_root)], task="asr", id=utterance)


def libritts(split: Path, data_root: Path) -> Iterator[Sample]:
    """TTS rows of a LibriTTS split: the normalised text to speak, its recording as the
    reference answer."""
    for text_file in sorted(split.rglob("*.normalized.txt")):
        audio = text_file.with_name(text_file.name.replace(".normalized.txt", ".wav"))
        if not audio.is_file():
            logger.warning("%s: no audio beside it", text_file)
            continue
        text = text_file.read_text(encoding="utf-8").strip()
        yield Sample([{"role": "user", "content": f"{TTS_INSTRUCTION}\n{text}"},
                      {"role": "assistant", "content": "<|audio|>"}],
                     audios=[_relative(audio, data_root)], task="tts", id=audio.stem)


def mme(root: Path, data_root: Path) -> Iterator[Sample]:
    """Yes/no rows of MME: every category folder under `root`, two questions an image."""
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        if (category / "questions_answers_YN").is_dir():
            pairs = [(q, category / "images") for q in sorted((category / "questions_answers_YN").glob("*.txt"))]
        else:
            pairs = [(q, category) for q in sorted(category.glob("*.txt"))]
        for questions, image_dir in pairs:
            image = next((image_dir / (questions.stem + s) for s in IMAGE_SUFFIXES
                          if (image_dir / (questions.stem + s)).is_file()), None)
            if image is None:
                logger.warning("%s: no image named %s", questions, questions.stem)
                continue
            rel = _relative(image, data_root)
            for k, line in enumerate(l for l in questions.read_text(encoding="utf-8").splitlines() if l.strip()):
                question, _, answer = line.rpartition("\t")
                yield Sample([{"role": "user", "content": f"<|image|>\n{question.strip()}"},
                              {"role": "assistant", "content": answer.strip()}],
                             images=[rel], task="vqa", id=f"{category.name}/{questions.stem}/{k}",
                             meta={"image_id": f"{category.name}/{questions.stem}", "category": category.name})


def pope(questions: Path, images: Path, data_root: Path) -> Iterator[Sample]:
    """Yes/no rows of one POPE question file; `images` holds the COCO images it names."""
    split = questions.stem.rsplit("_", 1)[-1]
    for number, line in enumerate(questions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            image = resolve_media(images, row["image"])
        except ManifestError as err:
            logger.warning("%s:%d: %s", questions, number, err)
            continue
        if not image.is_file():
            logger.warning("%s:%d: no image %s", questions, number, image)
            continue
        yield Sample([{"role": "user", "content": f"<|image|>\n{row['text'].strip()}"},
                      {"role": "assistant", "content": str(row["label"]).strip()}],
                     images=[_relative(image, data_root)], task="vqa", id=f"{split}/{row.get('question_id', number)}",
                     meta={"image_id": row["image"], "split": split})


def write_set(name: str, source: str | Path, out: str | Path, data_root: str | Path,
              images: str | Path | None = None) -> int:
    """Write the manifest of one public set; returns its rows. `source`: the split
    folder (LibriSpeech, LibriTTS), MME's root, or a POPE question file (with `images`,
    the COCO folder)."""
    source, data_root = Path(source), Path(data_root)
    if not source.exists():
        raise FileNotFoundError(f"{name}: no such file or folder {source}")
    if name == "librispeech":
        rows = librispeech(source, data_root)
    elif name == "libritts":
        rows = libritts(source, data_root)
    elif name == "mme":
        rows = mme(source, data_root)
    elif name == "pope":
        if images is None:
            raise ValueError("pope needs the COCO images folder (images=)")
        rows = pope(source, Path(images), data_root)
    else:
        raise ValueError(f"unknown set {name!r}; known: {', '.join(SETS)}")
    return write_manifest(out, rows)


__all__ = ["SETS", "librispeech", "libritts", "mme", "pope", "write_set"]
