"""The serving configuration (`configs/*/serve.yaml`): what to load, request limits,
batching, sampler defaults, and the Ray Serve deployment (replicas, autoscaling,
resources, backpressure).

    cfg = load_serve_config("configs/tiny/serve.yaml", ["limits.max_steps=64"])
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from omni_model.any_to_any import weights_dtype
from omni_model.config import load_config, to_dict
from omni_model.sampler import CACHES

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelPaths:
    model: str = "runs/stage3/final"  #: checkpoint folder (model.safetensors, vocab.json, tokenizers.json)
    image_tokenizer: str | None = "runs/tokenizers/image"  #: None: no image inputs or outputs
    speech_tokenizer: str | None = "runs/tokenizers/speech"  #: None: no speech inputs or outputs
    #: GLM-4-Voice's decoder folder (config.yaml, flow.pt, hift.pt): a release folder's spoken
    #: answers as 22,050 Hz WAV (default: the release's own glm-4-voice-decoder/ if present)
    speech_decoder: str | None = None
    text_tokenizer: str | None = None  #: None: the path recorded in tokenizers.json
    name: str = "omni-diffusion-tiny"  #: the model id `GET /v1/models` lists
    device: str = "auto"  #: auto: cuda when the replica was given a GPU, else cpu
    #: the weights' type: auto (bfloat16 on a GPU, float32 on a CPU), bfloat16, float32
    dtype: str = "auto"
    #: Griffin-Lim iterations of the embedded codec's vocoder; None: the codec's own (48).
    #: fewer are faster; Whisper hears 16 worse than 48 on the quickstart's model (docs/serving.md)
    vocoder_iterations: int | None = None
    #: a release folder: the side input images are resized and cropped to (512: 1,024 codes)
    release_image_resolution: int = 512

    def __post_init__(self) -> None:
        if self.vocoder_iterations is not None and self.vocoder_iterations < 1:
            raise ValueError("model.vocoder_iterations must be at least 1 (or null: the codec's own)")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")

    def torch_dtype(self, device: str):
        """The weights' torch dtype on `device`."""
        return weights_dtype(device) if self.dtype == "auto" else DTYPES[self.dtype]


@dataclass(frozen=True)
class Limits:
    """A request over any of these gets a 4xx naming the limit, before any model work."""

    max_request_bytes: int = 8_000_000  #: HTTP body (413 above)
    max_inputs: int = 8  #: input parts per request
    max_text_chars: int = 2_000  #: per text part
    max_image_pixels: int = 1024 * 1024  #: width x height of an input image
    max_audio_seconds: float = 30.0  #: per audio part
    max_sample_rate: int = 96_000  #: of an audio part, read from its header
    max_channels: int = 8  #: of an audio part
    max_output_tokens: int = 1_024  #: response positions (the sum over the output regions)
    #: prompt plus response positions, counted after the inputs are tokenized (a text
    #: limit in characters says little: 2,000 emoji are 8,000 byte-level tokens); also
    #: never more than the model's own positions
    max_total_tokens: int = 2_048
    max_steps: int = 256  #: sampler steps: the most forward passes a request can cost
    # Caps on sampler options: whatever the request asks, never more (422 naming the cap);
    # a request may ask for less. The deployment's `sampler` and the model's presets must
    # fit them too (checked when the config loads and when the replica starts).
    max_cfg_scale: float = 10.0  #: classifier-free guidance; 0: no guided requests (a guided one costs two rows)
    max_temperature: float = 2.0
    #: nucleus sampling; below 1, a request that sets no `top_p` samples with the cap
    max_top_p: float = 1.0
    #: top-k sampling; None: no cap; with one, a request that sets no `top_k` gets the cap
    max_top_k: int | None = None
    #: semi-autoregressive blocks; None: no cap; with one, a request that sets no
    #: `block_length` gets the cap (a dual cache recomputes one block a step)
    max_block_length: int | None = None
    max_cache_refresh: int = 64  #: steps a key-value cache may go unrefreshed (staler is cheaper, worse)
    max_repetition_penalty: float = 10.0
    max_position_penalty: float = 10.0
    #: the key-value caches a request may ask for (each holds keys and values of every layer)
    caches: tuple[str, ...] = ("none", "prefix", "dual")
    #: seconds from arrival: a request still waiting or generating then gets 504 (a stream
    #: an error event) and its generation stops
    request_timeout_s: float = 120.0
    #: requests admitted to this replica's model queue (waiting or generating); beyond
    #: it 503 with Retry-After (Serve's own `max_ongoing_requests` bounds it too)
    max_pending: int = 64

    def __post_init__(self) -> None:
        unknown = set(self.caches) - set(CACHES)
        if unknown or not self.caches:
            raise ValueError(f"limits.caches must be a non-empty subset of {CACHES}, not {list(self.caches)}")
        if self.max_inputs < 1 or self.max_steps < 1:
            raise ValueError("limits.max_inputs and limits.max_steps must be at least 1")


#: sampler option -> the `Limits` field that caps it
CAPPED_OPTIONS = {"steps": "max_steps", "cfg_scale": "max_cfg_scale", "temperature": "max_temperature",
                  "top_p": "max_top_p", "top_k": "max_top_k", "block_length": "max_block_length",
                  "cache_refresh": "max_cache_refresh", "repetition_penalty": "max_repetition_penalty",
                  "position_penalty": "max_position_penalty"}

#: capped options whose unset value (None) means "no bound": unset, they take the cap
UNBOUNDED_WHEN_UNSET = ("top_p", "top_k", "block_length")


