"""Any-to-any generation: one object built from a checkpoint folder (model, vocab,
tokenizers) that takes input parts (text, PIL images, waveforms) and the wanted outputs
(text, image, speech, or several) and returns them as a string, a PIL image, a waveform.

    pipe = AnyToAny.from_pretrained("runs/stage3/final", image_tokenizer="runs/tokenizers/image",
                                    speech_tokenizer="runs/tokenizers/speech")
    pipe.generate(["Generate an image of a red circle."], ["image"]).image
    pipe.generate([image, "how many shapes are there?"], ["text"]).text
    pipe.generate([image, Audio(wave, 16000)], ["text", "speech"])  # spoken VQA

The prompt is the user turn made of the inputs in order (the instruction is ordinary
text, as in the training data); the response layout comes from the wanted outputs and
`LengthPresets`: TTS length from the input text's length, ASR length from the audio's
duration, an image from the tokenizer's grid, a spoken answer as text then speech with
`boa` pre-infilled at `boa_fraction`. `prepare` and `decode` are separate so a server
can batch requests whose layouts are equal into one sampler call (`generate_batch`);
`batch_key` and `batches` say which requests can share a call (the server and the
evaluation group with them), `generate_many` runs any list of requests that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence, Union

import numpy as np
import torch
from PIL import Image as PILImage

from omni_model import model_folder
from omni_model.config import from_dict, to_dict
from omni_model.sampler import Layout, Region, SamplerConfig, make_layout, sample, spoken_layout
from omni_model.templates import Image, Message, Part, Speech, Text, encode_prompt
from omni_model.tokenizers import ImageTokenizer, SpeechTokenizer, load_image_tokenizer, load_speech_tokenizer
from omni_model.tokenizers.text import BPETokenizer, ByteTokenizer, TextTokenizer
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab

#: output combinations and the task they are (for presets and errors)
OUTPUTS = {("text",): "text", ("image",): "image", ("speech",): "speech",
           ("text", "speech"): "spoken", ("text", "image", "speech"): "all"}


class RequestError(ValueError):
    """A request the pipeline cannot serve (bad combination, missing tokenizer, ...)."""


@dataclass(frozen=True)
class Audio:
    """An input waveform: `[N]` or `[C, N]` samples at `sample_rate`."""

    waveform: Any
    sample_rate: int

    @property
    def seconds(self) -> float:
        return np.asarray(self.waveform).shape[-1] / self.sample_rate


Input = Union[str, PILImage.Image, Audio]


@dataclass(frozen=True)
class LengthPresets:
    """Response lengths (positions) per output; shorter content ends early with pads."""

    text: int = 32  #: a text answer (caption, VQA, free text)
    asr_tokens_per_second: float = 4.0  #: text positions per second of input audio (ASR)
    asr_min: int = 8
    tts_codes_per_token: float = 3.5  #: speech positions per input text token (TTS, published)
    speech_min: int = 16
    speech_max: int = 1024
    spoken: int = 64  #: a spoken answer: text, boa, speech
    boa_fraction: float = 0.2  #: where boa is pre-infilled in a spoken answer (published 0.2-0.25)
    image_grid: tuple[int, int] | None = None  #: None: the image tokenizer's grid
    #: sampler options per kind of output (`OUTPUTS`' names: text, image, speech, spoken,
    #: all), e.g. {"spoken": {"cache": "prefix"}}: what a request that leaves an option out
    #: gets (`AnyToAny.sampler_for`, the server); the evaluation records the options it
    #: measured the report with
    sampler: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, options in self.sampler.items():
            if kind not in OUTPUTS.values():
                raise ValueError(f"presets.sampler: unknown output kind {kind!r}; "
                                 f"known: {sorted(set(OUTPUTS.values()))}")
            sampler_with(SamplerConfig(), options, f"presets.sampler.{kind}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "LengthPresets":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("image_grid") is not None:
            known["image_grid"] = tuple(known["image_grid"])
        return cls(**known)


def sampler_with(config: SamplerConfig, options: dict, where: str) -> SamplerConfig:
    """`config` with `options` over it, checked by the config loader (unknown keys,
    types, ranges): a ValueError naming `where`."""
    try:
        return from_dict(SamplerConfig, {**to_dict(config), **options}, where)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass
class Prepared:
    """A request turned into ids: what the sampler needs and how to read its answer."""

    prompt: torch.Tensor  #: `[P]` prompt ids
    uncond: torch.Tensor  #: `[U]` the unconditional prompt (an empty user turn), for CFG
    regions: tuple[Region, ...]
    outputs: tuple[str, ...]


@dataclass
class Output:
    """What `generate` returns; fields not asked for stay None."""

    text: str | None = None
    image: PILImage.Image | None = None
    speech: np.ndarray | None = None  #: mono float32 waveform at `sample_rate`
    speech_codes: list[int] | None = None
    image_codes: list[int] | None = None
    sample_rate: int = 16_000
    steps: int = 0  #: sampler forward passes
    tokens: int = 0  #: response positions generated
    prompt_tokens: int = 0


def weights_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a GPU (half the weight reads of a step, and the tensor cores' type);
    float32 on a CPU, where it is the fast one (and what the tiny models were checked in)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


@dataclass
class AnyToAny:
    model: Transformer
    vocab: Vocab
    text_tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer | None = None
    speech_codec: SpeechTokenizer | None = None  #: speech out only when it `can_decode`
    presets: LengthPresets = field(default_factory=LengthPresets)

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_tokenizer: str | Path | None = None,
                        speech_tokenizer: str | Path | None = None,
                        text_tokenizer: str | Path | None = None, device: str = "cpu",
                        presets: LengthPresets | None = None,
                        speech_decoder: str | Path | None = None,
                        dtype: torch.dtype | None = None) -> "AnyToAny":
        """A checkpoint folder (model, vocab.json, tokenizers.json) and tokenizer folders.

        The text tokenizer defaults to the copy in the checkpoint (`tokenizers.json` names
        it). Every tokenizer is checked against the fingerprint recorded there: a model
        trained on other ids or codes would answer in the wrong language. Presets
        default to `presets.json` in the folder when present. The weights are in `dtype`,
        by default bfloat16 on a GPU and float32 on a CPU (`weights_dtype`); the sampler
        turns the logits to float32 either way.

        A folder in the released model's format (`is_release_folder`) gives a
        `ReleaseAnyToAny`: the same requests, answered with the release's own prompts
        and official sampler settings (`presets` do not apply to it); `speech_decoder`
        (GLM-4-Voice's decoder folder) makes its speech answers audible. For the project's
        own models a bare GLM-4-Voice tokenizer folder speaks through it too; an embedded
        codec speaks itself.
        """
        folder = Path(folder)
        from omni_model.release.model import is_release_folder

        if is_release_folder(folder):
            from omni_model.release.any_to_any import ReleaseAnyToAny

            return ReleaseAnyToAny.from_pretrained(folder, image_tokenizer, speech_tokenizer, text_tokenizer,
                                                   device, dtype or weights_dtype(device),
                                                   speech_decoder=speech_decoder)  # type: ignore[return-value]
        model = Transformer.from_pretrained(folder, dtype=dtype or weights_dtype(device)).to(device).eval()
        vocab = Vocab.load(folder)
        recorded = model_folder.read_tokenizers(folder)
        entry = recorded.get("text")
        if text_tokenizer is None and isinstance(entry, dict):  # the copy inside the checkpoint
            text_tokenizer = model_folder.inside(folder, entry["path"], "the text tokenizer's copy")
        elif text_tokenizer is None:  # older checkpoints recorded the path they were trained with
            text_tokenizer = entry
        text = BPETokenizer.from_pretrained(text_tokenizer) if text_tokenizer else ByteTokenizer()
        _check_fingerprint("text", text, recorded)
        image = speech = None
        if image_tokenizer is not None:
            image = load_image_tokenizer(image_tokenizer, device)
            _check_fingerprint("image", image, recorded)
        if speech_tokenizer is not None:
            speech = load_speech_tokenizer(speech_tokenizer, device)
            _check_fingerprint("speech", speech, recorded)
        if speech_decoder is not None:
            from omni_model.tokenizers.glm4voice import GLM4VoiceDecoder
            from omni_model.tokenizers.speech import GLM4VoiceTokenizer

            if not isinstance(speech, GLM4VoiceTokenizer) or speech.decoder is not None:
                raise ValueError("speech_decoder speaks GLM-4-Voice codes: it needs a bare GLM-4-Voice "
                                 "speech tokenizer folder (an embedded codec decodes its own codes)")
            decoder = GLM4VoiceDecoder.from_folder(speech_decoder, device)
            if decoder.flow.config.vocab_size < speech.codebook_size:
                raise ValueError(f"the speech decoder knows {decoder.flow.config.vocab_size} codes; the speech "
                                 f"tokenizer makes {speech.codebook_size}")
            speech.decoder = decoder
        if presets is None:
            measured = model_folder.read_presets(folder)
            presets = LengthPresets.from_dict(measured) if measured is not None else None
        return cls(model, vocab, text, image, speech, presets or LengthPresets())

    # ------------------------------------------------------------------ requests
    def prepare(self, inputs: Sequence[Input], outputs: Sequence[str],
                lengths: dict[str, int] | None = None) -> Prepared:
        """Inputs and wanted outputs -> prompt ids and the response regions."""
        wanted = _in_order(outputs)
        if len(wanted) != len(outputs) or wanted not in OUTPUTS:
            raise RequestError(f"unsupported outputs {list(outputs)}; supported: "
                               f"{[list(k) for k in OUTPUTS]}")
        if not inputs:
            raise RequestError("a request needs at least one input part")
        parts = [self._part(x) for x in inputs]
        prompt = encode_prompt([Message("user", tuple(parts))], self.text_tokenizer, self.vocab)
        uncond = encode_prompt([Message("user", ())], self.text_tokenizer, self.vocab)
        regions = self._regions(wanted, inputs, lengths or {})
        return Prepared(torch.tensor(prompt), torch.tensor(uncond), regions, wanted)

    def layout(self, prepared: Prepared) -> Layout:
        if OUTPUTS[prepared.outputs] == "spoken":
            text, speech = prepared.regions
            return spoken_layout(self.vocab, text.length + 1 + speech.length,
                                 text.length / (text.length + 1 + speech.length))
        return make_layout(self.vocab, prepared.regions)

    def sampler_for(self, outputs: Sequence[str], config: SamplerConfig = SamplerConfig()) -> SamplerConfig:
        """`config` with the presets' sampler options for this kind of output over it
        (`presets.json`'s `sampler`: the options the evaluation measured)."""
        options = self.preset_options(outputs)
        return sampler_with(config, options, "presets.sampler") if options else config

    def preset_options(self, outputs: Sequence[str]) -> dict:
        """The presets' sampler options for this kind of output (a copy)."""
        return dict(self.presets.sampler.get(OUTPUTS.get(_in_order(outputs), ""), {}))

    def generate(self, inputs: Sequence[Input], outputs: Sequence[str],
                 config: SamplerConfig | None = None, lengths: dict[str, int] | None = None,
                 on_step=None) -> Output:
        """One request: inputs in order, the wanted outputs, sampler options (None: the
        defaults with the presets' options for these outputs, `sampler_for`)."""
        config = self.sampler_for(outputs) if config is None else config
        return self.generate_batch([self.prepare(inputs, outputs, lengths)], config, on_step=on_step)[0]

    def generate_batch(self, requests: Sequence[Prepared], config: SamplerConfig = SamplerConfig(),
                       seeds: Sequence[int] | None = None, on_step=None) -> list[Output]:
        """Prepared requests with equal regions in one sampler call; per-row seeds keep
        each result independent of its batch."""
        if not requests:
            return []
        if any(r.regions != requests[0].regions for r in requests):
            raise RequestError("a batch needs equal output layouts")
        layout = self.layout(requests[0])
        result = sample(self.model, [r.prompt for r in requests], layout, config, pad_id=self.vocab.pad_id,
                        uncond_prompt_ids=[r.uncond for r in requests] if config.cfg_scale > 0 else None,
                        seeds=list(seeds) if seeds is not None else None, on_step=on_step)
        return [self.decode(r, layout, ids, steps)
                for r, ids, steps in zip(requests, result.ids, result.steps)]

    def generate_many(self, requests: Sequence[Prepared], config: SamplerConfig = SamplerConfig(),
                      seeds: Sequence[int] | None = None, batch_size: int = 16,
                      on_batch: Callable[[int], None] | None = None) -> list[Output]:
        """Any prepared requests, in sampler calls of at most `batch_size` requests that
        share a `batch_key`; outputs in the order of `requests`. `on_batch(n)` after each
        call of `n` requests (a progress bar)."""
        seeds = list(seeds) if seeds is not None else [config.seed + i for i in range(len(requests))]
        outputs: list[Output | None] = [None] * len(requests)
        for chunk in batches([batch_key(r, config) for r in requests], batch_size):
            results = self.generate_batch([requests[i] for i in chunk], config, seeds=[seeds[i] for i in chunk])
            for i, out in zip(chunk, results):
                outputs[i] = out
            if on_batch is not None:
                on_batch(len(chunk))
        return outputs  # type: ignore[return-value]

    def decode(self, prepared: Prepared, layout: Layout, ids: torch.Tensor, steps: int = 0) -> Output:
        """Response ids -> output fields, region by region."""
        out = Output(steps=steps, tokens=layout.num_masked, prompt_tokens=len(prepared.prompt))
        for r, region in enumerate(layout.regions):
            region_ids = ids[layout.region_index.to(ids.device) == r].tolist()
            if region.modality == "text":
                kept = _until(region_ids, (self.vocab.im_end_id, self.vocab.pad_id, self.vocab.mask_id))
                out.text = self.text_tokenizer.decode(kept).strip()
            elif region.modality == "image":
                codes = self.vocab.ids_to_image(region_ids)
                out.image_codes = codes.tolist()
                if self.image_tokenizer is not None:
                    out.image = self.image_tokenizer.decode_images(codes[None], self.image_grid())[0]
            else:
                codes = _until(region_ids, (self.vocab.eoa_id, self.vocab.im_end_id, self.vocab.pad_id,
                                            self.vocab.mask_id))
                out.speech_codes = self.vocab.ids_to_speech(codes).tolist() if codes else []
                if codes and self.speech_codec is not None and self.speech_codec.can_decode:
                    out.speech = self.speech_codec.decode([torch.tensor(out.speech_codes)])[0].numpy()
                    out.sample_rate = int(getattr(self.speech_codec, "output_sample_rate", out.sample_rate))
                elif self.speech_codec is not None and self.speech_codec.can_decode:
                    out.speech = np.zeros(0, dtype=np.float32)
        return out

    # ------------------------------------------------------------------ internals
    def _part(self, x: Input) -> Part:
        if isinstance(x, str):
            return Text(x)
        if isinstance(x, PILImage.Image):
            if self.image_tokenizer is None:
                raise RequestError("image input needs an image tokenizer")
            with torch.no_grad():
                codes = self.image_tokenizer.encode([x])[0]
            return Image(tuple(codes.tolist()))
        if isinstance(x, Audio):
            if self.speech_codec is None:
                raise RequestError("speech input needs a speech tokenizer")
            wave = torch.as_tensor(np.asarray(x.waveform, dtype=np.float32))
            if wave.numel() == 0:
                raise RequestError("empty audio input")
            with torch.no_grad():
                codes = self.speech_codec.encode([wave], x.sample_rate)[0]
            return Speech(tuple(codes.tolist()))
        raise RequestError(f"unsupported input part {type(x).__name__}: text, PIL image or Audio")

    def image_grid(self) -> tuple[int, int]:
        """The (rows, cols) code grid of a generated image."""
        if self.presets.image_grid is not None:
            return self.presets.image_grid
        if self.image_tokenizer is None:
            raise RequestError("image output needs an image tokenizer (or presets.image_grid)")
        side = self.image_tokenizer.config.resolution
        return self.image_tokenizer.grid_for(side, side)

    def _regions(self, wanted: tuple[str, ...], inputs: Sequence[Input],
                 lengths: dict[str, int]) -> tuple[Region, ...]:
        p = self.presets
        text_tokens = sum(len(self.text_tokenizer.encode(x)) for x in inputs if isinstance(x, str))
        audio_seconds = sum(x.seconds for x in inputs if isinstance(x, Audio))
        if "speech" in wanted and self.speech_codec is None:
            raise RequestError("speech output needs a speech tokenizer")
        task = OUTPUTS[wanted]
        if task == "spoken":
            total = int(lengths.get("spoken", p.spoken))
            text = int(lengths.get("text", max(1, round(p.boa_fraction * total))))
            return (Region("text", text), Region("speech", max(1, total - 1 - text)))
        regions = []
        for modality in wanted:
            if modality == "text":
                default = p.text
                if audio_seconds and not any(isinstance(x, PILImage.Image) for x in inputs):
                    default = max(p.asr_min, math.ceil(p.asr_tokens_per_second * audio_seconds))
                regions.append(Region("text", int(lengths.get("text", default))))
            elif modality == "image":
                h, w = self.image_grid()
                regions.append(Region("image", h * w))
            else:
                default = min(p.speech_max, max(p.speech_min, math.ceil(p.tts_codes_per_token * text_tokens)))
                regions.append(Region("speech", int(lengths.get("speech", default))))
        return tuple(regions)


def _in_order(outputs: Sequence[str]) -> tuple[str, ...]:
    """The wanted outputs in `OUTPUTS`' order (text, image, speech)."""
    return tuple(o for o in ("text", "image", "speech") if o in set(outputs))


def batch_key(prepared: Prepared, config: SamplerConfig) -> tuple:
    """Requests with equal keys can share a sampler call: equal response layouts and
    sampler options (the seed aside: every row has its own generator)."""
    return prepared.regions, prepared.outputs, replace(config, seed=0)


def batches(keys: Sequence[Hashable], max_size: int | None = None) -> list[list[int]]:
    """Indices of equal keys together, groups in the order their first member comes,
    each cut into runs of at most `max_size` (None: whole groups)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    step = max_size or max(1, len(keys))
    return [members[k:k + step] for members in groups.values() for k in range(0, len(members), step)]


def _until(ids: list[int], stops: tuple[int, ...]) -> list[int]:
    """The ids before the first stop id."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def _check_fingerprint(kind: str, tokenizer: Any, recorded: dict) -> None:
    entry = recorded.get(kind)
    expected = entry.get("fingerprint") if isinstance(entry, dict) else None
    if expected and expected != tokenizer.fingerprint:
        raise ValueError(f"the {kind} tokenizer's fingerprint {tokenizer.fingerprint} is not the "
                         f"{expected} the model was trained with (tokenizers.json)")


__all__ = ["AnyToAny", "Audio", "LengthPresets", "Output", "Prepared", "RequestError", "OUTPUTS", "batch_key",
           "batches"]
