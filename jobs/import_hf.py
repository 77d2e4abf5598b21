"""Import a local Hugging Face dataset as media files and a manifest in the published format.

    python jobs/import_hf.py --dataset DIR --task asr --out runs/imported/asr \\
        [--columns audio=audio,text=transcription] [--split test] \\
        [--layout auto|disk|parquet|imagefolder|audiofolder] [--limit N] \\
        [--max-file-bytes N] [--max-row-decoded-bytes N]

DIR is a `save_to_disk` folder, a folder of Parquet files, an `imagefolder` or an
`audiofolder` (nothing is fetched from a hub). Roles per task (pipelines/data/hf_import.py):
asr audio+text, tts text+audio, caption image+text, vqa image+question+answer
(+answers), t2i text+image. Then tokenize it (`jobs/tokenize_manifest.py --manifest
OUT/TASK.jsonl --data-root OUT`) or evaluate on it (`evaluate.manifests=[OUT]`,
`evaluate.data_root=OUT`). Rows that cannot be imported are in OUT/quarantine.jsonl,
each with its reason (media paths must stay inside DIR; only regular files within
`--max-file-bytes` are read; a row's media must decode within `--max-row-decoded-bytes`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipelines.data.hf_import import LAYOUTS, ROLES, ImportConfig, import_dataset

DEFAULTS = ImportConfig(".", "asr", ".")


def parse(argv: list[str] | None) -> ImportConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="the local dataset folder")
    parser.add_argument("--task", required=True, choices=sorted(ROLES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--columns", default="", help="role=column pairs, comma-separated")
    parser.add_argument("--split", default=None)
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULTS.max_file_bytes,
                        help="a larger media file is quarantined unread")
    parser.add_argument("--max-row-decoded-bytes", type=int, default=DEFAULTS.max_row_decoded_bytes,
                        help="a row whose media would decode to more is quarantined before decoding")
    args = parser.parse_args(argv)
    columns = {}
    for pair in filter(None, args.columns.split(",")):
        role, sep, column = pair.partition("=")
        if not sep or not role.strip() or not column.strip():
            parser.error(f"--columns: {pair!r} is not role=column")
        columns[role.strip()] = column.strip()
    try:
        return ImportConfig(args.dataset, args.task, args.out, columns, args.split, args.layout, args.limit,
                            max_file_bytes=args.max_file_bytes, max_row_decoded_bytes=args.max_row_decoded_bytes)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        summary = import_dataset(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"import_hf: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
