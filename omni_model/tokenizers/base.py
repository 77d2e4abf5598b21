"""What every media tokenizer shares: a stable fingerprint and strict safetensors I/O.

A tokenizer turns media into local codes `0..codebook_size-1` and back:

* `encode(batch) -> codes`, `decode(codes) -> batch`, batched, on CPU or GPU;
* `codebook_size`;
* `fingerprint`: `name-<sha256 of config and weights>`, recorded beside every shard set,
  so shards made by different tokenizers are never mixed;
* `from_pretrained(folder)` / `save_pretrained(folder)`: `config.json` + `model.safetensors`;
* `can_decode`: whether codes can be turned back into media.

`ImageTokenizer` and `SpeechTokenizer` below say it as protocols; `omni_model.tokenizers.
load_image_tokenizer` / `load_speech_tokenizer` turn a folder into one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file
from torch import nn

from omni_model.model_folder import WEIGHTS_FILE, write_config, write_weights


def fingerprint(name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """`name-<16 hex>`: changes when any config value or any weight bit changes."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{name}-{h.hexdigest()[:16]}"


def load_strict(module: nn.Module, folder: str | Path, device: str | torch.device = "cpu",
                skip: tuple[str, ...] = (), unused: tuple[str, ...] = ()) -> None:
    """Load `folder/model.safetensors` into `module`: every name and shape must match.

    `skip` names state entries the module computes itself (e.g. derived buffers) that a
    checkpoint may or may not carry; `unused` prefixes checkpoint entries the format
    holds but this module does not run (e.g. an encoder's layers after the codes).
    """
    path = Path(folder) / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {folder}")
    state = {k: v for k, v in load_file(str(path), device=str(device)).items() if not k.startswith(unused)}
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(k for k in set(expected) - set(state) if k not in skip)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match the model: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]} wrong_shape={wrong[:5]}")
    module.load_state_dict(state, strict=False)


def save_folder(module: nn.Module, folder: str | Path, config: Mapping[str, Any]) -> Path:
    """Write `config.json` and `model.safetensors` (contiguous CPU tensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(folder, {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
    write_config(folder, dict(config))
    return folder


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")


@runtime_checkable
class ImageTokenizer(Protocol):
    """What the project asks of an image tokenizer (MAGVIT-v2's `MagVitTokenizer`)."""

    codebook_size: int
    fingerprint: str
    can_decode: bool  #: codes -> pixels is available

    def encode(self, images: Any) -> torch.Tensor: ...  # `[B, 3, H, W]` or PIL images -> `[B, h*w]`

    def decode_images(self, codes: Any, grid: tuple[int, int]) -> list: ...  # -> PIL images

    def grid_for(self, height: int, width: int) -> tuple[int, int]: ...


@runtime_checkable
class SpeechTokenizer(Protocol):
    """What the project asks of a speech tokenizer: GLM-4-Voice's (`GLM4VoiceTokenizer`,
    which decodes only with a decoder attached) or the embedded `SpeechCodec`."""

    codebook_size: int
    fingerprint: str
    codes_per_second: float
    can_decode: bool  #: codes -> waveform is available (`decode` raises otherwise)

    def encode(self, waveforms: Any, sample_rate: int) -> list[torch.Tensor]: ...

    def decode(self, codes: Any) -> list[torch.Tensor]: ...
