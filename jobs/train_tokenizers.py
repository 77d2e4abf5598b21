"""Train the embedded default's text (BPE), image (MAGVIT-v2) and speech (GLM-4-Voice
architecture + code-to-mel decoder) tokenizers from a folder of media; print their quality.

    python jobs/train_tokenizers.py --config configs/tiny/tokenizers.yaml data.dir=DIR out_dir=DIR
"""

from __future__ import annotations

import logging
import sys

import torch

from omni_model.config import parse_job_args, save_config
from pipelines.tokenizer_training import TokenizersConfig, format_report, train_tokenizers


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(TokenizersConfig, __doc__.splitlines()[0],
                         "configs/tiny/tokenizers.yaml", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.threads)
    save_config(cfg, f"{cfg.out_dir}/config.yaml")
    report = train_tokenizers(cfg)
    print(format_report(report))
    print(f"tokenizers saved under {cfg.out_dir}/ (text/, image/, speech/, quality.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
