"""Reading media files into arrays, with a clear error for anything unreadable.

Files are probed before they are decoded, so no file costs more memory than its limits
allow: an image's format and size come from its header (`Image.open` restricted to
`IMAGE_FORMATS`, PIL's own text-chunk and decompression-bomb limits in force), audio's
format, frames, rate and channels from `soundfile.info`; then at most the allowed
number of frames is read, whatever the header claimed.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
#: PIL decoders tried on an image (never EPS, PSD, ... whatever the file's name says).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
#: libsndfile container formats read as audio.
AUDIO_FORMATS = ("WAV", "WAVEX", "FLAC", "OGG")


class MediaError(ValueError):
    """A media file that cannot be used; the message says why."""


def load_image(source: str | Path | bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Open and fully decode an image as RGB (raises MediaError if corrupt or too large)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source,
                            formats=IMAGE_FORMATS) as img:
                if img.width * img.height > max_pixels:
                    raise MediaError(f"image of {img.width}x{img.height} exceeds {max_pixels} pixels")
                if img.width < 1 or img.height < 1:
                    raise MediaError(f"image of {img.width}x{img.height} has no pixels")
                return img.convert("RGB")  # forces a full decode: truncated files fail here
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(f"image too large: {err}") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds on hostile files
        raise MediaError(f"unreadable image: {type(err).__name__}: {err}") from err


def load_audio(source: str | Path | bytes, max_seconds: float | None = None,
               max_sample_rate: int = 192_000, max_channels: int = 8) -> tuple[np.ndarray, int]:
    """Read audio as float32 `[frames]` or `[frames, channels]` and its sample rate.

    The header is checked first (format, rate, channels, duration); then at most
    `max_seconds` of frames are read, so a header that lies about its length costs no
    more than the limit.
    """
    def opened():
        return io.BytesIO(source) if isinstance(source, bytes) else str(source)

    try:
        info = sf.info(opened())
    except Exception as err:  # noqa: BLE001 - libsndfile's errors vary by format
        raise MediaError(f"unreadable audio: {err}") from err
    if info.format not in AUDIO_FORMATS:
        raise MediaError(f"audio format {info.format} is not one of {', '.join(AUDIO_FORMATS)}")
    rate, channels = int(info.samplerate), int(info.channels)
    if not 1000 <= rate <= max_sample_rate:
        raise MediaError(f"audio sample rate {rate} Hz is outside 1000..{max_sample_rate}")
    if not 1 <= channels <= max_channels:
        raise MediaError(f"audio with {channels} channels (at most {max_channels})")
    if max_seconds is not None and info.frames / rate > max_seconds:
        raise MediaError(f"audio of {info.frames / rate:.1f}s exceeds {max_seconds:g}s")
    limit = int(max_seconds * rate) + 1 if max_seconds is not None else -1
    try:
        data, rate = sf.read(opened(), frames=limit, dtype="float32", always_2d=False)
    except Exception as err:  # noqa: BLE001
        raise MediaError(f"unreadable audio: {err}") from err
    if data.size == 0:
        raise MediaError("empty audio")
    if max_seconds is not None and len(data) / rate > max_seconds:
        raise MediaError(f"audio of more than {max_seconds:g}s")
    if not np.isfinite(data).all():
        raise MediaError("audio contains NaN or infinite samples")
    return data, int(rate)


def find_files(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` with one of `suffixes` (case-insensitive), sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
