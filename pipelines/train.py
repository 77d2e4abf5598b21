"""The Ray Train loop shared by the three training stages. A stage is a YAML file.

Driver side (`run_stage`): resolve the vocab and the starting weights (a fresh tiny
model, a Dream-layout backbone whose vocab is extended by image and speech codes, or the
previous stage's final checkpoint), read the stage's shard sets with Ray Data, mix them
by weight (a replay share of earlier stages' data), turn rows into token sequences
through `omni_model.templates` (text is tokenised here), and launch a `TorchTrainer`.

Worker side (`train_loop_per_worker`): stream the dataset shard, add tail pads and pack
samples into rows of `max_seq_len` with a document mask, draw the masking at every step,
and optimise with AdamW (warmup then cosine, clipping, accumulation) under DDP (gloo on
CPU, NCCL on GPU) or DeepSpeed ZeRO (GPU; bf16, activation checkpointing optional).
Metrics (loss overall and per task, masked-token accuracy, tokens/s, learning rate, time
waiting for data) go to `ray.train.report`, to `metrics.jsonl` and to TensorBoard event
files. Checkpoints (model in the layout `Transformer.from_pretrained` reads, vocab,
tokenizer references, optimizer and scheduler, step, RNG, data position) are reported
every N steps; a run restarted with the same config resumes from its latest one, and a
worker that dies is restarted by Ray from it (`FailureConfig`).

Guards (issue: a mis-sized cluster used to hang silently): before `fit`, `fit_to_cluster`
compares what the stage asks for with the cluster and either shrinks the data side's
CPU requests to what is left or fails at once, naming the numbers; during `fit`, a
watchdog fails the stage when no step completes within `run.stall_timeout_s`, saying
what is pending. A checkpoint counts only when every file it lists is there at its
size (`checkpoint_complete`), so a save cut short is never resumed from, and `final/`
appears whole or not at all. The text tokenizer is copied into every checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from omni_model.batching import StreamPacker
from omni_model.masking import SCHEDULES, WEIGHTINGS, add_tail_pad
from omni_model.objective import Objective, diffusion_loss_of_batch, warmup_cosine
from omni_model.precision import MODES as PRECISIONS, autocast
from omni_model.templates import encode_sample
from omni_model.tokenizers.text import BPETokenizer, ByteTokenizer
from omni_model.transformer import Transformer, TransformerConfig
from omni_model.vocab import Vocab
from omni_model.config import from_dict
from pipelines.manifest import TASKS
from pipelines.ray_setup import RayConfig
from pipelines.shards import check_compatible, shard_files, to_messages

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
TOKENIZERS_FILE = "tokenizers.json"
OPTIMIZER_FILE = "optimizer.pt"
TEXT_TOKENIZER_DIR = "text_tokenizer"  #: the copy of the text tokenizer in a checkpoint
PROGRESS_FILE = "progress.json"  #: rank 0's last step and its time (the watchdog reads it)


# ---------------------------------------------------------------------- config
@dataclass(frozen=True)
class FreshModel:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 768
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096


@dataclass(frozen=True)
class ModelConfig:
    #: `fresh` (a new model of `fresh`'s shape), `pretrained` (a Dream/Qwen2-layout folder
    #: with its tokenizer.json: the vocab is extended by image and speech codes) or
    #: `previous` (a checkpoint of an earlier stage, with its vocab.json).
    init: str = "fresh"
    #: the folder for `pretrained` / `previous`; for `previous` also `latest:RUN_DIR`
    #: (that run's final checkpoint, else its newest one).
    path: str | None = None
    fresh: FreshModel = field(default_factory=FreshModel)
    shift_logits: bool = False  #: Dream backbones predict position i from i-1
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class DataSource:
    shards: str  #: a shard set folder (jobs/tokenize_manifest.py output), relative to data.shards
    weight: float = 1.0  #: share of the mixture
    tasks: tuple[str, ...] = ()  #: keep only these tasks (empty: all)
    #: relative weight of a task's rows within the source (unlisted tasks: 1), e.g.
    #: `{t2i: 2.0}` draws each t2i row twice as often as each other row
    task_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight < 0 or any(float(w) < 0 for w in self.task_weights.values()):
            raise ValueError(f"mixture source {self.shards}: weights must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    shards: str = "runs/shards"  #: the folder relative mixture paths are resolved against
    mixture: tuple[DataSource, ...] = ()
    text_tokenizer: str | None = None  #: a tokenizer.json folder; None: UTF-8 bytes
    max_seq_len: int = 512  #: packed row length
    rows_per_step: int = 8  #: packed rows per worker per micro-batch
    max_pads: int = 8  #: tail pads per response: 1..N
    pad_ratio: float = 0.6  #: tail pads are masked with probability pad_ratio * t
    samples_per_epoch: int | None = None  #: mixture size (None: the largest source's size / share)
    #: passes over the mixture, each freshly shuffled (None: enough for train.max_steps).
    #: Workers stream one long pass: a new Ray Data epoch would need all workers to
    #: reach it together, which packed batches (a varying number of samples per step)
    #: cannot promise.
    epochs: int | None = None
    seed: int = 0
    #: CPUs each Ray Data read and filter task asks for. Below 1 so the data still flows
    #: on a small cluster whose whole CPUs the training workers hold.
    task_cpus: float = 0.25
    #: rows each worker shuffles locally as it streams (the blocks' order is shuffled
    #: per pass; no all-to-all shuffle, which would stall a small cluster)
    shuffle_buffer: int = 1024


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  #: cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.03
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    weighting: str = "elbo"  #: elbo (1/t) or none
    eps_t: float = 1e-3
    #: noise levels t: uniform, or cosine (MaskGIT; more samples near all-masked)
    t_schedule: str = "uniform"

    def __post_init__(self) -> None:  # fail at config time, not in the first worker step
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"optim.weighting must be one of {WEIGHTINGS}, not {self.weighting!r}")
        if self.t_schedule not in SCHEDULES:
            raise ValueError(f"optim.t_schedule must be one of {SCHEDULES}, not {self.t_schedule!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    max_steps: int = 100
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    backend: str = "auto"  #: auto (DeepSpeed on GPU, DDP on CPU), ddp, deepspeed
    zero_stage: int = 2
    bf16: bool = True  #: DeepSpeed on GPU only
    #: DDP's forward under bf16 autocast: auto (GPUs, and CPUs with native bf16: AVX512-BF16
    #: or AMX, 1.7x faster there), bf16, none. DeepSpeed keeps to `bf16`.
    precision: str = "auto"
    threads_per_worker: int = 1
    #: compare the stage's needs with the cluster before training (shrink the data side's
    #: CPU requests to what the workers leave, or fail at once); false on a cluster that
    #: autoscales, whose resources grow on demand
    check_resources: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"scaling.precision must be one of {PRECISIONS}, not {self.precision!r}")


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/stage1"  #: the run folder: config, metrics, checkpoints, final/
    max_failures: int = 2  #: worker-group restarts from the latest checkpoint
    #: the stage fails, saying what is pending, when no step completes for this long
    #: (the first step's time includes starting the workers and the data pipeline)
    stall_timeout_s: float = 900.0
    fail_at_step: int | None = None  #: test hook: rank 1 exits once at this step


@dataclass(frozen=True)
class StageConfig:
    stage: int = 1
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------------- driver helpers
def load_text_tokenizer(path: str | None):
    return BPETokenizer.from_pretrained(path) if path else ByteTokenizer()


def resolve_previous(path: str) -> Path:
    """`latest:RUN_DIR` -> that run's `final/`, else its newest checkpoint; else `path`."""
    if not path.startswith("latest:"):
        return Path(path)
    run = Path(path.split(":", 1)[1])
    if (run / "final" / "model.safetensors").exists():  # final/ appears whole (see _export_final)
        return run / "final"
    latest = latest_checkpoint(run)
    if latest is None:
        raise FileNotFoundError(f"{run} has no final model and no checkpoint")
    return latest


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under a run folder (None if there
    is none); incomplete ones (a save cut short) are skipped with a warning."""
    best, best_step = None, -1
    for state in Path(run_dir).glob(f"*/checkpoint_*/{TRAIN_STATE}"):
        if not checkpoint_complete(state.parent):
            logger.warning("skipping incomplete checkpoint %s", state.parent)
            continue
        step = json.loads(state.read_text())["step"]
        if step > best_step:
            best, best_step = state.parent, step
    return best


def checkpoint_complete(folder: Path) -> bool:
    """Every file the checkpoint's `train_state.json` lists is there at its size, and
    every rank's state. (Ray copies a reported checkpoint file by file, in no set order:
    a crash mid-copy leaves a folder with some files and not others.)"""
    try:
        state = json.loads((folder / TRAIN_STATE).read_text())
    except (OSError, ValueError):
        return False
    files = state.get("files")
    if files is None:  # written before files were listed: the model is what must be there
        return (folder / "model.safetensors").exists()
    ranks = [f"rank_{r}.pt" for r in range(int(state.get("world", 1)))]
    return (all((folder / name).is_file() and (folder / name).stat().st_size == size
                for name, size in files.items())
            and all((folder / name).is_file() for name in ranks))


def resolve_vocab(cfg: StageConfig, identity: dict) -> tuple[Vocab, str | None]:
    """The stage's vocab and the weights to start from (None: fresh)."""
    m = cfg.model
    image = (identity.get("image") or {}).get("codebook_size")
    speech = (identity.get("speech") or {}).get("codebook_size")
    if m.init == "previous":
        if not m.path:
            raise ValueError("model.init=previous needs model.path (a folder or latest:RUN_DIR)")
        folder = resolve_previous(m.path)
        vocab = Vocab.load(folder)
        for name, n in (("image", image), ("speech", speech)):
            if n and vocab.ranges[name].size != n:
                raise ValueError(f"{folder}'s vocab has {vocab.ranges[name].size} {name} codes, "
                                 f"the shards' tokenizer {n}")
        return vocab, str(folder)
    if m.init == "pretrained":
        if not m.path:
            raise ValueError("model.init=pretrained needs model.path (a Dream-layout folder)")
        tok = BPETokenizer.from_pretrained(m.path)
        vocab = Vocab.extend_backbone(tok.vocab_size, tok.backbone_specials(), image or 8192,
                                      speech or 16384, code_order=("speech", "image"))
        return vocab, m.path
    if m.init != "fresh":
        raise ValueError(f"unknown model.init {m.init!r}")
    text = load_text_tokenizer(cfg.data.text_tokenizer)
    return Vocab.fresh(text.vocab_size, image or 1, speech or 1), None


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


