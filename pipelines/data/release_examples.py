"""Manifest rows -> training examples of the released model (a Ray Data `map_batches`
callable, plain `batch -> table`, so tests call it without Ray).

A row of the published JSONL manifest (`pipelines/data/manifest.py`) is parsed and its media
checked from their headers within `MediaLimits`; then a user's speech becomes SenseVoice
front-end features (the release's continuous speech input; dither drawn from a
generator seeded by the row, so a rerun gives the same features), images become
MAGVIT-v2 codes (512 px in a user turn, 256 px in an assistant's, as the official
training encodes them), an assistant's speech GLM-4-Voice codes, and the conversation
the ids the official training builds (`omni_model.release.finetune.release_example`).
Every row comes out: an example, or an empty one whose `reason` says why it is
quarantined (unparsable, a file missing or past a limit, an image or spoken answer with
no tokenizer to encode it, longer than `max_len` with its tail pads). Nothing a row holds
stops the run.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from omni_model.model_folder import read_config
from omni_model.release.finetune import Turn, release_example
from omni_model.release.images import input_pixels
from omni_model.release.model import SENSEVOICE_FOLDER
from omni_model.release.tokenizer import ReleaseTokenizer
from omni_model.templates import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, PLACEHOLDERS
from omni_model.tokenizers.mel import resample, to_mono
from omni_model.tokenizers.sensevoice import SenseVoiceFrontend, context_positions
from pipelines.data.manifest import ManifestError, parse_line, resolve_media
from pipelines.data.media import MediaError, MediaLimits, check_row_media, load_audio, load_image

#: one example a row; `reason` empty for a good one, the quarantine reason otherwise
EXAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("source", pa.string()), ("line", pa.int64()), ("task", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()),  # the line itself, kept for quarantined rows only
    ("input_ids", pa.list_(pa.int32())), ("response_mask", pa.list_(pa.int8())),
    ("audio_starts", pa.list_(pa.int32())),  # first context position of each speech input
    ("audio_frames", pa.list_(pa.int32())),  # its feature frames (context positions = frames + 4)
    ("audio_features", pa.list_(pa.float32())),  # the features of all, frame after frame
])


class ReleaseExamples:
    """Ray Data stage: manifest lines (`raw`, `line`, `source`, `sample_id`) -> rows of
    `EXAMPLE_SCHEMA`. Loads the release's tokenizer and speech front end (and the image
    and speech tokenizers, when given) once per actor."""

    def __init__(self, release: str, data_root: str, max_len: int, max_pads: int = 16,
                 image_tokenizer: str | None = None, speech_tokenizer: str | None = None,
                 image_input_size: int = 512, image_output_size: int = 256, dither: float = 1.0,
                 seed: int = 0, limits: Mapping[str, Any] | MediaLimits | None = None,
                 sensevoice_folder: str | None = None, device: str = "cpu") -> None:
        self.tokenizer = ReleaseTokenizer.from_folder(release)
        size = read_config(release)["vocab_size"]
        self.vocab = self.tokenizer.vocab(size)
        self.frontend = SenseVoiceFrontend.from_folder(sensevoice_folder or Path(release) / SENSEVOICE_FOLDER,
                                                       dither=dither)
        self.root = Path(data_root)
        self.max_len, self.max_pads, self.seed = max_len, max_pads, seed
        self.sizes = {"user": image_input_size, "system": image_output_size, "assistant": image_output_size}
        self.limits = limits if isinstance(limits, MediaLimits) else MediaLimits(**dict(limits or {}))
        self.image = self.speech = None
        if image_tokenizer:
            from omni_model.tokenizers.image import MagVitTokenizer

            self.image = MagVitTokenizer.from_pretrained(image_tokenizer, device=device)
        if speech_tokenizer:
            from omni_model.tokenizers.speech import GLM4VoiceTokenizer

            self.speech = GLM4VoiceTokenizer.from_pretrained(speech_tokenizer, device=device)

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        rows = []
        for i, raw in enumerate(batch["raw"]):
            row = {"sample_id": str(batch["sample_id"][i]), "source": str(batch["source"][i]),
                   "line": int(batch["line"][i]), "task": "", "reason": "", "raw": "", "input_ids": [],
                   "response_mask": [], "audio_starts": [], "audio_frames": [], "audio_features": []}
            try:
                row.update(self.example(str(raw), row["sample_id"]))
            except Exception as err:  # noqa: BLE001 - row content never stops the run
                row["reason"] = str(err) if isinstance(err, (ManifestError, MediaError, ValueError)) \
                    else f"{type(err).__name__}: {err}"
                row["reason"] = row["reason"][:2000]
                row["raw"] = str(raw)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)

    def example(self, raw: str, sample_id: str) -> dict[str, Any]:
        """One manifest line -> the example's columns (raises with the quarantine reason)."""
        sample = parse_line(raw, self.root, max_media=self.limits.max_media_per_row)
        images = [resolve_media(self.root, rel) for rel in sample.images]
        audios = [resolve_media(self.root, rel) for rel in sample.audios]
        check_row_media(images, audios, self.limits)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{sample_id}".encode()))
        turns, features = [], []
        for message in sample.messages:
            role, parts = message["role"], []
            for piece in PLACEHOLDERS.split(message["content"]):
                if piece == IMAGE_PLACEHOLDER:
                    parts.append(("image", self._image_codes(images.pop(0), role)))
                elif piece == AUDIO_PLACEHOLDER:
                    path = audios.pop(0)
                    if role == "assistant":
                        parts.append(("audio_out", self._speech_codes(path)))
                    elif role == "user":
                        feats = self._features(path, generator)
                        features.append(feats)
                        parts.append(("audio_in", context_positions(feats.shape[0])))
                    else:
                        raise ManifestError("speech in a system message: the release hears a user's speech only")
                elif piece:
                    parts.append(piece)
            turns.append(Turn(role, tuple(parts)))
        example = release_example(turns, self.tokenizer, self.vocab)
        if len(example.ids) + self.max_pads > self.max_len:
            raise ValueError(f"{len(example.ids)} tokens and up to {self.max_pads} tail pads exceed "
                             f"max_seq_len={self.max_len} (a sample is never cut)")
        return {"task": sample.task, "input_ids": example.ids, "response_mask": [int(m) for m in example.response_mask],
                "audio_starts": [s for s, _ in example.audio_spans],
                "audio_frames": [int(f.shape[0]) for f in features],
                "audio_features": np.concatenate([f.reshape(-1).numpy() for f in features]).tolist()
                if features else []}

    def _features(self, path: Path, generator: torch.Generator) -> torch.Tensor:
        wave, rate = load_audio(path, self.limits.max_audio_seconds, self.limits.max_sample_rate,
                                self.limits.max_channels)
        wave = resample(to_mono(wave), rate, self.frontend.config.fs)
        if self.frontend.num_frames(wave.numel()) < 1 or wave.numel() < self.frontend.config.shift_samples:
            raise MediaError(f"audio of {wave.numel()} samples gives no SenseVoice feature frame")
        feats, lengths = self.frontend([wave], generator=generator)
        return feats[0, :int(lengths[0])]

    def _image_codes(self, path: Path, role: str) -> list[int]:
        if self.image is None:
            raise ManifestError("the row has an image but no data.image_tokenizer (MAGVIT-v2) is configured")
        pixels = input_pixels(load_image(path, self.limits.max_image_pixels), self.sizes[role])
        with torch.no_grad():
            codes = self.image.encode(pixels[None].to(self.image_device))[0]
        return codes.tolist()

    def _speech_codes(self, path: Path) -> list[int]:
        if self.speech is None:
            raise ManifestError("the assistant speaks but no data.speech_tokenizer (GLM-4-Voice) is configured")
        wave, rate = load_audio(path, self.limits.max_audio_seconds, self.limits.max_sample_rate,
                                self.limits.max_channels)
        return self.speech.encode([wave], rate)[0].tolist()

    @property
    def image_device(self) -> torch.device:
        return next(self.image.parameters()).device


def manifest_batch(manifest: str | Path, source: str | None = None, max_line_bytes: int | None = None) -> dict:
    """A manifest's non-blank lines as one input batch (`raw`, `line`, `source`, `sample_id`)."""
    from pipelines.data.manifest import read_bounded_lines, sample_id

    source = source or Path(manifest).name
    rows = list(read_bounded_lines(manifest, max_line_bytes))
    return {"raw": [r for _, r, _ in rows], "line": [n for n, _, _ in rows], "source": [source] * len(rows),
            "sample_id": [sample_id(source, n, r) for n, r, _ in rows]}
