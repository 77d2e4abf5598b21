"""Held-out manifests (the published format) into evaluation cases, media loaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from omni_model.pipeline import Audio
from omni_model.templates import Text, split_placeholders
from pipelines.evaluation.tasks import Case, spec
from pipelines.manifest import Sample, parse_line, read_lines, resolve_media
from pipelines.media import load_audio, load_image
from pipelines.world import Scene

logger = logging.getLogger(__name__)


def manifest_for(task: str, manifests: Sequence[str]) -> Path | None:
    """The first `{task}.jsonl` among the manifest folders."""
    return next((Path(m) / f"{task}.jsonl" for m in manifests if (Path(m) / f"{task}.jsonl").exists()), None)


def load_cases(cfg, task: str) -> list[Case]:
    """The first `cfg.max_per_task` examples of `task` from `cfg.manifests` (media under
    `cfg.data_root`, checked and loaded)."""
    root = Path(cfg.data_root)
    path = manifest_for(task, cfg.manifests)
    if path is None:
        logger.warning("no held-out manifest for %s in %s", task, cfg.manifests)
        return []
    cases = []
    for _, line in read_lines(path):
        cases.append(case_of(parse_line(line, root), root))
        if len(cases) >= cfg.max_per_task:
            break
    return cases


def case_of(sample: Sample, root: Path) -> Case:
    """A manifest row as a case: the user turn's parts as API inputs, the task's reference."""
    user = sample.messages[0]["content"]
    images = (load_image(resolve_media(root, rel)) for rel in sample.images)
    audios = (audio_at(resolve_media(root, rel)) for rel in sample.audios)
    inputs = [p.text if isinstance(p, Text) else p for p in split_placeholders(user, images, audios)
              if not (isinstance(p, Text) and not p.text.strip())]
    meta = sample.meta or {}
    scene = Scene.from_dict(meta["scene"]) if "scene" in meta else None
    outputs = sample.spoken_outputs()
    spoken = audio_at(resolve_media(root, outputs[-1])) if outputs else None
    return Case(sample.task, inputs, spec(sample.task).reference(sample), scene, prompt=user, answer_audio=spoken)


def audio_at(path: Path) -> Audio:
    wave, rate = load_audio(path)
    return Audio(wave.T if wave.ndim == 2 else wave, rate)  # [C, N]