# ---------------------------------------------------------------------- worker
def lr_schedule(cfg: StageConfig):
    """The stage's learning-rate factor per step: warmup then cosine."""
    return warmup_cosine(cfg.train.max_steps, int(cfg.train.max_steps * cfg.optim.warmup_ratio),
                         cfg.optim.min_lr_ratio)


def objective_of(cfg: StageConfig) -> Objective:
    return Objective(cfg.data.pad_ratio, cfg.optim.eps_t, cfg.optim.t_schedule, cfg.optim.weighting)


def _sample_stream(shard, skip: int, buffer: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The worker's samples in one pass (see DataConfig.epochs), skipping `skip` first."""
    task_index = {t: i for i, t in enumerate(TASKS)}
    seen = 0
    for batch in shard.iter_batches(batch_size=64, batch_format="numpy", local_shuffle_buffer_size=buffer,
                                    local_shuffle_seed=seed):
        for ids, mask, task in zip(batch["input_ids"], batch["response_mask"], batch["task"]):
            seen += 1
            if seen <= skip:
                continue
            yield (torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.bool),
                   task_index.get(str(task), len(TASKS)))
    raise RuntimeError(f"this worker's data ran out after {seen} samples: raise data.epochs")


def _padded(stream, pad_id: int, max_pads: int, gen: torch.Generator):
    for ids, mask, tag in stream:
        ids, mask = add_tail_pad(ids, mask, pad_id, max_pads, gen)
        yield ids, mask, tag


