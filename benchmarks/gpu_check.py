"""The GPU paths in one short run (never a CI dependency): DeepSpeed ZeRO-2 in bf16
through Ray Train on a ~1B model of Dream-like shapes, then the sampler on the GPU.

    python benchmarks/gpu_check.py [--steps 30] [--small]

1. Builds a small world, tokenizes it with the fixture tokenizers, and trains a fresh
   model (2048 wide, 16 layers, 16 heads, 4 key-value heads, SwiGLU 5632; ~1B with a
   Dream-size vocabulary: `--vocab` pads the output layer to it) for `--steps` steps with
   `scaling.backend=deepspeed`, ZeRO stage 2, bf16, one GPU worker; prints tokens/s and
   MFU (6 x parameters x tokens/s over the GPU's dense bf16 peak, attention left out).
2. Times the sampler on the GPU with that model: wall per sample at batch 1..64 for a
   t2i-shaped request (20 prompt + 256 image positions), and the uncached, prefix-cached
   and dual-cached sampler for a spoken-VQA-shaped one (119 prompt + 64 response positions).

`--small` runs the same chain with a tiny model on whatever device there is (a check of
the script itself, on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _world import make_shards

from omni_model.config import load_config
from omni_model.sampler import Region, SamplerConfig, make_layout, sample, spoken_layout
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab
from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from pipelines.train import DataSource, StageConfig, run_stage

#: dense bf16 peak in FLOP/s by device name (NVIDIA's data sheets, SXM parts)
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAKS.items() if k in name), None)


def train(shards: Path, run: Path, steps: int, small: bool) -> tuple[dict, Path]:
    overrides = [f"data.shards={shards}", "data.text_tokenizer=null", f"run.dir={run}",
                 f"train.max_steps={steps}", "train.log_every=5", f"train.checkpoint_every={steps}",
                 "scaling.num_workers=1", "scaling.backend=deepspeed", "scaling.zero_stage=2"]
    if small:
        overrides += ["scaling.use_gpu=false", "scaling.bf16=false"]
    else:
        overrides += ["scaling.use_gpu=true", "scaling.bf16=true", "scaling.cpus_per_worker=4",
                      "model.fresh={hidden: 2048, layers: 16, heads: 16, kv_heads: 4, ffn: 5632}",
                      "data.max_seq_len=2048", "data.rows_per_step=8"]
    cfg = load_config(StageConfig, "configs/tiny/stage1.yaml", overrides)
    cfg = replace(cfg, data=replace(cfg.data, mixture=(DataSource("train"),)))
    run_stage(cfg)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]  # after warm-up
    return {"tokens_per_s": sum(m["tokens_per_s"] for m in metrics) / max(1, len(metrics))}, run / "final"


def time_sampler(model: Transformer, vocab: Vocab, device: str) -> dict:
    def timed(prompts, layout, config) -> float:
        sample(model, prompts, layout, config, pad_id=vocab.pad_id)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(model, prompts, layout, config, pad_id=vocab.pad_id)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(prompts)

    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 200, (n,), generator=gen)  # noqa: E731
    t2i = make_layout(vocab, [Region("image", 256)])
    scaling = {b: timed([text(20) for _ in range(b)], t2i, SamplerConfig(steps=16)) for b in (1, 2, 4, 8, 16, 32, 64)}
    spoken = spoken_layout(vocab, 64, 0.2)
    prompts = [text(119) for _ in range(16)]
    caches = {name: timed(prompts, spoken, SamplerConfig(steps=16, **options)) for name, options in (
        ("none", {}), ("prefix", {"cache": "prefix", "cache_refresh": 4}),
        ("dual", {"cache": "dual", "cache_refresh": 4, "block_length": 16}))}
    return {"t2i_seconds_per_sample_by_batch": scaling, "svqa_seconds_per_sample_by_cache": caches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--small", action="store_true", help="a tiny model on any device (checks the script)")
    args = parser.parse_args()
    device_name, peak = peak_flops()
    owned = start_ray(RayConfig(num_cpus=8, num_gpus=None))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shards = make_shards(Path(tmp), args.scenes, tts_workers=4)
            result, final = train(shards, Path(tmp) / "stage1", args.steps, args.small)
            device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
            model = Transformer.from_pretrained(final).to(device).eval()
            if device == "cuda":
                model = model.to(torch.bfloat16)
            vocab = Vocab.load(final)
            params = model.num_parameters
            result.update(device=device_name, parameters=params, steps=args.steps)
            if peak:
                result["mfu"] = 6 * params * result["tokens_per_s"] / peak
            result["sampler"] = time_sampler(model, vocab, device)
    finally:
        stop_ray(owned)
    print(json.dumps(result, indent=2))
    print(f"\n{device_name}: {params / 1e9:.2f}B parameters, DeepSpeed ZeRO-2 "
          f"{'bf16' if not args.small else 'fp32'}: {result['tokens_per_s']:.0f} tokens/s"
          + (f", MFU {result['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
