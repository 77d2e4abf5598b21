"""The scores, as pure functions of references and answers (tested on ground truth, where
they are perfect, and on random answers, where they are at chance)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from omni_model.metrics import normalize_text, word_error_rate
from pipelines.world.checker import Agreement, check_image
from pipelines.world.scenes import ANSWERS, Scene

__all__ = ["chance_levels", "exact_match", "says", "score_images", "word_error_rate"]


def score_images(scenes: Sequence[Scene], images: Sequence[Image.Image]) -> dict[str, float]:
    """Per-attribute agreement of the checker's reading of each image generated from a
    description with the scene described: what the description states (a group's
    places are not stated; `Agreement.described_only`)."""
    agreement = Agreement(described_only=True)
    for scene, image in zip(scenes, images, strict=True):
        agreement.add(scene, check_image(image))
    return agreement.rates()


def exact_match(references: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> float:
    """Share of predictions whose normalised words equal the reference's (or, where a
    reference is a list of acceptable answers, any one of them)."""
    pairs = list(zip(references, predictions, strict=True))
    accepted = [[refs] if isinstance(refs, str) else refs for refs, _ in pairs]
    hits = sum(normalize_text(p) in map(normalize_text, ok) for ok, (_, p) in zip(accepted, pairs))
    return hits / max(1, len(pairs))


def says(references: Sequence[str], transcripts: Sequence[str]) -> float:
    """Share of transcripts that contain every word of their reference."""
    pairs = list(zip(references, transcripts, strict=True))
    return sum(set(normalize_text(r)) <= set(normalize_text(t)) for r, t in pairs) / max(1, len(pairs))


def chance_levels() -> dict[str, float]:
    """What guessing scores: a uniformly random world answer for VQA (the model could
    do better by guessing per question type; this is the floor a report compares to)."""
    return {"vqa": 1 / len(ANSWERS)}
