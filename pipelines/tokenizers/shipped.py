"""Tokenizers trained before: what a training run depends on (`trained_on.json`), and
using the shipped ones instead of training when they were trained on the same."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from omni_model.config import to_dict
from pipelines.tokenizers.config import TokenizersConfig

logger = logging.getLogger(__name__)

#: the settings of a built world (its `config.yaml`, SDVI's `manifests/sdvi/config.yaml`)
#: that tokenizers depend on; not its size or seed: more scenes of the same world read alike
WORLD_SETTINGS = {"world": ("image_size", "group_share", "caption_voices", "speed_range"),
                  "sdvi": ("question_voices", "answer_voices")}
#: config fields that change nothing in the trained tokenizers
_NOT_TRAINING = {"out_dir", "threads", "shipped", "data.dir", "data.audio_dirs", "data.voice_manifests",
                 "data.voice_root", "speech.asr", "speech.asr_utterances", "speech.examples",
                 "image.train.log_every", "speech.train.log_every", "speech.decoder.log_every"}


def training_settings(cfg: TokenizersConfig) -> dict:
    """What tokenizers trained by `cfg` depend on, flat (`image.train.steps`, ...): the
    tokenizer settings, and the world's when `data.voice_root` is a built world (`world.*`,
    `sdvi.*`; None for data of another kind)."""
    def flat(value, prefix: str = "") -> dict:
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    settings = {k: v for k, v in flat(to_dict(cfg)).items() if k not in _NOT_TRAINING}
    root = Path(cfg.data.voice_root) if cfg.data.voice_root else None
    for name, path in (("world", "config.yaml"), ("sdvi", "manifests/sdvi/config.yaml")):
        file = root / path if root is not None else None
        section = (yaml.safe_load(file.read_text()) or {}).get(name) if file and file.exists() else None
        for key in WORLD_SETTINGS[name]:
            settings[f"{name}.{key}"] = section.get(key) if section else None
    return json.loads(json.dumps(settings))  # tuples as lists, as the recorded file has them


def shipped_differences(cfg: TokenizersConfig, shipped: str | Path) -> list[str]:
    """Why the tokenizers in `shipped` are not what `cfg` would train (the settings that
    differ, or what is missing); empty when they are."""
    recorded_file = Path(shipped) / "trained_on.json"
    if not recorded_file.exists():
        return [f"{recorded_file} does not exist"]
    recorded, wanted = json.loads(recorded_file.read_text()), training_settings(cfg)
    if wanted.get("world.image_size") is None:
        return [f"{cfg.data.voice_root or cfg.data.dir} is not a built world (no world config.yaml)"]
    return [f"{key}: {recorded.get(key)!r} here {wanted.get(key)!r}" for key in sorted(set(recorded) | set(wanted))
            if recorded.get(key) != wanted.get(key)]


def use_shipped(cfg: TokenizersConfig) -> dict | None:
    """Copy the shipped tokenizers into `cfg.out_dir` when they match (`shipped_differences`)
    and return their quality report; None (and a log line saying why) when they must be
    trained."""
    if cfg.shipped is None:
        return None
    differences = shipped_differences(cfg, cfg.shipped)
    if differences:
        logger.warning("training the tokenizers: the shipped ones in %s were trained on other settings: %s",
                       cfg.shipped, "; ".join(differences[:5]))
        return None
    out = Path(cfg.out_dir)
    for part in ("text", "image", "speech"):
        if (Path(cfg.shipped) / part).exists():
            shutil.copytree(Path(cfg.shipped) / part, out / part, dirs_exist_ok=True)
    for name in ("quality.json", "trained_on.json"):
        shutil.copy(Path(cfg.shipped) / name, out / name)
    logger.info("using the shipped tokenizers of %s: trained on the same world and tokenizer settings", cfg.shipped)
    return json.loads((out / "quality.json").read_text())