def build_model(cfg: StageConfig, vocab: Vocab, init_path: str | None,
                 resume: Path | None) -> Transformer:
    if resume is not None:
        return Transformer.from_pretrained(resume)
    if init_path is not None:
        model = Transformer.from_pretrained(init_path, shift_logits=cfg.model.shift_logits)
        if model.config.vocab_size != vocab.size:
            model.resize_vocab(vocab.size)  # a backbone gains the image and speech codes
        model.config = model.config.replace(mask_token_id=vocab.mask_id, pad_token_id=vocab.pad_id)
        return model
    f = cfg.model.fresh
    config = TransformerConfig(vocab_size=vocab.size, hidden_size=f.hidden, intermediate_size=f.ffn,
                               num_hidden_layers=f.layers, num_attention_heads=f.heads,
                               num_key_value_heads=f.kv_heads, rope_theta=f.rope_theta,
                               max_position_embeddings=f.max_position_embeddings,
                               shift_logits=cfg.model.shift_logits, mask_token_id=vocab.mask_id,
                               pad_token_id=vocab.pad_id)
    return Transformer.from_config(config, seed=cfg.data.seed)


def _use_deepspeed(cfg: StageConfig) -> bool:
    if cfg.scaling.backend == "auto":
        return cfg.scaling.use_gpu
    if cfg.scaling.backend not in ("ddp", "deepspeed"):
        raise ValueError(f"unknown scaling.backend {cfg.scaling.backend!r}")
    return cfg.scaling.backend == "deepspeed"


