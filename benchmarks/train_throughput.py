"""Training throughput: Ray Train (1 and 2 CPU workers, DDP) against a plain
single-process PyTorch loop over the same model, the same packed batches and the same
thread count, all measured in this run; plus the share of step time spent waiting for
data. Tokens are real (non-padding) tokens.

    .venv/bin/python benchmarks/train_throughput.py [--shards DIR] [--steps 60]

Without --shards it builds a small world and tokenizes it with the fixture tokenizers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import torch
from _world import make_shards

from omni_model.batching import StreamPacker
from omni_model.config import load_config
from omni_model.masking import add_tail_pad
from omni_model.objective import diffusion_loss_of_batch
from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from pipelines.data.shards import check_compatible, shard_files
from pipelines.train import (AssembleSamples, DataSource, StageConfig, build_model, lr_schedule, objective_of,
                             resolve_vocab, run_stage)



def plain_loop(cfg: StageConfig, steps: int) -> float:
    """Single process, no Ray: the same assembly, packing, masking and optimiser."""
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    vocab, _ = resolve_vocab(cfg, check_compatible([Path(cfg.data.shards) / "train"]))
    assemble = AssembleSamples(cfg.data.text_tokenizer, vocab.to_dict(),
                               cfg.data.max_seq_len - cfg.data.max_pads)
    rows = assemble(pq.read_table(shard_files(Path(cfg.data.shards) / "train")))
    gen = torch.Generator().manual_seed(0)

    def stream():
        while True:
            for ids, mask in zip(rows["input_ids"], rows["response_mask"]):
                yield (*add_tail_pad(torch.tensor(ids), torch.tensor(mask, dtype=torch.bool),
                                     vocab.pad_id, cfg.data.max_pads, gen), 0)

    model = build_model(cfg, vocab, None, None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))
    packer, samples = StreamPacker(cfg.data.max_seq_len, cfg.data.rows_per_step, vocab.pad_id), stream()
    objective = objective_of(cfg)
    tokens, start = 0, None
    for step in range(steps):
        if step == 5:  # skip warm-up
            tokens, start = 0, time.perf_counter()
        batch, _, _ = packer.next_batch(samples)
        loss = diffusion_loss_of_batch(model, batch, vocab, objective).loss  # the trainer's step
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        tokens += int(batch.attention_mask.sum())
    return tokens / (time.perf_counter() - start)


def ray_train(cfg: StageConfig, workers: int, steps: int, run_dir: Path) -> tuple[float, float]:
    cfg = replace(cfg, run=replace(cfg.run, dir=str(run_dir)),
                  scaling=replace(cfg.scaling, num_workers=workers),
                  train=replace(cfg.train, max_steps=steps, log_every=5, checkpoint_every=steps))
    run_stage(cfg)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return (sum(m["tokens_per_s"] for m in metrics) / len(metrics),
            sum(m["data_wait_fraction"] for m in metrics) / len(metrics))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="a folder holding the shard set train/ (default: build one)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--config", default="configs/tiny/stage1.yaml")
    args = p.parse_args()
    owned = start_ray(RayConfig(num_cpus=4))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shards = Path(args.shards) if args.shards else make_shards(Path(tmp))
            cfg = load_config(StageConfig, args.config, [f"data.shards={shards}", "data.text_tokenizer=null"])
            cfg = replace(cfg, data=replace(cfg.data, mixture=(DataSource("train"),)))
            plain = plain_loop(cfg, args.steps)
            one, wait1 = ray_train(cfg, 1, args.steps, Path(tmp) / "ray1")
            two, wait2 = ray_train(cfg, 2, args.steps, Path(tmp) / "ray2")
    finally:
        stop_ray(owned)
    f = cfg.model.fresh
    print(f"model: fresh {f.layers} layers x {f.hidden}, rows {cfg.data.rows_per_step} x {cfg.data.max_seq_len} "
          f"tokens per worker step, {cfg.scaling.threads_per_worker} thread(s) per process")
    print(f"plain PyTorch loop, 1 process : {plain:8.0f} tokens/s (1.00x)")
    print(f"Ray Train, 1 worker           : {one:8.0f} tokens/s ({one / plain:.2f}x), "
          f"waiting for data {wait1:.1%} of step time")
    print(f"Ray Train, 2 workers (DDP)    : {two:8.0f} tokens/s ({two / plain:.2f}x), "
          f"waiting for data {wait2:.1%} of step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
