"""Tokenize a manifest into Parquet token shards (bad rows to quarantine), on Ray Data.

    python jobs/tokenize_manifest.py --config configs/tiny/tokenize.yaml \\
        --manifest runs/world/manifests/train/all.jsonl --data-root runs/world \\
        --out runs/shards/train --image-tokenizer runs/tokenizers/image \\
        --speech-tokenizer runs/tokenizers/speech [tokenize.image_workers=2 ...]

The tokenizer folders are anything `from_pretrained` reads: the small trained ones, the
real checkpoints, or the reference checkpoints in tests/fixtures. Pass `none` to skip a modality.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field

from omni_model.config import load_config, save_config
from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from pipelines.data.tokenize import TokenizeConfig, tokenize_manifest

FLAGS = {"manifest": "manifest", "data_root": "data_root", "out": "out",
         "image_tokenizer": "image_tokenizer", "speech_tokenizer": "speech_tokenizer"}


@dataclass(frozen=True)
class TokenizeJob:
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def parse(argv: list[str] | None) -> TokenizeJob:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/tokenize.yaml")
    for flag in FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    flags = [f"tokenize.{key}={'null' if value == 'none' else value}"
             for key, value in ((k, getattr(args, k)) for k in FLAGS) if value is not None]
    return load_config(TokenizeJob, args.config, [*flags, *args.overrides])


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_config(cfg, f"{cfg.tokenize.out}/config.yaml")
    owned = start_ray(cfg.ray)
    try:
        summary = tokenize_manifest(cfg.tokenize)
    finally:
        stop_ray(owned)
    totals, run = summary["totals"], summary["this_run"]
    print(json.dumps({"totals": totals, "tasks": summary["tasks"]}, indent=2))
    print(f"this run: {run['rows']} rows in {run['seconds']:.1f}s "
          f"({run['samples_per_second']:.1f} samples/s), {run['shard_rows']} to shards, "
          f"{run['quarantined']} quarantined; shards in {cfg.tokenize.out}/shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