def deepspeed_config(cfg: StageConfig, world: int, bf16: bool) -> dict:
    zero: dict[str, Any] = {"stage": cfg.scaling.zero_stage, "overlap_comm": True,
                            "contiguous_gradients": True}
    if cfg.scaling.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.data.rows_per_step,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.rows_per_step * cfg.optim.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class _Optimisation:
    """The model with its optimizer and schedule, behind one interface for DDP and DeepSpeed.

    DDP: a torch AdamW, accumulation by dividing the loss, clipping before the step.
    DeepSpeed: the same torch AdamW handed to `deepspeed.initialize` (no fused-op build),
    ZeRO stage, clipping, accumulation and bf16 from `deepspeed_config`.
    """

    def __init__(self, cfg: StageConfig, model: Transformer, device: torch.device, world: int,
                 resume_dir: Path | None) -> None:
        import ray.train.torch

        self.cfg = cfg
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                           betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))
        self.engine = None
        if _use_deepspeed(cfg):
            import deepspeed

            bf16 = cfg.scaling.bf16 and device.type == "cuda"
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model.to(device), optimizer=self.optimizer, lr_scheduler=self.scheduler,
                config=deepspeed_config(cfg, world, bf16))
            if resume_dir is not None and (resume_dir / "deepspeed").exists():
                self.engine.load_checkpoint(str(resume_dir / "deepspeed"), tag="state")
            self.net = self.engine
        else:
            self.net = ray.train.torch.prepare_model(model)
            if resume_dir is not None:
                state = torch.load(resume_dir / OPTIMIZER_FILE, map_location=device, weights_only=True)
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward pass (DeepSpeed also steps at each boundary)."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss / self.cfg.optim.grad_accum).backward()

    def step(self) -> None:
        """Ends a step of `grad_accum` micro-batches."""
        if self.engine is not None:
            return
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, rank: int) -> None:
        """Every rank joins (ZeRO shards are collective); rank 0 writes the model."""
        if self.engine is None:
            if rank == 0:
                self.module.save_pretrained(folder)
                torch.save({"optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict()}, folder / OPTIMIZER_FILE)
            return
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        if self.cfg.scaling.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                if rank == 0:
                    self.module.save_pretrained(folder)
        elif rank == 0:
            self.module.save_pretrained(folder)


class _FailOnce:
    """Test hook (`run.fail_at_step`): rank 1 exits once at that step, as a crashed worker."""

    def __init__(self, cfg: StageConfig, rank: int) -> None:
        self.step = cfg.run.fail_at_step if rank == 1 else None
        self.marker = Path(cfg.run.dir) / ".failed_once"

    def __call__(self, step: int) -> None:
        if step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text("rank 1 exited on purpose (run.fail_at_step)")
            os._exit(1)


def _restore(checkpoint) -> tuple[Path | None, dict[str, Any]]:
    if checkpoint is None:
        return None, {"step": 0}
    resume_dir = Path(tempfile.mkdtemp(prefix="resume-"))
    checkpoint.to_directory(str(resume_dir))
    return resume_dir, json.loads((resume_dir / TRAIN_STATE).read_text())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(StageConfig, config["stage"])
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    vocab = Vocab.from_dict(config["vocab"])

    resume_dir, state = _restore(ray.train.get_checkpoint())
    torch.manual_seed(cfg.data.seed * 1000 + rank)
    gen = torch.Generator().manual_seed(cfg.data.seed * 1000 + rank + 7 * state["step"])
    model = build_model(cfg, vocab, config.get("init_path"), resume_dir)
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    opt = _Optimisation(cfg, model, device, world, resume_dir)
    if resume_dir is not None and (resume_dir / f"rank_{rank}.pt").exists():
        rank_state = torch.load(resume_dir / f"rank_{rank}.pt", weights_only=True)
        torch.set_rng_state(rank_state["torch_rng"])
        gen.set_state(rank_state["generator"])
        logger.info("rank %d resumes at step %d", rank, state["step"])

    samples_seen = int(state.get("samples_seen", {}).get(str(rank), 0))
    stream = _padded(_sample_stream(ray.train.get_dataset_shard("train"), samples_seen,
                                    cfg.data.shuffle_buffer, cfg.data.seed * 1000 + rank),
                     vocab.pad_id, cfg.data.max_pads, gen)
    packer = StreamPacker(cfg.data.max_seq_len, cfg.data.rows_per_step, vocab.pad_id)
    n_tasks = len(TASKS) + 1
    writer = _MetricsWriter(Path(cfg.run.dir)) if rank == 0 else None
    window = _Window(n_tasks, device)
    fail_once = _FailOnce(cfg, rank)
    precision = "none" if opt.engine is not None else cfg.scaling.precision  # DeepSpeed: its own bf16
    objective = objective_of(cfg)
    model.train()
    for step in range(state["step"], cfg.train.max_steps):
        fail_once(step)
        t_start = time.perf_counter()
        for _ in range(cfg.optim.grad_accum):
            t0 = time.perf_counter()
            batch, tags, consumed = packer.next_batch(stream)
            samples_seen += consumed
            batch, tags = batch.to(device), tags.to(device)
            window.wait += time.perf_counter() - t0
            out = diffusion_loss_of_batch(opt.net, batch, vocab, objective, autocast=autocast(device, precision))
            opt.backward(out.loss)
            window.add(out.per_position.detach(), out.logits.detach(), batch.input_ids, out.noisy.target_mask,
                       tags, batch.attention_mask)
        opt.step()
        window.time += time.perf_counter() - t_start
        done = step + 1
        if writer is not None:
            writer.progress(done)
        is_log = done % cfg.train.log_every == 0 or done == cfg.train.max_steps
        is_ckpt = done % cfg.train.checkpoint_every == 0 or done == cfg.train.max_steps
        if not (is_log or is_ckpt):
            continue
        metrics = window.reduce(world) | {"step": done, "lr": opt.lr, "epoch_samples": samples_seen}
        window = _Window(n_tasks, device)
        if writer is not None:
            writer.write(metrics)
        if is_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(Path(tmp), rank, opt, vocab, config, done, samples_seen, gen,
                                 world, device)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()


class _Window:
    """Accumulates the metrics of the steps between two reports."""

    def __init__(self, n_tasks: int, device: torch.device) -> None:
        self.loss = torch.zeros(n_tasks, device=device)  # summed weighted loss per task
        self.count = torch.zeros(n_tasks, device=device)  # masked tokens per task
        self.correct = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device)  # real (non-padding) tokens processed
        self.steps = 0
        self.wait = 0.0
        self.time = 0.0

    def add(self, per_pos, logits, targets, masked, tags, attention) -> None:
        tags = tags.clamp(min=0)
        self.loss.index_add_(0, tags[masked], per_pos[masked].float())
        self.count.index_add_(0, tags[masked], torch.ones_like(per_pos[masked], dtype=torch.float))
        self.correct += (logits.argmax(-1)[masked] == targets[masked]).sum()
        self.tokens += attention.sum()
        self.steps += 1

    def reduce(self, world: int) -> dict[str, float]:
        packed = torch.cat([self.loss, self.count, self.correct[None], self.tokens[None],
                            torch.tensor([self.time, self.wait], device=self.loss.device)])
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
        n = len(self.loss)
        loss, count = packed[:n], packed[n:2 * n]
        correct, tokens, seconds, wait = packed[2 * n:].tolist()
        seconds, wait = seconds / world, wait / world
        out = {"loss": (loss.sum() / count.sum().clamp(min=1)).item(),
               "masked_accuracy": correct / max(1.0, count.sum().item()),
               "tokens_per_s": tokens / max(seconds, 1e-9),
               "data_wait_fraction": wait / max(seconds, 1e-9)}
        for i, task in enumerate(TASKS):
            if count[i] > 0:
                out[f"loss/{task}"] = (loss[i] / count[i]).item()
        return out


class _MetricsWriter:
    """Rank 0 appends metrics to `metrics.jsonl` and TensorBoard event files, and keeps
    `progress.json` (the last step and when) for the driver's watchdog."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.progress_file = run_dir / PROGRESS_FILE
        self.progress_written = 0.0
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def progress(self, step: int) -> None:
        """Record a finished step (at most every 5 s: a small file, rewritten)."""
        now = time.time()
        if now - self.progress_written >= 5.0:
            tmp = self.progress_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "time": now}))
            tmp.replace(self.progress_file)
            self.progress_written = now

    def write(self, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step":
                self.tb.add_scalar(key, value, metrics["step"])
        self.tb.flush()
        logger.info("step %d loss %.4f acc %.3f %.0f tok/s", metrics["step"], metrics["loss"],
                    metrics["masked_accuracy"], metrics["tokens_per_s"])

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def _save_checkpoint(folder: Path, rank: int, opt: _Optimisation, vocab: Vocab, config: dict,
                     step: int, samples_seen: int, gen: torch.Generator, world: int,
                     device: torch.device) -> None:
    """Every rank writes its own state; rank 0 also the model, vocab and optimizer."""
    torch.save({"torch_rng": torch.get_rng_state(), "generator": gen.get_state(),
                "samples_seen": samples_seen}, folder / f"rank_{rank}.pt")
    seen = [torch.tensor(samples_seen)]
    if world > 1 and torch.distributed.is_initialized():
        seen = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
        torch.distributed.all_gather(seen, torch.tensor(samples_seen, device=device))
    opt.save(folder, rank)
    if rank != 0:
        return
    vocab.save(folder)
    (folder / TOKENIZERS_FILE).write_text(json.dumps(config.get("tokenizers", {}), indent=2) + "\n")
    text_tokenizer = config["stage"]["data"]["text_tokenizer"]
    if text_tokenizer:  # a checkpoint is self-contained: the text ids' meaning travels with it
        source = Path(text_tokenizer)
        (folder / TEXT_TOKENIZER_DIR).mkdir()
        shutil.copy(source / BPETokenizer.FILE if source.is_dir() else source,
                    folder / TEXT_TOKENIZER_DIR / BPETokenizer.FILE)
    # written last, listing what came before: `checkpoint_complete` checks it
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and not f.name.startswith("rank_")}
    (folder / TRAIN_STATE).write_text(json.dumps({
        "step": step, "samples_seen": {str(r): int(s) for r, s in enumerate(seen)},
        "stage": config["stage"]["stage"], "world": world, "files": files}) + "\n")


# ---------------------------------------------------------------------- driver
def run_stage(cfg: StageConfig) -> dict[str, Any]:
    """Train one stage on a started Ray; returns the final metrics and the final model path."""
    import ray.train
    from ray.train.torch import TorchTrainer

    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Workers and Ray Data tasks do not run in this directory: every path they open is absolute.
    cfg = replace(cfg, data=replace(cfg.data, shards=str(Path(cfg.data.shards).resolve()),
                                    text_tokenizer=cfg.data.text_tokenizer and
                                    str(Path(cfg.data.text_tokenizer).resolve())))
    if cfg.scaling.check_resources:
        cfg = fit_to_cluster(cfg)
    identity = check_compatible(shard_sets(cfg))
    vocab, init_path = resolve_vocab(cfg, identity)
    init_path = str(Path(init_path).resolve()) if init_path else None
    text = text_tokenizer_entry(cfg.data.text_tokenizer)
    if cfg.model.init == "previous":
        check_text_tokenizer(Path(init_path), text)
    cfg_dict = asdict(cfg)
    cfg_dict["run"]["dir"] = str(run_dir)
    tokenizers = {"text": text, "image": identity.get("image"), "speech": identity.get("speech")}
    dataset = build_dataset(cfg, vocab)
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        done = json.loads((resume / TRAIN_STATE).read_text())["step"]
        logger.info("resuming from %s (step %d)", resume, done)
        if done >= cfg.train.max_steps:
            _export_final(resume, run_dir / "final")
            return {"metrics": None, "final": str(run_dir / "final"), "vocab_size": vocab.size,
                    "resumed_finished_run": True}
    use_gpu = cfg.scaling.use_gpu
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": cfg_dict, "vocab": vocab.to_dict(), "init_path": init_path,
                           "tokenizers": tokenizers},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name="train", storage_path=str(run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures)),
        datasets={"train": dataset},
        # No resume_from_checkpoint: Train V2 restores a run started again with the same
        # name and storage_path from that run's newest checkpoint by itself.
    )
    result = _fit_watched(trainer, cfg, run_dir)
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as src:
        _export_final(Path(src), run_dir / "final")
    return {"metrics": result.metrics, "final": str(run_dir / "final"), "vocab_size": vocab.size}


def _export_final(checkpoint: Path, final: Path) -> None:
    """`final/`: the files `Transformer.from_pretrained` and the sampler read, nothing else.
    Written to a temporary folder renamed into place, so it is whole or absent."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "vocab.json", TOKENIZERS_FILE, TRAIN_STATE):
        shutil.copy(checkpoint / name, tmp / name)
    if (checkpoint / TEXT_TOKENIZER_DIR).is_dir():
        shutil.copytree(checkpoint / TEXT_TOKENIZER_DIR, tmp / TEXT_TOKENIZER_DIR)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- guards
class StageStalled(RuntimeError):
    """No training step completed within `run.stall_timeout_s`."""


def text_tokenizer_entry(path: str | None) -> dict | None:
    """`tokenizers.json`'s text entry: the copy inside the checkpoint and its fingerprint
    (None: the byte-level tokenizer, which needs no file)."""
    if not path:
        return None
    return {"path": TEXT_TOKENIZER_DIR, "fingerprint": BPETokenizer.from_pretrained(path).fingerprint,
            "source": path}


def check_text_tokenizer(previous: Path, entry: dict | None) -> None:
    """A stage that continues another must read text with the same tokenizer."""
    recorded_file = previous / TOKENIZERS_FILE
    if not recorded_file.exists():
        return
    recorded = json.loads(recorded_file.read_text()).get("text")
    theirs = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    mine = entry["fingerprint"] if entry else None
    if isinstance(recorded, dict) and theirs != mine:
        raise ValueError(f"{previous} was trained with text tokenizer {theirs}; data.text_tokenizer is "
                         f"{mine}: the text ids would change meaning")


def fit_to_cluster(cfg: StageConfig) -> StageConfig:
    """Compare what the stage asks for with the cluster's resources.

    The training workers must fit (else fail now, naming the numbers). The data side
    (read tasks and the AssembleSamples actor, `data.task_cpus` each) gets what the
    workers leave: when that is less than it asks, its requests shrink to fit (down to
    0 CPU, sharing the workers' cores; its work is light beside training), where it
    would otherwise wait for CPUs forever.
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    s = cfg.scaling
    need_cpu = s.num_workers * s.cpus_per_worker
    need_gpu = s.num_workers if s.use_gpu else 0
    if need_cpu > cpus or need_gpu > gpus:
        raise ValueError(
            f"the stage asks for {s.num_workers} workers x {s.cpus_per_worker:g} CPU"
            + (" + 1 GPU" if s.use_gpu else "") + f" = {need_cpu:g} CPUs" + (f" and {need_gpu} GPUs" if s.use_gpu else "")
            + f", the cluster has {cpus:g} CPUs and {gpus:g} GPUs: lower scaling.num_workers or "
            "scaling.cpus_per_worker, or add nodes (scaling.check_resources=false on an autoscaling cluster)")
    spare = cpus - need_cpu
    data_tasks = 2  # at least one read task and the AssembleSamples actor run together
    if spare < data_tasks * cfg.data.task_cpus:
        task_cpus = math.floor(100 * spare / data_tasks) / 100
        logger.warning("the workers take %g of %g CPUs: data tasks ask %g CPU each instead of %g, so "
                       "they can run beside them", need_cpu, cpus, task_cpus, cfg.data.task_cpus)
        cfg = replace(cfg, data=replace(cfg.data, task_cpus=task_cpus))
    return cfg


def _fit_watched(trainer, cfg: StageConfig, run_dir: Path):
    """`trainer.fit()` under a watchdog: when no step completes for `run.stall_timeout_s`
    the stage fails with what is pending. (The fit runs in a daemon thread: a stalled
    fit cannot be interrupted from outside, and the job's exit ends it and its workers.)"""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    progress = run_dir / PROGRESS_FILE
    started = time.time()
    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=min(5.0, cfg.run.stall_timeout_s))
        if not thread.is_alive():
            break
        last = started
        if progress.exists():
            last = max(last, progress.stat().st_mtime)
        if time.time() - last > cfg.run.stall_timeout_s:
            raise StageStalled(_stall_report(cfg, progress, time.time() - last))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stall_report(cfg: StageConfig, progress: Path, idle: float) -> str:
    import ray

    done = json.loads(progress.read_text())["step"] if progress.exists() else None
    total, free = ray.cluster_resources(), ray.available_resources()
    pending = []
    try:  # the state API needs the dashboard (a `ray start` cluster has one)
        from ray.util.state import list_actors, list_tasks

        pending += [f"actor {a.class_name}" for a in list_actors(
            filters=[("state", "=", "PENDING_CREATION")], raise_on_missing_output=False)]
        pending += [f"task {t.name}" for t in list_tasks(
            filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], raise_on_missing_output=False)]
    except Exception as err:  # noqa: BLE001 - the report is best effort
        pending.append(f"(no state API: {type(err).__name__})")
    s = cfg.scaling
    return (f"no training step completed in {idle:.0f} s (run.stall_timeout_s="
            f"{cfg.run.stall_timeout_s:g}; last step done: {done if done is not None else 'none'}). "
            f"Pending: {', '.join(sorted(set(pending))) or 'nothing reported'}. The cluster has "
            f"{total.get('CPU', 0):g} CPUs ({free.get('CPU', 0):g} free) and {total.get('GPU', 0):g} GPUs; "
            f"the stage asks {s.num_workers} workers x {s.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if s.use_gpu else ''} and {cfg.data.task_cpus:g} CPU per data task. "
            "If data actors or tasks wait for CPUs, lower scaling.cpus_per_worker or data.task_cpus "
            "(scaling.check_resources=true sizes them), or add nodes")
