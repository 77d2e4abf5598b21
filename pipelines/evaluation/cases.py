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
    """The first `cfg.max_per_task` examples of `task` (media under `cfg.data_root`,
    checked and loaded) from `cfg.manifests`: folders of per-task manifests (the first
    `{task}.jsonl` among them), then manifest files, whose rows of `task` are read (a
    user's own set: one file, any tasks, each row naming its `task`)."""
    root = Path(cfg.data_root)
    missing = [m for m in cfg.manifests if not Path(m).exists()]
    if missing:
        raise FileNotFoundError(f"evaluate.manifests: no such file or folder: {', '.join(map(str, missing))}")
    folder_file = manifest_for(task, [m for m in cfg.manifests if Path(m).is_dir()])
    files = [Path(m) for m in cfg.manifests if Path(m).is_file()]
    cases: list[Case] = []
    for path in ([folder_file] if folder_file else []) + files:
        for number, line in read_lines(path):
            try:
                sample = parse_line(line, root)
                if sample.task != task:
                    continue
                cases.append(case_of(sample, root))
            except (ValueError, OSError) as err:  # ManifestError is a ValueError
                raise ValueError(f"{path}:{number}: {err}") from err
            if len(cases) >= cfg.max_per_task:
                return cases
    if not cases:
        logger.warning("no held-out examples of %s in %s", task, cfg.manifests)
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
    return Case(sample.task, inputs, spec(sample.task).reference(sample), scene, prompt=user, answer_audio=spoken,
                references=_references(meta), group=str(meta.get("image_id") or next(iter(sample.images), "")) or None)


def _references(meta: dict) -> list[str] | None:
    """`meta.answers` (VQA's human answers) or `meta.captions` (reference captions)."""
    for key in ("answers", "captions"):
        if key in meta:
            refs = meta[key]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"meta.{key} must be a non-empty list of strings, got {refs!r}")
            return refs
    return None


def audio_at(path: Path) -> Audio:
    wave, rate = load_audio(path)
    return Audio(wave.T if wave.ndim == 2 else wave, rate)  # [C, N]
