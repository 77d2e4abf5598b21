"""The released model's folder: load it strictly, run it, save it in the same format.

A release folder holds `config.json` (Dream's fields), the weights as
`model.safetensors` or shards with `model.safetensors.index.json` (the Dream backbone
`model.*` / `lm_head.weight`, the SenseVoiceSmall encoder `model.audio_model.model.*` and
the projector `model.audio_projection.*`), Dream's slow tokenizer files with the
release's added tokens, usually `generation_config.json`, and the SenseVoiceSmall folder
its speech front end is configured from (`config.yaml`, `am.mvn`; the official code
fetches it from the hub as `FunAudioLLM/SenseVoiceSmall`, here it is a path, by default
`SenseVoiceSmall/` inside the release folder).

Every tensor in the weights is used, or named as kept-but-unused (SenseVoice's CTC head,
written back on save); anything else, missing or misshapen, is an error naming it.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from omni_model.model_folder import (CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, read_config, read_weights,
                                     write_config, write_weight_index, write_weights)
from omni_model.release.images import INPUT_RESOLUTION, input_pixels
from omni_model.release.prompts import ReleasePrompt, task_prompt
from omni_model.release.response import ReleaseResponse, parse_response
from omni_model.release.sampler import OfficialSamplerConfig, generate, preset, unconditional_prompt
from omni_model.release.tokenizer import ReleaseFormatError, ReleaseTokenizer
from omni_model.tokenizers.sensevoice import (AUDIO_PREFIX, context_positions, PROJECTOR_PREFIX, UNUSED_AUDIO_KEYS, ResamplerProjector,
                                              SenseVoiceEncoder, SenseVoiceEncoderConfig, SenseVoiceFrontend,
                                              SpeechInput)
from omni_model.transformer import Transformer, TransformerConfig
from omni_model.vocab import Vocab

logger = logging.getLogger(__name__)

SENSEVOICE_FOLDER = "SenseVoiceSmall"
GENERATION_CONFIG = "generation_config.json"
#: the largest weight shard `save_pretrained` writes (transformers' default size)
SHARD_BYTES = 5 * 1024**3


def is_release_folder(folder: str | Path) -> bool:
    """Whether `folder` is in the released model's format (Dream's slow tokenizer files
    beside the weights) rather than the project's own (`vocab.json` as a `Vocab`)."""
    folder = Path(folder)
    return (folder / "merges.txt").is_file() and (folder / "tokenizer_config.json").is_file()


