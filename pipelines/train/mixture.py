"""The stage's data: its shard sets mixed by weight (a replay share of earlier stages'
data, task weights within a source) and assembled into token sequences, as one
streaming Ray Data read."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Sequence

import numpy as np

from omni_model.templates import encode_sample
from omni_model.vocab import Vocab
from pipelines.data.shards import check_compatible, shard_files, to_messages
from pipelines.train.config import DataSource, StageConfig
from pipelines.train.initial_model import load_text_tokenizer

logger = logging.getLogger(__name__)


class AssembleSamples:
    """Ray Data stage: shard rows -> `input_ids`, `response_mask`, `task` (templates)."""

    def __init__(self, text_tokenizer: str | None, vocab: dict, max_len: int) -> None:
        self.tokenizer = load_text_tokenizer(text_tokenizer)
        self.vocab = Vocab.from_dict(vocab)
        self.max_len = max_len

    def __call__(self, table) -> dict[str, list]:
        ids, masks, tasks = [], [], []
        for row in table.to_pylist():
            enc = encode_sample(to_messages(row), self.tokenizer, self.vocab)
            if len(enc.ids) > self.max_len:
                continue  # never truncate a response; the summary counts what was dropped
            ids.append(enc.ids)
            masks.append([int(m) for m in enc.response_mask])
            tasks.append(row["task"])
        return {"input_ids": ids, "response_mask": masks, "task": tasks}


def shard_sets(cfg: StageConfig) -> list[Path]:
    """The mixture's shard folders, resolved against `data.shards`."""
    return [Path(cfg.data.shards) / s.shards for s in cfg.data.mixture]


def build_dataset(cfg: StageConfig, vocab: Vocab):
    """The stage's mixed, shuffled, assembled Ray dataset: one streaming read.

    Every pass over the mixture lists each source's files, repeated as often as its
    weight needs, in a fresh random order with the sources interleaved; each row is then
    kept with the probability that brings its source to its share (`read_mixture`).
    One read operator for the whole run, no all-to-all shuffle: a small cluster whose
    CPUs the training workers hold still streams (the workers shuffle locally).
    """
    import ray

    if not cfg.data.mixture:
        raise ValueError("data.mixture lists no shard sets")
    folders = shard_sets(cfg)
    check_compatible(folders)
    rules, repeats, epoch_rows = mixture_rules(cfg.data.mixture, folders, cfg.data.samples_per_epoch)
    passes = cfg.data.epochs or _passes_needed(cfg, vocab, folders, epoch_rows)
    logger.info("streaming %d shuffled pass(es) over the mixture", passes)
    rng = random.Random(cfg.data.seed)
    files: list[str] = []
    for _ in range(passes):
        one_pass = [str(f) for folder, k in zip(folders, repeats) for f in shard_files(folder) * k]
        rng.shuffle(one_pass)
        files += one_pass
    # Our own read tasks (one file each, in this order, at task_cpus): Ray Data's
    # read_parquet lists files in a task that asks for a whole CPU.
    ds = ray.data.from_items([{"path": f, "index": i} for i, f in enumerate(files)])
    ds = ds.map_batches(read_mixture, fn_kwargs={"rules": rules, "seed": cfg.data.seed}, batch_size=1,
                        batch_format="pyarrow", num_cpus=cfg.data.task_cpus)
    return ds.map_batches(
        AssembleSamples, fn_constructor_args=(cfg.data.text_tokenizer, vocab.to_dict(),
                                              cfg.data.max_seq_len - cfg.data.max_pads),
        batch_format="pyarrow", batch_size=256, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=cfg.data.task_cpus)


#: how one listed shard file is read: (keep probability of a weight-1 row, the tasks
#: kept (None: all), task -> weight)
Rule = tuple[float, "tuple[str, ...] | None", dict[str, float]]


