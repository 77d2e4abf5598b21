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
what is pending. A checkpoint counts only when every file each rank lists is there at its
size (`checkpoint_complete`), so a save cut short is never resumed from, and `final/`
appears whole or not at all. A step with a non-finite loss or gradient norm is skipped
on every rank and counted (`train.max_nonfinite_in_row` in a row stop the stage); weights
are checked finite before every save and export; `run.dir` is locked for one run. The
text tokenizer is copied into every checkpoint.

Modules, one concern each: `config` (the stage's dataclasses), `initial_model` (vocab and
first weights), `mixture` (the data stream), `parallelism` (DDP or DeepSpeed, optimizer,
schedule), `loop` (the worker), `metrics`, `checkpoint`, `guards` (resources, watchdog)
and `stage` (`run_stage`, the driver).
"""

from pipelines.train.checkpoint import TRAIN_STATE, checkpoint_complete, latest_checkpoint, resolve_previous
from pipelines.train.config import (DataConfig, DataSource, FreshModel, ModelConfig, OptimConfig, RunConfig,
                                    ScalingConfig, ScheduleConfig, StageConfig)
from pipelines.train.guards import NonFiniteTraining, RunDirBusy, StageStalled, fit_to_cluster
from pipelines.train.initial_model import build_model, load_text_tokenizer, resolve_vocab
from pipelines.train.loop import objective_of, train_loop_per_worker
from pipelines.train.mixture import AssembleSamples, build_dataset, mixture_rules, read_mixture
from pipelines.train.parallelism import deepspeed_config, lr_schedule
from pipelines.train.stage import run_stage

__all__ = ["AssembleSamples", "DataConfig", "DataSource", "FreshModel", "ModelConfig", "NonFiniteTraining",
           "OptimConfig", "RunConfig", "RunDirBusy", "ScalingConfig", "ScheduleConfig", "StageConfig", "StageStalled",
           "TRAIN_STATE",
           "build_dataset", "build_model", "checkpoint_complete", "deepspeed_config", "fit_to_cluster",
           "latest_checkpoint", "load_text_tokenizer", "lr_schedule", "mixture_rules", "objective_of",
           "read_mixture", "resolve_previous", "resolve_vocab", "run_stage", "train_loop_per_worker"]
