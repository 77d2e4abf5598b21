"""Train the embedded default's text (BPE), image (MAGVIT-v2) and speech (GLM-4-Voice
architecture + code-to-mel decoder) tokenizers from a folder of media; print their quality.

    python jobs/train_tokenizers.py --config configs/tiny/tokenizers.yaml data.dir=DIR out_dir=DIR \
        [shipped=pretrained/tokenizers]

With `shipped`, the tokenizers there are copied instead when they were trained on the same
world and tokenizer settings (their `trained_on.json`); the job says which it does.
"""

from __future__ import annotations

import logging
import sys

import torch

from omni_model.config import parse_job_args, save_config
from pipelines.tokenizers.config import TokenizersConfig
from pipelines.tokenizers.quality import format_report
from pipelines.tokenizers.shipped import use_shipped
from pipelines.tokenizers.train import check_data_folders, train_tokenizers


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(TokenizersConfig, __doc__.splitlines()[0],
                         "configs/tiny/tokenizers.yaml", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.threads)
    check_data_folders(cfg)  # before the shipped ones are matched: a missing folder is an error
    save_config(cfg, f"{cfg.out_dir}/config.yaml")
    report = use_shipped(cfg)
    if report is not None:
        print(format_report(report))
        print(f"tokenizers: the shipped ones of {cfg.shipped} (trained on these settings), copied to "
              f"{cfg.out_dir}/; train them instead with TOKENIZERS=train or without `shipped`")
        return 0
    report = train_tokenizers(cfg)
    print(format_report(report))
    print(f"tokenizers trained and saved under {cfg.out_dir}/ (text/, image/, speech/, quality.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
