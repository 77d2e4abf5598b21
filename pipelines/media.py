"""Reading media files into arrays, with a clear error for anything unreadable."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class MediaError(ValueError):
    """A media file that cannot be used; the message says why."""


def load_image(source: str | Path | bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Open and fully decode an image as RGB (raises MediaError if corrupt or too large)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.width * img.height > max_pixels:
                raise MediaError(f"image of {img.width}x{img.height} exceeds {max_pixels} pixels")
            if img.width < 2 or img.height < 2:
                raise MediaError(f"image of {img.width}x{img.height} pixels is too small")
            return img.convert("RGB")  # forces a full decode: truncated files fail here
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise MediaError(f"unreadable image: {err}") from err
    except Image.DecompressionBombError as err:
        raise MediaError(f"image too large: {err}") from err


def load_audio(source: str | Path | bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read audio as float32 `[frames]` or `[frames, channels]` and its sample rate."""
    try:
        data, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                             dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise MediaError(f"unreadable audio: {err}") from err
    if data.size == 0:
        raise MediaError("empty audio")
    if not np.isfinite(data).all():
        raise MediaError("audio contains NaN or infinite samples")
    if max_seconds is not None and len(data) / rate > max_seconds:
        raise MediaError(f"audio of {len(data) / rate:.1f}s exceeds {max_seconds:g}s")
    return data, int(rate)


def find_files(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` with one of `suffixes` (case-insensitive), sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
