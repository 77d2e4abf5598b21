"""How fast the tiny model learns text-to-image, under different optimiser settings.

Trains a fresh model of `configs/tiny/stage1.yaml`'s shape on the t2i rows of a
pipeline run's train shards alone (one process, the stage's packing, masking, AdamW and
warmup-cosine schedule), once per setting, all in this run, and prints after every
`--every` steps how often the model's first guess is right with the whole image masked
(where generation starts): on background codes and on object codes (the codes that
differ from the image's background code; they carry colour, shape and position). The
first setting is the baseline the others are compared with.

    .venv/bin/python benchmarks/t2i_learning.py --runs runs [--steps 800]

`--runs` is a folder written by `scripts/pipeline.sh` (its `shards/train` and
`tokenizers/text`). Fit, not generalisation: the rows scored are the first `--probe`
training rows; the held-out evaluation is `jobs/evaluate.py`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from omni_model.batching import pack
from omni_model.config import load_config
from omni_model.masking import add_tail_pad
from omni_model.objective import diffusion_loss_of_batch
from pipelines.data.shards import check_compatible, shard_files
from pipelines.train import AssembleSamples, StageConfig, build_model, lr_schedule, objective_of, resolve_vocab

SETTINGS = {  # name: optim overrides
    "lr 1e-3, t uniform": {"lr": 1e-3, "t_schedule": "uniform"},
    "lr 2.5e-4, t uniform": {"lr": 2.5e-4, "t_schedule": "uniform"},
    "lr 2.5e-4, t cosine": {"lr": 2.5e-4, "t_schedule": "cosine"},
}


def t2i_samples(cfg: StageConfig, vocab) -> list[tuple[torch.Tensor, torch.Tensor]]:
    table = pa.concat_tables(pq.read_table(f) for f in shard_files(Path(cfg.data.shards) / "train"))
    table = table.filter(pc.equal(table["task"], "t2i"))
    rows = AssembleSamples(cfg.data.text_tokenizer, vocab.to_dict(),
                           cfg.data.max_seq_len - cfg.data.max_pads)(table)
    return [(torch.tensor(ids), torch.tensor(mask, dtype=torch.bool))
            for ids, mask in zip(rows["input_ids"], rows["response_mask"])]


@torch.no_grad()
def first_guess(model, samples, vocab) -> tuple[float, float]:
    """Accuracy of the argmax with the whole image masked: (background, object) codes."""
    model.eval()
    hits, totals = [0, 0], [0, 0]
    for ids, response in samples:
        image = (ids >= vocab.ranges["image"].start) & (ids < vocab.ranges["image"].stop)
        x = torch.where(response, torch.full_like(ids, vocab.mask_id), ids)
        guess = model(x[None], image_index=model.image_index(ids[None]))[0].argmax(-1)[image]
        codes = ids[image]
        background = codes.mode().values
        for k, sel in enumerate((codes == background, codes != background)):
            hits[k] += int((guess[sel] == codes[sel]).sum())
            totals[k] += int(sel.sum())
    model.train()
    return hits[0] / max(1, totals[0]), hits[1] / max(1, totals[1])


def train(cfg: StageConfig, vocab, samples, probe, steps: int, every: int) -> list[tuple]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(cfg, vocab, None, None).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg))
    objective = objective_of(cfg)
    per_step = cfg.data.rows_per_step * (cfg.data.max_seq_len // (len(samples[0][0]) + cfg.data.max_pads))
    order: list[int] = []
    out, start = [], time.perf_counter()
    for step in range(steps):
        batch = []
        while len(batch) < per_step:
            if not order:
                order = torch.randperm(len(samples), generator=gen).tolist()
            ids, response = samples[order.pop()]
            batch.append(add_tail_pad(ids, response, vocab.pad_id, cfg.data.max_pads, gen))
        b = pack(batch, cfg.data.max_seq_len, vocab.pad_id)
        loss = diffusion_loss_of_batch(model, b, vocab, objective, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            out.append((step + 1, *first_guess(model, probe, vocab), time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="a scripts/pipeline.sh run folder")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--probe", type=int, default=64, help="training rows scored")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    base = load_config(StageConfig, "configs/tiny/stage1.yaml",
                       [f"data.shards={runs / 'shards'}", f"data.text_tokenizer={runs / 'tokenizers/text'}"])
    vocab, _ = resolve_vocab(base, check_compatible([Path(base.data.shards) / "train"]))
    samples = t2i_samples(base, vocab)
    probe = samples[:args.probe]
    print(f"{len(samples)} t2i rows; fresh {base.model.fresh}; {base.data.rows_per_step} packed rows "
          f"of {base.data.max_seq_len} a step; first guess with the whole image masked, "
          f"{args.probe} training rows")
    baseline = None
    for name, optim in SETTINGS.items():
        cfg = replace(base, optim=replace(base.optim, **optim),
                      train=replace(base.train, max_steps=args.steps))
        curve = train(cfg, vocab, samples, probe, args.steps, args.every)
        for step, bg, obj, secs in curve:
            print(f"{name:22s} step {step:5d}: background {bg:.3f}  object {obj:.3f}  ({secs:.0f} s)")
        final = curve[-1][2]
        baseline = final if baseline is None else baseline
        ratio = f"{final / baseline:.2f}x the baseline" if baseline else "baseline at 0"
        print(f"{name:22s} object codes right after {args.steps} steps: {final:.3f} ({ratio})")


if __name__ == "__main__":
    main()
