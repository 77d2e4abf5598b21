"""Tokenizer quality on synthetic-world media: scene renders, their captions, and the
captions spoken by the world's voices (hibari "heart", two espeak-ng voices), generated
here without Ray. Runs jobs/train_tokenizers.py on them and prints the quality table
(held-out PSNR and attribute-checker agreement of decoded images; codes/s, mel distance
and Whisper WER of decoded speech against the WER of the original audio).

    .venv/bin/python benchmarks/tokenizer_quality.py [--scenes 2000 --utterances 1500] [overrides]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import soundfile as sf

from pipelines.world.build import WorldConfig
from pipelines.world.scenes import captions, make_scene, render
from pipelines.world.tts import get_engine


def build(root: Path, scenes: int, utterances: int, seed: int = 0) -> None:
    world = WorldConfig(seed=seed)
    engines = {v.engine: get_engine(v.engine) for v in world.caption_voices}
    rng = random.Random(seed)
    lines = []
    for i in range(scenes):
        scene = make_scene(seed, i)
        render(scene, world.image_size).save(root / f"scene_{i:05d}.png")
        lines += captions(scene)
        if i < utterances:
            v = rng.choices(world.caption_voices, [v.weight for v in world.caption_voices])[0]
            text = captions(scene)[0]
            audio = engines[v.engine].synthesize(text, v.voice or None, rng.uniform(*world.speed_range), seed=i)
            sf.write(root / f"utt_{i:05d}.wav", audio, 16000)
            (root / f"utt_{i:05d}.txt").write_text(text + "\n")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--utterances", type=int, default=1500)
    parser.add_argument("--out", default="runs/bench_tokenizers")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from jobs.train_tokenizers import main as train_main

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.scenes, args.utterances)
        # the quickstart's tokenizer settings, trained on this folder alone (no world's SDVI
        # audio or answer voice beside it)
        return train_main(["--config", "configs/tiny/tokenizers_train.yaml", f"data.dir={tmp}",
                           "data.audio_dirs=[]", "data.voice_root=", "data.voice_manifests=[]",
                           f"out_dir={args.out}", *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
