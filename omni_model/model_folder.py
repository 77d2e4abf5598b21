"""The model folder: the files a trained model is made of, their names, and how each one
is written and read. Every other module asks here instead of spelling a file name.

    config.json                    the network's shape, a Hugging Face `config.json` (Dream layout)
    model.safetensors              the weights, or shards listed by model.safetensors.index.json
    vocab.json                     the token space (`Vocab.save` / `Vocab.load`)
    tokenizers.json                which image, speech and text tokenizers made its codes
    text_tokenizer/tokenizer.json  a copy of the text tokenizer, so the folder stands alone
    presets.json                   optional: response lengths and sampler options an evaluation
                                   measured (`AnyToAny` reads them; `write_presets` adds them)

A training checkpoint is this folder plus the trainer's own files (`train_state.json`,
the optimizer, each rank's state); a run's `final/` is exactly this folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
VOCAB_FILE = "vocab.json"
TOKENIZERS_FILE = "tokenizers.json"
PRESETS_FILE = "presets.json"
TEXT_TOKENIZER_DIR = "text_tokenizer"  #: the copy of the text tokenizer
#: the files of a finished model (with the text tokenizer's folder, when it has one)
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, TOKENIZERS_FILE)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's `config.json` as a dict (FileNotFoundError naming the folder without one)."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}")
    return json.loads(path.read_text())


def write_config(folder: str | Path, config: dict[str, Any]) -> None:
    _write_json(Path(folder) / CONFIG_FILE, config)


def has_weights(folder: str | Path) -> bool:
    """Whether the folder holds a single-file `model.safetensors` (what training writes)."""
    return (Path(folder) / WEIGHTS_FILE).exists()


def inside(folder: str | Path, name: str, what: str) -> Path:
    """`folder / name` for a file name one of the folder's own files gave (a shard in the
    weight index, a tokenizer's copy): relative and without `..`, else ValueError. Checked
    by name, not by resolving links, so a Hugging Face cache snapshot (shards linked to
    `../../blobs`) still loads."""
    if not name or PurePath(name).is_absolute() or ".." in PurePath(name).parts:
        raise ValueError(f"{what} {name!r} is not a path inside {folder}")
    return Path(folder) / name


def weight_files(folder: str | Path, prefixes: Sequence[str] | None = None) -> list[Path]:
    """The safetensors files of a folder's weights: `model.safetensors`, or the shards its
    index names (with `prefixes`, only those holding a tensor under one of them); a shard
    named outside the folder is refused."""
    path = Path(folder)
    index = path / WEIGHTS_INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted({f for key, f in weight_map.items() if prefixes is None or key.startswith(tuple(prefixes))})
        return [inside(path, name, "weight shard") for name in names]
    if (path / WEIGHTS_FILE).exists():
        return [path / WEIGHTS_FILE]
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {path}")


def read_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a folder's `model.safetensors` or of the shards its index names
    (a shard named outside the folder is refused)."""
    state: dict[str, torch.Tensor] = {}
    for shard in weight_files(folder):
        state.update(load_file(str(shard), device=str(device)))
    return state


def write_weights(folder: str | Path, state: dict[str, torch.Tensor], name: str = WEIGHTS_FILE) -> None:
    """`state` (contiguous CPU tensors) as one safetensors file, `model.safetensors` unless
    `name` says which shard."""
    save_file(state, str(Path(folder) / name), metadata={"format": "pt"})


def write_weight_index(folder: str | Path, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json`: which shard holds each tensor (the shards written
    with `write_weights(folder, shard, name)`)."""
    _write_json(Path(folder) / WEIGHTS_INDEX_FILE, {"metadata": {"total_size": total_size},
                                                    "weight_map": weight_map})


def read_tokenizers(folder: str | Path) -> dict[str, Any]:
    """`tokenizers.json`'s record ({} when the folder has none)."""
    path = Path(folder) / TOKENIZERS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_tokenizers(folder: str | Path, record: dict[str, Any]) -> None:
    _write_json(Path(folder) / TOKENIZERS_FILE, record)


def read_presets(folder: str | Path) -> dict[str, Any] | None:
    """`presets.json` as a dict, None when the folder has none."""
    path = Path(folder) / PRESETS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_presets(folder: str | Path, presets: dict[str, Any]) -> Path:
    """Write `presets.json` into `folder` (a model folder, or a report's)."""
    path = Path(folder) / PRESETS_FILE
    _write_json(path, presets)
    return path