class ReleaseModel(torch.nn.Module):
    """The released Omni-Diffusion model: backbone, speech input, tokenizer and ids."""

    def __init__(self, transformer: Transformer, speech: SpeechInput, tokenizer: ReleaseTokenizer,
                 vocab: Vocab, source: Path, kept: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.transformer = transformer
        self.speech = speech
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.source = source
        self._kept = kept  # tensors the model does not use, written back on save

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    sensevoice_folder: str | Path | None = None, **frontend_overrides) -> "ReleaseModel":
        """Load a release folder strictly. `dtype`: cast every weight (None: as stored;
        the release stores bfloat16). `frontend_overrides`: SenseVoice front-end
        settings, e.g. `dither=0.0` for reproducible features (the official default 1.0
        adds noise)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ReleaseFormatError(f"{folder}: no {CONFIG_FILE}")
        sensevoice_folder = Path(sensevoice_folder) if sensevoice_folder else folder / SENSEVOICE_FOLDER
        if not sensevoice_folder.is_dir():
            raise ReleaseFormatError(f"no SenseVoiceSmall folder at {sensevoice_folder} (its config.yaml and am.mvn "
                                     "configure the speech front end; pass sensevoice_folder=)")
        tokenizer = ReleaseTokenizer.from_folder(folder)
        raw = read_config(folder)
        config = TransformerConfig.from_dict(raw).replace(shift_logits=True)
        vocab = tokenizer.vocab(config.vocab_size)
        state = read_weights(folder, device)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        audio = {k: state.pop(k) for k in [k for k in state if k.startswith(AUDIO_PREFIX)]}
        projector = {k: state.pop(k) for k in [k for k in state if k.startswith(PROJECTOR_PREFIX)]}
        if not audio or not projector:
            raise ReleaseFormatError(f"{folder}: the weights hold no speech encoder ({AUDIO_PREFIX}*) or "
                                     f"no projector ({PROJECTOR_PREFIX}*): not a release checkpoint")
        kept = {AUDIO_PREFIX + k: audio[AUDIO_PREFIX + k] for k in UNUSED_AUDIO_KEYS if AUDIO_PREFIX + k in audio}
        encoder = SenseVoiceEncoder(SenseVoiceEncoderConfig.from_folder(sensevoice_folder))
        encoder.load_release_state(audio)
        speech = SpeechInput(SenseVoiceFrontend.from_folder(sensevoice_folder, **frontend_overrides), encoder,
                             ResamplerProjector.from_state(projector))
        try:
            transformer = Transformer.from_state(config, state, where=str(folder))
        except ValueError as e:
            raise ReleaseFormatError(str(e)) from None
        if speech.projector.mlp[2].weight.shape[0] != config.hidden_size:
            raise ReleaseFormatError(f"{folder}: the projector gives {speech.projector.mlp[2].weight.shape[0]} "
                                     f"features, the backbone's hidden size is {config.hidden_size}")
        model = cls(transformer, speech.to(device), tokenizer, vocab, folder, kept).eval()
        logger.info("loaded release %s (%.1fM parameters)", folder, sum(p.numel() for p in model.parameters()) / 1e6)
        return model

    # ------------------------------------------------------------------ compute
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.lm_head.weight.dtype

    def speech_features(self, waveform: torch.Tensor | np.ndarray, sample_rate: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """One utterance -> SenseVoice front-end features `[T, 560]` (what the official
        tokenizer's `encode(is_contiguous=True)` returns)."""
        wave = self.speech.prepare(waveform, sample_rate)
        feats, lengths = self.speech.frontend([wave], generator=generator)
        return feats[0, :int(lengths[0])]

    def prompt_embeds(self, prompt: ReleasePrompt, features: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """`[1, P, H]` input vectors of a prompt: token embeddings, with each speech
        input's projected encoder rows written over its context positions."""
        if len(features) != len(prompt.audio_spans):
            raise ValueError(f"the prompt has {len(prompt.audio_spans)} speech inputs, {len(features)} given")
        ids = torch.tensor([prompt.ids], device=self.transformer.lm_head.weight.device)
        vectors = self.transformer.model.embed_tokens(ids)
        if features:
            rows, lengths = self.speech.embed_features(*_pad(features))
            vectors = vectors.clone()
            for (start, length), r, n in zip(prompt.audio_spans, rows, lengths):
                if int(n) != length:
                    raise ValueError(f"a speech input of {int(n)} encoder rows for {length} context positions")
                vectors[0, start:start + length] = r[:length].to(vectors.dtype)
        return vectors

    def logits(self, vectors: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits of positions `start:` (position i scored from i - 1, as Dream does)."""
        ids = torch.zeros(vectors.shape[:2], dtype=torch.long, device=vectors.device)
        return self.transformer(ids, inputs_embeds=vectors, logits_range=(start, vectors.shape[1]))

    @torch.no_grad()
    def generate(self, prompt: ReleasePrompt, config: OfficialSamplerConfig, features: Sequence[torch.Tensor] = (),
                 unconditional: Sequence[int] | None = None, generator: torch.Generator | None = None,
                 on_step: Callable[[int], None] | None = None,
                 forward: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> list[int]:
        """The response ids the official `DreamModel.generate` returns for this prompt.
        `on_step(n)` before the n-th forward pass (n from 0): a server's deadline or
        cancel check, which may raise to stop the call. `forward`: the logits of
        `vectors` from `start` (None: `logits`; e.g. `speed.PromptCache`)."""
        vectors = self.prompt_embeds(prompt, features)
        embed = self.transformer.model.embed_tokens
        logits = forward or self.logits
        passes = [0]

        def checked(vectors: torch.Tensor, start: int) -> torch.Tensor:
            on_step(passes[0])
            passes[0] += 1
            return logits(vectors, start)
        forward = logits if on_step is None else checked
        return generate(forward, embed, vectors, self.vocab, config, unconditional, generator).tolist()

    def image_codes(self, image, image_tokenizer, resolution: int = INPUT_RESOLUTION) -> list[int]:
        """An input image as the release takes it: resized and centre-cropped to
        `resolution`, encoded by MAGVIT-v2 (1,024 codes at 512 px)."""
        pixels = input_pixels(image, resolution)[None].to(self.transformer.lm_head.weight.device)
        return image_tokenizer.encode(pixels)[0].tolist()

    def unconditional(self, config: OfficialSamplerConfig, prompt: ReleasePrompt, seed: int) -> list[int] | None:
        """The guidance prompt of `config` (None without guidance); `seed` seeds the
        draws of the text-to-image one."""
        if config.cfg <= 0:
            return None
        return unconditional_prompt(config.task, self.tokenizer.encode, self.vocab, len(prompt.ids),
                                    random.Random(seed))

    @torch.no_grad()
    def run(self, task: str, text: str | None = None, image=None, audio: tuple | None = None,
            image_tokenizer=None, config: OfficialSamplerConfig | None = None, seed: int = 42,
            image_resolution: int = INPUT_RESOLUTION) -> ReleaseResponse:
        """One request end to end, as the official inference runs it: `task` one of
        t2i, vqa, asr, tts, s2i, svqa (sqa too); `image` a PIL image (needs
        `image_tokenizer`, a MAGVIT-v2 tokenizer); `audio` `(waveform, sample_rate)`;
        `config` the sampler settings (default: the task's official preset). `seed`
        seeds torch's draws and the text-to-image guidance prompt (the official
        inference seeds 42). Speech output ends at GLM-4-Voice codes."""
        codes = None
        if image is not None:
            if image_tokenizer is None:
                raise ValueError("an image input needs image_tokenizer= (MAGVIT-v2)")
            codes = self.image_codes(image, image_tokenizer, image_resolution)
        features = [self.speech_features(*audio)] if audio is not None else []
        frames = context_positions(features[0].shape[0]) if features else None
        prompt = task_prompt(task, self.tokenizer, self.vocab, text, codes, frames)
        config = config or preset(task)
        generator = torch.Generator(device=self.transformer.lm_head.weight.device).manual_seed(seed)
        ids = self.generate(prompt, config, features, self.unconditional(config, prompt, seed), generator)
        return parse_response(ids, self.tokenizer, self.vocab)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | Path) -> Path:
        """Write a release folder: weights (sharded at 5 GB with an index, as
        transformers does), `config.json`, and the source folder's tokenizer files,
        generation config, SenseVoiceSmall folder and code files copied unchanged."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.transformer.state_dict().items()}
        if self.transformer.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state.update({AUDIO_PREFIX + k: v.detach().contiguous().cpu()
                      for k, v in self.speech.encoder.state_dict().items()})
        state.update({PROJECTOR_PREFIX + k: v.detach().contiguous().cpu()
                      for k, v in self.speech.projector.state_dict().items()})
        state.update({k: v.detach().contiguous().cpu() for k, v in self._kept.items()})
        _save_sharded(state, path)
        config = read_config(self.source)
        config["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        write_config(path, config)
        for file in [*self.tokenizer.files(), *self.source.glob("*.py"), self.source / GENERATION_CONFIG]:
            if file.is_file():
                shutil.copy2(file, path / file.name)
        if (self.source / SENSEVOICE_FOLDER).is_dir():
            shutil.copytree(self.source / SENSEVOICE_FOLDER, path / SENSEVOICE_FOLDER, dirs_exist_ok=True)
        return path


def _pad(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in features])
    out = features[0].new_zeros(len(features), int(lengths.max()), features[0].shape[1])
    for i, f in enumerate(features):
        out[i, :f.shape[0]] = f
    return out, lengths


def _save_sharded(state: dict[str, torch.Tensor], path: Path) -> None:
    for old in [path / WEIGHTS_FILE, path / WEIGHTS_INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in state:  # in the order the modules hold them, as transformers writes them
        n = state[name].numel() * state[name].element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += n
    if len(shards) == 1:
        write_weights(path, shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_weights(path, shard, name)
        weight_map.update({k: name for k in shard})
    write_weight_index(path, weight_map, sum(v.numel() * v.element_size() for v in state.values()))