def over_cap(options: Mapping[str, Any], limits: Limits) -> str | None:
    """The first sampler option in `options` over its cap in `limits`, as a message
    naming the cap; None when every one fits."""
    for name, cap_field in CAPPED_OPTIONS.items():
        value, cap = options.get(name), getattr(limits, cap_field)
        if value is not None and cap is not None and value > cap:
            return f"sampler.{name} {value:g} is over this deployment's cap of {cap:g} (limits.{cap_field})"
    cache = options.get("cache")
    if cache is not None and cache not in limits.caches:
        return f"sampler.cache {cache!r} is not allowed here: limits.caches is {list(limits.caches)}"
    return None


def within_caps(options: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """`options` with each unset unbounded option (`top_p`, `top_k`, `block_length`)
    set to its cap, where there is one."""
    out = dict(options)
    for name in UNBOUNDED_WHEN_UNSET:
        cap = getattr(limits, CAPPED_OPTIONS[name])
        if out.get(name) is None and cap is not None and not (name == "top_p" and cap >= 1):
            out[name] = cap
    return out


BATCHING_MODES = ("step", "batch")


@dataclass(frozen=True)
class Batching:
    """How concurrent requests share the model.

    `step` (the default): a scheduler runs one denoising step at a time over every
    active request, whatever its layout and options; a request joins at the next step
    and leaves as soon as it is done (`max_rows` rows in flight, a guided request counts
    two). `batch`: `@serve.batch` collects requests for up to `wait_timeout_s`, then
    those with the same layout and sampler options share one whole sampler call.
    """

    mode: str = "step"  #: step | batch
    max_rows: int = 64  #: step mode: rows in flight per replica; more requests wait
    #: step mode: a shared forward pass may spend at most this share of its real positions
    #: on padding; requests of very different lengths go into separate passes beyond it
    max_padding: float = 0.5
    max_batch_size: int = 16  #: batch mode: 1 = no batching
    #: a release folder in batch mode: the requests of a batch share each step's forward
    #: pass, in passes whose padding stays within this share of their positions (0: one
    #: pass per prompt length); None: one request after another, as the official sampler
    #: runs them. Exact up to rounding (docs/release.md)
    release_shared_steps: float | None = None
    wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in BATCHING_MODES:
            raise ValueError(f"batching.mode must be one of {BATCHING_MODES}, not {self.mode!r}")
        if self.max_padding < 0:
            raise ValueError("batching.max_padding must be >= 0")
        if self.max_rows < 2:
            raise ValueError("batching.max_rows must be at least 2 (a guided request has two rows)")


@dataclass(frozen=True)
class SamplerDefaults:
    """Sampler options a request leaves out (a request's own values win, within the caps
    of `limits`)."""

    steps: int = 16
    temperature: float = 0.0
    confidence: str = "probability"
    image_confidence: str = "random"  #: for requests with an image output (see evaluation)
    stream_previews: int = 4  #: intermediate previews a streaming request gets
    #: any other sampler options for every request, e.g. {cache: prefix, early_stop: true}
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  #: per replica; above it Serve adds replicas
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0


@dataclass(frozen=True)
class Deployment:
    name: str = "OmniDiffusion"
    app_name: str = "omni"
    route_prefix: str = "/"
    num_replicas: int | None = None  #: fixed replicas; None: autoscale
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    max_ongoing_requests: int = 32  #: per replica, waiting in a batch included
    max_queued_requests: int = 64  #: beyond this the proxy answers 503 with Retry-After
    retry_after_s: int = 1
    num_cpus: float = 1.0  #: per replica
    num_gpus: float = 0.0  #: per replica (1 on a GPU cluster)
    health_check_period_s: float = 5.0
    threads: int = 2  #: torch CPU threads of the replica's model thread (others: 1; serve/threads.py)


@dataclass(frozen=True)
class Http:
    host: str = "127.0.0.1"
    port: int = 8000


@dataclass(frozen=True)
class ServeConfig:
    model: ModelPaths = field(default_factory=ModelPaths)
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    deployment: Deployment = field(default_factory=Deployment)
    http: Http = field(default_factory=Http)
    #: the Ray jobs/deploy.py joins or, outside a cluster, starts: the fields of
    #: `pipelines.ray_setup.RayConfig` (address, num_cpus, num_gpus), which checks them
    ray: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        defaults = {"steps": self.sampler.steps, "temperature": self.sampler.temperature, **self.sampler.options}
        problem = over_cap(defaults, self.limits)
        if problem:  # the deployment's own defaults must be requests it would serve
            raise ValueError(f"the deployment's sampler defaults break a cap: {problem}")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options`: replicas or autoscaling, resources,
        backpressure."""
        d = self.deployment
        options: dict[str, Any] = {
            "name": d.name,
            "max_ongoing_requests": d.max_ongoing_requests,
            "max_queued_requests": d.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": d.retry_after_s},
            "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
            "health_check_period_s": d.health_check_period_s,
        }
        if d.num_replicas is not None:
            options["num_replicas"] = d.num_replicas
        else:
            options["autoscaling_config"] = to_dict(d.autoscaling)
        return options

    def with_paths_resolved(self, root: str | Path) -> "ServeConfig":
        """Relative model paths made absolute against `root` (replicas do not run in the
        driver's directory)."""
        def absolute(p: str | None) -> str | None:
            return None if p is None else str((Path(root) / p).resolve())

        m = self.model
        return replace(self, model=replace(m, model=absolute(m.model), image_tokenizer=absolute(m.image_tokenizer),
                                           speech_tokenizer=absolute(m.speech_tokenizer),
                                           speech_decoder=absolute(m.speech_decoder),
                                           text_tokenizer=absolute(m.text_tokenizer)))


def load_serve_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ServeConfig:
    """`configs/*/serve.yaml` plus dotted overrides."""
    return load_config(ServeConfig, path, overrides)
