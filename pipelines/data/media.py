"""Reading media files into arrays, with a clear error for anything unreadable.

Files are probed before they are decoded, so no file costs more memory than its limits
allow: an image's format and size come from its header (`Image.open` restricted to
`IMAGE_FORMATS`, PIL's own text-chunk and decompression-bomb limits in force), audio's
format, frames, rate and channels from `soundfile.info`; then at most the allowed
number of frames is read, whatever the header claimed.

Only regular files are opened (a FIFO would block the reader, a device never end), each
under a size cap, and a row's media together under a budget of decoded bytes summed
from their headers (`MediaLimits`, `check_row_media`), so a row naming one large image
many times is refused before anything is decoded.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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


#: PIL holds a decoded RGB (or RGBA) image at 4 bytes a pixel.
IMAGE_BYTES_PER_PIXEL = 4
#: Audio is decoded as float32 samples.
AUDIO_BYTES_PER_SAMPLE = 4


@dataclass(frozen=True)
class MediaLimits:
    """What one media file, and one row's media together, may cost. Every limit is
    checked from the file system or the file's header, before anything is decoded."""

    #: bytes of one media file on disk (or of bytes stored in a dataset row)
    max_file_bytes: int = 256 * 2**20
    #: width x height of an image, from its header
    max_image_pixels: int = 40_000_000
    #: length of an audio file (frames / rate, from its header)
    max_audio_seconds: float = 600.0
    #: audio above this rate is refused (from the header)
    max_sample_rate: int = 192_000
    #: audio with more channels is refused
    max_channels: int = 8
    #: media files one row may name (each is opened, decoded and tokenized)
    max_media_per_row: int = 64
    #: a row's media decoded, summed from their headers: images as RGB at 4 bytes a
    #: pixel, audio as float32 frames x channels. 256 MiB takes a 40 Mpx image or 10
    #: minutes of 48 kHz stereo; it refuses a 40 Mpx image named twice.
    max_row_decoded_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_image_pixels", "max_sample_rate", "max_channels",
                     "max_media_per_row", "max_row_decoded_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be positive, got {self.max_audio_seconds}")


def check_regular_file(path: str | Path, max_bytes: int) -> int:
    """The size of `path` if it is a regular file of at most `max_bytes` (MediaError
    otherwise). Checked with `stat` before anything opens it: opening a FIFO for
    reading blocks until a writer comes, and a device has no end."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise MediaError(f"cannot read {Path(path).name!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(f"{Path(path).name!r} is not a regular file")
    if info.st_size > max_bytes:
        raise MediaError(f"file of {info.st_size} bytes is over the limit of {max_bytes} bytes")
    return info.st_size


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. Opened non-blocking and
    checked again on the open descriptor, so a file swapped for a FIFO after the first
    check cannot block; at most `max_bytes` are read whatever the file grows to."""
    check_regular_file(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise MediaError(f"cannot read {Path(path).name!r}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MediaError(f"{Path(path).name!r} is not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise MediaError(f"file of more than {max_bytes} bytes is over the limit of {max_bytes} bytes")
    return data


def image_size(source: str | Path | bytes, max_pixels: int = 64_000_000) -> tuple[int, int]:
    """(width, height) from the image's header, nothing decoded (MediaError if the
    format is not taken, the header is corrupt or the image is too large)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source,
                            formats=IMAGE_FORMATS) as img:
                size = img.width, img.height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(f"image too large: {err}") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds on hostile files
        raise MediaError(f"unreadable image: {type(err).__name__}: {err}") from err
    if size[0] * size[1] > max_pixels:
        raise MediaError(f"image of {size[0]}x{size[1]} exceeds {max_pixels} pixels")
    if size[0] < 1 or size[1] < 1:
        raise MediaError(f"image of {size[0]}x{size[1]} has no pixels")
    return size


def audio_info(source: str | Path | bytes, max_seconds: float | None = None,
               max_sample_rate: int = 192_000, max_channels: int = 8):
    """`soundfile.info` of the audio, its format, rate, channels and length checked."""
    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else str(source))
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
    return info


def decoded_bytes(kind: str, source: str | Path | bytes, limits: MediaLimits) -> int:
    """What one image or audio file costs decoded, from its header alone (its own
    limits checked on the way): RGB at 4 bytes a pixel, float32 frames x channels.
    A path must be a regular file within `limits.max_file_bytes`; bytes must be as small."""
    if isinstance(source, bytes):
        if len(source) > limits.max_file_bytes:
            raise MediaError(f"{len(source)} bytes of {kind}, over the limit of {limits.max_file_bytes} bytes")
    else:
        check_regular_file(source, limits.max_file_bytes)
    if kind == "image":
        width, height = image_size(source, limits.max_image_pixels)
        return width * height * IMAGE_BYTES_PER_PIXEL
    info = audio_info(source, limits.max_audio_seconds, limits.max_sample_rate, limits.max_channels)
    return int(info.frames) * int(info.channels) * AUDIO_BYTES_PER_SAMPLE


def check_row_media(images: Sequence[str | Path | bytes], audios: Sequence[str | Path | bytes],
                    limits: MediaLimits) -> int:
    """Check a row's media from the file system and their headers alone: how many,
    each a regular file within its size, format, pixel, rate, channel and length
    limits, and all of them decoded within `limits.max_row_decoded_bytes`. Returns the
    decoded bytes; raises MediaError (its message prefixed `image: ` or `audio: `)."""
    count = len(images) + len(audios)
    if count > limits.max_media_per_row:
        raise MediaError(f"{count} media files, over the limit of {limits.max_media_per_row} per row")
    total = 0
    costs: dict[tuple, int] = {}  # a file named many times is probed once, counted each time
    for kind, sources in (("image", images), ("audio", audios)):
        for source in sources:
            key = (kind, source if not isinstance(source, bytes) else id(source))
            if key not in costs:
                try:
                    costs[key] = decoded_bytes(kind, source, limits)
                except MediaError as err:
                    raise MediaError(f"{kind}: {err}") from None
            total += costs[key]
    if total > limits.max_row_decoded_bytes:
        raise MediaError(f"the row's {count} media would decode to {total / 2**20:.0f} MiB, over the "
                         f"budget of {limits.max_row_decoded_bytes / 2**20:.0f} MiB a row "
                         f"(max_row_decoded_bytes)")
    return total


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

    rate = int(audio_info(source, max_seconds, max_sample_rate, max_channels).samplerate)
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