def mixture_rules(mixture: Sequence[DataSource], folders: Sequence[Path],
                  samples_per_epoch: int | None = None) -> tuple[dict[str, Rule], list[int], int]:
    """How to read each source so that it makes its share of an epoch.

    A source's rows count with their task's weight; the epoch is the largest source's
    weighted size over its share (or `samples_per_epoch`). A source that needs more rows
    than it holds lists its files several times (`repeats`); each listing keeps a row
    with the probability that brings the source to its share and its tasks to their
    weights. Returns the rules per file, the repeats per source and the epoch's rows.
    """
    counts = [_count_rows(folder, source.tasks, source.task_weights)
              for source, folder in zip(mixture, folders)]
    total_weight = sum(s.weight for s in mixture)
    shares = [s.weight / total_weight for s in mixture]
    epoch = samples_per_epoch or int(max(c / w for c, w in zip(counts, shares) if w > 0))
    rules: dict[str, Rule] = {}
    repeats: list[int] = []
    for source, folder, count, share in zip(mixture, folders, counts, shares):
        want = int(round(epoch * share))
        if count == 0 or want == 0:
            logger.warning("mixture source %s contributes nothing", source.shards)
            repeats.append(0)
            continue
        weights = {t: float(w) for t, w in source.task_weights.items()}
        present = source.tasks or [*weights, None]  # None: a task without a weight (1)
        copies = math.ceil(want * max(weights.get(t, 1.0) for t in present) / count)
        repeats.append(copies)
        for f in shard_files(folder):
            if str(f) in rules:
                raise ValueError(f"{folder} is listed twice in the mixture: one source per "
                                 "shard set (weigh its tasks with task_weights)")
            rules[str(f)] = (want / (count * copies), tuple(source.tasks) if source.tasks else None, weights)
        logger.info("mixture: %s: %d of %.0f weighted rows per epoch", source.shards, want, count)
    epoch_rows = sum(int(round(epoch * sh)) for c, sh in zip(counts, shares) if c)
    return rules, repeats, epoch_rows


def _count_rows(folder: Path, tasks: Sequence[str] | None, weights: dict[str, float] | None = None) -> float:
    """Rows of a shard set (of the given tasks, each counted with its task's weight),
    from the task column alone."""
    import pyarrow.parquet as pq

    if not tasks and not weights:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(folder))
    weights = weights or {}
    total = 0.0
    for f in shard_files(folder):
        for t in pq.read_table(f, columns=["task"])["task"].to_pylist():
            if not tasks or t in tasks:
                total += float(weights.get(t, 1.0))
    return total


def read_mixture(batch, rules: dict[str, Rule], seed: int):
    """Read one listed shard file and keep each row with its source's probability times
    its task's weight (and only its source's tasks); the draw is seeded by the file's
    place in the list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, index = batch["path"][0].as_py(), batch["index"][0].as_py()
    prob, tasks, weights = rules[path]
    table = pq.read_table(path)
    row_tasks = np.array(table["task"].to_pylist(), dtype=object) if tasks or weights else None
    if weights:
        prob = prob * np.array([weights.get(t, 1.0) for t in row_tasks])
    keep = np.random.default_rng([seed, index]).random(table.num_rows) < prob
    if tasks is not None:
        keep &= np.isin(row_tasks, list(tasks))
    return table.filter(pa.array(keep))


def _passes_needed(cfg: StageConfig, vocab: Vocab, folders: list[Path], epoch_rows: int) -> int:
    """Passes over the mixture that cover max_steps for every worker, with 50% margin.

    The mean sample length comes from assembling up to 256 rows of the first shard file.
    """
    import pyarrow.parquet as pq

    assemble = AssembleSamples(cfg.data.text_tokenizer, vocab.to_dict(), cfg.data.max_seq_len)
    table = pq.read_table(shard_files(folders[0])[0]).slice(0, 256)
    lengths = [len(ids) for ids in assemble(table)["input_ids"]] or [cfg.data.max_seq_len]
    mean_len = sum(lengths) / len(lengths) + (cfg.data.max_pads + 1) / 2
    tokens = cfg.train.max_steps * cfg.optim.grad_accum * cfg.data.rows_per_step * cfg.data.max_seq_len
    needed = tokens / mean_len * cfg.scaling.num_workers * 1.5 + 64 * cfg.scaling.num_workers
    return max(1, math.ceil(needed / max(1, epoch_rows)))
