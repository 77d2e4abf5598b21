"""Does the model fit its training scenes better than unseen ones? Train vs held-out loss per task.

For each model folder given (a stage's `final`, or a checkpoint's model folder), scores
the same number of rows per task from the training shards and from held-out shards
(tokenized from the world's `eval` and `sdvi_eval` manifests) with the training
objective's masking at fixed noise levels, and prints per task: the mean cross-entropy
over masked response positions and the share predicted right, train against held-out.
A held-out loss far above the training loss says the world is too small for the steps
(memorised); both high says the model or the steps are the limit.

    .venv/bin/python benchmarks/heldout_loss.py --runs RUNS --heldout RUNS/shards_heldout \
        RUNS/stage1/final RUNS/stage2/final RUNS/stage3/final

`--runs` is a folder written by `scripts/pipeline.sh` (its `shards/` and
`tokenizers/text`); `--heldout` holds shard sets tokenized by `jobs/tokenize_manifest.py`
from the world's held-out manifests with the same tokenizers (for instance
`--manifest RUNS/world/manifests/eval/all.jsonl --out RUNS/shards_heldout/eval`).
Every model is scored on identical masks (seeded per row and noise level).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from omni_model.batching import collate
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab
from pipelines.data.shards import shard_files
from pipelines.train import AssembleSamples

TASK_ORDER = ("t2i", "s2i", "caption", "vqa", "asr", "tts", "svqa", "text")


def rows_by_task(folders: list[Path], tokenizer: str, vocab: Vocab, per_task: int,
                 max_len: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The first `per_task` rows of each task in the shard folders, as (ids, response mask)."""
    table = pa.concat_tables(pq.read_table(f) for folder in folders for f in shard_files(folder))
    assembled = AssembleSamples(tokenizer, vocab.to_dict(), max_len)(table)
    out: dict[str, list] = {}
    for ids, mask, task in zip(assembled["input_ids"], assembled["response_mask"], assembled["task"]):
        rows = out.setdefault(task, [])
        if len(rows) < per_task:
            rows.append((torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)))
    return out


@torch.no_grad()
def score(model: Transformer, rows, vocab: Vocab, t: float, seed: int, batch: int = 16) -> tuple[float, float]:
    """(mean cross-entropy, share right) over response positions masked with probability t."""
    total, right, count = 0.0, 0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        b = collate(chunk, vocab.pad_id)
        masked = torch.zeros_like(b.response_mask)
        for r in range(len(chunk)):
            gen = torch.Generator().manual_seed(seed * 100_003 + start + r)
            draw = torch.rand(b.response_mask.shape[1], generator=gen) < t
            masked[r] = draw & b.response_mask[r]
        noisy = torch.where(masked, torch.full_like(b.input_ids, vocab.mask_id), b.input_ids)
        # image positions from the clean rows, as in training (the sampler's layouts fix
        # `<|begin_of_image|>`; here masking may hide it)
        logits = model(noisy, attention_mask=b.attention_mask, image_index=model.image_index(b.input_ids)).float()
        target = b.input_ids[masked]
        picked = logits[masked]
        total += float(F.cross_entropy(picked, target, reduction="sum"))
        right += int((picked.argmax(-1) == target).sum())
        count += int(masked.sum())
    return total / max(1, count), right / max(1, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders (config.json + model.safetensors + vocab.json)")
    parser.add_argument("--runs", default="runs", help="a scripts/pipeline.sh run folder")
    parser.add_argument("--heldout", required=True, help="a folder of held-out shard sets")
    parser.add_argument("--rows", type=int, default=64, help="rows per task and split")
    parser.add_argument("--t", default="0.3,0.7,1.0", help="noise levels (share of the response masked)")
    parser.add_argument("--max-len", type=int, default=248)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    levels = [float(x) for x in args.t.split(",")]
    vocab = Vocab.load(args.models[0])
    tokenizer = str(runs / "tokenizers/text")
    splits = {
        "train": rows_by_task([runs / "shards/train", runs / "shards/sdvi"], tokenizer, vocab, args.rows, args.max_len),
        "held-out": rows_by_task(sorted(p for p in Path(args.heldout).iterdir() if p.is_dir()), tokenizer, vocab,
                                 args.rows, args.max_len),
    }
    tasks = [t for t in TASK_ORDER if t in splits["train"] and t in splits["held-out"]]
    results: dict = {}
    for folder in args.models:
        model = Transformer.from_pretrained(folder).eval()
        print(f"\n{folder}  ({args.rows} rows a task and split; loss / share right at each t)")
        print(f"{'task':8s} " + " ".join(f"{'t=' + str(t):>27s}" for t in levels) + f"   gap at t={levels[-1]}")
        for task in tasks:
            cells = []
            for t in levels:
                tr = score(model, splits["train"][task], vocab, t, seed=1)
                ho = score(model, splits["held-out"][task], vocab, t, seed=2)
                results.setdefault(folder, {}).setdefault(task, {})[str(t)] = {"train": tr, "held_out": ho}
                cells.append(f"{tr[0]:5.3f}/{tr[1]:.2f} vs {ho[0]:5.3f}/{ho[1]:.2f}")
            gap = ho[0] - tr[0]  # held-out minus train loss at the last (highest) noise level
            print(f"{task:8s} " + " ".join(f"{c:>27s}" for c in cells) + f"   {gap:+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
