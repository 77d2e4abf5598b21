"""The data of a release fine-tuning run: manifests -> examples on Parquet (once, before
training), then a streaming read of them into the trainer.

Why Parquet in between rather than decoding media inside the training stream: every
input row is accounted for before a GPU is held (`examples/` or `quarantine.parquet`,
with the reason), and a bad manifest fails on CPUs in minutes; the image and speech
tokenizers run once per row, not once per pass; a resumed run skips the samples it has
seen by reading the same files in the same seeded order; and the features are small
(560 float32 every 60 ms: 37 KB a second of speech). The cost: SenseVoice's dither is
drawn once per row (seeded by it) where the official dataset draws it at every read.
A run reuses its `examples/` when the manifests, the release and the data settings
are unchanged (`examples/_done.json` records their fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.release_examples import ReleaseExamples, manifest_batch
from pipelines.data.shards import QUARANTINE_SCHEMA, write_quarantine
from pipelines.train.release_config import ReleaseFinetuneConfig

logger = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"
DONE_FILE = "_done.json"
QUARANTINE_FILE = "quarantine.parquet"


def _fingerprint(cfg: ReleaseFinetuneConfig) -> str:
    data = asdict(cfg.data)
    for key in ("epochs", "task_cpus", "shuffle_buffer", "rows_per_step", "prepare_workers", "prepare_cpus",
                "prepare_gpus", "prepare_batch", "pad_ratio"):
        data.pop(key)  # these change how examples are read, not what they are
    files = []
    for rel in cfg.data.manifests:
        path = Path(cfg.data.root) / rel
        stat = path.stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    weights = sorted(p.name for p in Path(cfg.model.path).glob("*.safetensors*"))
    blob = json.dumps({"data": data, "manifests": files, "release": [str(cfg.model.path), weights]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare_examples(cfg: ReleaseFinetuneConfig, run_dir: Path) -> dict[str, Any]:
    """Turn the manifests into `run_dir/examples/part-*.parquet` with Ray Data (every
    row: an example, or a reason in `examples/quarantine.parquet`). Returns the counts."""
    import ray

    out = run_dir / EXAMPLES_DIR
    fingerprint = _fingerprint(cfg)
    done = out / DONE_FILE
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        summary = json.loads(done.read_text())
        logger.info("reusing %s: %d examples, %d quarantined", out, summary["examples"], summary["quarantined"])
        return summary
    d = cfg.data
    if not d.manifests:
        raise ValueError("data.manifests lists no JSONL manifest")
    items = []
    for rel in d.manifests:
        batch = manifest_batch(Path(d.root) / rel, rel, d.max_line_bytes)
        items += [dict(zip(batch, values)) for values in zip(*batch.values())]
    shutil.rmtree(out, ignore_errors=True)
    staging = run_dir / f".{EXAMPLES_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / d.prepare_batch)))
    ds = ds.map_batches(
        ReleaseExamples, batch_size=d.prepare_batch, batch_format="pyarrow",
        fn_constructor_kwargs=dict(
            release=cfg.model.path, data_root=d.root, max_len=d.max_seq_len, max_pads=d.max_pads,
            image_tokenizer=d.image_tokenizer, speech_tokenizer=d.speech_tokenizer,
            image_input_size=d.image_input_size, image_output_size=d.image_output_size, dither=d.dither,
            seed=d.seed, limits=asdict(d.limits), sensevoice_folder=cfg.model.sensevoice_folder,
            device="cuda" if d.prepare_gpus else "cpu"),
        compute=ray.data.ActorPoolStrategy(size=d.prepare_workers), num_cpus=d.prepare_cpus,
        num_gpus=d.prepare_gpus or None)
    ds.write_parquet(str(staging))
    bad = []
    n_good = 0
    for f in sorted(staging.glob("*.parquet")):
        table = pq.read_table(f, columns=["sample_id", "source", "line", "reason", "raw"])
        failed = pc.not_equal(table["reason"], "")
        n_good += table.num_rows - (pc.sum(failed).as_py() or 0)
        bad += table.filter(failed).to_pylist()
    if bad:
        write_quarantine([{k: r[k] for k in QUARANTINE_SCHEMA.names} for r in bad], staging / QUARANTINE_FILE)
        for r in bad[:5]:
            logger.warning("quarantined %s:%d: %s", r["source"], r["line"], r["reason"])
    summary = {"fingerprint": fingerprint, "rows": len(items), "examples": int(n_good), "quarantined": len(bad)}
    (staging / DONE_FILE).write_text(json.dumps(summary) + "\n")
    staging.rename(out)
    logger.info("examples: %d of %d rows; %d quarantined%s", n_good, len(items), len(bad),
                f" (reasons in {out / QUARANTINE_FILE})" if bad else "")
    return summary


def example_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / EXAMPLES_DIR).glob("*.parquet") if p.name != QUARANTINE_FILE)


def read_examples(batch: pa.Table) -> pa.Table:
    """Ray Data read task: one listed example file, its good rows (no `raw`)."""
    table = pq.read_table(batch["path"][0].as_py())
    return table.filter(pc.equal(table["reason"], "")).drop_columns(["raw", "reason"])


def training_dataset(cfg: ReleaseFinetuneConfig, run_dir: Path, summary: dict[str, Any]):
    """The examples for `fit`, streamed: every pass lists the files in a fresh seeded
    order (workers shuffle locally); enough passes for `train.max_steps` unless
    `data.epochs` says."""
    import ray

    files = example_files(run_dir)
    passes = cfg.data.epochs or _passes_needed(cfg, files, summary["examples"])
    rng = random.Random(cfg.data.seed)
    listed: list[str] = []
    for _ in range(passes):
        one = [str(f) for f in files]
        rng.shuffle(one)
        listed += one
    ds = ray.data.from_items([{"path": f} for f in listed], override_num_blocks=len(listed))
    return ds.map_batches(read_examples, batch_size=1, batch_format="pyarrow", num_cpus=cfg.data.task_cpus)


def _passes_needed(cfg: ReleaseFinetuneConfig, files: list[Path], n_examples: int) -> int:
    lengths = []
    for f in files[:4]:
        table = pq.read_table(f, columns=["input_ids", "reason"])
        lengths += pc.list_value_length(table.filter(pc.equal(table["reason"], ""))["input_ids"]).to_pylist()
    mean = (sum(lengths) / len(lengths) if lengths else cfg.data.max_seq_len) + (cfg.data.max_pads + 1) / 2
    per_row = max(1, int(cfg.data.max_seq_len // mean))
    needed = (cfg.train.max_steps * cfg.optim.grad_accum * cfg.data.rows_per_step * per_row
              * cfg.scaling.num_workers * 1.5 + 64 * cfg.scaling.num_workers)
    return max(1, math.ceil(needed / max(1, n_examples)))
