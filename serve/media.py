"""Media in and out of the HTTP API: base64 PNG/JPEG images and WAV/FLAC audio, decoded
under the deployment's limits before any model work, and generated outputs encoded back.

Every failure is a `ClientError` with the HTTP status it should answer: 400 for bad
base64, 415 for a format the API does not take, 413 for media over a limit (pixels,
seconds, sample rate, channels), 422 for a file that claims a supported format but
cannot be decoded. Sizes come from headers, before any decoding.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import soundfile as sf
from PIL import Image, UnidentifiedImageError

from omni_model.any_to_any import Audio
from serve.errors import ClientError

IMAGE_FORMATS = ("PNG", "JPEG")
AUDIO_FORMATS = ("WAV", "FLAC")


def _b64(data: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{what} `data` is not valid base64", 400) from None
    if not raw:
        raise ClientError(f"{what} `data` is empty", 400)
    return raw


def decode_image(data: str, max_pixels: int, index: int = 0) -> Image.Image:
    """A base64 PNG or JPEG -> an RGB PIL image, refusing more than `max_pixels` before
    the pixels are decoded (the header says the size). Only the PNG and JPEG decoders
    are tried, with PIL's limits on text chunks and decompression in force; any image
    from 1 x 1 up is taken."""
    what = f"inputs[{index}] (image)"
    raw = _b64(data, what)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            found = _sniff(raw) or "not a readable image"
            raise ClientError(f"{what} is {found}; send PNG or JPEG", 415) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ClientError(f"{what} is too large to decode: {exc}", 413) from None
        except Exception as exc:  # noqa: BLE001 - hostile headers raise many kinds
            raise ClientError(f"{what} cannot be decoded ({exc})", 422) from None
        width, height = image.size
        if width * height > max_pixels:
            raise ClientError(f"{what} has {width}x{height} pixels, over the limit of {max_pixels}", 413)
        if width < 1 or height < 1:
            raise ClientError(f"{what} has no pixels", 422)
        try:
            image.load()
            return image.convert("RGB")
        except Exception as exc:  # noqa: BLE001
            raise ClientError(f"{what} cannot be decoded ({exc})", 422) from None


def _sniff(raw: bytes) -> str | None:
    """The format name of an image the API does not take (for the 415 message)."""
    try:
        with Image.open(io.BytesIO(raw)) as other:
            return other.format
    except Exception:  # noqa: BLE001
        return None


def decode_audio(data: str, max_seconds: float, index: int = 0, max_sample_rate: int = 96_000,
                 max_channels: int = 8) -> Audio:
    """A base64 WAV or FLAC -> a mono float32 `Audio`, refusing more than `max_seconds`,
    a rate above `max_sample_rate` or more than `max_channels` before the samples are
    read; at most `max_seconds` of frames are read whatever the header claims."""
    what = f"inputs[{index}] (audio)"
    raw = _b64(data, what)
    try:
        info = sf.info(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 - libsndfile's errors vary by format
        raise ClientError(f"{what} is not a readable audio file; send WAV or FLAC", 415) from None
    if info.format not in AUDIO_FORMATS:
        raise ClientError(f"{what} is {info.format}; send WAV or FLAC", 415)
    if info.samplerate < 1000 or info.frames < 1:
        raise ClientError(f"{what} has no usable samples ({info.frames} at {info.samplerate} Hz)", 422)
    if info.samplerate > max_sample_rate:
        raise ClientError(f"{what} has a sample rate of {info.samplerate} Hz, over the limit of "
                          f"{max_sample_rate}", 413)
    if info.channels > max_channels:
        raise ClientError(f"{what} has {info.channels} channels, over the limit of {max_channels}", 413)
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise ClientError(f"{what} lasts {seconds:.1f} s, over the limit of {max_seconds:g} s", 413)
    try:
        wave, rate = sf.read(io.BytesIO(raw), frames=int(max_seconds * info.samplerate) + 1,
                             dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001
        raise ClientError(f"{what} cannot be decoded ({exc})", 422) from None
    if len(wave) == 0:
        raise ClientError(f"{what} holds no samples", 422)
    wave = wave.mean(axis=1)
    if not np.isfinite(wave).all():
        raise ClientError(f"{what} holds non-finite samples", 422)
    return Audio(wave, int(rate))


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def encode_wav(wave: np.ndarray, sample_rate: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.asarray(wave, dtype=np.float32), -1, 1), sample_rate,
             format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()
