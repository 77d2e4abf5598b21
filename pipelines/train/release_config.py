"""Fine-tuning a release folder: its configuration (`configs/release/*.yaml`, dotted
overrides on the command line). The run, optimizer, schedule and scaling sections are
the training stages' own (`pipelines/train/config.py`); the model is a release folder
and the data JSONL manifests in the published format, not token shards (the release
hears speech as SenseVoice features, which shards do not hold)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.ray_setup import RayConfig
from omni_model.release.finetune import MASKINGS
from pipelines.data.media import MediaLimits
from pipelines.train.config import OptimConfig, RunConfig, ScalingConfig, ScheduleConfig

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ReleaseModelConfig:
    path: str | None = None  #: the release folder to start from (`is_release_folder`)
    #: SenseVoiceSmall's folder (config.yaml, am.mvn); None: `SenseVoiceSmall/` in `path`
    sensevoice_folder: str | None = None
    #: the weights' dtype on the workers: float32 (DDP, under bf16 autocast where it
    #: helps) or bfloat16; DeepSpeed with bf16 keeps float32 master weights itself
    dtype: str = "float32"
    #: as the official fine-tuning (`--audio-model-freeze`); the projector always trains
    freeze_speech_encoder: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype {self.dtype!r}: one of {DTYPES}")


@dataclass(frozen=True)
class ReleaseDataConfig:
    root: str = "."  #: the data root: manifests and every media path are relative to it
    manifests: tuple[str, ...] = ()  #: JSONL manifests (relative to `root`), read in full every pass
    #: MAGVIT-v2 folder (`MagVitTokenizer.from_pretrained`); None: rows with images are quarantined
    image_tokenizer: str | None = None
    #: GLM-4-Voice tokenizer folder, for spoken answers; None: such rows are quarantined
    speech_tokenizer: str | None = None
    image_input_size: int = 512  #: a user's image (the official training: 512 px, 1,024 codes)
    image_output_size: int = 256  #: an assistant's image (256 px, 256 codes)
    dither: float = 1.0  #: SenseVoice's (funasr's default), drawn once per row, seeded by it
    max_seq_len: int = 1024  #: packed row length (the official finetune.sh: 1,024)
    rows_per_step: int = 1  #: packed rows per worker per micro-batch
    max_pads: int = 16  #: tail `<|endoftext|>` pads per response: 1..N (official: 16)
    pad_ratio: float = 0.6  #: pads are masked with probability pad_ratio * t (official: 0.6)
    epochs: int | None = None  #: passes over the examples (None: enough for train.max_steps)
    seed: int = 0
    task_cpus: float = 0.25  #: CPUs of each Ray Data read task while training
    prepare_workers: int = 1  #: actors turning manifest rows into examples
    prepare_cpus: float = 1.0  #: CPUs each of them asks for
    prepare_gpus: float = 0.0  #: GPUs each asks for (the image and speech tokenizers run there)
    prepare_batch: int = 16  #: manifest rows per batch
    max_line_bytes: int = 1_000_000  #: a longer manifest line is quarantined unparsed
    shuffle_buffer: int = 256  #: examples each worker shuffles locally as it streams
    prefetch: int | None = None  #: micro-batches made ahead on a thread (None: 2 on a GPU, 0 on a CPU)
    limits: MediaLimits = field(default_factory=MediaLimits)


@dataclass(frozen=True)
class ReleaseFinetuneConfig:
    stage: int = 3
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/release_stage3"))
    model: ReleaseModelConfig = field(default_factory=ReleaseModelConfig)
    data: ReleaseDataConfig = field(default_factory=ReleaseDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weighting="none"))
    #: the forward process (`omni_model.release.finetune.MASKINGS`): `per_sample` (the
    #: project's: one t a sample) or `per_position` (the official training's: one t a token)
    masking: str = "per_sample"
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.masking not in MASKINGS:
            raise ValueError(f"masking {self.masking!r}: one of {MASKINGS}")
