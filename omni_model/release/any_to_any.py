"""The released model behind the any-to-any API: the same requests as
`omni_model.any_to_any.AnyToAny` (input parts in order, the wanted outputs), answered
the way the official inference answers them.

    pipe = AnyToAny.from_pretrained("/models/Omni-Diffusion", image_tokenizer="/models/magvitv2")
    pipe.generate([image, "What is in the picture?"], ["text"]).text      # vqa
    pipe.generate([Audio(wave, 16000)], ["text"]).text                    # asr
    pipe.generate([Audio(wave, 16000), image], ["text", "speech"])        # spoken VQA

A request is one of the release's tasks (`task_for`): its prompt is the official one
(`omni_model.release.prompts`), its sampler settings the task's official preset
(`presets="inference"`, tools/inference.py) or the evaluation scripts' (`presets=
"evaluation"`), and its answer is parsed as the official code parses it. The official
sampler takes one request at a time, so a batch runs its requests one after another,
each with its own seed (the same seed, the same answer, whatever it is batched with).

Speech answers are GLM-4-Voice codes (`Output.speech_codes`); with GLM-4-Voice's decoder
folder (`speech_decoder=`, or a `glm-4-voice-decoder/` folder inside the release folder)
they are also spoken: `Output.speech` at 22,050 Hz, through the project's own
`GLM4VoiceDecoder` (the official `token2wav`: no prompt, 10 flow steps, its seeds), the
answers of a batch decoded together. `stream_speech` decodes one in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from omni_model.any_to_any import OUTPUTS, Audio, Input, Output, RequestError, _in_order
from omni_model.release.images import INPUT_RESOLUTION, output_image
from omni_model.release.model import ReleaseModel
from omni_model.release.prompts import TASKS as PROMPT_TASKS
from omni_model.release.prompts import ReleasePrompt, task_prompt
from omni_model.release.response import parse_response
from omni_model.release.sampler import OfficialSamplerConfig, evaluation_preset, preset
from omni_model.release.speed import PromptCache, generate_batch, masked_forward
from omni_model.tokenizers.glm4voice.decoder import WEB_DEMO_BLOCKS, GLM4VoiceDecoder
from omni_model.tokenizers.sensevoice import context_positions

#: (wanted outputs, an image among the inputs, audio among the inputs) -> the release's task
REQUEST_TASKS = {
    (("image",), False, False): "t2i",
    (("image",), False, True): "s2i",
    (("text",), True, False): "vqa",
    (("text",), False, True): "asr",
    (("text",), True, True): "svqa",  # the text part of a spoken answer
    (("speech",), False, False): "tts",
    (("text", "speech"), True, True): "svqa",
    (("text", "speech"), False, True): "sqa",
}
#: `REQUEST_TASKS` in words, for refusals
SUPPORTED = ("an image from text (t2i) or audio (s2i); text from an image and text (vqa), audio (asr) or "
             "audio and an image (svqa); speech from text (tts); text and speech from audio (sqa) or audio and "
             "an image (svqa)")
PRESET_KINDS = ("inference", "evaluation")
#: the seed of a request that names none (the official inference seeds 42)
DEFAULT_SEED = 42
#: where a release folder may keep GLM-4-Voice's decoder (the official README puts it beside)
DECODER_SUBFOLDER = "glm-4-voice-decoder"


def task_for(outputs: Sequence[str], has_image: bool, has_audio: bool) -> str:
    """The release task a request is, or a `RequestError` listing what the release does."""
    task = REQUEST_TASKS.get((_in_order(outputs), has_image, has_audio))
    if task is None:
        raise RequestError(f"the released model has no task for outputs {list(outputs)} from "
                           f"{'an image' if has_image else 'no image'} and {'audio' if has_audio else 'no audio'}; "
                           f"it answers: {SUPPORTED}")
    return task


@dataclass
class ReleasePrepared:
    """A request as the release runs it: the task, its prompt and speech features, and
    the official sampler settings it gets unless the caller gives others."""

    task: str
    prompt: ReleasePrompt
    features: list[torch.Tensor]
    outputs: tuple[str, ...]
    config: OfficialSamplerConfig
    #: steps between full passes of a prompt key-value cache (`speed.PromptCache`: the
    #: steps between compute the response only; an approximation); None: no cache, the
    #: official sampler's own passes
    cache_refresh: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.ids)


class ReleaseAnyToAny:
    """`AnyToAny`'s request API over a `ReleaseModel` (see the module docstring)."""

    speech_codec = None  #: speech input goes through the release's own SenseVoice encoder

    def __init__(self, model: ReleaseModel, image_tokenizer=None, presets: str = "inference",
                 image_resolution: int = INPUT_RESOLUTION, speech_decoder: GLM4VoiceDecoder | None = None) -> None:
        if presets not in PRESET_KINDS:
            raise ValueError(f"presets {presets!r}: one of {', '.join(PRESET_KINDS)}")
        if speech_decoder is not None and speech_decoder.flow.config.vocab_size < model.vocab.speech_range.size:
            raise ValueError(f"the speech decoder knows {speech_decoder.flow.config.vocab_size} codes; the model "
                             f"speaks {model.vocab.speech_range.size} (GLM-4-Voice's decoder is needed)")
        self.speech_decoder = speech_decoder
        self.model = model
        self.image_tokenizer = image_tokenizer
        self.presets = presets
        self.image_resolution = image_resolution

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_tokenizer: str | Path | None = None,
                        speech_tokenizer: str | Path | None = None, text_tokenizer: str | Path | None = None,
                        device: str = "cpu", dtype: torch.dtype | None = None, presets: str = "inference",
                        speech_decoder: str | Path | None = None, **frontend_overrides) -> "ReleaseAnyToAny":
        """A release folder (`ReleaseModel.from_folder`), a MAGVIT-v2 folder for image
        input and output, and GLM-4-Voice's decoder folder for speech output
        (`speech_decoder`; default: `<folder>/glm-4-voice-decoder` when present; without
        one, speech answers are codes only). The release brings its own text tokenizer
        and hears through its own SenseVoice encoder: a text or speech tokenizer given
        here is an error rather than silently unused. The decoder runs in float32."""
        if text_tokenizer is not None:
            raise ValueError("a release folder brings its own text tokenizer (vocab.json + merges.txt); "
                             "leave text_tokenizer unset")
        if speech_tokenizer is not None:
            raise ValueError("the released model takes speech through its own SenseVoice encoder, and speaks "
                             "GLM-4-Voice codes through speech_decoder (GLM-4-Voice's decoder folder): leave "
                             "speech_tokenizer unset")
        from omni_model.tokenizers import load_image_tokenizer

        model = ReleaseModel.from_folder(folder, dtype=dtype, device=device, **frontend_overrides)
        image = load_image_tokenizer(image_tokenizer, device) if image_tokenizer is not None else None
        if speech_decoder is None and (Path(folder) / DECODER_SUBFOLDER).is_dir():
            speech_decoder = Path(folder) / DECODER_SUBFOLDER
        decoder = GLM4VoiceDecoder.from_folder(speech_decoder, device) if speech_decoder is not None else None
        return cls(model, image, presets, speech_decoder=decoder)

    @property
    def vocab(self):
        return self.model.vocab

    @property
    def text_tokenizer(self):
        return self.model.tokenizer

    @property
    def max_positions(self) -> int:
        return self.model.transformer.config.max_position_embeddings

    # ------------------------------------------------------------------ requests
    def prepare(self, inputs: Sequence[Input], outputs: Sequence[str],
                lengths: dict[str, int] | None = None) -> ReleasePrepared:
        """Inputs and wanted outputs -> the task's official prompt and settings.
        `lengths` (`text`, `speech` or `spoken`, by the kind of output) sets the
        response's length, the steps scaled with it as the preset scales them."""
        wanted = _in_order(outputs)
        if len(wanted) != len(outputs) or wanted not in OUTPUTS:
            raise RequestError(f"unsupported outputs {list(outputs)}; supported: {[list(k) for k in OUTPUTS]}")
        if not inputs:
            raise RequestError("a request needs at least one input part")
        texts = [x for x in inputs if isinstance(x, str)]
        images = [x for x in inputs if isinstance(x, PILImage.Image)]
        audios = [x for x in inputs if isinstance(x, Audio)]
        if len(texts) + len(images) + len(audios) != len(inputs):
            bad = next(x for x in inputs if not isinstance(x, (str, PILImage.Image, Audio)))
            raise RequestError(f"unsupported input part {type(bad).__name__}: text, PIL image or Audio")
        if len(images) > 1 or len(audios) > 1:
            raise RequestError("the released model takes at most one image and one audio a request")
        task = task_for(wanted, bool(images), bool(audios))
        takes_text = "text" in PROMPT_TASKS[task]["inputs"]
        text = "\n".join(t for t in texts if t.strip()) if texts else None
        if text and not takes_text:
            raise RequestError(f"the release's {task} task takes no text input (its prompt is fixed)")
        if takes_text and not text:
            raise RequestError(f"the release's {task} task needs a text input")
        codes = None
        if images:
            if self.image_tokenizer is None:
                raise RequestError("image input needs an image tokenizer (MAGVIT-v2)")
            with torch.no_grad():
                codes = self.model.image_codes(images[0], self.image_tokenizer, self.image_resolution)
        features = []
        if audios:
            wave = np.asarray(audios[0].waveform, dtype=np.float32)
            if wave.size == 0:
                raise RequestError("empty audio input")
            # dither draws noise: a fixed generator makes a clip's features its own
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                features = [self.model.speech_features(wave, audios[0].sample_rate, generator)]
        frames = context_positions(features[0].shape[0]) if features else None
        prompt = task_prompt(task, self.model.tokenizer, self.vocab, text if takes_text else None, codes, frames)
        config = self._settings(task, prompt, text if takes_text else None)
        config = _sized(config, wanted, lengths or {})
        if len(prompt.ids) + config.max_new_tokens > self.max_positions:
            raise RequestError(f"the prompt ({len(prompt.ids)} tokens) and the response ({config.max_new_tokens}) "
                               f"make more than the model's {self.max_positions} positions")
        return ReleasePrepared(task, prompt, features, wanted, config)

    def _settings(self, task: str, prompt: ReleasePrompt, text: str | None) -> OfficialSamplerConfig:
        if task == "sqa":  # the official inference has no preset of its own for it: spoken VQA's
            return replace(preset("svqa"), task="sqa")
        if self.presets == "evaluation" and task in ("asr", "tts", "vqa"):
            reference = len(self.model.tokenizer.encode_text(text)) if text else 0
            return evaluation_preset(task, len(prompt.ids), reference)
        return preset(task)

    def generate(self, inputs: Sequence[Input], outputs: Sequence[str], config=None,
                 lengths: dict[str, int] | None = None, seed: int = DEFAULT_SEED) -> Output:
        """One request (see `generate_batch` for `config`)."""
        return self.generate_batch([self.prepare(inputs, outputs, lengths)], config, seeds=[seed])[0]

    def settings(self, prepared: ReleasePrepared, config=None) -> OfficialSamplerConfig:
        """The sampler settings a request runs with: its own (`config` None), an
        `OfficialSamplerConfig`, or a dict of options over its own (checked: a
        ValueError names a bad one)."""
        if config is None:
            return prepared.config
        if isinstance(config, OfficialSamplerConfig):
            return config
        known = {f.name for f in fields(OfficialSamplerConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown official sampler option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(prepared.config, **config)

    def generate_batch(self, requests: Sequence[ReleasePrepared], config=None, seeds: Sequence[int] | None = None,
                       on_step: Callable[[int], None] | None = None,
                       shared_steps: float | None = None, speak: bool = True) -> list[Output]:
        """Each request in turn with the official sampler (it takes one at a time), with
        its own seed (default 42, as the official inference). `on_step(n)` before each
        forward pass, counted over the whole batch: may raise to stop. `config`: see
        `settings`, one for every request or a list of one each. `speak`: decode the
        speech answers to waveforms (with a speech decoder), all in one batch.

        `shared_steps`: the requests (those without a prompt cache) share each step's
        forward pass instead (`speed.generate_batch`, each keeping its own loop and
        draws), in passes whose padding stays within this share of their positions (0:
        one pass per prompt length). Exact up to rounding: a padded or batched row's
        logits can differ in the last bits, and near-ties with them (docs/release.md)."""
        seeds = list(seeds) if seeds is not None else [DEFAULT_SEED] * len(requests)
        configs = list(config) if isinstance(config, (list, tuple)) else [config] * len(requests)
        if shared_steps is not None and len(requests) > 1 and not any(r.cache_refresh for r in requests):
            outputs = self._generate_shared(requests, configs, seeds, on_step, shared_steps)
            return self.speak(outputs) if speak else outputs
        outputs, passes = [], [0]

        def counted(_: int) -> None:
            if on_step is not None:
                on_step(passes[0])
            passes[0] += 1

        device = self.model.transformer.lm_head.weight.device
        for request, seed, config in zip(requests, seeds, configs):
            settings = self.settings(request, config)
            before = passes[0]
            generator = torch.Generator(device=device).manual_seed(int(seed))
            cache = PromptCache(self.model.transformer, request.cache_refresh) if request.cache_refresh else None
            ids = self.model.generate(request.prompt, settings, request.features,
                                      self.model.unconditional(settings, request.prompt, int(seed)), generator,
                                      on_step=counted, forward=cache)
            outputs.append(self.decode(request, ids, passes[0] - before, settings))
        return self.speak(outputs) if speak else outputs

    def speak(self, outputs: Sequence[Output], steps: int | None = None) -> list[Output]:
        """Fill `speech` (22,050 Hz) of the outputs that have speech codes, decoding them
        together; an empty answer gets an empty waveform. Without a decoder: unchanged."""
        outputs = list(outputs)
        if self.speech_decoder is None:
            return outputs
        talking = [o for o in outputs if o.speech_codes]
        waves = self.speech_decoder.decode([torch.tensor(o.speech_codes) for o in talking], steps) if talking else []
        for out, wave in zip(talking, waves):
            out.speech, out.sample_rate = wave.numpy(), self.speech_decoder.sample_rate
        for out in outputs:
            if out.speech_codes is not None and not out.speech_codes:
                out.speech, out.sample_rate = np.zeros(0, dtype=np.float32), self.speech_decoder.sample_rate
        return outputs

    def stream_speech(self, codes: Sequence[int], blocks: Sequence[int] = WEB_DEMO_BLOCKS):
        """A speech answer decoded chunk by chunk (`GLM4VoiceDecoder.stream`: GLM-4-Voice's
        streaming schedule, first 25 codes): yields float32 waveforms at 22,050 Hz."""
        if self.speech_decoder is None:
            raise RuntimeError("no speech decoder: load the release with speech_decoder=<glm-4-voice-decoder>")
        return self.speech_decoder.stream(torch.tensor(list(codes)), blocks)

    def _generate_shared(self, requests: Sequence[ReleasePrepared], configs: Sequence, seeds: Sequence[int],
                         on_step: Callable[[int], None] | None, max_padding: float) -> list[Output]:
        """`generate_batch` with shared forward passes; each output's `steps` counts the
        passes of the whole call."""
        model = self.model
        device = model.transformer.lm_head.weight.device
        settings = [self.settings(r, c) for r, c in zip(requests, configs)]
        passes = [0]

        def counted(_rows: int) -> None:
            if on_step is not None:
                on_step(passes[0])
            passes[0] += 1

        with torch.no_grad():
            ids = generate_batch(masked_forward(model.transformer), model.transformer.model.embed_tokens,
                                 [model.prompt_embeds(r.prompt, r.features) for r in requests], self.vocab, settings,
                                 [model.unconditional(c, r.prompt, int(s)) for c, r, s in zip(settings, requests, seeds)],
                                 [torch.Generator(device=device).manual_seed(int(s)) for s in seeds], max_padding,
                                 on_pass=counted)
        return [self.decode(r, i.tolist(), passes[0], c) for r, i, c in zip(requests, ids, settings)]

    def generate_many(self, requests: Sequence[ReleasePrepared], config=None, seeds: Sequence[int] | None = None,
                      batch_size: int = 1, on_batch: Callable[[int], None] | None = None) -> list[Output]:
        """Any requests, one at a time; the speech answers of each `batch_size` requests
        are decoded together."""
        seeds = list(seeds) if seeds is not None else [DEFAULT_SEED] * len(requests)
        outputs: list[Output] = []
        pending: list[Output] = []
        for i, (request, seed) in enumerate(zip(requests, seeds)):
            pending += self.generate_batch([request], config, [seed], speak=False)
            if len(pending) >= max(1, batch_size) or i == len(requests) - 1:
                outputs += self.speak(pending)
                pending = []
            if on_batch is not None:
                on_batch(1)
        return outputs

    def decode(self, prepared: ReleasePrepared, ids: Sequence[int], steps: int,
               settings: OfficialSamplerConfig) -> Output:
        """Response ids -> the wanted output fields (the official parsing)."""
        response = parse_response(ids, self.model.tokenizer, self.vocab)
        out = Output(steps=steps, tokens=settings.max_new_tokens, prompt_tokens=prepared.prompt_tokens)
        if "text" in prepared.outputs:
            out.text = response.text.strip()
        if "speech" in prepared.outputs:
            out.speech_codes = list(response.speech_codes)
        if "image" in prepared.outputs:
            out.image_codes = response.image_codes
            if response.image_codes is not None and self.image_tokenizer is not None:
                with torch.no_grad():
                    out.image = output_image(response.image_codes, self.image_tokenizer)
        return out


def _sized(config: OfficialSamplerConfig, wanted: tuple[str, ...], lengths: dict[str, int]) -> OfficialSamplerConfig:
    """`config` with the response length a request asks for (`lengths` by the kind of
    output: text, speech or spoken), its steps scaled in proportion."""
    kind = OUTPUTS[wanted]
    key = {"text": "text", "speech": "speech", "spoken": "spoken"}.get(kind)
    n = lengths.get(key) if key else None
    if n is None:
        return config
    steps = max(1, round(int(n) * config.steps / config.max_new_tokens))
    return replace(config, max_new_tokens=int(n), steps=steps)


__all__ = ["REQUEST_TASKS", "ReleaseAnyToAny", "ReleasePrepared", "task_for"]
