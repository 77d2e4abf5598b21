"""Held-out manifests (the published format) into evaluation cases, media loaded.

A row that cannot be a case (not JSON, a wrong field, media missing, not a regular
file, over a limit of `EvalConfig.limits`, a scene that is not one: any exception it
raises) is quarantined with its file, line and reason, and the others still load. Media
are checked from their headers before any is decoded, as in the tokenize job: audio
within `limits.max_audio_seconds`, images within `limits.max_image_pixels`, the row's
media together within `limits.max_row_decoded_bytes`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from omni_model.any_to_any import Audio
from omni_model.templates import Text, split_placeholders
from pipelines.data.manifest import ManifestError, Sample, parse_line, read_bounded_lines, resolve_media
from pipelines.data.media import MediaLimits, check_row_media, load_audio, load_image
from pipelines.evaluation.tasks import Case, spec
from pipelines.world.scenes import Scene

logger = logging.getLogger(__name__)


def manifest_for(task: str, manifests: Sequence[str]) -> Path | None:
    """The first `{task}.jsonl` among the manifest folders."""
    return next((Path(m) / f"{task}.jsonl" for m in manifests if (Path(m) / f"{task}.jsonl").exists()), None)


def load_cases(cfg, task: str, quarantine: list[dict] | None = None) -> list[Case]:
    """The first `cfg.max_per_task` examples of `task` (media under `cfg.data_root`,
    checked and loaded) from `cfg.manifests`: folders of per-task manifests (the first
    `{task}.jsonl` among them), then manifest files, whose rows of `task` are read (a
    user's own set: one file, any tasks, each row naming its `task`). A row that
    cannot be a case is skipped and appended to `quarantine` as `{task, source, line,
    reason}` (logged when no list is given)."""
    root = Path(cfg.data_root)
    limits: MediaLimits = cfg.limits
    missing = [m for m in cfg.manifests if not Path(m).exists()]
    if missing:
        raise FileNotFoundError(f"evaluate.manifests: no such file or folder: {', '.join(map(str, missing))}")
    folder_file = manifest_for(task, [m for m in cfg.manifests if Path(m).is_dir()])
    files = [Path(m) for m in cfg.manifests if Path(m).is_file()]
    cases: list[Case] = []
    for path in ([folder_file] if folder_file else []) + files:
        for number, line, size in read_bounded_lines(path, cfg.max_line_bytes):
            try:
                if size > cfg.max_line_bytes:
                    raise ManifestError(f"line of {size} bytes is over the limit of {cfg.max_line_bytes}")
                sample = parse_line(line, root, max_media=limits.max_media_per_row)
                if sample.task != task:
                    continue
                cases.append(case_of(sample, root, limits))
            except Exception as err:  # noqa: BLE001 - one row never stops the evaluation
                reason = f"{type(err).__name__}: {err}"[:2000]
                logger.warning("%s:%d: quarantined: %s", path, number, reason)
                if quarantine is not None:
                    quarantine.append({"task": task, "source": str(path), "line": number, "reason": reason})
                continue
            if len(cases) >= cfg.max_per_task:
                return cases
    if not cases:
        logger.warning("no held-out examples of %s in %s", task, cfg.manifests)
    return cases


def case_of(sample: Sample, root: Path, limits: MediaLimits = MediaLimits()) -> Case:
    """A manifest row as a case: the user turn's parts as API inputs, the task's reference.
    Its media are checked from their headers (regular files, limits, the row's budget)
    before any is decoded."""
    image_paths = [resolve_media(root, rel) for rel in sample.images]
    audio_paths = [resolve_media(root, rel) for rel in sample.audios]
    check_row_media(image_paths, audio_paths, limits)
    user = sample.messages[0]["content"]
    images = (load_image(path, limits.max_image_pixels) for path in image_paths)
    audios = (audio_at(path, limits) for path in audio_paths)
    inputs = [p.text if isinstance(p, Text) else p for p in split_placeholders(user, images, audios)
              if not (isinstance(p, Text) and not p.text.strip())]
    meta = sample.meta or {}
    scene = Scene.from_dict(meta["scene"]) if "scene" in meta else None
    outputs = sample.spoken_outputs()
    spoken = audio_at(resolve_media(root, outputs[-1]), limits) if outputs else None
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


def audio_at(path: Path, limits: MediaLimits = MediaLimits()) -> Audio:
    """A clip as an API input, read within the limits' length, rate and channels."""
    wave, rate = load_audio(path, limits.max_audio_seconds, limits.max_sample_rate, limits.max_channels)
    return Audio(wave.T if wave.ndim == 2 else wave, rate)  # [C, N]
