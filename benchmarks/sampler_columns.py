"""What a sampler step costs beside the model at the released model's vocabulary
(176,264 ids), and what stepping on a request's own columns saves: a t2i answer (256
image positions after a 20-id prompt, 16 steps) whose regions allow the 8,192 image
codes, sampled over the whole vocabulary (`NARROW_SHARE = 0`, the sampler before) and
over those columns (today's default: the output layer multiplies those ids' rows only,
and every softmax, sort and draw reads those columns), side by side in one run, with
the model's forward passes over the whole vocabulary alone timed too. The outputs of
the two are compared id for id.

    .venv/bin/python benchmarks/sampler_columns.py [--hidden 256] [--layers 2] [--batches 1,4] [--repeats 1]

A small model on purpose: on a CPU the step's work over the vocabulary is then visible
beside the model's; on a GPU, where a 7B model's forward pass takes milliseconds,
benchmarks/gpu_check.py stage c times the same comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # noqa: E402  (the check's vocabulary and random models)
import omni_model.sampler as sampler_module  # noqa: E402
from omni_model.sampler import Region, SamplerConfig, make_layout, sample  # noqa: E402

CONFIGS = {
    "greedy, probability": SamplerConfig(steps=16),
    "temperature 1, top-p 0.9, entropy": SamplerConfig(steps=16, temperature=1.0, top_p=0.9, confidence="entropy"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=176264)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--head-scale", type=float, default=20.0,
                   help="output layer scaled up: peaked distributions as a trained model's (a random one's are "
                        "near-uniform, and its near-tied confidences may order differently by float rounding)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    vocab = gpu_check.padded_vocab(a.vocab)
    gpu_check.SHAPES["bench"] = (a.hidden, a.layers, max(1, a.hidden // 64), max(1, a.hidden // 128), a.hidden * 3)
    model = gpu_check.random_model(gpu_check.model_config("bench", vocab), torch.device("cpu"), torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(a.head_scale)
    layout = make_layout(vocab, [Region("image", 256)])
    gen = torch.Generator().manual_seed(0)
    text = vocab.text_range
    default_share = sampler_module.NARROW_SHARE
    results = {"vocab": vocab.size, "hidden": a.hidden, "layers": a.layers, "threads": torch.get_num_threads(),
               "image_positions": 256, "steps": 16, "cases": {}}

    def timed(batch, config, share):
        sampler_module.NARROW_SHARE = share
        times, out = [], None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = sample(model, batch, layout, config, pad_id=vocab.pad_id, seeds=list(range(len(batch))))
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    for b in (int(x) for x in a.batches.split(",")):
        batch = [torch.randint(text.start, text.stop, (20,), generator=gen) for _ in range(b)]
        ids = torch.stack(batch)
        full_ids = torch.cat([ids, layout.template.expand(b, -1)], 1)
        with torch.no_grad():
            model(full_ids, logits_range=(20, 20 + 256))  # warm-up
            t0 = time.perf_counter()
            for _ in range(16):
                model(full_ids, logits_range=(20, 20 + 256))
            forwards = time.perf_counter() - t0
        for name, config in CONFIGS.items():
            sample(model, batch, layout, config, pad_id=vocab.pad_id)  # warm-up
            whole, a_out = timed(batch, config, 0.0)
            columns, b_out = timed(batch, config, default_share)
            case = {"batch": b, "whole_vocabulary_s": round(whole, 4), "columns_s": round(columns, 4),
                    "speedup": round(whole / columns, 2), "model_forwards_s": round(forwards, 4),
                    "step_work_beside_model_whole_s": round(whole - forwards, 4),
                    "step_work_beside_model_columns_s": round(columns - forwards, 4),
                    "same_ids": bool(torch.equal(a_out.ids, b_out.ids))}
            results["cases"][f"batch {b}, {name}"] = case
            print(f"batch {b}, {name}: whole vocabulary {whole:.3f} s, columns {columns:.3f} s "
                  f"({case['speedup']}x); 16 forward passes alone {forwards:.3f} s; same ids: {case['same_ids']}",
                  flush=True)
    sampler_module.NARROW_SHARE = default_share
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
