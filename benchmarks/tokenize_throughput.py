"""Samples/s of the tokenize job with 1 and with 2 tokenizer workers per modality, and
the share of stage time spent reading media (I/O + decode) vs running the tokenizers.

    .venv/bin/python benchmarks/tokenize_throughput.py [--scenes 300] [--world DIR]
        [--image-tokenizer DIR --speech-tokenizer DIR]

Builds (or reuses) a synthetic world on a local Ray, then tokenizes its training
manifest twice into fresh folders; the ratio is against the 1-worker run of the same
invocation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipelines.data.tokenize import TokenizeConfig, tokenize_manifest
from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from pipelines.world.build import Voice, WorldConfig, build_world

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--world", help="reuse this world folder instead of building one")
    p.add_argument("--image-tokenizer", default=str(FIXTURES / "magvit_tiny_a"))
    p.add_argument("--speech-tokenizer", default=str(FIXTURES / "glm4voice_tiny_a"))
    p.add_argument("--num-cpus", type=int, default=4)
    args = p.parse_args()
    owned = start_ray(RayConfig(num_cpus=args.num_cpus))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            world = Path(args.world or Path(tmp) / "world")
            if not args.world:
                build_world(WorldConfig(out=str(world), train_scenes=args.scenes, eval_scenes=1,
                                        caption_voices=(Voice("espeak", "en-us"),), tts_workers=2))
            results = {}
            for workers in (1, 2):
                cfg = TokenizeConfig(manifest=str(world / "manifests/train/all.jsonl"),
                                     data_root=str(world), out=f"{tmp}/shards{workers}",
                                     image_tokenizer=args.image_tokenizer,
                                     speech_tokenizer=args.speech_tokenizer,
                                     image_workers=workers, speech_workers=workers,
                                     rows_per_part=10_000)
                results[workers] = tokenize_manifest(cfg)["this_run"]
    finally:
        stop_ray(owned)
    base = results[1]["samples_per_second"]
    for workers, r in results.items():
        shares = []
        for kind in ("image", "speech"):
            io, enc = r[f"{kind}_io_s"], r[f"{kind}_encode_s"]
            if io + enc:
                shares.append(f"{kind}: {io / (io + enc):.0%} reading / {enc / (io + enc):.0%} encoding")
        print(f"workers={workers}: {r['rows']} rows in {r['seconds']:.1f} s = "
              f"{r['samples_per_second']:.1f} samples/s ({r['samples_per_second'] / base:.2f}x); "
              + "; ".join(shares))
    return 0


if __name__ == "__main__":
    sys.exit(main())
