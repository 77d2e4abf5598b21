"""A training stage's configuration: frozen dataclasses, one YAML per stage
(`configs/*/stage{1,2,3}.yaml`), dotted overrides on the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.ray_setup import RayConfig
from omni_model.masking import SCHEDULES, WEIGHTINGS
from omni_model.precision import MODES as PRECISIONS

ADAMW = ("auto", "fused", "default")


@dataclass(frozen=True)
class FreshModel:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 768
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    #: learned embeddings of a code's place in its image (codes per image; 0: off, as
    #: Dream): the small model reads where objects are from them (transformer.py)
    image_positions: int = 0


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
    #: how packed documents attend: `sdpa` (a dense [L, L] mask; any device) or `flex`
    #: (FlexAttention's block-sparse mask, compiled on a GPU: skips other documents' blocks)
    attention: str = "sdpa"
    #: `blocks`: each transformer block compiled with `torch.compile` (its norms, RoPE,
    #: attention and SwiGLU fused; the rows' fixed shape compiles once, in ~20 s on a CPU
    #: for a tiny model, minutes at 7B), or `none`
    compile: str = "none"

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "flex"):
            raise ValueError(f"model.attention {self.attention!r}: sdpa or flex")
        if self.compile not in ("none", "blocks"):
            raise ValueError(f"model.compile {self.compile!r}: none or blocks")


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
    #: micro-batches packed ahead on a thread, in pinned memory (None: 2 on a GPU, where
    #: packing would otherwise idle the device between steps; 0 on a CPU)
    prefetch: int | None = None


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
    #: torch AdamW's implementation: fused (its update in one kernel), default (torch's
    #: choice: foreach kernels on a GPU, a loop on a CPU), or auto: fused on a GPU, default
    #: on a CPU. The same update either way, to rounding
    adamw: str = "auto"

    def __post_init__(self) -> None:  # fail at config time, not in the first worker step
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"optim.weighting must be one of {WEIGHTINGS}, not {self.weighting!r}")
        if self.t_schedule not in SCHEDULES:
            raise ValueError(f"optim.t_schedule must be one of {SCHEDULES}, not {self.t_schedule!r}")
        if self.adamw not in ADAMW:
            raise ValueError(f"optim.adamw must be one of {ADAMW}, not {self.adamw!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    max_steps: int = 100
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    #: a step whose loss or gradient norm is NaN or inf (on any rank) is skipped and
    #: counted (`skipped_nonfinite` in the metrics); this many in a row stop the stage
    #: with an error (a retry would run into the same steps)
    max_nonfinite_in_row: int = 8

    def __post_init__(self) -> None:
        if self.max_nonfinite_in_row < 1:
            raise ValueError("train.max_nonfinite_in_row must be >= 1")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    backend: str = "auto"  #: auto (DeepSpeed on GPU, DDP on CPU), ddp, deepspeed
    #: DeepSpeed's ZeRO stage, 1 to 3 (its ZeRO optimizer is what skips a non-finite step)
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
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"scaling.zero_stage must be 1, 2 or 3, not {self.zero_stage} (no ZeRO: backend ddp)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"scaling.precision must be one of {PRECISIONS}, not {self.precision!r}")


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/stage1"  #: the run folder: config, metrics, checkpoints, final/
    max_failures: int = 2  #: worker-group restarts from the latest checkpoint
    #: the stage fails, saying what is pending, when no step completes for this long
    #: (the first step's time includes starting the workers and the data pipeline)
    stall_timeout_s: float = 900.0


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
