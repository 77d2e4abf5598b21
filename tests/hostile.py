"""Hostile inputs, built on disk for the data pipeline's tests and as bytes for Serve's:
each kind a user (or an attacker) has sent or could send, with the reason it must be
refused for. Every file is real (written by PIL, soundfile or by hand to the format's
specification); nothing is mocked.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int = 8, height: int = 8, colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def iccp_bomb_png() -> bytes:
    """A 65 KB PNG whose iCCP chunk inflates to 64 MiB (PIL refuses text chunks that big)."""
    raw = png_bytes()
    profile = zlib.compress(b"\0" * (64 * 2**20), 9)
    return raw[:33] + _png_chunk(b"iCCP", b"icc\0\0" + profile) + raw[33:]


def pixel_bomb_png(side: int = 50_000) -> bytes:
    """A valid PNG header claiming `side` x `side` pixels, with almost no data."""
    raw = png_bytes()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return raw[:8] + _png_chunk(b"IHDR", ihdr) + raw[33:]


def pcx_named_png() -> bytes:
    """A PCX image (a format PIL decodes, the pipeline does not take) under a .png name."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, "PCX")
    return buffer.getvalue()


def wav_bytes(seconds: float = 0.5, rate: int = 16_000, channels: int = 1,
              value: float = 0.1, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    frames = max(1, int(seconds * rate))
    sf.write(buffer, np.full((frames, channels), value, np.float32), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def lying_flac() -> bytes:
    """A 97-byte FLAC whose STREAMINFO claims 2^36-1 frames (256 GiB if believed)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(1600, np.float32), 16_000, format="FLAC")
    data = bytearray(buffer.getvalue())
    info = 8  # after "fLaC" and the metadata block header
    bits = int.from_bytes(data[info + 10:info + 18], "big") | ((1 << 36) - 1)
    data[info + 10:info + 18] = bits.to_bytes(8, "big")
    return bytes(data[:97])


def nan_wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.full(1600, np.nan, np.float32), 16_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _chat(user: str, answer: str, **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}], **extra})


def hostile_manifest_rows(root: Path, max_line_bytes: int = 100_000) -> dict[str, str]:
    """Write the hostile media under `root/hostile/` and return {expected reason: line}.

    The reasons are substrings of what the tokenize job must put in quarantine.
    """
    media = root / "hostile"
    media.mkdir(parents=True, exist_ok=True)
    (media / "iccp.png").write_bytes(iccp_bomb_png())
    (media / "bomb.png").write_bytes(pixel_bomb_png())
    (media / "pcx.png").write_bytes(pcx_named_png())
    (media / "huge.flac").write_bytes(lying_flac())
    (media / "fast.wav").write_bytes(wav_bytes(rate=384_000))
    (media / "many.wav").write_bytes(wav_bytes(channels=16, seconds=0.1))
    (media / "nan.wav").write_bytes(nan_wav())
    (media / "folder.png").mkdir(exist_ok=True)
    (media / "ok.png").write_bytes(png_bytes())
    for a, b in (("loop_a", "loop_b"), ("loop_b", "loop_a")):
        if not (media / a).is_symlink():
            (media / a).symlink_to(media / b)
    if not (media / "out.png").is_symlink():
        (media / "out.png").symlink_to(root.parent / "outside_target.png")
    (root.parent / "outside_target.png").write_bytes(png_bytes())
    image = lambda rel: _chat("<|image|>Describe.", "x", images=[rel])  # noqa: E731
    audio = lambda rel: _chat("Transcribe.<|audio|>", "x", audios=[rel])  # noqa: E731
    return {
        "contains a NUL byte": image("hostile/a\0b.png"),
        "has a file name of 300 bytes": image("hostile/" + "n" * 296 + ".png"),
        "'meta' must be a JSON object, not str": _chat("hi", "there", meta="x"),
        "'meta' must be a JSON object, not int": _chat("hi", "there", meta=5),
        "Decompressed data too large": image("hostile/iccp.png"),
        "exceeds": image("hostile/bomb.png"),  # 50,000 x 50,000 from the header
        "unreadable image": image("hostile/pcx.png"),
        "audio of 4294967.3s exceeds": audio("hostile/huge.flac"),
        "nested 100000 levels deep": "[" * 100_000,
        "sample rate 384000 Hz": audio("hostile/fast.wav"),
        "16 channels": audio("hostile/many.wav"),
        "NaN": audio("hostile/nan.wav"),
        "not valid Unicode": '{"messages": [{"role": "user", "content": "\\ud800"}, '
                             '{"role": "assistant", "content": "x"}]}',
        f"over the limit of {max_line_bytes}": _chat("a" * max_line_bytes, "x"),
        "'id' must be a string or an integer": _chat("hi", "there", id={"a": 1}),
        "unknown role ['user']": json.dumps({"messages": [{"role": ["user"], "content": "hi"},
                                                 {"role": "assistant", "content": "x"}]}),
        "65 media files": _chat("<|image|>" * 65, "x", images=["hostile/ok.png"] * 65),
        "cannot be resolved": image("hostile/loop_a/x.png"),
        "'hostile/out.png' escapes the data root": image("hostile/out.png"),  # a symlink out
        "missing file 'hostile/folder.png'": image("hostile/folder.png"),
    }


def blank_png(side: int) -> bytes:
    """A valid `side` x `side` RGB PNG of one colour, compressed row by row (a 6300 x
    6300 one is ~120 KB on disk and 159 MB decoded), built without holding its pixels."""
    row = b"\0" + b"\x80" * (3 * side)  # filter byte "none", then the row's pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def long_flac(path: Path, seconds: float, rate: int = 192_000, channels: int = 8) -> None:
    """A real FLAC of near-silence, written a second at a time (300 s at 192 kHz x 8
    channels is a few hundred KB on disk and 1.8 GB decoded as float32)."""
    block = np.full((rate, channels), 1e-3, np.float32)
    with sf.SoundFile(path, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            f.write(block)
