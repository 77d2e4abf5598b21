"""Tokenizer quality on a generated media folder (until the synthetic world of the data
issue replaces it): scenes of coloured shapes drawn with Pillow, their captions, and the
captions spoken by espeak-ng in four voices at varied speeds. Runs
jobs/train_tokenizers.py on it and prints the quality table.

    .venv/bin/python benchmarks/tokenizer_quality.py [--images 600 --utterances 1200] [overrides]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 205, 30), "purple": (150, 50, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
          "center": (0.5, 0.5)}
VOICES = ("en-us+f3", "en-us+m3", "en-gb+f2", "en-us+m1")


def draw(shape: str, colour: str, place: str, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 240))
    cx, cy = (int(v * size) for v in PLACES[place])
    r = size // 7
    box = [cx - r, cy - r, cx + r, cy + r]
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img


def build(root: Path, images: int, utterances: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    captions = []
    for i in range(images):
        shape, colour, place = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(PLACES))
        draw(shape, colour, place).save(root / f"scene_{i:05d}.png")
        captions.append(f"a {colour} {shape} on the {place}")
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    for i in range(utterances):
        text = rng.choice(captions)
        wav = root / f"utt_{i:05d}.wav"
        subprocess.run(["espeak-ng", "-v", rng.choice(VOICES), "-s", str(rng.randint(140, 190)),
                        "-w", str(wav), text], check=True)
        wav.with_suffix(".txt").write_text(text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--utterances", type=int, default=1200)
    parser.add_argument("--out", default="runs/bench_tokenizers")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.train_tokenizers import main as train_main

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.images, args.utterances)
        return train_main(["--config", "configs/tiny/tokenizers.yaml", f"data.dir={tmp}",
                           f"out_dir={args.out}", *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
