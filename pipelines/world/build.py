"""Building the synthetic world's data on Ray: rendered scenes, spoken captions, and
manifests for every task.

Output layout under `out/` (SPLIT is `train` or `eval`; eval scenes are never trained on,
by the tokenizers either):

    SPLIT/images/scene_000123.png     the scene renders
    SPLIT/audio/caption_000123.wav    a caption of each scene, spoken (ASR input, TTS target),
                                      with its transcript in caption_000123.txt
    SPLIT/text.txt                    every text of the split's manifests (BPE corpus)
    manifests/SPLIT/{task}.jsonl      t2i, caption, vqa, asr, tts, text; and all.jsonl

Rendering and speech synthesis are Ray Data stages; the manifests are written by the
driver from the (deterministic) scene list. Existing files are kept, so a re-run after
an interruption only does what is missing.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni_model.templates import PLACEHOLDERS
from pipelines.data.manifest import Sample, write_manifest
from pipelines.world.scenes import captions, make_scene, questions, render
from pipelines.world.tts import synthesize_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Voice:
    engine: str  #: espeak | hibari | piper-joe
    voice: str = ""  #: engine voice ("" for the engine's default)
    weight: float = 1.0


def _default_voices() -> tuple[Voice, ...]:
    return (Voice("hibari", "heart", 3.0), Voice("espeak", "en-us+m3", 1.0),
            Voice("espeak", "en-gb+f2", 1.0))


@dataclass(frozen=True)
class WorldConfig:
    out: str = "runs/world"
    seed: int = 0
    train_scenes: int = 2000
    eval_scenes: int = 200
    image_size: int = 32
    group_share: float = 0.3  #: share of counting scenes (2-3 identical objects)
    questions_per_scene: int = 2
    #: voices of spoken captions (ASR inputs); the TTS task's target voice is the first
    caption_voices: tuple[Voice, ...] = field(default_factory=_default_voices)
    speed_range: tuple[float, float] = (0.9, 1.15)
    tts_workers: int = 2
    render_batch: int = 64


PROMPTS = {
    "t2i": ["Generate an image of {c}.", "Draw {c}.", "Make a picture: {c}."],
    "caption": ["Describe the image.", "What is in this picture?", "Write a caption."],
    "asr": ["Convert the speech to text.", "Transcribe the audio."],
    "tts": ["Convert the text to speech.", "Say this out loud."],
}


def _chat(user: str, assistant: str, task: str, images=(), audios=(), meta=None) -> Sample:
    return Sample([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                  list(images), list(audios), task, meta=meta or {})


def scene_samples(index: int, cfg: WorldConfig) -> dict[str, list[Sample]]:
    """All manifest samples of one scene, per task."""
    scene = make_scene(cfg.seed, index, cfg.group_share)
    rng = random.Random(f"{cfg.seed}:samples:{index}")
    caps = captions(scene)
    cap = rng.choice(caps)
    spoken = caps[0]
    split = _split(index, cfg)
    image, audio = f"{split}/images/scene_{index:06d}.png", f"{split}/audio/caption_{index:06d}.wav"
    meta = {"scene": scene.to_dict(), "index": index}
    qa = questions(scene, rng)
    rng.shuffle(qa)
    out = {
        "t2i": [_chat(rng.choice(PROMPTS["t2i"]).format(c=cap), "<|image|>", "t2i", images=[image],
                      meta=meta)],
        "caption": [_chat("<|image|>\n" + rng.choice(PROMPTS["caption"]), cap, "caption",
                          images=[image], meta=meta)],
        "vqa": [_chat(f"<|image|>\n{q}", a, "vqa", images=[image], meta={**meta, "question": q})
                for q, a in qa[: cfg.questions_per_scene]],
        "asr": [_chat(rng.choice(PROMPTS["asr"]) + "\n<|audio|>", spoken, "asr", audios=[audio],
                      meta=meta)],
        "tts": [_chat(rng.choice(PROMPTS["tts"]) + "\n" + spoken, "<|audio|>", "tts", audios=[audio],
                      meta=meta)],
        "text": [_chat(f"{cap}. {q.replace('the image', 'it')}", a, "text",
                       meta={**meta, "question": q}) for q, a in qa[:1]],
    }
    return out


def speech_rows(indices: list[int], cfg: WorldConfig) -> list[dict]:
    """One TTS job per scene: its first caption, in a voice drawn by weight."""
    rows = []
    voices = list(cfg.caption_voices)
    weights = [v.weight for v in voices]
    for index in indices:
        rng = random.Random(f"{cfg.seed}:voice:{index}")
        # TTS targets (the first voice) must be one consistent speaker, so the task's
        # answer voice is fixed; ASR inputs see every voice.
        v = voices[0] if index % 2 == 0 else rng.choices(voices, weights)[0]
        rows.append({"text": captions(make_scene(cfg.seed, index, cfg.group_share))[0],
                     "engine": v.engine, "voice": v.voice, "speed": rng.uniform(*cfg.speed_range),
                     "seed": index, "path": f"{_split(index, cfg)}/audio/caption_{index:06d}.wav"})
    return rows


def _split(index: int, cfg: WorldConfig) -> str:
    return "train" if index < cfg.train_scenes else "eval"


def render_batch(batch: dict[str, np.ndarray], out: str, seed: int, size: int,
                 group_share: float, train_scenes: int) -> dict[str, np.ndarray]:
    """Ray Data stage: scene indices -> PNG files (kept if present)."""
    for index in batch["index"]:
        split = "train" if index < train_scenes else "eval"
        path = Path(out) / split / "images" / f"scene_{int(index):06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_suffix(".tmp.png")
            render(make_scene(seed, int(index), group_share), size).save(tmp)
            tmp.replace(path)
    return batch


def build_world(cfg: WorldConfig) -> dict:
    """Render, speak and write manifests; returns counts per split and task."""
    import ray

    out = Path(cfg.out)
    indices = list(range(cfg.train_scenes + cfg.eval_scenes))
    ray.data.range(len(indices)).map_batches(
        lambda b: {"index": b["id"]}).map_batches(
        render_batch, fn_kwargs={"out": str(out), "seed": cfg.seed, "size": cfg.image_size,
                                 "group_share": cfg.group_share, "train_scenes": cfg.train_scenes},
        batch_size=cfg.render_batch, num_cpus=0.5).materialize()

    rows = speech_rows(indices, cfg)
    synthesize_rows(rows, str(out), cfg.tts_workers)  # also writes each clip's transcript

    counts: dict = {}
    for split, idx in (("train", indices[: cfg.train_scenes]), ("eval", indices[cfg.train_scenes:])):
        per_task: dict[str, list[Sample]] = {}
        for i in idx:
            for task, samples in scene_samples(i, cfg).items():
                per_task.setdefault(task, []).extend(samples)
        for task, samples in per_task.items():
            write_manifest(out / "manifests" / split / f"{task}.jsonl", samples)
        everything = [s for task in sorted(per_task) for s in per_task[task]]
        write_manifest(out / "manifests" / split / "all.jsonl", everything)
        _write_corpus(out / split / "text.txt", everything)
        counts[split] = {task: len(s) for task, s in per_task.items()}
    return counts


def _write_corpus(path: Path, samples: list[Sample]) -> None:
    """Every message text without media placeholders, one per line (the BPE corpus)."""
    lines = []
    for s in samples:
        for m in s.messages:
            text = PLACEHOLDERS.sub(" ", m["content"])
            lines += [t.strip() for t in text.splitlines() if t.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
