"""Measure this machine on the embedded default's model and estimate the chain's time;
with --minutes, choose the stages' steps so that the chain fits that budget.

    python jobs/estimate_run.py --profile tiny [--minutes 30] [--out runs/estimate.json]

The quickstart runs this first (about half a minute): it trains the profile's stage-1
model a few steps here, prints the pace and the time each step of the chain will take at
it, and writes them (and the chosen steps) as JSON for scripts/pipeline.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from omni_model.config import load_config
from omni_model.vocab import Vocab
from pipelines.tokenizers.config import TokenizersConfig
from pipelines.train import StageConfig
from pipelines.train.pace import REFERENCE_SECONDS, estimate, fit_steps, measure_tokens_per_s

STAGES = ("stage1", "stage2", "stage3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(REFERENCE_SECONDS), default="tiny",
                        help="the configs/ folder whose chain is estimated")
    parser.add_argument("--minutes", type=float, default=None, help="a time budget for the whole chain")
    parser.add_argument("--out", default=None, help="also write the estimate as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    folder = Path("configs") / args.profile
    stages = {name: load_config(StageConfig, folder / f"{name}.yaml") for name in STAGES}
    tok = load_config(TokenizersConfig, folder / "tokenizers.yaml")
    vocab = Vocab.fresh(tok.text.vocab_size, 2 ** tok.image.codebook_dim, tok.speech.codebook_size)
    rate = measure_tokens_per_s(stages["stage1"], vocab)
    est = estimate(args.profile, stages, rate)
    print(f"this machine trains the {args.profile} profile's model at ~{rate:,.0f} tokens/s: "
          f"the whole chain takes about {est.total_s / 60:.0f} min here")
    steps = None
    if args.minutes is not None:
        try:
            steps = fit_steps(est, stages, args.minutes)
        except ValueError as err:
            print(f"--minutes: {err}", file=sys.stderr)
            return 2
        configured = ", ".join(str(cfg.train.max_steps) for cfg in stages.values())
        if all(steps[name] == cfg.train.max_steps for name, cfg in stages.items()):
            steps = None  # nothing to pass: the configs' own run
            print(f"the whole chain fits a {args.minutes:g}-minute budget at its configured steps ({configured})")
        else:
            est = estimate(args.profile, {name: replace(cfg, train=replace(cfg.train, max_steps=steps[name]))
                                          for name, cfg in stages.items()}, rate)
            print(f"for a {args.minutes:g}-minute budget: stages of {', '.join(str(s) for s in steps.values())} "
                  f"steps (configured: {configured}); about {est.total_s / 60:.0f} min in all")
    print("  " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in est.seconds.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"tokens_per_s": round(rate), "minutes": args.minutes,
                                              "seconds": {k: round(v) for k, v in est.seconds.items()},
                                              "steps": steps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
