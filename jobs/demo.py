"""The core demonstration: build a tiny model, train it with the masked-diffusion
objective on a handful of multimodal-shaped samples, save and reload the checkpoint, and
let the sampler regenerate every response from its prompt.

    python jobs/demo.py --config configs/tiny/demo.yaml [fit.steps=400 out_dir=runs/demo]
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch

from omni_model.config import parse_job_args, save_config
from omni_model.sampler import SamplerConfig
from omni_model.tokenizers.text import ByteTokenizer
from omni_model.toy import FitConfig, fit, regenerate, same_parts, toy_model, toy_samples, toy_vocab
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128  #: hidden width
    layers: int = 3  #: transformer blocks
    heads: int = 4  #: attention heads
    kv_heads: int = 2  #: key/value heads (grouped-query attention)


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "runs/demo"  #: checkpoint and resolved config go here
    seed: int = 0  #: seeds the model, the samples, the masks and the sampler
    threads: int = 2  #: torch CPU threads
    model: ModelSize = field(default_factory=ModelSize)
    fit: FitConfig = field(default_factory=FitConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(DemoConfig, __doc__.splitlines()[0], "configs/tiny/demo.yaml", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.threads)
    save_config(cfg, f"{cfg.out_dir}/config.yaml")

    tokenizer = ByteTokenizer()
    vocab = toy_vocab(tokenizer)
    model = toy_model(vocab, cfg.model.hidden, cfg.model.layers, cfg.model.heads,
                      cfg.model.kv_heads, seed=cfg.seed)
    samples = toy_samples(vocab, seed=cfg.seed)
    start = time.perf_counter()
    losses = fit(model, samples, tokenizer, vocab, cfg.fit)
    train_s = time.perf_counter() - start

    ckpt = f"{cfg.out_dir}/checkpoint"
    model.save_pretrained(ckpt)
    vocab.save(ckpt)
    reloaded = Transformer.from_pretrained(ckpt)
    vocab = Vocab.load(ckpt)

    start = time.perf_counter()
    outputs = regenerate(reloaded, samples, tokenizer, vocab, cfg.fit.max_pads, cfg.sampler)
    sample_s = time.perf_counter() - start
    exact = [same_parts(s[-1].parts, o) for s, o in zip(samples, outputs)]

    print(f"model: {reloaded.num_parameters / 1e6:.2f}M parameters, vocab {vocab.size}")
    print(f"train: {cfg.fit.steps} steps in {train_s:.1f}s, loss {losses[0]:.3f} -> "
          f"{sum(losses[-10:]) / 10:.4f} (mean of last 10)")
    print(f"sample: {cfg.sampler.steps} steps max, {len(samples)} prompts in {sample_s:.2f}s")
    for messages, output, ok in zip(samples, outputs, exact):
        prompt = " ".join(type(p).__name__ if not hasattr(p, "text") else repr(p.text)
                          for p in messages[0].parts)
        print(f"  [{'ok' if ok else 'MISMATCH'}] {prompt} -> "
              + " ".join(repr(p.text) if hasattr(p, "text") else
                         f"{type(p).__name__}({len(p.codes)} codes)" for p in output))
    print(f"regenerated exactly: {sum(exact)}/{len(exact)}; checkpoint: {ckpt}")
    return 0 if all(exact) else 1


if __name__ == "__main__":
    sys.exit(main())
