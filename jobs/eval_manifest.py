"""Write the evaluation manifest of a public set from its local copy (nothing is downloaded).

    python jobs/eval_manifest.py librispeech /data/LibriSpeech/test-clean --data-root /data --out manifests/librispeech.jsonl
    python jobs/eval_manifest.py libritts /data/LibriTTS/test-clean --data-root /data --out manifests/libritts.jsonl
    python jobs/eval_manifest.py mme /data/MME_Benchmark_release_version --data-root /data --out manifests/mme.jsonl
    python jobs/eval_manifest.py pope /data/POPE/coco_pope_random.json --images /data/coco/val2014 \\
        --data-root /data --out manifests/pope_random.jsonl

Then `jobs/evaluate.py evaluate.manifests=[manifests/librispeech.jsonl] evaluate.data_root=/data
evaluate.tasks=[asr]` (layouts: pipelines/evaluation/public_sets.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.evaluation.public_sets import SETS, write_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", choices=SETS)
    parser.add_argument("source", help="the split folder, MME's root, or a POPE question file")
    parser.add_argument("--data-root", required=True, help="media paths are written relative to it")
    parser.add_argument("--out", required=True, help="the manifest to write (.jsonl)")
    parser.add_argument("--images", help="POPE: the COCO val2014 images folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = write_set(args.set, args.source, args.out, args.data_root, args.images)
    print(f"{rows} rows of {args.set} in {args.out}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
