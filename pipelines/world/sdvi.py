"""SDVI: speech-driven visual interaction data (Omni-Diffusion stage 3), built by speaking
existing visual data with a TTS engine.

From a VQA row (image + question -> answer): a **spoken VQA** sample, image + the question
spoken by one voice -> the answer as text followed by the answer spoken by *another* voice
(as the paper does, so the model does not learn to copy the asker's voice).
From a caption row (image -> caption): a **speech-to-image** sample, the caption spoken
-> the image. Works on the world's manifests and on any manifest in the format: the
question is the user text without placeholders, the answer / caption the assistant text.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from omni_model.templates import PLACEHOLDERS
from pipelines.data.manifest import ManifestError, Sample, parse_line, read_lines, write_manifest
from pipelines.world.build import Voice
from pipelines.world.tts import synthesize_rows

logger = logging.getLogger(__name__)


def _question_voices() -> tuple[Voice, ...]:
    return (Voice("piper-joe", "joe", 1.0), Voice("espeak", "en-us+m3", 1.0))


def _answer_voices() -> tuple[Voice, ...]:
    return (Voice("hibari", "heart", 1.0),)


@dataclass(frozen=True)
class SDVIConfig:
    vqa_manifests: tuple[str, ...] = ("runs/world/manifests/train/vqa.jsonl",)
    caption_manifests: tuple[str, ...] = ("runs/world/manifests/train/caption.jsonl",)
    data_root: str = "runs/world"  #: media paths of the inputs (and outputs) are relative to it
    audio_dir: str = "sdvi/audio"  #: where the spoken questions/answers go, under data_root
    out: str = "runs/world/manifests/sdvi"  #: svqa.jsonl and s2i.jsonl are written here
    question_voices: tuple[Voice, ...] = field(default_factory=_question_voices)
    answer_voices: tuple[Voice, ...] = field(default_factory=_answer_voices)
    max_rows: int | None = None  #: per input kind (None: all)
    seed: int = 0
    tts_workers: int = 2


def _user_text(sample: Sample) -> str:
    text = " ".join(m["content"] for m in sample.messages if m["role"] == "user")
    return " ".join(PLACEHOLDERS.sub(" ", text).split())


def _answer(sample: Sample) -> str:
    return sample.messages[-1]["content"].strip()


def _clip(cfg: SDVIConfig, kind: str, text: str, voice: Voice) -> str:
    key = hashlib.sha1(f"{kind}\0{voice.engine}\0{voice.voice}\0{text}".encode()).hexdigest()[:16]
    return f"{cfg.audio_dir}/{kind}_{key}.wav"


def _load(paths: tuple[str, ...], root: Path, limit: int | None) -> list[Sample]:
    out = []
    for path in paths:
        for number, line in read_lines(path):
            try:
                s = parse_line(line, root)
            except ManifestError as err:
                logger.warning("%s:%d skipped: %s", path, number, err)
                continue
            if len(s.images) == 1 and not s.audios and "<|image|>" not in _answer(s):
                out.append(s)
    return out[:limit]


def build_sdvi(cfg: SDVIConfig) -> dict[str, int]:
    """Speak the inputs (on Ray) and write `svqa.jsonl` and `s2i.jsonl`; returns counts."""
    root = Path(cfg.data_root)
    rng = random.Random(cfg.seed)
    pick = lambda voices: rng.choices(voices, [v.weight for v in voices])[0]  # noqa: E731
    jobs: dict[str, dict] = {}

    def speak(kind: str, text: str, voice: Voice) -> str:
        path = _clip(cfg, kind, text, voice)
        jobs.setdefault(path, {"text": text, "engine": voice.engine, "voice": voice.voice,
                               "speed": 1.0, "seed": len(jobs), "path": path})
        return path

    svqa, s2i = [], []
    for s in _load(cfg.vqa_manifests, root, cfg.max_rows):
        question, answer = _user_text(s), _answer(s)
        q = speak("question", question, pick(cfg.question_voices))
        a = speak("answer", answer, pick(cfg.answer_voices))
        svqa.append(Sample([{"role": "user", "content": "<|image|><|audio|>"},
                            {"role": "assistant", "content": f"{answer}<|audio|>"}],
                           s.images, [q, a], "svqa", meta={**s.meta, "question": question}))
    for s in _load(cfg.caption_manifests, root, cfg.max_rows):
        caption = _answer(s)
        c = speak("caption", caption, pick(cfg.question_voices))
        s2i.append(Sample([{"role": "user", "content": "<|audio|>"},
                           {"role": "assistant", "content": "<|image|>"}],
                          s.images, [c], "s2i", meta={**s.meta, "caption": caption}))
    synthesize_rows(list(jobs.values()), str(root), cfg.tts_workers)
    out = Path(cfg.out)
    counts = {"svqa": write_manifest(out / "svqa.jsonl", svqa),
              "s2i": write_manifest(out / "s2i.jsonl", s2i), "clips": len(jobs)}
    write_manifest(out / "all.jsonl", svqa + s2i)
    return counts
