"""The tokenizers' training data: a folder of media, split into training and held-out
files and read; the voice clips the frozen-code decoder is fitted to.

Folder conventions (any depth): images (`.png`, `.jpg`, ...); audio (`.wav`, `.flac`)
with an optional transcript `<same name>.txt` beside each file (used to score
intelligibility); text: every line of every other `.txt` file, plus the transcripts.
A held-out share of each is kept for the quality report.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from omni_model.tokenizers.mel import SAMPLE_RATE, resample, to_mono
from pipelines.data.manifest import ManifestError, parse_line, read_lines, resolve_media
from pipelines.data.media import MediaError, load_audio, load_image
from pipelines.tokenizers.config import DataConfig

logger = logging.getLogger(__name__)


def split_holdout(items: list, holdout: float, rng: random.Random) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    n_out = max(1, round(len(items) * holdout)) if len(items) > 1 else 0
    return items[n_out:], items[:n_out]


def read_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            images.append(load_image(p))
        except MediaError as err:
            logger.warning("skipping %s: %s", p, err)
    return images


def read_audio(paths: list[Path], max_seconds: float) -> tuple[list[torch.Tensor], list[str | None], list[Path]]:
    """Waveforms, transcripts (`<clip>.txt`, None where absent) and the paths read."""
    waves, texts, kept = [], [], []
    for p in paths:
        try:
            data, rate = load_audio(p, max_seconds)
        except MediaError as err:
            logger.warning("skipping %s: %s", p, err)
            continue
        waves.append(resample(to_mono(data), rate, SAMPLE_RATE))
        transcript = p.with_suffix(".txt")
        texts.append(transcript.read_text().strip() if transcript.exists() else None)
        kept.append(p)
    return waves, texts, kept


#: a voice clip's draw weight from the number of rows that say it; None: every clip
#: equally (train_code_decoder's own uniform draw)
VOICE_DRAWS: dict[str, Callable[[int], float] | None] = {"clips": None, "sqrt": math.sqrt, "rows": float}


def voice_clips(data: DataConfig) -> Counter[Path] | None:
    """The resolved paths of the voice manifests' spoken outputs, with the number of rows
    that say each (None: no manifests)."""
    if data.voice_draw not in VOICE_DRAWS:
        raise ValueError(f"data.voice_draw must be one of {sorted(VOICE_DRAWS)}, not {data.voice_draw!r}")
    if not data.voice_manifests:
        return None
    if not data.voice_root:
        raise ValueError("data.voice_manifests needs data.voice_root (their media paths' root)")
    root, clips = Path(data.voice_root), Counter()
    for manifest in data.voice_manifests:
        for number, line in read_lines(manifest):
            try:
                sample = parse_line(line, root, check_files=False)
                clips.update(resolve_media(root, rel) for rel in sample.spoken_outputs())
            except ManifestError as err:
                logger.warning("%s line %d left out of the voice: %s", manifest, number, err)
    return clips


def decoder_clips(train: list[Path], held: list[Path], voice: Counter[Path] | None, draw: str
                  ) -> tuple[list[int], list[int], list[float] | None]:
    """The clips the frozen-code decoder is fitted to: indices of the training clips in the
    voice (all of them without voice manifests), indices of the held-out clips said by
    more than one row, and each one's draw weight in that order (None: drawn equally)."""
    if voice is None:
        return list(range(len(train))), [], None
    fitted = [i for i, p in enumerate(train) if p.resolve() in voice]
    said_again = [i for i, p in enumerate(held) if voice.get(p.resolve(), 0) > 1]
    weigh = VOICE_DRAWS[draw]
    if weigh is None:
        return fitted, said_again, None
    return fitted, said_again, [weigh(voice[p.resolve()]) for p in [*(train[i] for i in fitted),
                                                                     *(held[i] for i in said_again)]]
