"""Images as the released model takes and gives them.

In: the shorter side resized to 512 (bicubic, PIL), centre-cropped to 512 x 512, scaled
to [-1, 1], encoded by MAGVIT-v2 to 32 x 32 = 1,024 codes. Out: the first 256 image ids
of a response (fewer are padded with the last one; out-of-range ids clamped to the
codebook) decoded as a 16 x 16 grid to 256 x 256 pixels, scaled from [-1, 1] to
[0, 255] and truncated to uint8, as the official inference does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

INPUT_RESOLUTION = 512
OUTPUT_CODES = 256


def input_pixels(image: Image.Image, resolution: int = INPUT_RESOLUTION) -> torch.Tensor:
    """`[3, resolution, resolution]` float32 in [-1, 1] (torchvision's Resize(shorter
    side, bicubic) + CenterCrop + ToTensor + Normalize(0.5, 0.5) on a PIL image)."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    if w < resolution or h < resolution:  # never after the resize above; kept for odd inputs
        raise ValueError(f"image of {w}x{h} is smaller than the crop {resolution}")
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (pixels - 0.5) / 0.5


def output_codes(codes: Sequence[int], codebook_size: int) -> list[int] | None:
    """The 256 codes the official inference decodes from a response's image codes
    (None when the response holds none)."""
    codes = [int(c) for c in codes]
    if not codes:
        return None
    if len(codes) < OUTPUT_CODES:
        codes += [codes[-1]] * (OUTPUT_CODES - len(codes))
    return [min(max(c, 0), codebook_size - 1) for c in codes[:OUTPUT_CODES]]


def to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """A decoder output `[3, H, W]` in [-1, 1] -> `[H, W, 3]` uint8 (truncated, as the
    official inference converts it)."""
    image = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0) * 255.0
    return image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def output_image(codes: Sequence[int], image_tokenizer) -> Image.Image:
    """256 response codes (`output_codes`) as the official inference shows them: a
    16 x 16 grid decoded by MAGVIT-v2, truncated to uint8."""
    side = int(round(len(codes) ** 0.5))
    decoded = image_tokenizer.decode(torch.tensor([list(codes)]), (side, side))[0]
    return Image.fromarray(to_uint8(decoded))
